// One shared timer for everything that counts down on the page, aligned to the
// wall-clock second so all countdowns change together.

const subscribers = new Set();
let timer = null;

function schedule() {
  const delay = 1000 - (Date.now() % 1000) + 5;
  timer = setTimeout(run, delay);
}

function run() {
  const t = Date.now();
  for (const fn of subscribers) {
    try {
      fn(t);
    } catch (err) {
      console.warn('ticker subscriber failed', err); // eslint-disable-line no-console
    }
  }
  schedule();
}

export function onTick(fn) {
  subscribers.add(fn);
  if (timer === null) schedule();
  return () => subscribers.delete(fn);
}
