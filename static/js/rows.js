// Building and patching one job card. Everything server-provided goes through
// textContent / setAttribute / URL parsing, never through HTML parsing.

import { allowedImageUrl, safeColor } from './images.js';
import {
  UNSPLASH_HOME, externalLink, formatClock, formatCountdown, h, parseTime, plural, shortId, withUtm,
} from './util.js';

// The API's own words for its states, as the tiles say them too.
export const STATUS_LABEL = {
  pending: 'Pending',
  resolved: 'Resolved',
  failed: 'Failed',
  creating: 'Sending',
  error: 'Not created',
};

// The server's errors, said in plain words; the exact text stays in the job's details.
const PLAIN_ERRORS = [
  [/rejected the access key|HTTP 401\b/i, 'Unsplash refused the access key'],
  [/cannot reach Unsplash/i, 'Couldn’t reach Unsplash'],
  [/did not answer within/i, 'Unsplash didn’t answer in time'],
  [/Unsplash answered HTTP (\d+)/i, (m) => `Unsplash answered with an error (HTTP ${m[1]})`],
  [/not photo JSON/i, 'Unsplash sent no photo'],
  [/calls are used up|rate limit/i, 'Unsplash’s limit for the access key was reached'],
  [/internal error/i, 'The service hit an internal error'],
  [/old service/i, 'It failed in the old service'],
];

/** What went wrong, in a short sentence: "Couldn't reach Unsplash. Gave up after 3 attempts." */
export function plainError(job) {
  const raw = job && typeof job.error === 'string' ? job.error : '';
  let what = 'The job failed';
  for (const [pattern, say] of PLAIN_ERRORS) {
    const m = pattern.exec(raw);
    if (m) {
      what = typeof say === 'function' ? say(m) : say;
      break;
    }
  }
  const gaveUp = /gave up after (\d+) attempts?/i.exec(raw);
  const tries = gaveUp ? Number(gaveUp[1]) : null;
  return tries ? `${what}. Gave up after ${plural(tries, 'attempt')}.` : `${what}.`;
}

// Whether the live connection is down: a due job then waits for the server, not the kitchen.
let serverAway = false;

export function setServerAway(away) {
  serverAway = away;
}

// Per-row handles used by the ticker, so it never has to query the DOM.
const pendingParts = new WeakMap();

export function altText(image) {
  const alt = image && typeof image.alt === 'string' ? image.alt.trim() : '';
  return alt || 'Food photo';
}

/** "Photo by NAME on Unsplash" (or "Photo on Unsplash"), linked per Unsplash's guidelines. */
export function buildCredit(image) {
  const p = h('p', { className: 'credit', 'data-testid': 'credit' });
  const unsplash = externalLink(withUtm(UNSPLASH_HOME), 'Unsplash');
  const author = image && typeof image.author === 'string' ? image.author.trim() : '';
  if (author) {
    const href = withUtm(image.authorUrl);
    p.append('Photo by ', href ? externalLink(href, author) : author, ' on ', unsplash);
  } else {
    p.append('Photo on ', unsplash);
  }
  // Shown before: no fresh photo could come in time (the key's budget, or Unsplash).
  const note = image && image.reused === true
    ? (image.source === 'catalog' ? 'catalog photo' : 'reused') : '';
  if (note) {
    p.append(' · ', h('span', {
      className: 'credit-note', 'data-testid': 'reused',
      title: 'No fresh photo could come in time, so this one was shown before.',
      text: note,
    }));
  }
  return p;
}

/** The alt text, linked to the photo's Unsplash page when there is one. */
export function buildAltLine(image, className = 'job-alt') {
  const text = altText(image);
  const href = image ? withUtm(image.pageUrl) : null;
  return h('p', { className }, href ? externalLink(href, text, { className: 'alt-link' }) : text);
}

function timeEl(iso, className) {
  const t = parseTime(iso);
  return h('time', { className, datetime: Number.isFinite(t) ? iso : null, text: formatClock(t) });
}

function head(status, job) {
  return h('div', { className: 'job-head' },
    h('span', { className: 'pill', text: STATUS_LABEL[status] || status }),
    job && job.createdAt ? timeEl(job.createdAt, 'job-time') : null);
}

/** Delete, or for a pending job Cancel: the first step; the card then asks to confirm. */
function deleteButton(job) {
  const verb = job.status === 'pending' ? 'Cancel' : 'Delete';
  return h('button', {
    className: 'btn btn-link job-delete',
    type: 'button',
    'data-action': 'delete',
    'data-testid': 'delete',
    'aria-label': `${verb} job ${shortId(job.id)}`,
    text: verb,
  });
}

/** The short id, a link to the job's details (#job=ID), which any key or click opens. */
function idLink(job) {
  return h('a', {
    className: 'job-id',
    href: `#job=${encodeURIComponent(job.id)}`,
    'data-testid': 'job-link',
    'aria-label': `Details of job ${shortId(job.id)}`,
    text: `#${shortId(job.id)}`,
  });
}

function foot(job) {
  const bits = [idLink(job)];
  if (Number.isInteger(job.attempts) && job.attempts > 0) {
    bits.push(h('span', { className: 'job-attempts', text: `${job.attempts} ${job.attempts === 1 ? 'attempt' : 'attempts'}` }));
  }
  bits.push(deleteButton(job));
  return h('div', { className: 'job-foot' }, ...bits);
}

function pendingMedia(el) {
  const text = document.createTextNode('');
  const bar = h('div', { className: 'progress-bar' });
  const progress = h('div', {
    className: 'progress',
    role: 'progressbar',
    'aria-label': 'Time until due',
    'aria-valuemin': 0,
    'aria-valuemax': 100,
    'aria-valuenow': 0,
    'data-testid': 'progress',
  }, bar);
  const countdown = h('span', { className: 'countdown', 'data-testid': 'countdown' }, text);
  pendingParts.set(el, { text, bar, progress, frac: -1, pct: -1, phase: null });
  return h('div', { className: 'job-media media-pending' },
    h('div', { className: 'wait' }, countdown, h('span', { className: 'wait-label', text: 'to go' })),
    progress);
}

function resolvedMedia(job) {
  const image = job.image && typeof job.image === 'object' ? job.image : null;
  const color = safeColor(image && image.color);
  const thumb = allowedImageUrl(image && image.thumb);
  const small = allowedImageUrl(image && image.small);
  const fallback = thumb || small || allowedImageUrl(job.result);
  const media = h('div', { className: 'job-media media-resolved' });
  if (color) media.style.backgroundColor = color;
  if (!fallback) {
    media.classList.add('media-blocked');
    media.append(h('span', { className: 'media-note', text: 'Image not shown (untrusted source)' }));
    return media;
  }
  // loading/decoding first: an <img> starts fetching as soon as it has a src.
  const img = h('img', {
    className: 'thumb',
    'data-testid': 'thumb',
    loading: 'lazy',
    decoding: 'async',
    width: 400,
    height: 300,
    alt: altText(image),
  });
  if (thumb && small && thumb !== small) {
    // 200w for the phone layout's small square, 400w for the cards
    img.setAttribute('srcset', `${thumb} 200w, ${small} 400w`);
    img.setAttribute('sizes', '(max-width: 560px) 112px, 380px');
  }
  img.src = small || fallback;
  if (color) img.style.backgroundColor = color;
  media.append(h('button', {
    className: 'thumb-btn',
    type: 'button',
    'data-action': 'view',
    'aria-label': `Open photo: ${altText(image)}`,
  }, img));
  return media;
}

function failedMedia() {
  return h('div', { className: 'job-media media-failed' },
    h('span', { className: 'media-icon', 'aria-hidden': 'true', text: '!' }),
    h('span', { className: 'media-note', text: 'No photo this time' }));
}

function creatingMedia(isError) {
  return h('div', { className: `job-media ${isError ? 'media-failed' : 'media-creating'}` },
    isError
      ? h('span', { className: 'media-icon', 'aria-hidden': 'true', text: '!' })
      : h('span', { className: 'spinner', 'aria-hidden': 'true' }),
    h('span', { className: 'media-note', text: isError ? 'Order not placed' : 'Placing order…' }));
}

function jobContent(el, job) {
  const status = job.status;
  if (status === 'pending') {
    const due = parseTime(job.dueAt);
    return [
      pendingMedia(el),
      h('div', { className: 'job-body' },
        head(status, job),
        h('p', { className: 'job-note' },
          Number.isFinite(due) ? 'Due at ' : 'Waiting for the kitchen',
          Number.isFinite(due) ? timeEl(job.dueAt, 'job-due') : null),
        foot(job)),
    ];
  }
  if (status === 'resolved') {
    const image = job.image && typeof job.image === 'object' ? job.image : null;
    return [
      resolvedMedia(job),
      h('div', { className: 'job-body' },
        head(status, job),
        buildAltLine(image),
        buildCredit(image),
        foot(job)),
    ];
  }
  // failed
  return [
    failedMedia(),
    h('div', { className: 'job-body' },
      head(status, job),
      h('p', { className: 'job-error', 'data-testid': 'error', text: plainError(job) }),
      h('div', { className: 'job-actions' },
        h('button', {
          className: 'btn btn-small', type: 'button', 'data-action': 'retry', 'data-testid': 'retry', text: 'Retry',
        })),
      foot(job)),
  ];
}

// A row is a light shell (<li> with data-job-id / data-status) until it first comes
// near the viewport; then its content is built once and patched in place after.
const built = new WeakSet();

const shellTemplate = document.createElement('li');
shellTemplate.className = 'job';

export function buildShell(job) {
  const el = shellTemplate.cloneNode(false);
  el.setAttribute('data-job-id', job.id);
  el.setAttribute('data-status', job.status);
  return el;
}

export function isBuilt(el) {
  return built.has(el);
}

/** Builds (or rebuilds) the card's content. */
export function renderRow(el, job) {
  pendingParts.delete(el);
  el.replaceChildren(...jobContent(el, job));
  built.add(el);
}

/**
 * Re-renders one card in place: the <li> stays, only its attributes and (if it
 * was built) its children change.
 */
export function patchRow(el, job) {
  if (el.dataset.status !== job.status) el.dataset.status = job.status;
  if (el.dataset.jobId !== job.id) el.dataset.jobId = job.id;
  if ('phase' in el.dataset) delete el.dataset.phase;
  if ('optimistic' in el.dataset) delete el.dataset.optimistic;
  if (built.has(el)) renderRow(el, job);
}

/** Updates the countdown and progress bar of a pending card. Writes only what changed. */
export function tickRow(el, job, t) {
  const parts = pendingParts.get(el);
  if (!parts) return;
  const due = parseTime(job.dueAt);
  const created = parseTime(job.createdAt);
  let text;
  let frac;
  let phase = null; // past due: 'fetching', or 'waiting' for the server to be back
  if (!Number.isFinite(due)) {
    text = 'queued';
    frac = 0;
  } else if (due - t <= 0) {
    text = serverAway ? 'waiting for the server' : 'fetching…';
    frac = 1;
    phase = serverAway ? 'waiting' : 'fetching';
  } else {
    text = formatCountdown(due - t);
    const span = due - created;
    frac = Number.isFinite(span) && span > 0 ? Math.min(1, Math.max(0, (t - created) / span)) : 0;
  }
  if (parts.text.data !== text) parts.text.data = text;
  if (phase !== parts.phase) {
    parts.phase = phase;
    if (phase) el.dataset.phase = phase;
    else delete el.dataset.phase;
  }
  const rounded = Math.round(frac * 1000) / 1000;
  if (rounded !== parts.frac) {
    parts.frac = rounded;
    parts.bar.style.transform = `scaleX(${rounded})`;
  }
  const pct = Math.round(frac * 100);
  if (pct !== parts.pct) {
    parts.pct = pct;
    parts.progress.setAttribute('aria-valuenow', String(pct));
  }
}

// ---- optimistic rows (a job being created, before the server has answered) ----

export function buildOptimisticRow(localId) {
  const el = h('li', { className: 'job' });
  el.dataset.status = 'creating';
  el.dataset.optimistic = localId;
  fillOptimistic(el, null);
  return el;
}

export function fillOptimistic(el, message) {
  const isError = message !== null;
  el.dataset.status = isError ? 'error' : 'creating';
  const body = h('div', { className: 'job-body' }, head(isError ? 'error' : 'creating', null));
  if (isError) {
    body.append(
      h('p', { className: 'job-error', 'data-testid': 'error', text: message }),
      h('div', { className: 'job-actions' },
        h('button', { className: 'btn btn-small', type: 'button', 'data-action': 'recreate', text: 'Try again' }),
        h('button', { className: 'btn btn-small btn-ghost', type: 'button', 'data-action': 'dismiss', text: 'Dismiss' })),
    );
  } else {
    body.append(h('p', { className: 'job-note', text: 'Sending the order to the kitchen…' }));
  }
  el.replaceChildren(creatingMedia(isError), body);
}

/** A short message under a card's actions (e.g. a retry that did not go through). */
export function setRowMessage(el, message) {
  let msg = el.querySelector('.row-msg');
  if (!message) {
    if (msg) msg.remove();
    return;
  }
  if (!msg) {
    msg = h('p', { className: 'row-msg' });
    const actions = el.querySelector('.job-actions');
    (actions || el.lastElementChild || el).after(msg);
  }
  msg.textContent = message;
}

// ---- the in-card confirmation of Delete / Cancel ----

/**
 * Opens the card's confirmation (Confirm / Keep) in place of its Delete button and
 * moves focus to Keep, the safe choice. Returns the confirmation.
 */
export function openConfirm(el) {
  const open = el.querySelector('.confirm');
  if (open) {
    open.querySelector('[data-action="keep"]').focus();
    return open;
  }
  const trigger = el.querySelector('[data-action="delete"]');
  const pending = el.dataset.status === 'pending';
  const question = pending ? 'Cancel this job? No photo will be fetched.' : 'Delete this job for good?';
  const keep = h('button', {
    className: 'btn btn-small', type: 'button', 'data-action': 'keep', 'data-testid': 'keep', text: 'Keep',
  });
  const box = h('div', {
    className: 'confirm', role: 'group', 'aria-label': question, 'data-testid': 'confirm',
  },
  h('p', { className: 'confirm-text', text: question }),
  h('div', { className: 'confirm-actions' },
    h('button', {
      className: 'btn btn-small btn-danger',
      type: 'button',
      'data-action': 'confirm-delete',
      'data-testid': 'confirm-delete',
      'data-verb': pending ? 'cancel' : 'delete',
      text: 'Confirm',
    }),
    keep));
  if (trigger) trigger.hidden = true;
  const anchor = el.querySelector('.job-foot');
  if (anchor) anchor.before(box);
  else el.append(box);
  keep.focus();
  return box;
}

/** Closes the confirmation; with refocus, focus goes back to the Delete button. */
export function closeConfirm(el, refocus) {
  const box = el.querySelector('.confirm');
  if (box) box.remove();
  const trigger = el.querySelector('[data-action="delete"]');
  if (trigger) {
    trigger.hidden = false;
    if (refocus) trigger.focus();
  }
}
