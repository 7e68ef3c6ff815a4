// The login form, shown instead of the list when the server wants a token and this
// browser has no session. The token goes to `POST /session` once and is kept nowhere:
// the input is emptied as it is sent, and the server answers with an HttpOnly cookie
// that scripts cannot read.

import { openSession } from './api.js';

const NOT_ACCEPTED = 'That token was not accepted.';

export class LoginForm {
  /**
   * @param {HTMLElement} section  the login section (holds the form)
   * @param {object} hooks
   * @param {(result: {required: boolean}) => void} hooks.onLoggedIn
   */
  constructor(section, hooks) {
    this.section = section;
    this.hooks = hooks;
    this.form = section.querySelector('form');
    this.input = section.querySelector('input[name="token"]');
    this.message = section.querySelector('.login-message');
    this.submit = section.querySelector('button[type="submit"]');
    this.busy = false;
    this.form.addEventListener('submit', (ev) => {
      ev.preventDefault(); // never a real form post: the token must not travel as a form
      this.send();
    });
  }

  get shown() {
    return !this.section.hidden;
  }

  /** Shows the form (with a message, or none) and puts the cursor in the token field. */
  show(message = '') {
    this.section.hidden = false;
    this.say(message, false);
    this.input.focus();
  }

  hide() {
    this.section.hidden = true;
    this.input.value = '';
    this.say('', false);
  }

  say(message, invalid) {
    if (this.message.textContent !== message) this.message.textContent = message;
    if (invalid) this.input.setAttribute('aria-invalid', 'true');
    else this.input.removeAttribute('aria-invalid');
  }

  async send() {
    if (this.busy) return;
    const token = this.input.value.trim();
    this.input.value = ''; // not a moment longer in the page than needed
    // Emptied first, so that the same answer twice is announced twice.
    this.say('', false);
    if (!token) {
      this.say('Enter the access token.', true);
      this.input.focus();
      return;
    }
    this.busy = true;
    this.form.setAttribute('aria-busy', 'true');
    // aria-disabled, not disabled: a disabled button would drop keyboard focus.
    this.submit.setAttribute('aria-disabled', 'true');
    this.submit.textContent = 'Logging in…';
    let result = null;
    try {
      result = await openSession(token);
    } catch (err) {
      this.say(describe(err), err.status === 401);
      this.input.focus();
    } finally {
      this.busy = false;
      this.form.removeAttribute('aria-busy');
      this.submit.removeAttribute('aria-disabled');
      this.submit.textContent = 'Log in';
    }
    if (result) this.hooks.onLoggedIn(result);
  }
}

function describe(err) {
  if (err.status === 401) return NOT_ACCEPTED;
  if (err.status === 429) {
    // Too many wrong tokens from here: the server's own words, and how long to wait.
    const wait = Number.isFinite(err.retryAfter) && err.retryAfter > 0
      ? ` Try again in ${err.retryAfter} s.` : '';
    return `${err.message}${/[.!?]$/.test(err.message) ? '' : '.'}${wait}`;
  }
  return `Could not log in: ${err.message}`;
}
