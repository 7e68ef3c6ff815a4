// The large-photo viewer: a modal <dialog>. Escape closes it (native), so does
// a click on the backdrop or the close button; focus returns to the thumbnail.

import { allowedImageUrl, safeColor } from './images.js';
import { altText, buildAltLine, buildCredit } from './rows.js';

export class Viewer {
  constructor(dialog) {
    this.dialog = dialog;
    this.img = dialog.querySelector('[data-testid="viewer-img"]');
    this.caption = dialog.querySelector('.viewer-caption');
    this.opener = null;
    dialog.querySelector('[data-action="close-viewer"]').addEventListener('click', () => this.close());
    dialog.addEventListener('click', (ev) => {
      if (ev.target === dialog) this.close(); // the backdrop
    });
    dialog.addEventListener('close', () => {
      this.img.removeAttribute('src');
      if (this.opener && this.opener.isConnected) this.opener.focus({ preventScroll: true });
      this.opener = null;
    });
  }

  /** Opens the job's large photo; returns false if there is nothing we may show. */
  open(job, opener) {
    const image = job && job.image && typeof job.image === 'object' ? job.image : null;
    const url = allowedImageUrl(job && job.result)
      || allowedImageUrl(image && image.small)
      || allowedImageUrl(image && image.thumb);
    if (!url) return false;
    const color = safeColor(image && image.color);
    this.img.style.backgroundColor = color || '';
    this.img.alt = altText(image);
    this.img.src = url;
    this.caption.replaceChildren(buildAltLine(image, 'viewer-alt'), buildCredit(image));
    this.opener = opener || null;
    if (!this.dialog.open) this.dialog.showModal();
    return true;
  }

  close() {
    if (this.dialog.open) this.dialog.close();
  }
}
