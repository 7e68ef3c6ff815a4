// Thin wrapper over the service's JSON API. Every failure becomes an ApiError
// with a message fit to show to a person.

import { noteServerDate } from './util.js';

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
  }
}

async function request(method, path, { body, timeout = 15000 } = {}) {
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
    throw new ApiError(res.status, (err && err.code) || `http_${res.status}`, message);
  }
  return { data, headers: res.headers, status: res.status };
}

/** All jobs (oldest first) and the change counter at listing time. */
export async function listJobs() {
  const { data, headers } = await request('GET', '/jobs', { timeout: 60000 });
  if (!Array.isArray(data)) throw new ApiError(200, 'bad_response', 'The job list was not understood.');
  const seq = Number.parseInt(headers.get('X-Jobs-Seq') || '', 10);
  return { jobs: data, seq: Number.isFinite(seq) ? seq : null };
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
