// The job list: the newest page first, older pages as the user scrolls.
//
// - The server filters and pages (`GET /jobs?order=desc&limit=100[&status=...]`, then
//   the `Link: rel="next"` URL as-is); so every loaded job matches the filter, and a new
//   filter starts over from the first page.
// - jobs: Map id -> job (the latest state, by seq); rows: Map id -> <li>; order: the
//   loaded jobs, newest first (pages are appended; a job that appears live is inserted
//   at its place by createdAt with a binary search, so nothing else moves).
// - Every loaded job has its <li> (carrying data-job-id and data-status), but only a
//   window at the top is displayed: the rest are `hidden` shells, which cost no layout,
//   paint or observer work. The window grows by BATCH cards when the end of the list
//   comes within TAIL_MARGIN of the viewport; when fewer than BATCH loaded cards are left
//   outside it, the next page is fetched.
// - A card's content is built when it enters the window (or, in a burst such as a long
//   replay, when it first comes near the viewport).
// - Live changes: a loaded job is patched in place (and removed if it no longer matches
//   the filter); a job not loaded is inserted if it matches and is not older than the
//   last page fetched (older ones come with their page); a deleted job's card goes.
//   Changes that arrive while a page is being fetched are applied again when it lands,
//   so a page never brings back an older state (seq decides) or a deleted job.
// - Only pending cards on screen (an IntersectionObserver) are touched by the shared
//   one-second ticker.

import {
  buildOptimisticRow, buildShell, fillOptimistic, isBuilt, patchRow, renderRow, setRowMessage,
  tickRow,
} from './rows.js';
import { now, parseTime } from './util.js';

const STATUSES = new Set(['pending', 'resolved', 'failed']);
const BATCH = 48; // cards shown at first, and added each time the end comes near
const TAIL_MARGIN = '1200px 0px';
const NEAR_MARGIN = '600px 0px';
const TOMBSTONES = 10000; // ids of deleted jobs remembered, so stale data cannot revive them
const RETRY_DELAYS = [1000, 2000, 5000, 10000, 30000];

function isJob(value) {
  return value && typeof value === 'object' && typeof value.id === 'string' && value.id !== ''
    && STATUSES.has(value.status);
}

function createdTime(job) {
  const t = parseTime(job.createdAt);
  return Number.isFinite(t) ? t : now();
}

function isNewer(job, prev) {
  return !prev || !Number.isFinite(job.seq) || !Number.isFinite(prev.seq) || job.seq > prev.seq;
}

export class JobList {
  /**
   * @param {HTMLUListElement} root  the list
   * @param {HTMLElement} tail       an element right after the list (infinite-scroll sentinel)
   * @param {object} hooks
   * @param {(url: string) => Promise<{jobs: object[], next: string|null, seq: number|null}>} hooks.fetchPage
   * @param {(filter: string) => string} hooks.firstUrl
   * @param {(prev: object|undefined, job: object) => void} [hooks.onTransition]
   * @param {(job: object, reason: string) => void} [hooks.onRemoved]
   * @param {() => void} [hooks.onSummary]
   */
  constructor(root, tail, hooks) {
    this.root = root;
    this.tail = tail;
    this.hooks = hooks;
    this.jobs = new Map();
    this.rows = new Map();
    this.order = []; // [{id, t}] newest first
    this.edge = 0; // order[0 .. edge-1] are displayed
    this.inWindow = new WeakSet(); // their <li>s
    this.optimistic = new Set(); // <li> of jobs being created
    this.awaiting = new Map(); // id -> optimistic <li> whose POST answered, job not seen yet
    this.localIds = 0;
    this.gone = new Set(); // ids of deleted jobs (the newest TOMBSTONES)
    // paging
    this.gen = 0; // bumped by every fresh start (filter change, reload)
    this.loaded = false; // the current filter's first page is in
    this.next = null; // URL of the next (older) page; null at the end
    this.boundary = null; // createdAt of the last job of the last page placed
    this.fetching = false;
    this.log = null; // changes seen while a page is on its way: applied again when it lands
    this.current = null; // the latest first-page load (a promise)
    this.error = null; // the last failed fetch (cleared when one succeeds)
    this.retryTimer = null;
    this.retries = 0;
    this.visible = new Set();
    this.summaryQueued = false;
    this.buildBudget = BATCH;
    this.budgetReset = false;
    // Pending cards on (or just off) screen: the ticker's working set.
    this.io = new IntersectionObserver((entries) => this.onIntersect(entries), {
      rootMargin: '100px 0px',
    });
    // Displayed cards not built yet (only after a burst): built when they come near.
    this.near = new IntersectionObserver((entries) => this.onNear(entries), {
      rootMargin: NEAR_MARGIN,
    });
    // The end of the list: when it comes near, the window grows (and pages load).
    this.tailObserver = new IntersectionObserver((entries) => {
      if (entries.some((entry) => entry.isIntersecting)) this.growWindow();
    }, { rootMargin: TAIL_MARGIN });
    this.tailObserver.observe(tail);
  }

  get filter() {
    return this.root.dataset.filter || 'all';
  }

  matches(status) {
    const filter = this.filter;
    return filter === 'all' || filter === status;
  }

  /** Every job of the filter is loaded (no older page left). */
  get complete() {
    return this.loaded && this.next === null;
  }

  /** Whether older cards are still to come: outside the window, or on the server. */
  get hasMore() {
    return this.loaded && (this.edge < this.order.length || this.next !== null);
  }

  // ---------- whole-list loads ----------

  /**
   * Starts over from the filter's first page (first load, RESET, a new filter). Resolves
   * with that page once it is shown (if another start overtakes it, with that one's);
   * rejects if it cannot be fetched.
   */
  reload() {
    this.gen += 1;
    const gen = this.gen;
    this.clearRetry();
    this.clearRows();
    this.loaded = false;
    this.next = null;
    this.boundary = null;
    this.fetching = true;
    this.log = [];
    this.queueSummary();
    const load = this.hooks.fetchPage(this.hooks.firstUrl(this.filter)).then((page) => {
      if (gen !== this.gen) return this.current;
      this.fetching = false;
      this.error = null;
      this.retries = 0;
      this.placeFirst(page);
      return page;
    }, (err) => {
      if (gen !== this.gen) return this.current;
      this.fetching = false;
      this.log = null;
      this.error = err;
      this.queueSummary();
      throw err;
    });
    this.current = load;
    return load;
  }

  /**
   * Forgets everything (logging out): no card, no optimistic row, nothing loaded; a page
   * still on its way is dropped when it lands. The filter stays.
   */
  reset() {
    this.gen += 1;
    this.clearRetry();
    this.optimistic.clear();
    this.awaiting.clear();
    this.gone.clear();
    this.clearRows();
    this.loaded = false;
    this.next = null;
    this.boundary = null;
    this.fetching = false;
    this.log = null;
    this.current = null;
    this.error = null;
    this.retries = 0;
    this.queueSummary();
  }

  /** A reload of our own (a new filter): on failure it is tried again after a while. */
  restart() {
    const gen = this.gen + 1;
    this.reload().catch(() => {
      if (gen === this.gen) this.scheduleRetry(() => this.restart());
    });
  }

  clearRows() {
    this.io.disconnect();
    this.near.disconnect();
    this.visible.clear();
    this.jobs.clear();
    this.rows.clear();
    this.order = [];
    this.edge = 0;
    this.inWindow = new WeakSet();
    this.root.replaceChildren(...[...this.optimistic].reverse()); // newest on top
  }

  /** The first page: its cards replace whatever was there (optimistic rows stay on top). */
  placeFirst(page) {
    this.clearRows();
    this.loaded = true;
    this.appendJobs(page);
    // Optimistic rows whose job is in the listing are done; the others stay on top.
    for (const [id, el] of this.awaiting) {
      if (this.jobs.has(id)) {
        this.awaiting.delete(id);
        this.optimistic.delete(el);
        el.remove();
      }
    }
    this.showMore(BATCH);
    this.replayLog();
    this.recheckTail();
    this.queueSummary();
  }

  /** Adds a page's jobs at the end (hidden shells, shown as the window grows). */
  appendJobs(page) {
    const frag = document.createDocumentFragment();
    let last = null;
    for (const job of Array.isArray(page.jobs) ? page.jobs : []) {
      if (!isJob(job)) continue;
      last = job;
      if (this.gone.has(job.id)) continue;
      if (this.rows.has(job.id)) {
        // Already here (it appeared live, or pages overlap): keep the newer state.
        this.applyNow(job);
        continue;
      }
      if (!this.matches(job.status)) continue;
      const el = buildShell(job);
      el.hidden = true;
      this.jobs.set(job.id, job);
      this.rows.set(job.id, el);
      this.order.push({ id: job.id, t: createdTime(job) });
      frag.append(el);
    }
    this.root.append(frag);
    if (last) this.boundary = createdTime(last);
    this.next = page.next || null;
  }

  /** Shows up to n more cards of the loaded ones. */
  showMore(n) {
    let shown = 0;
    const t = now();
    while (this.edge < this.order.length && shown < n) {
      const { id } = this.order[this.edge];
      this.edge += 1;
      const el = this.rows.get(id);
      const job = this.jobs.get(id);
      if (!isBuilt(el)) renderRow(el, job);
      this.inWindow.add(el);
      el.hidden = false;
      if (job.status === 'pending') {
        tickRow(el, job, t);
        this.io.observe(el);
      }
      shown += 1;
    }
    return shown;
  }

  /** The end of the list came near: show the next BATCH; fetch a page when few are left. */
  growWindow() {
    if (!this.loaded) return;
    if (this.showMore(BATCH) > 0) this.recheckTail();
    if (this.order.length - this.edge < BATCH) this.loadMore();
    this.queueSummary();
  }

  /** Fetches the next (older) page, if there is one and none is on its way. */
  loadMore() {
    if (!this.loaded || this.next === null || this.fetching || this.retryTimer !== null) return;
    const gen = this.gen;
    const url = this.next;
    this.fetching = true;
    this.log = [];
    this.queueSummary();
    this.hooks.fetchPage(url).then((page) => {
      if (gen !== this.gen) return;
      this.fetching = false;
      this.error = null;
      this.retries = 0;
      this.appendJobs(page);
      this.replayLog();
      this.recheckTail();
      this.queueSummary();
    }, (err) => {
      if (gen !== this.gen) return;
      this.fetching = false;
      this.log = null;
      const instead = err.status === 400 ? this.cursorFallback(url) : null;
      if (instead) {
        // The job the cursor names is gone for good: go on from our oldest card instead.
        this.next = instead;
        this.loadMore();
        return;
      }
      if (err.status === 400) {
        // No cursor left to go on from: what is shown is all there is to show.
        this.next = null;
        this.queueSummary();
        return;
      }
      this.error = err;
      this.scheduleRetry(() => this.loadMore());
      this.queueSummary();
    });
  }

  /**
   * The next-page URL with its cursor (before/after) moved to our oldest loaded card,
   * when the server turned the cursor down (400: it names no job any more, e.g. it was
   * deleted and the server forgot it). null if that would be the same cursor again.
   */
  cursorFallback(url) {
    const oldest = this.order.length ? this.order[this.order.length - 1].id : null;
    if (!oldest) return null;
    const u = new URL(url, window.location.href);
    const key = u.searchParams.has('before') ? 'before' : 'after';
    if (!u.searchParams.has(key) || u.searchParams.get(key) === oldest) return null;
    u.searchParams.set(key, oldest);
    return `${u.pathname}${u.search}`;
  }

  scheduleRetry(fn) {
    this.clearRetry();
    const delay = RETRY_DELAYS[Math.min(this.retries, RETRY_DELAYS.length - 1)];
    this.retries += 1;
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      fn();
    }, delay);
  }

  clearRetry() {
    if (this.retryTimer !== null) {
      clearTimeout(this.retryTimer);
      this.retryTimer = null;
    }
  }

  /** Skips the wait of a failed fetch (e.g. the live connection is back). */
  retrySoon() {
    if (this.retryTimer === null) return;
    this.clearRetry();
    this.retries = 0;
    if (this.loaded) this.loadMore();
    else this.restart();
  }

  replayLog() {
    const log = this.log;
    this.log = null;
    if (!log) return;
    for (const change of log) {
      if (change.deleted) this.removeNow(change.id, change.reason);
      else this.applyNow(change);
    }
  }

  /** Observing again gets a fresh report: if the end is still near, grow again. */
  recheckTail() {
    this.tailObserver.unobserve(this.tail);
    this.tailObserver.observe(this.tail);
  }

  /** Shows or hides one card for the window. */
  place(el, job) {
    const show = this.inWindow.has(el);
    if (show && !isBuilt(el)) {
      if (this.takeBuildBudget()) this.fill(el, job);
      else this.near.observe(el);
    }
    if (el.hidden === show) el.hidden = !show;
  }

  indexOf(id) {
    for (let i = 0; i < this.order.length; i += 1) if (this.order[i].id === id) return i;
    return -1;
  }

  // ---------- single changes ----------

  /**
   * A job's new state (an event, or a REST answer). Applied if it is newer than what we
   * hold (by seq). Returns true when something changed.
   */
  apply(job) {
    if (!isJob(job)) return false;
    if (this.log) this.log.push(job);
    return this.applyNow(job);
  }

  applyNow(job) {
    if (this.gone.has(job.id)) return false;
    const prev = this.jobs.get(job.id);
    if (!isNewer(job, prev)) return false;
    let el = this.rows.get(job.id);
    if (el) {
      this.jobs.set(job.id, job);
      if (!this.matches(job.status)) {
        // It left the filter (e.g. a pending job resolved while showing "Pending").
        this.drop(job.id);
      } else {
        this.patch(el, job);
        this.place(el, job);
        this.observe(el, job);
      }
      if (this.hooks.onTransition) this.hooks.onTransition(prev, job);
      this.queueSummary();
      return true;
    }
    if (!this.loaded) return false; // the first page is on its way; replayed after it
    const mine = this.awaiting.get(job.id);
    if (!this.matches(job.status)) {
      if (mine) this.dropOptimistic(mine);
      return false;
    }
    // Older than the last page fetched: it comes with its page.
    if (!mine && this.next !== null && this.boundary !== null && createdTime(job) < this.boundary) {
      return false;
    }
    this.jobs.set(job.id, job);
    if (mine) {
      // Our own optimistic row becomes the real one: same element, filled in.
      el = mine;
      this.awaiting.delete(job.id);
      this.optimistic.delete(el);
      patchRow(el, job);
      this.insert(job, el, true);
      this.rows.set(job.id, el);
      this.fill(el, job);
      el.hidden = !this.inWindow.has(el);
    } else {
      el = buildShell(job);
      this.insert(job, el, false);
      this.rows.set(job.id, el);
      this.place(el, job);
    }
    this.observe(el, job);
    if (this.hooks.onTransition) this.hooks.onTransition(prev, job);
    this.queueSummary();
    return true;
  }

  /**
   * The job is gone from the server (deleted, cancelled, expired): its card goes, and
   * nothing later (a page, a REST answer) brings it back. Idempotent.
   */
  remove(id, reason) {
    if (this.log) this.log.push({ deleted: true, id, reason });
    return this.removeNow(id, reason);
  }

  removeNow(id, reason) {
    if (!this.gone.has(id)) {
      this.gone.add(id);
      if (this.gone.size > TOMBSTONES) this.gone.delete(this.gone.values().next().value);
    }
    const mine = this.awaiting.get(id);
    if (mine) this.dropOptimistic(mine);
    const job = this.jobs.get(id);
    if (!this.drop(id)) return false;
    if (this.hooks.onRemoved) this.hooks.onRemoved(job, reason);
    return true;
  }

  /** Takes a card out of the list; focus, if it was in the card, moves to a neighbour. */
  drop(id) {
    const el = this.rows.get(id);
    if (!el) return false;
    const i = this.indexOf(id);
    if (i >= 0) {
      this.order.splice(i, 1);
      if (i < this.edge) this.edge -= 1;
    }
    this.jobs.delete(id);
    this.rows.delete(id);
    this.io.unobserve(el);
    this.near.unobserve(el);
    this.visible.delete(el);
    const hadFocus = el.contains(document.activeElement);
    el.remove();
    if (hadFocus) {
      const near = (i >= 0 && i < this.edge ? this.order[i] : null) || (i > 0 ? this.order[i - 1] : null);
      const target = (near && this.rows.get(near.id)) || this.root;
      target.tabIndex = -1;
      target.focus({ preventScroll: true });
    }
    this.recheckTail();
    this.queueSummary();
    return true;
  }

  /** A few cards may be built per frame; in a burst the rest wait until they come near. */
  takeBuildBudget() {
    if (this.buildBudget <= 0) return false;
    this.buildBudget -= 1;
    if (!this.budgetReset) {
      this.budgetReset = true;
      requestAnimationFrame(() => {
        this.budgetReset = false;
        this.buildBudget = BATCH;
      });
    }
    return true;
  }

  fill(el, job) {
    renderRow(el, job);
    this.near.unobserve(el);
    if (job.status === 'pending') tickRow(el, job, now());
    this.observe(el, job);
  }

  patch(el, job) {
    // If a focused button goes away with the old content, focus stays on this card.
    this.keepFocus(el, () => patchRow(el, job));
    if (job.status === 'pending' && isBuilt(el)) tickRow(el, job, now());
  }

  /** Puts a new card at its place (newest first); it joins the window if it lands inside. */
  insert(job, el, keepIfOnTop) {
    const t = createdTime(job);
    // First index whose job is strictly older: newest first, ties keep arrival order.
    let lo = 0;
    let hi = this.order.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.order[mid].t >= t) lo = mid + 1;
      else hi = mid;
    }
    const all = this.edge >= this.order.length;
    this.order.splice(lo, 0, { id: job.id, t });
    if (lo < this.edge || all) {
      this.edge += 1;
      this.inWindow.add(el);
    }
    if (lo === 0) {
      // Above every known job: an optimistic row already sits up there, leave it.
      if (keepIfOnTop && el.parentNode === this.root) return;
      const first = this.order.length > 1 ? this.rows.get(this.order[1].id) : null;
      this.root.insertBefore(el, first || null);
      return;
    }
    this.rows.get(this.order[lo - 1].id).after(el);
  }

  onNear(entries) {
    for (const entry of entries) {
      if (!entry.isIntersecting) continue;
      const el = entry.target;
      const job = this.jobs.get(el.dataset.jobId);
      if (job && this.rows.get(job.id) === el && !isBuilt(el)) this.fill(el, job);
      else this.near.unobserve(el);
    }
  }

  /** The ticker's observer watches built pending cards only. */
  observe(el, job) {
    if (job.status === 'pending' && isBuilt(el)) {
      this.io.observe(el);
    } else {
      this.io.unobserve(el);
      this.visible.delete(el);
    }
  }

  onIntersect(entries) {
    const t = now();
    for (const entry of entries) {
      const el = entry.target;
      if (entry.isIntersecting) {
        this.visible.add(el);
        const job = this.jobs.get(el.dataset.jobId);
        if (job && job.status === 'pending' && isBuilt(el)) tickRow(el, job, t);
      } else {
        this.visible.delete(el);
      }
    }
  }

  /** Called by the shared ticker: only pending rows on screen are touched. */
  tick(t) {
    for (const el of this.visible) {
      const job = this.jobs.get(el.dataset.jobId);
      if (job && job.status === 'pending') tickRow(el, job, t);
    }
  }

  // ---------- optimistic creation ----------

  addOptimistic() {
    this.localIds += 1;
    const el = buildOptimisticRow(`local-${this.localIds}`);
    this.optimistic.add(el);
    this.root.prepend(el);
    this.queueSummary();
    return el;
  }

  /** The POST answered with an id. */
  confirmOptimistic(el, id) {
    if (this.rows.has(id) || this.gone.has(id)) {
      // The server's event got here first: its row is the job; drop ours.
      this.dropOptimistic(el);
      return true;
    }
    el.dataset.jobId = id;
    this.awaiting.set(id, el);
    return false;
  }

  failOptimistic(el, message) {
    this.keepFocus(el, () => fillOptimistic(el, message));
    this.queueSummary();
  }

  retryOptimistic(el) {
    this.keepFocus(el, () => fillOptimistic(el, null));
    this.queueSummary();
  }

  /** Runs fn (which replaces el's content); focus stays in the card if it was there. */
  keepFocus(el, fn) {
    const hadFocus = el.contains(document.activeElement);
    fn();
    if (hadFocus && !el.contains(document.activeElement)) {
      const target = el.querySelector('button:not([hidden]), a[href]') || el;
      if (target === el) el.tabIndex = -1;
      target.focus({ preventScroll: true });
    }
  }

  dropOptimistic(el) {
    this.optimistic.delete(el);
    for (const [id, other] of this.awaiting) if (other === el) this.awaiting.delete(id);
    const hadFocus = el.contains(document.activeElement);
    const next = el.nextElementSibling || el.previousElementSibling;
    el.remove();
    if (hadFocus) {
      const target = next || this.root;
      if (next) next.tabIndex = -1;
      target.focus({ preventScroll: true });
    }
    this.queueSummary();
  }

  setRowMessage(id, message) {
    const el = this.rows.get(id);
    if (el) setRowMessage(el, message);
  }

  // ---------- filter and summary ----------

  /** A new filter starts over from its first page (the server filters). */
  setFilter(value) {
    if (this.root.dataset.filter === value) return;
    this.root.dataset.filter = value;
    this.restart();
  }

  /** How many cards the current filter shows (loaded ones and optimistic ones). */
  shownCount() {
    let creating = 0;
    let errors = 0;
    for (const el of this.optimistic) {
      if (el.dataset.status === 'error') errors += 1;
      else creating += 1;
    }
    switch (this.filter) {
      case 'pending': return this.order.length + creating;
      case 'resolved': return this.order.length;
      case 'failed': return this.order.length + errors;
      default: return this.order.length + creating + errors;
    }
  }

  queueSummary() {
    if (this.summaryQueued) return;
    this.summaryQueued = true;
    queueMicrotask(() => {
      this.summaryQueued = false;
      if (this.hooks.onSummary) this.hooks.onSummary(this);
    });
  }
}
