"""How fast the page opens: milliseconds from navigation start to the first job card shown
and to the totals shown, measured in headless Chromium (Debian's, launched as the browser
tests launch it) against a service that is already running.

    python tests/page_timing.py http://127.0.0.1:8080 [--runs 3] [--timeout 30]

prints one JSON object: per run, `first_card_ms` (the first card built and displayed, at the
end of the frame that shows it), `totals_ms` (the same for the totals), `*_dom_ms` (when the
DOM first had them) and the durations of the page's two requests (`GET /jobs?...` and
`GET /jobs/stats`); then the median of each over the runs. Every run is a fresh browser
context (no cache). Exit status 1 if the page did not show both within the timeout.

`measure()` is the same as a coroutine, for tests/bench.py and the browser tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}

# An init script (runs before any of the page's own): a MutationObserver notes the first
# moment each of the two things is in the DOM, then the end of the frame that paints it.
# performance.now() counts from the navigation start.
TIMING_JS = """(() => {
  const t = window.__timing = {};
  const CARD = '[data-testid="job-list"] > li[data-job-id]:not([hidden]):not(:empty)';
  const TOTALS = '[data-testid="stats"][aria-busy="false"]';
  const seen = (key) => {
    t[key + 'Dom'] = performance.now();
    requestAnimationFrame(() => setTimeout(() => { t[key] = performance.now(); }, 0));
  };
  const check = () => {
    if (t.cardDom === undefined && document.querySelector(CARD)) seen('card');
    if (t.totalsDom === undefined && document.querySelector(TOTALS)) seen('totals');
    if (t.cardDom !== undefined && t.totalsDom !== undefined) observer.disconnect();
  };
  const observer = new MutationObserver(check);
  observer.observe(document, {subtree: true, childList: true, attributes: true,
                              attributeFilter: ['hidden', 'aria-busy']});
})();"""

TIMING_READY_JS = "() => !!window.__timing && 'card' in __timing && 'totals' in __timing"

READ_TIMING_JS = """() => {
  const t = window.__timing;
  const requests = performance.getEntriesByType('resource')
    .filter((e) => new URL(e.name).pathname.startsWith('/jobs'))
    .map((e) => ({url: new URL(e.name).pathname + new URL(e.name).search,
                  ms: e.responseEnd - e.startTime, bytes: e.encodedBodySize}));
  return {first_card_ms: t.card, totals_ms: t.totals, first_card_dom_ms: t.cardDom,
          totals_dom_ms: t.totalsDom, requests};
}"""


async def measure_once(browser, base_url: str, timeout_ms: float) -> dict:
    context = await browser.new_context(viewport=VIEWPORT)
    try:
        await context.add_init_script(TIMING_JS)
        page = await context.new_page()
        await page.goto(base_url.rstrip("/") + "/", wait_until="commit")
        await page.wait_for_function(TIMING_READY_JS, timeout=timeout_ms)
        return await page.evaluate(READ_TIMING_JS)
    finally:
        await context.close()


async def measure(base_url: str, runs: int = 1, timeout: float = 30.0, browser=None) -> dict:
    """Opens the page `runs` times; the per-run numbers and their medians."""
    results = []
    if browser is not None:
        for _ in range(runs):
            results.append(await measure_once(browser, base_url, timeout * 1000))
    else:
        from playwright.async_api import async_playwright

        async with async_playwright() as playwright:
            own = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                for _ in range(runs):
                    results.append(await measure_once(own, base_url, timeout * 1000))
            finally:
                await own.close()
    summary = {key: statistics.median(run[key] for run in results)
               for key in ("first_card_ms", "totals_ms", "first_card_dom_ms", "totals_dom_ms")}
    return {"url": base_url, **summary, "runs": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the running service's base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--runs", type=int, default=1, help="page loads to measure (default 1)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds a load may take before it counts as failed (default 30)")
    args = parser.parse_args(argv)
    try:
        result = asyncio.run(measure(args.url, args.runs, args.timeout))
    except Exception as exc:  # reported as JSON, for the benchmark to record
        print(json.dumps({"url": args.url, "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
