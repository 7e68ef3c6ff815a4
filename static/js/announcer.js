// One polite live region. Job changes are gathered and announced at most once
// per interval, summarised when many jobs change at once (e.g. +10, a replay
// after reconnecting), so a screen reader is never flooded.

const INTERVAL = 1500;

export class Announcer {
  constructor(region) {
    this.region = region;
    this.pending = [];
    this.counts = { created: 0, resolved: 0, failed: 0, retried: 0 };
    this.messages = [];
    this.timer = null;
    this.lastFlush = 0;
  }

  /** kind: created | resolved | failed | retried; detail: a short sentence for a single change. */
  job(kind, detail) {
    this.counts[kind] += 1;
    this.pending.push(detail);
    this.schedule();
  }

  say(message) {
    this.messages.push(message);
    this.schedule();
  }

  schedule() {
    if (this.timer) return;
    const wait = Math.max(0, this.lastFlush + INTERVAL - Date.now());
    this.timer = setTimeout(() => this.flush(), Math.max(wait, 150));
  }

  flush() {
    this.timer = null;
    this.lastFlush = Date.now();
    const parts = [...this.messages];
    if (this.pending.length === 1) {
      parts.push(this.pending[0]);
    } else if (this.pending.length > 1) {
      const { created, resolved, failed, retried } = this.counts;
      const bits = [];
      if (created) bits.push(`${created} new`);
      if (retried) bits.push(`${retried} retried`);
      if (resolved) bits.push(`${resolved} resolved`);
      if (failed) bits.push(`${failed} failed`);
      parts.push(`Jobs updated: ${bits.join(', ')}.`);
    }
    this.messages = [];
    this.pending = [];
    this.counts = { created: 0, resolved: 0, failed: 0, retried: 0 };
    if (parts.length) this.region.textContent = parts.join(' ');
  }
}
