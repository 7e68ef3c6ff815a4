// jobservice page: wires the list, the live connection, the buttons and the viewer.

import { createJob, getJob, listJobs, retryJob } from './js/api.js';
import { Announcer } from './js/announcer.js';
import { Connection } from './js/connection.js';
import { JobList } from './js/list.js';
import { altText } from './js/rows.js';
import { onTick } from './js/ticker.js';
import { now, shortId } from './js/util.js';
import { Viewer } from './js/viewer.js';

const $ = (sel) => document.querySelector(sel);

const ui = {
  list: $('[data-testid="job-list"]'),
  newJob: $('[data-testid="new-job"]'),
  newTen: $('[data-testid="new-ten"]'),
  filter: $('[data-testid="filter"]'),
  badge: $('[data-testid="conn-badge"]'),
  badgeLabel: $('[data-testid="conn-badge"] .conn-label'),
  retryNow: $('[data-action="reconnect"]'),
  counts: {
    pending: $('[data-testid="count-pending"]'),
    resolved: $('[data-testid="count-resolved"]'),
    failed: $('[data-testid="count-failed"]'),
  },
  statButtons: [...document.querySelectorAll('.stat[data-filter-value]')],
  tail: $('#list-end'),
  empty: $('#empty'),
  emptyText: $('#empty .empty-text'),
  notice: $('#notice'),
  live: $('#announcer'),
  viewer: $('[data-testid="viewer"]'),
};

const state = { lastSeq: 0 };
const announcer = new Announcer(ui.live);
const viewer = new Viewer(ui.viewer);
let announceChanges = false; // off while the first list renders

// ---------- list ----------

function describe(job) {
  const name = `Job ${shortId(job.id)}`;
  if (job.status === 'resolved') return `${name} is ready: ${altText(job.image)}.`;
  if (job.status === 'failed') return `${name} failed${job.error ? `: ${job.error}` : ''}.`;
  return `${name} is in the queue.`;
}

const list = new JobList(ui.list, ui.tail, {
  onTransition(prev, job) {
    if (!announceChanges) return;
    if (!prev) {
      announcer.job(job.id, job.status === 'pending' ? 'created' : job.status,
        job.status === 'pending' ? `New job ${shortId(job.id)} is in the queue.` : describe(job));
    } else if (prev.status !== job.status) {
      const kind = job.status === 'pending' ? 'retried' : job.status;
      announcer.job(job.id, kind,
        kind === 'retried' ? `Job ${shortId(job.id)} is pending again.` : describe(job));
    }
  },
  onSummary: renderSummary,
});

const shown = { pending: -1, resolved: -1, failed: -1 };
const EMPTY_TEXT = {
  all: 'No jobs yet. Press “New job” and a food photo will be on its way.',
  pending: 'Nothing pending right now.',
  resolved: 'No photos yet.',
  failed: 'No failed jobs. Good kitchen.',
};

function renderSummary() {
  for (const key of ['pending', 'resolved', 'failed']) {
    const n = list.counts[key];
    if (shown[key] !== n) {
      shown[key] = n;
      ui.counts[key].textContent = String(n);
    }
  }
  const filter = list.filter;
  if (ui.filter.value !== filter) ui.filter.value = filter;
  for (const btn of ui.statButtons) {
    const pressed = String(btn.dataset.filterValue === filter);
    if (btn.getAttribute('aria-pressed') !== pressed) btn.setAttribute('aria-pressed', pressed);
  }
  const more = list.hasMore ? 'Scroll for older jobs…' : '';
  if (ui.tail.textContent !== more) ui.tail.textContent = more;
  const empty = list.loaded && list.shownCount() === 0;
  if (ui.empty.hidden === empty) ui.empty.hidden = !empty;
  if (empty) ui.emptyText.textContent = EMPTY_TEXT[filter] || EMPTY_TEXT.all;
}

function setFilter(value) {
  const v = ['all', 'pending', 'resolved', 'failed'].includes(value) ? value : 'all';
  list.setFilter(v);
}

ui.filter.addEventListener('change', () => setFilter(ui.filter.value));
for (const btn of ui.statButtons) {
  btn.addEventListener('click', () => {
    const v = btn.dataset.filterValue;
    setFilter(list.filter === v ? 'all' : v);
  });
}

// ---------- creating jobs (optimistic) ----------

/**
 * Fetches one job if the event stream has not brought its news: at once when the
 * stream is down, after a grace period when it is live. A REST answer never moves
 * lastSeq (only the stream does), and applying it is harmless (seq decides).
 */
function refreshSoon(id, stillNeeded) {
  const run = async () => {
    if (!stillNeeded()) return;
    try {
      list.apply(await getJob(id));
    } catch {
      // the event stream will bring it after reconnecting
    }
  };
  if (connection.state === 'live') setTimeout(run, 3000);
  else run();
}

async function submitOptimistic(el) {
  try {
    const id = await createJob();
    if (list.confirmOptimistic(el, id)) return;
    refreshSoon(id, () => list.awaiting.has(id));
  } catch (err) {
    list.failOptimistic(el, `Could not create the job: ${err.message}`);
    announcer.say(`Could not create a job: ${err.message}`);
  }
}

function createJobs(n) {
  if (list.filter === 'resolved' || list.filter === 'failed') setFilter('all');
  const rows = [];
  for (let i = 0; i < n; i += 1) rows.push(list.addOptimistic());
  for (const el of rows) submitOptimistic(el);
}

ui.newJob.addEventListener('click', () => createJobs(1));
ui.newTen.addEventListener('click', () => createJobs(10));

// ---------- row actions (one delegated listener) ----------

async function retry(id, button) {
  // aria-disabled, not disabled: a disabled button drops keyboard focus to <body>.
  if (button.getAttribute('aria-disabled') === 'true') return;
  button.setAttribute('aria-disabled', 'true');
  button.textContent = 'Retrying…';
  list.setRowMessage(id, null);
  try {
    await retryJob(id);
  } catch (err) {
    if (err.status !== 409) {
      if (button.isConnected) {
        button.removeAttribute('aria-disabled');
        button.textContent = 'Retry';
      }
      list.setRowMessage(id, `Retry did not go through: ${err.message}`);
      announcer.say(`Retry failed: ${err.message}`);
      return;
    }
    // 409: it is not failed any more; the refresh below shows what it is.
  }
  refreshSoon(id, () => list.jobs.get(id)?.status === 'failed');
}

ui.list.addEventListener('click', (ev) => {
  const target = ev.target instanceof Element ? ev.target.closest('[data-action]') : null;
  if (!target || !ui.list.contains(target)) return;
  const row = target.closest('li.job');
  if (!row) return;
  const id = row.dataset.jobId;
  switch (target.dataset.action) {
    case 'view':
      if (id) viewer.open(list.jobs.get(id), target);
      break;
    case 'retry':
      if (id) retry(id, target);
      break;
    case 'recreate':
      list.retryOptimistic(row);
      submitOptimistic(row);
      break;
    case 'dismiss':
      list.dropOptimistic(row);
      break;
    default:
      break;
  }
});

// A thumbnail that fails to load shows its alt text on the placeholder colour.
ui.list.addEventListener('error', (ev) => {
  const img = ev.target;
  if (img instanceof HTMLImageElement && img.classList.contains('thumb')) {
    img.closest('.job-media')?.classList.add('media-broken');
  }
}, true);

// ---------- live connection ----------

const BADGE_TEXT = { live: 'Live', offline: 'Offline' };
let badgeInfo = {};

function renderBadge() {
  const s = connection.state;
  let text = BADGE_TEXT[s];
  if (s === 'reconnecting') {
    if (badgeInfo.phase === 'waiting') {
      const secs = Math.max(0, Math.ceil((badgeInfo.retryAt - Date.now()) / 1000));
      text = `Reconnecting in ${secs}s`;
    } else if (badgeInfo.phase === 'loading') {
      text = 'Loading…';
    } else if (badgeInfo.phase === 'syncing') {
      text = 'Syncing…';
    } else {
      text = 'Connecting…';
    }
  }
  if (ui.badgeLabel.textContent !== text) ui.badgeLabel.textContent = text;
  const waiting = s === 'reconnecting' && badgeInfo.phase === 'waiting';
  if (ui.retryNow.hidden === waiting) ui.retryNow.hidden = !waiting;
}

let lastAnnouncedState = null;
let everLive = false;

const connection = new Connection({
  async load() {
    const first = !list.loaded;
    const { jobs, seq } = await listJobs();
    list.replaceAll(jobs);
    performance.mark('jobservice:list-rendered');
    requestAnimationFrame(() => setTimeout(() => performance.mark('jobservice:list-painted'), 0));
    let maxSeq = 0;
    for (const job of list.jobs.values()) if (Number.isFinite(job.seq) && job.seq > maxSeq) maxSeq = job.seq;
    // The header is the counter at listing time; replay from there (duplicates are harmless).
    state.lastSeq = seq !== null ? seq : maxSeq;
    ui.notice.hidden = true;
    if (!first) announcer.say('The job list was reloaded.');
    announceChanges = true;
  },
  getSince: () => state.lastSeq,
  onJob(_event, job) {
    if (Number.isFinite(job.seq) && job.seq > state.lastSeq) state.lastSeq = job.seq;
    list.apply(job);
  },
  onSynced(seq) {
    if (seq > state.lastSeq) state.lastSeq = seq;
  },
  onState(s, info) {
    badgeInfo = info || {};
    if (ui.badge.dataset.state !== s) ui.badge.dataset.state = s;
    renderBadge();
    if (!list.loaded && info && info.error) {
      ui.notice.textContent = `Could not load the jobs: ${info.error.message || 'the server did not answer'}. Trying again…`;
      ui.notice.hidden = false;
    }
    if (s !== lastAnnouncedState) {
      if (s === 'live' && everLive) announcer.say('Live updates are back.');
      else if (s === 'offline') announcer.say('You are offline. Updates resume when you reconnect.');
      else if (s === 'reconnecting' && lastAnnouncedState === 'live') announcer.say('Connection lost. Reconnecting.');
      if (s === 'live') everLive = true;
      lastAnnouncedState = s;
    }
  },
});

ui.retryNow.addEventListener('click', () => connection.retryNow());

// ---------- one shared ticker ----------

onTick(() => {
  list.tick(now());
  if (connection.state === 'reconnecting' && badgeInfo.phase === 'waiting') renderBadge();
});

// ---------- test hooks ----------

Object.defineProperty(window, '__jobservice', {
  value: Object.freeze({
    jobs: list.jobs,
    rows: list.rows,
    get lastSeq() { return state.lastSeq; },
    get connection() { return connection.state; },
  }),
  writable: false,
  configurable: false,
});

connection.start();
