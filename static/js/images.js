// Which image URLs the page may render: only those whose origin the server
// listed in <meta name="image-origins"> (the same list its CSP allows).

import { safeHttpUrl } from './util.js';

const FALLBACK = ['https://images.unsplash.com', 'https://plus.unsplash.com'];
const PLACEHOLDER = '__IMAGE_ORIGINS__';

function readAllowed() {
  const meta = document.querySelector('meta[name="image-origins"]');
  const content = meta ? meta.getAttribute('content') || '' : '';
  const tokens = content.includes(PLACEHOLDER) ? [] : content.split(/\s+/).filter(Boolean);
  const origins = new Set();
  for (const token of tokens.length ? tokens : FALLBACK) {
    const url = safeHttpUrl(token);
    if (url) origins.add(url.origin);
  }
  return origins;
}

const allowed = readAllowed();

export function allowedImageOrigins() {
  return [...allowed];
}

/** The URL (normalised) if it may be shown, otherwise null. */
export function allowedImageUrl(value) {
  const url = safeHttpUrl(value);
  return url && allowed.has(url.origin) ? url.href : null;
}

export function safeColor(value) {
  return typeof value === 'string' && /^#[0-9a-fA-F]{6}$/.test(value) ? value : null;
}
