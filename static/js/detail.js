// A job's details: a modal <dialog>, opened by a URL (#job=ID), by a card's id link or
// by the search. It shows the job as the server has it (fetched as it opens, then kept
// current by the live events): the whole id with a copy button; when it was created,
// due and finished, with relative times and how long it took; its attempts; the exact
// error; the photo with its credit and link. Escape, the close button or a click on
// the backdrop close it; focus goes back to what opened it.

import { allowedImageUrl, safeColor } from './images.js';
import {
  STATUS_LABEL, altText, buildAltLine, buildCredit, plainError,
} from './rows.js';
import {
  formatDateTime, formatDuration, formatRelative, h, now, parseTime, plural, shortId,
} from './util.js';

const HASH = /^#job=(.+)$/;

/** The job id a URL's hash names (#job=ID), or null. */
export function jobFromHash(hash) {
  const m = HASH.exec(hash || '');
  if (!m) return null;
  try {
    return decodeURIComponent(m[1]);
  } catch {
    return null;
  }
}

export class Detail {
  /**
   * @param {HTMLDialogElement} dialog
   * @param {object} hooks
   * @param {(id: string) => Promise<object>} hooks.fetchJob  rejects with an ApiError (404: none)
   * @param {() => void} hooks.onClose
   */
  constructor(dialog, hooks) {
    this.dialog = dialog;
    this.hooks = hooks;
    this.title = dialog.querySelector('.detail-title');
    this.body = dialog.querySelector('.detail-body');
    this.id = null;
    this.job = null;
    this.opener = null;
    this.asked = 0; // bumped per open: an answer to an older one is dropped
    dialog.querySelector('[data-action="close-detail"]').addEventListener('click', () => this.close());
    dialog.addEventListener('click', (ev) => {
      if (ev.target === dialog) this.close(); // the backdrop
    });
    dialog.addEventListener('close', () => {
      this.id = null;
      this.job = null;
      const opener = this.opener;
      this.opener = null;
      if (opener && opener.isConnected) opener.focus({ preventScroll: true });
      this.hooks.onClose();
    });
  }

  get isOpen() {
    return this.dialog.open;
  }

  /** Opens the job's details; `known` is what the page holds of it already, if anything. */
  open(id, known, opener) {
    const asked = ++this.asked;
    if (!this.dialog.open) this.opener = opener || document.activeElement;
    this.id = id;
    this.job = null;
    if (known) this.show(known);
    else this.say(`Job ${shortId(id)}`, 'Loading…');
    if (!this.dialog.open) this.dialog.showModal();
    this.hooks.fetchJob(id).then((job) => {
      if (asked === this.asked && this.id === id) this.update(job);
    }, (err) => {
      if (asked !== this.asked || this.id !== id) return;
      if (err.status === 404) this.gone(id);
      else if (!this.job) this.say(`Job ${shortId(id)}`, `Could not load this job: ${err.message}`);
    });
  }

  close() {
    if (this.dialog.open) this.dialog.close();
  }

  /** A newer state of the job shown (an event, or the fetch). */
  update(job) {
    if (!this.dialog.open || !job || job.id !== this.id) return;
    const held = this.job;
    if (held && Number.isFinite(held.seq) && Number.isFinite(job.seq) && job.seq <= held.seq) return;
    this.show(job);
  }

  /** The job shown was deleted (or never was). */
  gone(id) {
    if (!this.dialog.open || id !== this.id) return;
    this.job = null;
    this.say(`Job ${shortId(id)}`, `There is no job ${id} (any more): it was deleted, or it expired.`);
  }

  say(title, text) {
    this.title.textContent = title;
    this.body.replaceChildren(h('p', { className: 'detail-note', 'data-testid': 'detail-note', text }));
  }

  show(job) {
    this.job = job;
    const status = job.status;
    this.title.replaceChildren(`Job ${shortId(job.id)} `,
      h('span', { className: `pill pill-${status}`, text: STATUS_LABEL[status] || status }));
    const created = parseTime(job.createdAt);
    const due = parseTime(job.dueAt);
    const finished = parseTime(job.resolvedAt);
    const facts = h('dl', { className: 'detail-facts' });
    const fact = (label, ...value) => facts.append(h('dt', { text: label }), h('dd', null, ...value));
    const copyNote = h('span', { className: 'copy-note', role: 'status' });
    const copy = h('button', {
      className: 'btn btn-small', type: 'button', 'data-testid': 'copy-id', text: 'Copy',
      'aria-label': 'Copy the job id',
    });
    const code = h('code', { className: 'detail-id', 'data-testid': 'detail-id', text: job.id });
    copy.addEventListener('click', () => copyText(job.id, code, copyNote));
    fact('Id', code, ' ', copy, ' ', copyNote);
    fact('Status', STATUS_LABEL[status] || status);
    fact('Created', moment(job.createdAt, created));
    fact(status === 'pending' ? 'Due' : 'Was due', moment(job.dueAt, due));
    if (status !== 'pending') {
      fact(status === 'failed' ? 'Failed' : 'Resolved', moment(job.resolvedAt, finished));
      if (Number.isFinite(finished) && Number.isFinite(created)) {
        fact('Took', h('span', { 'data-testid': 'detail-took', text: formatDuration(finished - created) }));
      }
    }
    const attempts = Number.isInteger(job.attempts) ? job.attempts : 0;
    fact('Attempts', h('span', {
      'data-testid': 'detail-attempts',
      text: attempts ? plural(attempts, 'call') + ' to Unsplash' : 'none',
    }));
    const parts = [facts];
    if (status === 'failed') {
      parts.push(h('div', { className: 'detail-error' },
        h('p', { className: 'job-error', text: plainError(job) }),
        h('p', { className: 'detail-label', text: 'The exact error:' }),
        h('pre', { className: 'detail-raw', 'data-testid': 'detail-error', text: job.error || '(none recorded)' })));
    }
    if (status === 'resolved') parts.push(photo(job));
    this.body.replaceChildren(...parts);
    this.relate(now());
  }

  /** Relative times move on while it is open (the shared ticker calls this). */
  tick(t) {
    if (this.dialog.open) this.relate(t);
  }

  relate(t) {
    for (const el of this.body.querySelectorAll('.detail-rel')) {
      const text = `(${formatRelative(Number(el.dataset.t), t)})`;
      if (el.textContent !== text) el.textContent = text;
    }
  }
}

function moment(iso, t) {
  if (!Number.isFinite(t)) return 'not yet';
  return h('span', null,
    h('time', { datetime: iso, text: formatDateTime(t) }), ' ',
    h('span', { className: 'detail-rel', dataset: { t: String(t) } }));
}

function photo(job) {
  const image = job.image && typeof job.image === 'object' ? job.image : null;
  const src = allowedImageUrl(image && image.small) || allowedImageUrl(image && image.thumb)
    || allowedImageUrl(job.result);
  const figure = h('figure', { className: 'detail-photo', 'data-testid': 'detail-photo' });
  if (src) {
    const img = h('img', {
      className: 'detail-img', alt: altText(image), width: 400, height: 300, decoding: 'async',
    });
    const color = safeColor(image && image.color);
    if (color) img.style.backgroundColor = color;
    img.src = src;
    figure.append(img);
  }
  figure.append(h('figcaption', null, buildAltLine(image, 'detail-alt'), buildCredit(image)));
  return figure;
}

async function copyText(text, source, note) {
  try {
    await navigator.clipboard.writeText(text);
    note.textContent = 'Copied.';
  } catch {
    // No clipboard here (an insecure origin, or refused): select it for Ctrl+C instead.
    const range = document.createRange();
    range.selectNodeContents(source);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    note.textContent = 'Selected: press Ctrl+C to copy.';
  }
}
