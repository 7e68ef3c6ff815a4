// The job list: one <li> per job, built once and patched in place.
//
// - jobs: Map id -> job (the latest state, by seq); rows: Map id -> <li>.
// - Order is newest first by createdAt; a new job is inserted at its place with a
//   binary search, so nothing else moves. A status change patches that one <li>.
// - Every job has its <li> from the first render (carrying data-job-id and
//   data-status, so any job can be found in the DOM), but only a window at the top is
//   displayed: the rest are `hidden` shells, which cost no layout, paint or observer
//   work. The window grows by BATCH cards when the end of the list comes within
//   TAIL_MARGIN of the viewport (infinite scroll), so 10,000 jobs render at once.
// - A card's content is built when it enters the window (or, in a burst such as a
//   long replay, when it first comes near the viewport).
// - The status filter hides non-matching cards; the window then counts matching ones.
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

function isJob(value) {
  return value && typeof value === 'object' && typeof value.id === 'string' && value.id !== ''
    && STATUSES.has(value.status);
}

function createdTime(job) {
  const t = parseTime(job.createdAt);
  return Number.isFinite(t) ? t : now();
}

export class JobList {
  /**
   * @param {HTMLUListElement} root  the list
   * @param {HTMLElement} tail       an element right after the list (infinite-scroll sentinel)
   * @param {{onTransition?: Function, onSummary?: Function}} hooks
   */
  constructor(root, tail, hooks = {}) {
    this.root = root;
    this.tail = tail;
    this.hooks = hooks;
    this.jobs = new Map();
    this.rows = new Map();
    this.order = []; // [{id, t}] newest first
    this.edge = 0; // order[0 .. edge-1] are inside the window
    this.inWindow = new WeakSet();
    this.counts = { pending: 0, resolved: 0, failed: 0 };
    this.optimistic = new Set(); // <li> of jobs being created
    this.awaiting = new Map(); // id -> optimistic <li> whose POST answered, job not seen yet
    this.localIds = 0;
    this.loaded = false;
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
    // The end of the list: when it comes near, the window grows.
    this.tailObserver = new IntersectionObserver((entries) => {
      if (entries.some((entry) => entry.isIntersecting)) this.growWindow();
    }, { rootMargin: TAIL_MARGIN });
    this.tailObserver.observe(tail);
  }

  matches(status) {
    const filter = this.filter;
    return filter === 'all' || filter === status;
  }

  // ---------- whole-list loads ----------

  /** Replaces everything with a fresh listing (first load, or after RESET). */
  replaceAll(list) {
    const jobs = Array.isArray(list) ? list.filter(isJob) : [];
    this.io.disconnect();
    this.near.disconnect();
    this.visible.clear();
    this.jobs.clear();
    this.rows.clear();
    this.inWindow = new WeakSet();
    this.counts = { pending: 0, resolved: 0, failed: 0 };
    // A listing is oldest first: reversed, it is newest first (sort only if it is not).
    const entries = jobs.map((job, i) => ({ job, t: createdTime(job), i }));
    entries.reverse();
    let sorted = true;
    for (let k = 1; k < entries.length && sorted; k += 1) sorted = entries[k - 1].t >= entries[k].t;
    if (!sorted) entries.sort((a, b) => (b.t - a.t) || (b.i - a.i));
    const frag = document.createDocumentFragment();
    const order = [];
    let shown = 0;
    let edge = -1;
    for (const { job, t } of entries) {
      if (this.jobs.has(job.id)) continue;
      const el = buildShell(job);
      if (edge < 0) {
        this.inWindow.add(el);
        if (this.matches(job.status)) {
          renderRow(el, job);
          shown += 1;
        } else {
          el.hidden = true;
        }
        if (shown >= BATCH) edge = order.length + 1;
      } else {
        el.hidden = true;
      }
      this.jobs.set(job.id, job);
      this.rows.set(job.id, el);
      order.push({ id: job.id, t });
      this.counts[job.status] += 1;
      frag.append(el);
    }
    this.order = order;
    this.edge = edge < 0 ? order.length : edge;
    // Optimistic rows whose job is in the listing are done; the others stay on top.
    for (const [id, el] of this.awaiting) {
      if (this.jobs.has(id)) {
        this.awaiting.delete(id);
        this.optimistic.delete(el);
      }
    }
    this.root.replaceChildren(...this.optimistic, frag);
    const t = now();
    for (let i = 0; i < this.edge; i += 1) {
      const el = this.rows.get(order[i].id);
      const job = this.jobs.get(order[i].id);
      if (job.status === 'pending' && isBuilt(el)) {
        tickRow(el, job, t);
        this.io.observe(el);
      }
    }
    this.loaded = true;
    this.recheckTail();
    this.queueSummary();
  }

  /** Adds the next BATCH matching cards to the window. */
  growWindow() {
    if (!this.loaded || this.edge >= this.order.length) return;
    let shown = 0;
    while (this.edge < this.order.length && shown < BATCH) {
      const { id } = this.order[this.edge];
      this.edge += 1;
      const el = this.rows.get(id);
      const job = this.jobs.get(id);
      this.inWindow.add(el);
      if (this.matches(job.status)) {
        if (!isBuilt(el)) this.fill(el, job);
        el.hidden = false;
        shown += 1;
      }
    }
    this.recheckTail();
    this.queueSummary();
  }

  /** Observing again gets a fresh report: if the end is still near, grow again. */
  recheckTail() {
    this.tailObserver.unobserve(this.tail);
    this.tailObserver.observe(this.tail);
  }

  /** Shows or hides one card for the window and the filter. */
  place(el, job) {
    const show = this.inWindow.has(el) && this.matches(job.status);
    if (show && !isBuilt(el)) {
      if (this.takeBuildBudget()) this.fill(el, job);
      else this.near.observe(el);
    }
    if (el.hidden === show) el.hidden = !show;
  }

  // ---------- single changes ----------

  /**
   * Applies a job's new state if it is newer than what we hold (by seq).
   * Returns true when something changed.
   */
  apply(job) {
    if (!isJob(job)) return false;
    const prev = this.jobs.get(job.id);
    if (prev && Number.isFinite(job.seq) && Number.isFinite(prev.seq) && job.seq <= prev.seq) {
      return false;
    }
    this.jobs.set(job.id, job);
    let el = this.rows.get(job.id);
    if (el) {
      if (prev.status !== job.status) {
        this.counts[prev.status] -= 1;
        this.counts[job.status] += 1;
      }
      this.patch(el, job);
      this.place(el, job);
    } else {
      this.counts[job.status] += 1;
      el = this.awaiting.get(job.id);
      if (el) {
        // Our own optimistic row becomes the real one: same element, filled in.
        this.awaiting.delete(job.id);
        this.optimistic.delete(el);
        patchRow(el, job);
        this.fill(el, job);
        this.insert(job, el, true);
      } else {
        el = buildShell(job);
        this.insert(job, el, false);
      }
      this.rows.set(job.id, el);
      this.place(el, job);
    }
    this.observe(el, job);
    if (this.hooks.onTransition) this.hooks.onTransition(prev, job);
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
    } else {
      this.inWindow.delete(el);
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
    if (this.rows.has(id)) {
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
    if (hadFocus) {
      const target = el.querySelector('button, a[href]') || el;
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

  /**
   * A new filter starts a new window: the first BATCH matching cards. Only cards
   * whose visibility changes are touched.
   */
  setFilter(value) {
    if (this.root.dataset.filter === value) return;
    this.root.dataset.filter = value;
    this.inWindow = new WeakSet();
    let shown = 0;
    let edge = -1;
    for (let i = 0; i < this.order.length; i += 1) {
      const { id } = this.order[i];
      const el = this.rows.get(id);
      const job = this.jobs.get(id);
      if (edge < 0) {
        this.inWindow.add(el);
        if (this.matches(job.status)) shown += 1;
        if (shown >= BATCH) edge = i + 1;
      }
      const show = edge < 0 || i < edge ? this.matches(job.status) : false;
      if (show && !isBuilt(el)) this.fill(el, job);
      if (el.hidden === show) el.hidden = !show;
    }
    this.edge = edge < 0 ? this.order.length : edge;
    this.recheckTail();
    this.queueSummary();
  }

  /** Whether older cards are still outside the window. */
  get hasMore() {
    return this.edge < this.order.length;
  }

  get filter() {
    return this.root.dataset.filter || 'all';
  }

  /** How many cards the current filter shows. */
  shownCount() {
    let creating = 0;
    let errors = 0;
    for (const el of this.optimistic) {
      if (el.dataset.status === 'error') errors += 1;
      else creating += 1;
    }
    switch (this.filter) {
      case 'pending': return this.counts.pending + creating;
      case 'resolved': return this.counts.resolved;
      case 'failed': return this.counts.failed + errors;
      default: return this.jobs.size + creating + errors;
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
