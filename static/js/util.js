// Small, dependency-free helpers shared by the page's modules.

export const APP_NAME = 'jobservice';
export const UNSPLASH_HOME = 'https://unsplash.com/';

// Server clock minus client clock, in ms. Only applied when the skew is large
// enough to matter (the HTTP Date header has one-second resolution).
let clockOffset = 0;

export function now() {
  return Date.now() + clockOffset;
}

export function noteServerDate(headerValue, requestStartedAt) {
  if (!headerValue) return;
  const server = Date.parse(headerValue);
  if (Number.isNaN(server)) return;
  // The header is truncated to the second: compare against the middle of the request.
  const local = (requestStartedAt + Date.now()) / 2;
  const skew = server + 500 - local;
  clockOffset = Math.abs(skew) > 2000 ? skew : 0;
}

export function parseTime(iso) {
  if (typeof iso !== 'string') return NaN;
  return Date.parse(iso);
}

export function shortId(id) {
  return typeof id === 'string' ? id.slice(0, 8) : '';
}

/** 42 -> "42s", 245 -> "4:05", 3723 -> "1:02:03" */
export function formatCountdown(ms) {
  const total = Math.max(0, Math.ceil(ms / 1000));
  if (total < 60) return `${total}s`;
  const s = total % 60;
  const m = Math.floor(total / 60) % 60;
  const h = Math.floor(total / 3600);
  const ss = String(s).padStart(2, '0');
  if (h === 0) return `${m}:${ss}`;
  return `${h}:${String(m).padStart(2, '0')}:${ss}`;
}

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit', second: '2-digit' });
const dateTimeFmt = new Intl.DateTimeFormat(undefined, {
  month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit',
});

export function formatClock(t) {
  if (!Number.isFinite(t)) return '';
  const d = new Date(t);
  const today = new Date();
  return d.toDateString() === today.toDateString() ? timeFmt.format(d) : dateTimeFmt.format(d);
}

/** Returns a URL object for an absolute http(s) URL, or null. */
export function safeHttpUrl(value) {
  if (typeof value !== 'string' || value === '') return null;
  let url;
  try {
    url = new URL(value);
  } catch {
    return null;
  }
  return url.protocol === 'https:' || url.protocol === 'http:' ? url : null;
}

/** Adds Unsplash's referral parameters, as their API guidelines ask. */
export function withUtm(value) {
  const url = safeHttpUrl(value);
  if (!url) return null;
  url.searchParams.set('utm_source', APP_NAME);
  url.searchParams.set('utm_medium', 'referral');
  return url.href;
}

/** createElement with attributes, properties and children in one call. */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  if (attrs) {
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === 'className') el.className = value;
      else if (key === 'text') el.textContent = value;
      else if (key === 'dataset') Object.assign(el.dataset, value);
      else el.setAttribute(key, value === true ? '' : String(value));
    }
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child);
  }
  return el;
}

export function externalLink(href, text, extra = {}) {
  return h('a', { href, target: '_blank', rel: 'noopener noreferrer', text, ...extra });
}

/** "1 attempt", "3 attempts". */
export function plural(n, one, many = `${one}s`) {
  return `${new Intl.NumberFormat().format(n)} ${n === 1 ? one : many}`;
}

const fullFmt = new Intl.DateTimeFormat(undefined, {
  year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit',
});

/** A moment in full, for the job's details. */
export function formatDateTime(t) {
  return Number.isFinite(t) ? fullFmt.format(new Date(t)) : '';
}

const relativeFmt = new Intl.RelativeTimeFormat(undefined, { numeric: 'auto' });
const RELATIVE_UNITS = [['day', 86400], ['hour', 3600], ['minute', 60], ['second', 1]];

/** "5 minutes ago", "in 2 hours", "now". */
export function formatRelative(t, from) {
  if (!Number.isFinite(t)) return '';
  const seconds = Math.round((t - from) / 1000);
  if (Math.abs(seconds) < 5) return 'now';
  for (const [unit, size] of RELATIVE_UNITS) {
    if (Math.abs(seconds) >= size) return relativeFmt.format(Math.trunc(seconds / size), unit);
  }
  return 'now';
}

/** 45 s -> "45 seconds", 105 s -> "1 minute 45 seconds", 7260 s -> "2 hours 1 minute". */
export function formatDuration(ms) {
  if (!Number.isFinite(ms) || ms < 0) return '';
  const total = Math.round(ms / 1000);
  if (total < 60) return ms < 1000 ? `${Math.round(ms)} ms` : plural(total, 'second');
  const units = [['day', 86400], ['hour', 3600], ['minute', 60], ['second', 1]];
  const parts = [];
  let left = total;
  for (const [unit, size] of units) {
    const n = Math.floor(left / size);
    left -= n * size;
    if (n && parts.length < 2) parts.push(plural(n, unit));
    else if (parts.length) break;
  }
  return parts.join(' ');
}
