// Thin wrapper over the service's JSON API. Every failure becomes an ApiError
// with a message fit to show to a person.

import { noteServerDate } from './util.js';

export class ApiError extends Error {
  constructor(status, code, message, retryAfter = null) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter; // seconds, from a Retry-After header
  }
}

// Told of every 401 (the session ended, the token was rotated out), except from the
// session door itself, where a 401 only means "that token was wrong".
let onUnauthorized = null;

export function setUnauthorizedHandler(fn) {
  onUnauthorized = fn;
}

async function request(method, path, { body, timeout = 15000, session = false } = {}) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeout);
  const startedAt = Date.now();
  let res;
  let text;
  try {
    res = await fetch(path, {
      method,
      headers: body === undefined ? { Accept: 'application/json' }
        : { Accept: 'application/json', 'Content-Type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
      credentials: 'same-origin',
      signal: controller.signal,
    });
    text = await res.text();
  } catch (err) {
    const slow = err && err.name === 'AbortError';
    throw new ApiError(0, slow ? 'timeout' : 'network',
      slow ? 'The server took too long to answer.' : 'Could not reach the server.');
  } finally {
    clearTimeout(timer);
  }
  noteServerDate(res.headers.get('Date'), startedAt);
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!res.ok) {
    const err = data && typeof data === 'object' ? data.error : null;
    const message = err && typeof err.message === 'string' && err.message
      ? err.message
      : `The server answered ${res.status}${res.statusText ? ` ${res.statusText}` : ''}.`;
    const wait = Number.parseInt(res.headers.get('Retry-After') || '', 10);
    const error = new ApiError(res.status, (err && err.code) || `http_${res.status}`, message,
      Number.isFinite(wait) && wait >= 0 ? wait : null);
    if (res.status === 401 && !session && onUnauthorized) onUnauthorized(error);
    throw error;
  }
  return { data, headers: res.headers, status: res.status };
}

export const PAGE_SIZE = 100;

/** The listing's first page, newest first, for a filter ('all' or a status). */
export function firstPageUrl(filter) {
  const status = filter && filter !== 'all' ? `&status=${encodeURIComponent(filter)}` : '';
  return `/jobs?order=desc&limit=${PAGE_SIZE}${status}`;
}

/** The target of `Link: <...>; rel="next"`, if it is a path on this server; else null. */
export function nextLink(header) {
  if (!header) return null;
  for (const part of header.split(/,(?=\s*<)/)) {
    const m = /^\s*<([^>]*)>(.*)$/.exec(part);
    const rel = m ? /;\s*rel\s*=\s*(?:"([^"]*)"|([^;\s]+))/i.exec(m[2]) : null;
    if (!rel || !(rel[1] ?? rel[2]).toLowerCase().split(/\s+/).includes('next')) continue;
    let url;
    try {
      url = new URL(m[1], window.location.href);
    } catch {
      return null;
    }
    // Used as-is, but only ever against this origin's listing.
    if (url.origin !== window.location.origin || url.pathname !== '/jobs') return null;
    return m[1];
  }
  return null;
}

/**
 * One page of the listing: its jobs, the URL of the next (older) page or null at
 * the end, and the change counter at listing time.
 */
export async function listPage(url) {
  const { data, headers } = await request('GET', url, { timeout: 30000 });
  if (!Array.isArray(data)) throw new ApiError(200, 'bad_response', 'The job list was not understood.');
  const seq = Number.parseInt(headers.get('X-Jobs-Seq') || '', 10);
  return { jobs: data, next: nextLink(headers.get('Link')), seq: Number.isFinite(seq) ? seq : null };
}

/** The totals: {total, pending, resolved, failed, seq}. */
export async function getStats() {
  const { data } = await request('GET', '/jobs/stats');
  const ok = data && typeof data === 'object'
    && ['total', 'pending', 'resolved', 'failed'].every((k) => Number.isFinite(data[k]));
  if (!ok) throw new ApiError(200, 'bad_response', 'The job totals were not understood.');
  return data;
}

/** Where photos come from now (`photos` of /healthz), or null if it does not say. */
export async function getPhotoStatus() {
  const { data } = await request('GET', '/healthz');
  const photos = data && typeof data === 'object' ? data.photos : null;
  return photos && typeof photos === 'object' && typeof photos.state === 'string' ? photos : null;
}

/** Deletes (or, for a pending job, cancels) a job. A 404 is an ApiError with status 404. */
export async function deleteJob(id) {
  await request('DELETE', `/jobs/${encodeURIComponent(id)}`);
}

export async function createJob() {
  const { data } = await request('POST', '/jobs', { body: {} });
  if (!data || typeof data.id !== 'string') {
    throw new ApiError(201, 'bad_response', 'The server did not return a job id.');
  }
  return data.id;
}

export async function getJob(id) {
  const { data } = await request('GET', `/jobs/${encodeURIComponent(id)}`);
  return data;
}

export async function retryJob(id) {
  await request('POST', `/jobs/${encodeURIComponent(id)}/retry`);
}

/** The jobs whose id starts with `prefix` (a whole id, or the short one a card shows). */
export async function findJobs(prefix, limit = 10) {
  const query = `id=${encodeURIComponent(prefix)}&limit=${limit}`;
  const { data } = await request('GET', `/jobs/find?${query}`);
  if (!Array.isArray(data)) throw new ApiError(200, 'bad_response', 'The search was not understood.');
  return data;
}

/**
 * A bulk change: 'retry' every failed job, or 'delete' the finished ones. Resolves with
 * {taken, seq}: how many it took; each change then arrives as its own event.
 */
export async function bulkChange(kind, filter = {}) {
  const { data } = await request('POST', kind === 'retry' ? '/jobs/retry' : '/jobs/delete',
    { body: filter, timeout: 60000 });
  if (!data || !Number.isInteger(data.taken)) {
    throw new ApiError(202, 'bad_response', 'The server did not say how many jobs it took.');
  }
  return data;
}

// ---------- the session (the page's login) ----------

/** {required, authenticated}: whether the server wants a token, and whether we have a session. */
export async function getSession() {
  const { data } = await request('GET', '/session', { session: true });
  if (!data || typeof data !== 'object' || typeof data.required !== 'boolean') {
    throw new ApiError(200, 'bad_response', 'The session state was not understood.');
  }
  return { required: data.required, authenticated: data.authenticated !== false };
}

/**
 * Trades the token for the server's HttpOnly session cookie; the token is kept nowhere.
 * Resolves with whether the server wants a token at all; a wrong token is an ApiError 401.
 */
export async function openSession(token) {
  const { status, data } = await request('POST', '/session', { body: { token }, session: true });
  return { required: !(status === 200 && data && data.required === false) };
}

/** Logs out: the server clears the cookie. */
export async function closeSession() {
  await request('DELETE', '/session', { session: true });
}
