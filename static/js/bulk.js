// "Retry all failed" and "Delete finished": one click opens a confirmation in place that
// says how many (the server's totals), Confirm sends one request, Keep (or Escape) puts
// it away. Focus goes to Keep, the safe choice, and back to the button after. The jobs
// then change by the live events, as if someone had clicked each card.

import { plural } from './util.js';

const KINDS = {
  retry: {
    count: (c) => c.failed,
    none: 'No failed jobs to retry.',
    question: (c) => `Retry all ${plural(c.failed, 'failed job')}?`,
    go: (c) => `Retry ${new Intl.NumberFormat().format(c.failed)}`,
    busy: 'Retrying…',
    done: (n) => `Retrying ${plural(n, 'failed job')}.`,
    what: 'Retry all',
  },
  delete: {
    count: (c) => c.resolved + c.failed,
    none: 'No finished jobs to delete.',
    question: (c) => `Delete all ${plural(c.resolved + c.failed, 'finished job')} `
      + `(${new Intl.NumberFormat().format(c.resolved)} resolved, `
      + `${new Intl.NumberFormat().format(c.failed)} failed) for good?`,
    go: (c) => `Delete ${new Intl.NumberFormat().format(c.resolved + c.failed)}`,
    busy: 'Deleting…',
    done: (n) => `Deleting ${plural(n, 'finished job')}.`,
    what: 'Delete finished',
  },
};

export class BulkActions {
  /**
   * @param {HTMLElement} root  the bulk bar
   * @param {object} hooks
   * @param {() => object|null} hooks.counts  the totals shown ({pending, resolved, failed}), or null
   * @param {(kind: string) => Promise<{taken: number}>} hooks.run
   */
  constructor(root, hooks) {
    this.root = root;
    this.hooks = hooks;
    this.buttons = [...root.querySelectorAll('[data-bulk]')];
    this.box = root.querySelector('[data-testid="bulk-confirm"]');
    this.question = this.box.querySelector('.confirm-text');
    this.go = root.querySelector('[data-testid="bulk-go"]');
    this.keep = root.querySelector('[data-testid="bulk-keep"]');
    this.message = root.querySelector('[data-testid="bulk-message"]');
    this.kind = null; // the confirmation open, if any
    this.trigger = null;
    this.sending = false;
    for (const button of this.buttons) {
      button.addEventListener('click', () => this.ask(button.dataset.bulk, button));
    }
    this.keep.addEventListener('click', () => this.dismiss(true));
    this.go.addEventListener('click', () => this.send());
    this.box.addEventListener('keydown', (ev) => {
      if (ev.key === 'Escape') {
        ev.preventDefault();
        this.dismiss(true);
      }
    });
    this.refresh();
  }

  /** The totals changed: the buttons, and an open question, say the new numbers. */
  refresh() {
    const counts = this.hooks.counts();
    for (const button of this.buttons) {
      const none = !counts || KINDS[button.dataset.bulk].count(counts) === 0;
      const disabled = String(none);
      if (button.getAttribute('aria-disabled') !== disabled) button.setAttribute('aria-disabled', disabled);
    }
    if (this.kind && !this.sending && counts) {
      const kind = KINDS[this.kind];
      if (kind.count(counts) === 0) this.dismiss(false);
      else this.word(kind, counts);
    }
  }

  word(kind, counts) {
    const question = kind.question(counts);
    if (this.question.textContent !== question) this.question.textContent = question;
    const go = kind.go(counts);
    if (this.go.textContent !== go) this.go.textContent = go;
  }

  ask(name, trigger) {
    if (this.sending) return;
    const kind = KINDS[name];
    const counts = this.hooks.counts();
    if (!counts || kind.count(counts) === 0) {
      this.say(kind.none);
      return;
    }
    this.kind = name;
    this.trigger = trigger;
    this.say('');
    this.word(kind, counts);
    this.box.hidden = false;
    this.keep.focus();
  }

  dismiss(refocus) {
    this.box.hidden = true;
    this.kind = null;
    if (refocus && this.trigger && this.trigger.isConnected) this.trigger.focus();
  }

  async send() {
    if (this.sending || !this.kind) return;
    const kind = KINDS[this.kind];
    this.sending = true;
    this.go.setAttribute('aria-disabled', 'true');
    this.go.textContent = kind.busy;
    let message;
    try {
      const { taken } = await this.hooks.run(this.kind);
      message = taken ? kind.done(taken) : kind.none;
    } catch (err) {
      message = `${kind.what} did not go through: ${err.message}`;
    } finally {
      this.sending = false;
      this.go.removeAttribute('aria-disabled');
    }
    this.dismiss(true);
    this.say(message); // a status region: read out
    this.refresh();
  }

  say(text) {
    if (this.message.textContent !== text) this.message.textContent = text;
  }

  /** Logging out: nothing open, nothing said. */
  reset() {
    this.dismiss(false);
    this.say('');
    this.refresh();
  }
}
