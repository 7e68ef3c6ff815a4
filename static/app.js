// jobservice page: wires the list, the live connection, the buttons, the search, the
// bulk actions, a job's details and the viewer, behind the login form when the server
// wants a token.

import {
  ApiError, bulkChange, closeSession, createJob, deleteJob, findJobs, firstPageUrl, getJob,
  getPhotoStatus, getSession, getStats, listPage, retryJob, setUnauthorizedHandler,
} from './js/api.js';
import { Announcer } from './js/announcer.js';
import { BulkActions } from './js/bulk.js';
import { Connection } from './js/connection.js';
import { Detail, jobFromHash } from './js/detail.js';
import { JobList } from './js/list.js';
import { LoginForm } from './js/login.js';
import {
  STATUS_LABEL, altText, closeConfirm, openConfirm, plainError, setServerAway,
} from './js/rows.js';
import { onTick } from './js/ticker.js';
import {
  formatClock, h, now, parseTime, plural, shortId,
} from './js/util.js';
import { Viewer } from './js/viewer.js';

const $ = (sel) => document.querySelector(sel);

const ui = {
  list: $('[data-testid="job-list"]'),
  newJob: $('[data-testid="new-job"]'),
  newTen: $('[data-testid="new-ten"]'),
  listCount: $('[data-testid="list-count"]'),
  find: $('[data-testid="find"]'),
  findInput: $('[data-testid="find-input"]'),
  findResults: $('[data-testid="find-results"]'),
  bulk: $('[data-testid="bulk"]'),
  detail: $('[data-testid="detail"]'),
  badge: $('[data-testid="conn-badge"]'),
  badgeLabel: $('[data-testid="conn-badge"] .conn-label'),
  retryNow: $('[data-action="reconnect"]'),
  stats: $('[data-testid="stats"]'),
  counts: {
    total: $('[data-testid="count-total"]'),
    pending: $('[data-testid="count-pending"]'),
    resolved: $('[data-testid="count-resolved"]'),
    failed: $('[data-testid="count-failed"]'),
  },
  statButtons: [...document.querySelectorAll('.stat[data-filter-value]')],
  tail: $('#list-end'),
  empty: $('#empty'),
  emptyText: $('#empty .empty-text'),
  notice: $('#notice'),
  photoNotice: $('#photo-notice'),
  live: $('#announcer'),
  viewer: $('[data-testid="viewer"]'),
  board: $('#board'),
  login: $('[data-testid="login"]'),
  logout: $('[data-testid="logout"]'),
  actions: $('.topbar .actions'),
  conn: $('.topbar .conn'),
  skip: $('.skip-link'),
};

const state = { lastSeq: 0 };
// required: the server wants a token; active: the board is on (logged in, or no token
// needed); epoch: bumped on every logout, so answers to requests from before are dropped.
const session = {
  required: false, active: false, epoch: 0, checking: false,
};
const announcer = new Announcer(ui.live);
const viewer = new Viewer(ui.viewer);
let announceChanges = false; // off while the first list renders

// ---------- list ----------

function describe(job) {
  const name = `Job ${shortId(job.id)}`;
  if (job.status === 'resolved') return `${name} resolved: ${altText(job.image)}.`;
  if (job.status === 'failed') return `${name} failed: ${plainError(job)}`;
  return `${name} is in the queue.`;
}

const list = new JobList(ui.list, ui.tail, {
  fetchPage: listPage,
  firstUrl: firstPageUrl,
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
  onRemoved(job, reason) {
    if (!announceChanges || !job) return;
    const name = `Job ${shortId(job.id)}`;
    let detail = `${name} was deleted.`;
    if (reason === 'expired') detail = `${name} expired and was removed.`;
    else if (job.status === 'pending') detail = `${name} was cancelled.`;
    announcer.job(job.id, 'deleted', detail);
  },
  onSummary: renderSummary,
});

const EMPTY_TEXT = {
  all: 'No jobs yet. Press “New job” and a food photo will be on its way.',
  pending: 'Nothing pending right now.',
  resolved: 'No photos yet.',
  failed: 'No failed jobs. Good kitchen.',
};

function renderSummary() {
  const filter = list.filter;
  for (const btn of ui.statButtons) {
    const pressed = String(btn.dataset.filterValue === filter);
    if (btn.getAttribute('aria-pressed') !== pressed) btn.setAttribute('aria-pressed', pressed);
  }
  let tail = '';
  if (list.error) {
    tail = `Could not load ${list.loaded ? 'older ' : 'the '}jobs: ${list.error.message} Trying again…`;
  } else if (!list.loaded || (list.fetching && list.edge >= list.order.length)) {
    tail = list.loaded ? 'Loading older jobs…' : 'Loading jobs…';
  } else if (list.hasMore) {
    tail = 'Scroll for older jobs…';
  }
  if (ui.tail.textContent !== tail) ui.tail.textContent = tail;
  const busy = String(!list.loaded);
  if (ui.list.getAttribute('aria-busy') !== busy) ui.list.setAttribute('aria-busy', busy);
  const empty = list.complete && list.shownCount() === 0;
  if (ui.empty.hidden === empty) ui.empty.hidden = !empty;
  if (empty) ui.emptyText.textContent = EMPTY_TEXT[filter] || EMPTY_TEXT.all;
  renderCount();
}

/** "100 of 3,015 jobs": the cards loaded, of what the server holds for the filter. */
function renderCount() {
  const filter = list.filter;
  const all = filter === 'all' ? totals.shown.total : totals.shown[filter];
  let text = '';
  if (list.loaded && Number.isFinite(all)) {
    const noun = filter === 'all' ? 'job' : `${filter} job`;
    text = `${numberFormat.format(Math.min(list.order.length, all))} of ${plural(all, noun)}`;
  }
  if (ui.listCount.textContent !== text) ui.listCount.textContent = text;
}

function setFilter(value) {
  const v = ['all', 'pending', 'resolved', 'failed'].includes(value) ? value : 'all';
  list.setFilter(v);
}

for (const btn of ui.statButtons) {
  btn.addEventListener('click', () => {
    const v = btn.dataset.filterValue;
    setFilter(list.filter === v ? 'all' : v);
  });
}

// ---------- totals (the server counts; refetched, at most every 500 ms, as things change) ----------

const TOTALS_EVERY = 500;
const numberFormat = new Intl.NumberFormat();
const totals = {
  seq: -1, shown: {}, timer: null, inflight: false, again: false, lastStart: -Infinity,
  owed: false,
};

function renderTotals(stats) {
  for (const key of ['total', 'pending', 'resolved', 'failed']) {
    const n = stats[key];
    if (totals.shown[key] !== n) {
      totals.shown[key] = n;
      ui.counts[key].textContent = numberFormat.format(n);
      ui.counts[key].dataset.value = String(n);
    }
  }
  if (ui.stats.getAttribute('aria-busy') !== 'false') ui.stats.setAttribute('aria-busy', 'false');
  renderCount();
  bulk.refresh();
}

async function fetchTotals() {
  const { epoch } = session;
  totals.timer = null;
  totals.owed = false;
  totals.inflight = true;
  totals.lastStart = Date.now();
  let retryIn = 0;
  try {
    const stats = await getStats();
    if (epoch !== session.epoch) return; // logged out meanwhile
    const seq = Number.isFinite(stats.seq) ? stats.seq : totals.seq;
    if (seq >= totals.seq) {
      totals.seq = seq;
      renderTotals(stats);
      if (!performance.getEntriesByName('jobservice:totals-shown').length) {
        performance.mark('jobservice:totals-shown');
      }
    }
  } catch {
    if (epoch !== session.epoch) return;
    retryIn = 3000; // the next change, this retry, or the stream's return brings them
  } finally {
    if (epoch === session.epoch) totals.inflight = false;
  }
  if (totals.again) {
    totals.again = false;
    refreshTotals();
  } else if (retryIn) {
    refreshTotals(retryIn);
  }
}

/** Refetches the totals soon: a burst of changes is one request, at most every 500 ms. */
function refreshTotals(delay = 50) {
  if (!session.active) return;
  if (totals.inflight) {
    totals.again = true;
    return;
  }
  if (totals.timer !== null) return;
  const wait = Math.max(delay, totals.lastStart + TOTALS_EVERY - Date.now());
  totals.timer = setTimeout(refreshDue, wait);
}

/**
 * A refresh that comes due while the event stream is down is owed, not made: the
 * stream's return refreshes the totals anyway, and a server that is away, or back
 * wanting another token, is not asked in the meantime.
 */
function refreshDue() {
  totals.timer = null;
  if (connection.state === 'live') fetchTotals();
  else totals.owed = true;
}

/** At once (first load, RESET): a store may have been replaced, so any seq goes. */
function reloadTotals() {
  if (!session.active) return;
  totals.seq = -1;
  if (totals.timer !== null) {
    clearTimeout(totals.timer);
    totals.timer = null;
  }
  if (totals.inflight) totals.again = true;
  else fetchTotals();
}

/** Back to "not known yet" (logging out). */
function resetTotals() {
  if (totals.timer !== null) clearTimeout(totals.timer);
  Object.assign(totals, {
    seq: -1, shown: {}, timer: null, inflight: false, again: false, lastStart: -Infinity,
    owed: false,
  });
  for (const el of Object.values(ui.counts)) {
    el.textContent = '–';
    delete el.dataset.value;
  }
  ui.stats.setAttribute('aria-busy', 'true');
  renderCount();
}

// ---------- bulk actions ----------

const bulk = new BulkActions(ui.bulk, {
  counts() {
    const { pending, resolved, failed } = totals.shown;
    return [pending, resolved, failed].every(Number.isFinite) ? { pending, resolved, failed } : null;
  },
  async run(kind) {
    const answer = await bulkChange(kind);
    refreshTotals();
    return answer;
  },
});

// ---------- a job's details (#job=ID), and finding a job by its id ----------

const detail = new Detail(ui.detail, {
  fetchJob: getJob,
  onClose() {
    // The URL no longer names a job; no new history entry for closing.
    if (jobFromHash(window.location.hash)) {
      window.history.replaceState(null, '', `${window.location.pathname}${window.location.search}`);
    }
  },
});

/** Opens the details the URL names (a link followed, a URL opened, Back or Forward). */
function followHash() {
  if (!session.active) return;
  const id = jobFromHash(window.location.hash);
  if (!id) detail.close();
  else if (!detail.isOpen || detail.id !== id) detail.open(id, list.jobs.get(id));
}

window.addEventListener('hashchange', followHash);

/** Shows a job found by the search, and names it in the URL. */
function showFound(job) {
  window.history.pushState(null, '', `#job=${encodeURIComponent(job.id)}`);
  detail.open(job.id, job, ui.findInput);
}

function findSays(text, links = []) {
  ui.findResults.replaceChildren(text, ...(links.length ? [h('ul', { className: 'find-list' }, ...links)] : []));
}

ui.find.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  let wanted = ui.findInput.value.trim().replace(/^#/, '');
  if (/^[0-9a-f-]+$/i.test(wanted)) wanted = wanted.toLowerCase(); // ids are lowercase hex
  if (!wanted) {
    findSays('Type a job id, or its first characters.');
    return;
  }
  const { epoch } = session;
  findSays('Looking…');
  let found;
  try {
    found = await findJobs(wanted, 10);
  } catch (err) {
    if (epoch === session.epoch) findSays(`The search did not go through: ${err.message}`);
    return;
  }
  if (epoch !== session.epoch) return;
  if (found.length === 1) {
    findSays(`Found job ${shortId(found[0].id)}.`);
    showFound(found[0]);
  } else if (!found.length) {
    findSays(`No job has an id that starts with “${wanted}”.`);
  } else {
    const more = found.length === 10 ? ' (the first 10; type more of the id)' : '';
    findSays(`${found.length} jobs have an id that starts with “${wanted}”${more}:`, found.map((job) => h('li', null,
      h('a', { href: `#job=${encodeURIComponent(job.id)}`, text: `#${shortId(job.id)}` }),
      ` ${STATUS_LABEL[job.status] || job.status}, created ${formatClock(parseTime(job.createdAt))}`)));
  }
});

// ---------- photos: say so when fresh ones cannot be had ----------

// Asked when the list loads and when a reused photo arrives (at most every 5 s), and
// again every minute while the notice shows, so that it goes once fresh photos are back.
const photoCheck = {
  timer: null, at: 0, inflight: false, lastStart: -Infinity,
};
const PHOTO_CHECK_SOON = 5000;
const PHOTO_CHECK_AGAIN = 60000;

function photoNoticeText(photos) {
  const never = photos.reuse === 'never';
  const meanwhile = never ? 'new jobs wait for one' : 'new jobs show photos used before';
  if (photos.state === 'key_rejected') {
    const jobs = never ? 'new jobs fail' : 'new jobs show photos used before';
    return `Unsplash rejected the service's access key, so no fresh photos can be bought: ${jobs}. `
      + 'Whoever runs the service must set a valid UNSPLASH_ACCESS_KEY.';
  }
  if (photos.state === 'spent') {
    const until = formatClock(parseTime(photos.windowTurnsAt));
    const limit = Number.isInteger(photos.limit) ? ` (the key allows ${photos.limit} calls an hour)` : '';
    return `Fresh photos are used up for now${limit}: ${meanwhile}${until ? ` until ${until}` : ''}.`;
  }
  if (photos.state === 'unavailable') return `Unsplash is not answering right now: ${meanwhile} until it does.`;
  return '';
}

async function checkPhotos() {
  const { epoch } = session;
  photoCheck.timer = null;
  if (photoCheck.inflight || !session.active) return;
  photoCheck.inflight = true;
  photoCheck.lastStart = Date.now();
  let photos = null;
  try {
    photos = await getPhotoStatus();
  } catch {
    photos = null; // the next check, or the next reused photo, asks again
  } finally {
    photoCheck.inflight = false;
  }
  if (epoch !== session.epoch) return;
  const text = photos ? photoNoticeText(photos) : '';
  if (ui.photoNotice.textContent !== text) ui.photoNotice.textContent = text;
  ui.photoNotice.hidden = !text;
  if (text) {
    ui.photoNotice.dataset.state = photos.state;
    schedulePhotoCheck(PHOTO_CHECK_AGAIN);
  }
}

/** A check `delay` after the last one began, unless one is due sooner already. */
function schedulePhotoCheck(delay) {
  if (!session.active) return;
  const at = Math.max(Date.now(), photoCheck.lastStart + delay);
  if (photoCheck.timer !== null) {
    if (photoCheck.at <= at) return;
    clearTimeout(photoCheck.timer);
  }
  photoCheck.at = at;
  photoCheck.timer = setTimeout(checkPhotos, at - Date.now());
}

function resetPhotoNotice() {
  if (photoCheck.timer !== null) clearTimeout(photoCheck.timer);
  photoCheck.timer = null;
  ui.photoNotice.hidden = true;
  ui.photoNotice.textContent = '';
}

// ---------- creating jobs (optimistic) ----------

/**
 * Fetches one job if the event stream has not brought its news: at once when the
 * stream is down, after a grace period when it is live. A REST answer never moves
 * lastSeq (only the stream does), and applying it is harmless (seq decides).
 */
function refreshSoon(id, stillNeeded) {
  const { epoch } = session;
  const run = async () => {
    if (epoch !== session.epoch || !stillNeeded()) return;
    try {
      const job = await getJob(id);
      if (epoch === session.epoch) list.apply(job);
    } catch {
      // the event stream will bring it after reconnecting
    }
  };
  if (connection.state === 'live') setTimeout(run, 3000);
  else run();
}

async function submitOptimistic(el) {
  const { epoch } = session;
  try {
    const id = await createJob();
    if (epoch !== session.epoch) return;
    if (list.confirmOptimistic(el, id)) return;
    refreshSoon(id, () => list.awaiting.has(id));
  } catch (err) {
    if (epoch !== session.epoch) return; // logged out: the row is gone already
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
  const { epoch } = session;
  try {
    await retryJob(id);
  } catch (err) {
    if (epoch !== session.epoch) return;
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

async function remove(id, row, button) {
  if (button.getAttribute('aria-disabled') === 'true') return;
  const cancel = button.dataset.verb === 'cancel';
  button.setAttribute('aria-disabled', 'true');
  button.textContent = cancel ? 'Cancelling…' : 'Deleting…';
  const { epoch } = session;
  try {
    await deleteJob(id);
  } catch (err) {
    if (epoch !== session.epoch) return;
    if (err.status !== 404) {
      // Still there: the card says why, and focus goes back to its Delete button.
      if (row.isConnected) {
        const hadFocus = row.contains(document.activeElement);
        closeConfirm(row, hadFocus);
      }
      const what = cancel ? 'Cancel' : 'Delete';
      list.setRowMessage(id, `${what} did not go through: ${err.message}`);
      announcer.say(`${what} failed: ${err.message}`);
      return;
    }
    // 404: it is gone already (deleted elsewhere, or expired).
  }
  if (epoch !== session.epoch) return;
  list.remove(id, 'deleted');
  refreshTotals();
}

// Escape inside a card's confirmation is "Keep".
ui.list.addEventListener('keydown', (ev) => {
  if (ev.key !== 'Escape' || !(ev.target instanceof Element)) return;
  const box = ev.target.closest('.confirm');
  const row = box && box.closest('li.job');
  if (row) {
    ev.preventDefault();
    closeConfirm(row, true);
  }
});

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
    case 'delete':
      if (id) {
        list.setRowMessage(id, null);
        openConfirm(row);
      }
      break;
    case 'keep':
      closeConfirm(row, true);
      break;
    case 'confirm-delete':
      if (id) remove(id, row, target);
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
let everLoaded = false;

const connection = new Connection({
  async load() {
    const { epoch } = session;
    const first = !list.loaded && !everLoaded;
    reloadTotals();
    const page = await list.reload();
    if (epoch !== session.epoch || !page) throw new ApiError(0, 'stale', 'Logged out.');
    everLoaded = true;
    performance.mark('jobservice:list-rendered');
    requestAnimationFrame(() => setTimeout(() => performance.mark('jobservice:list-painted'), 0));
    let maxSeq = 0;
    for (const job of list.jobs.values()) if (Number.isFinite(job.seq) && job.seq > maxSeq) maxSeq = job.seq;
    // The header is the counter at listing time; replay from there (duplicates are harmless).
    state.lastSeq = page.seq !== null ? page.seq : maxSeq;
    ui.notice.hidden = true;
    if (!first) announcer.say('The job list was reloaded.');
    announceChanges = true;
    checkPhotos();
  },
  getSince: () => state.lastSeq,
  onJob(_event, job) {
    if (Number.isFinite(job.seq) && job.seq > state.lastSeq) state.lastSeq = job.seq;
    list.apply(job);
    detail.update(job);
    refreshTotals();
    // A reused photo may mean news; a fresh one while the notice shows, that it is over.
    if (job.image && (job.image.reused === true || !ui.photoNotice.hidden)) {
      schedulePhotoCheck(PHOTO_CHECK_SOON);
    }
  },
  onDeleted(info) {
    if (Number.isFinite(info.seq) && info.seq > state.lastSeq) state.lastSeq = info.seq;
    list.remove(info.id, info.reason === 'expired' ? 'expired' : 'deleted');
    detail.gone(info.id);
    refreshTotals();
  },
  onSynced(seq) {
    if (seq > state.lastSeq) state.lastSeq = seq;
  },
  onState(s, info) {
    badgeInfo = info || {};
    setServerAway(s !== 'live'); // due cards wait for the server, not the kitchen
    list.tick(now());
    if (ui.badge.dataset.state !== s) ui.badge.dataset.state = s;
    renderBadge();
    if (!list.loaded && info && info.error) {
      ui.notice.textContent = `Could not load the jobs: ${info.error.message || 'the server did not answer'}. Trying again…`;
      ui.notice.hidden = false;
    }
    if (s === 'live' && everLive) list.retrySoon(); // a page that failed while we were away
    if (s === 'live' && (everLive || totals.owed)) refreshTotals(); // what changed meanwhile
    if (s !== lastAnnouncedState) {
      if (s === 'live' && everLive) announcer.say('Live updates are back.');
      else if (s === 'offline') announcer.say('You are offline. Updates resume when you reconnect.');
      else if (s === 'reconnecting' && lastAnnouncedState === 'live') announcer.say('Connection lost. Reconnecting.');
      if (s === 'live') everLive = true;
      lastAnnouncedState = s;
    }
  },
  onOpenFailed() {
    // Refused, or turned down (a 401 looks the same from here): ask the session door.
    checkSession();
  },
});

ui.retryNow.addEventListener('click', () => connection.retryNow());

// ---------- one shared ticker ----------

onTick(() => {
  list.tick(now());
  detail.tick(now());
  if (connection.state === 'reconnecting' && badgeInfo.phase === 'waiting') renderBadge();
});

// ---------- the session: login, logout, a session that ends ----------

const SESSION_ENDED = 'Your session has ended. Log in again to go on.';

const login = new LoginForm(ui.login, {
  onLoggedIn(result) {
    session.required = result.required;
    enter();
    ui.list.focus({ preventScroll: true });
    announcer.say('Logged in.');
  },
});

/** Shows the board (the list, the counts, the buttons) or hides all of it. */
function showBoard(on) {
  ui.board.hidden = !on;
  ui.actions.hidden = !on;
  ui.conn.hidden = !on;
  ui.skip.hidden = !on;
  ui.logout.hidden = !(on && session.required);
}

/** Logged in (or no token needed): the page as it always was. */
function enter() {
  if (session.active) return;
  session.active = true;
  login.hide();
  showBoard(true);
  connection.start();
  followHash();
}

/** Forgets every job shown, closes the live connection: nothing is left on screen. */
function clearBoard() {
  connection.stop();
  viewer.close();
  detail.close();
  bulk.reset();
  ui.findResults.replaceChildren();
  list.reset();
  resetTotals();
  state.lastSeq = 0;
  announceChanges = false;
  everLoaded = false;
  everLive = false;
  lastAnnouncedState = null;
  badgeInfo = {};
  ui.badge.dataset.state = connection.state;
  renderBadge();
  ui.notice.hidden = true;
  ui.notice.textContent = '';
  resetPhotoNotice();
}

/** The login form instead of the board; message says why, if there is something to say. */
function leave(message = '') {
  session.required = true;
  if (!session.active && login.shown) {
    if (message) login.say(message, false);
    return;
  }
  session.active = false;
  session.epoch += 1;
  clearBoard();
  showBoard(false);
  login.show(message);
}

// Any 401 from the API (the cookie expired, the token was rotated out): log in again.
setUnauthorizedHandler(() => {
  if (session.active) leave(SESSION_ENDED);
});

/** After a WebSocket that never opened: is it that the session has ended? */
async function checkSession() {
  if (session.checking || !session.active) return;
  session.checking = true;
  const { epoch } = session;
  try {
    const info = await getSession();
    if (epoch === session.epoch && info.required && !info.authenticated) leave(SESSION_ENDED);
  } catch {
    // The server is away: the connection keeps trying.
  } finally {
    session.checking = false;
  }
}

ui.logout.addEventListener('click', async () => {
  const button = ui.logout;
  if (button.getAttribute('aria-disabled') === 'true') return;
  button.setAttribute('aria-disabled', 'true');
  try {
    await closeSession();
  } catch (err) {
    ui.notice.textContent = `Could not log out: ${err.message}`;
    ui.notice.hidden = false;
    return;
  } finally {
    button.removeAttribute('aria-disabled');
  }
  leave();
  announcer.say('Logged out.');
});

/**
 * Asks the server first: if it wants a token and this browser has no session, the login
 * form, and nothing is fetched. If it cannot say (it is away), the page starts as it
 * always did; a 401 later brings the form.
 */
async function boot() {
  let info = null;
  try {
    info = await getSession();
  } catch {
    info = null;
  }
  if (info && info.required && !info.authenticated) {
    leave();
    return;
  }
  session.required = Boolean(info && info.required);
  enter();
}

// ---------- test hooks ----------

Object.defineProperty(window, '__jobservice', {
  value: Object.freeze({
    jobs: list.jobs,
    rows: list.rows,
    get lastSeq() { return state.lastSeq; },
    get next() { return list.next; },
    get loaded() { return list.loaded; },
    get complete() { return list.complete; },
    get loadedCount() { return list.order.length; },
    get totals() { return { ...totals.shown }; },
    get connection() { return connection.state; },
    get retryDelays() { return [...connection.delays]; },
    get session() { return { required: session.required, active: session.active }; },
  }),
  writable: false,
  configurable: false,
});

boot();
