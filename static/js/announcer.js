// One polite live region. Job changes are gathered and announced at most once
// per interval, summarised when many jobs change at once (e.g. +10, a replay
// after reconnecting), so a screen reader is never flooded.

const INTERVAL = 1500;

export class Announcer {
  constructor(region) {
    this.region = region;
    this.changes = new Map(); // job id -> its latest {kind, detail} since the last flush
    this.messages = [];
    this.timer = null;
    this.lastFlush = 0;
  }

  /** kind: created | resolved | failed | retried | deleted; detail: a short sentence about the job. */
  job(id, kind, detail) {
    this.changes.delete(id); // one job changing twice is told once, as it is now
    this.changes.set(id, { kind, detail });
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
    const changes = [...this.changes.values()];
    if (changes.length === 1) {
      parts.push(changes[0].detail);
    } else if (changes.length > 1) {
      const counts = { created: 0, retried: 0, resolved: 0, failed: 0, deleted: 0 };
      for (const { kind } of changes) counts[kind] += 1;
      const labels = {
        created: 'new', retried: 'retried', resolved: 'resolved', failed: 'failed', deleted: 'removed',
      };
      const bits = Object.entries(counts).filter(([, n]) => n).map(([k, n]) => `${n} ${labels[k]}`);
      parts.push(`Jobs updated: ${bits.join(', ')}.`);
    }
    this.messages = [];
    this.changes.clear();
    if (parts.length) this.region.textContent = parts.join(' ');
  }
}
