// The live connection to /ws: replay from `since`, SYNCED, RESET, and reconnects
// with exponential backoff and full jitter, capped at a second: a server back from a
// restart is live on the page within two. It tries again at once when that can help:
// the network is back (`online`), or the tab is looked at again.
//
// State for the badge: 'live' | 'reconnecting' | 'offline' (navigator.onLine false).
//
// stop() ends it (logging out) until start() again; a socket that closes without having
// opened (refused, or a handshake the server turned down, e.g. 401) is told to
// onOpenFailed, since a page cannot see why a WebSocket handshake failed.

const BASE_DELAY = 500;
const MAX_DELAY = 1000; // a refused connection costs the server next to nothing
const MIN_DELAY = 250;
const OPEN_TIMEOUT = 10000;

export class Connection {
  /**
   * @param {object} opts
   * @param {() => Promise<void>} opts.load        (re)loads the job list; throws on failure
   * @param {() => number} opts.getSince           the seq to resume from
   * @param {(event: string, job: object) => void} opts.onJob
   * @param {(info: {id: string, seq: number, reason: string}) => void} opts.onDeleted
   * @param {(seq: number) => void} opts.onSynced
   * @param {(state: string, info: object) => void} opts.onState
   * @param {() => void} [opts.onOpenFailed]       a socket closed before it opened
   */
  constructor(opts) {
    this.opts = opts;
    this.ws = null;
    this.timer = null;
    this.attempt = 0;
    this.quickRetries = 0;
    this.needsLoad = true;
    this.state = 'reconnecting';
    this.info = { phase: 'connecting' };
    this.lastError = null;
    this.synced = false;
    this.stopped = true;
    this.gen = 0; // bumped by start() and stop(): a load from before is not acted on
    this.listening = false;
    this.delays = []; // the last waits scheduled between tries, in ms (the page's test hooks)
  }

  start() {
    if (!this.stopped) return;
    this.stopped = false;
    this.gen += 1;
    this.attempt = 0;
    this.quickRetries = 0;
    this.needsLoad = true;
    this.lastError = null;
    if (!this.listening) this.listen();
    this.connect();
  }

  /** Closes the connection and stops reconnecting, until start(). */
  stop() {
    if (this.stopped) return;
    this.stopped = true;
    this.gen += 1;
    this.clearTimer();
    const ws = this.ws;
    this.ws = null;
    this.synced = false;
    this.loading = false;
    this.needsLoad = true;
    this.state = 'reconnecting'; // for the next start(); the page hides the badge meanwhile
    this.info = { phase: 'connecting' };
    if (ws) ws.close(1000, 'logged out');
  }

  listen() {
    this.listening = true;
    window.addEventListener('offline', () => {
      if (!this.stopped) this.setState('offline', {});
    });
    window.addEventListener('online', () => {
      if (this.stopped) return;
      if (this.ws) {
        this.setState(this.synced ? 'live' : 'reconnecting', this.synced ? {} : { phase: 'syncing' });
        return;
      }
      this.attempt = 0;
      this.connect();
    });
    document.addEventListener('visibilitychange', () => {
      if (document.visibilityState === 'visible') this.retryNow();
    });
  }

  /** Skip the wait and try now (the badge's "Retry now", the tab shown again). */
  retryNow() {
    if (this.stopped || this.state === 'live' || this.ws || this.loading) return;
    this.attempt = 0;
    this.connect();
  }

  setState(state, info) {
    // navigator.onLine === false always wins: that is what "offline" means here.
    if (navigator.onLine === false && state !== 'offline') {
      state = 'offline';
      info = {};
    }
    this.state = state;
    this.info = info;
    this.opts.onState(state, info);
  }

  clearTimer() {
    if (this.timer !== null) {
      clearTimeout(this.timer);
      this.timer = null;
    }
  }

  async connect() {
    this.clearTimer();
    if (this.stopped || this.ws) return;
    if (navigator.onLine === false) {
      this.setState('offline', {});
      return;
    }
    if (this.needsLoad) {
      if (this.loading) return;
      this.loading = true;
      this.setState('reconnecting', { phase: 'loading' });
      const gen = this.gen;
      try {
        await this.opts.load();
        if (gen !== this.gen) return; // stopped meanwhile
        this.needsLoad = false;
        this.lastError = null;
      } catch (err) {
        if (gen !== this.gen) return;
        this.lastError = err;
        this.loading = false;
        this.scheduleRetry(false);
        return;
      }
      this.loading = false;
    }
    this.open();
  }

  open() {
    const scheme = window.location.protocol === 'https:' ? 'wss:' : 'ws:';
    const since = Math.max(0, Math.floor(this.opts.getSince() || 0));
    const url = `${scheme}//${window.location.host}/ws?since=${since}`;
    this.synced = false;
    this.setState('reconnecting', { phase: 'connecting' });
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (err) {
      this.lastError = err;
      this.scheduleRetry(false);
      return;
    }
    this.ws = ws;
    let opened = false;
    const openTimer = setTimeout(() => {
      if (ws.readyState !== WebSocket.OPEN) ws.close();
    }, OPEN_TIMEOUT);
    ws.addEventListener('open', () => {
      clearTimeout(openTimer);
      opened = true;
      if (this.ws === ws) this.setState('reconnecting', { phase: 'syncing' });
    });
    ws.addEventListener('message', (ev) => {
      if (this.ws === ws) this.onMessage(ev.data);
    });
    ws.addEventListener('close', (ev) => {
      clearTimeout(openTimer);
      if (this.ws !== ws) return; // a socket we already let go of (RESET)
      this.ws = null;
      this.synced = false;
      if (ev.code === 1013 && this.quickRetries < 3) {
        // Too slow for the server: catch up at once with `since`.
        this.quickRetries += 1;
        this.scheduleRetry(true);
      } else {
        this.scheduleRetry(false);
      }
      if (!opened && this.opts.onOpenFailed) this.opts.onOpenFailed();
    });
  }

  onMessage(data) {
    if (typeof data !== 'string') return;
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (!Array.isArray(msg) || typeof msg[0] !== 'string') return;
    const [event, payload] = msg;
    switch (event) {
      case 'ON_CREATED_JOB':
      case 'ON_RESOLVED_JOB':
        if (payload && typeof payload === 'object') this.opts.onJob(event, payload);
        break;
      case 'ON_DELETED_JOB':
        if (payload && typeof payload === 'object' && typeof payload.id === 'string') {
          this.opts.onDeleted(payload);
        }
        break;
      case 'SYNCED':
        this.synced = true;
        this.attempt = 0;
        this.quickRetries = 0;
        if (payload && Number.isFinite(payload.seq)) this.opts.onSynced(payload.seq);
        this.setState('live', {});
        break;
      case 'RESET': {
        // Our `since` is from another store: reload the list, then resume from it.
        const ws = this.ws;
        this.ws = null;
        this.synced = false;
        this.needsLoad = true;
        if (ws) ws.close(1000, 'reset');
        this.connect();
        break;
      }
      default:
        break;
    }
  }

  scheduleRetry(quick) {
    this.clearTimer();
    if (navigator.onLine === false) {
      this.setState('offline', {});
      return;
    }
    this.attempt = Math.min(this.attempt + 1, 30);
    const ceiling = quick ? 1000 : Math.min(MAX_DELAY, BASE_DELAY * 2 ** (this.attempt - 1));
    const delay = Math.max(MIN_DELAY, Math.random() * ceiling); // full jitter
    this.delays.push(delay);
    if (this.delays.length > 20) this.delays.shift();
    const retryAt = Date.now() + delay;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.connect();
    }, delay);
    this.setState('reconnecting', { phase: 'waiting', retryAt, error: this.lastError });
  }
}
