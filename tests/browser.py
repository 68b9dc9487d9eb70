"""Render an HTML page in a real browser (headless Chromium) and measure what a reader would see.

The page measures itself: a copy of it, beside it (so its relative links resolve), gets a script
that waits for every ``<img>`` (made eager), then records the layout viewport's width, the document's
scroll width, every element that reaches past the right edge outside a scrolling box, each image's
``naturalWidth`` and the visible text, into a ``<pre>`` that ``chromium --dump-dom`` prints. A second
run takes a screenshot of the whole page. Chromium comes from the distribution (``apt-get install
chromium``, as ``.ci/run`` does); without one the tests that need it are skipped, saying so.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
NO_BROWSER = ("no Chromium/Chrome found (looked for " + ", ".join(BROWSERS) + "); install the distribution's "
              "package, e.g. `apt-get install -y chromium` on Debian, as .ci/run does")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--disable-dev-shm-usage")
# What a template bug prints instead of a value.
BAD_TEXT = re.compile(r"\b(?:nan|NaN|None|undefined|null)\b|<[\w.]+ object at 0x[0-9a-fA-F]+>"
                      r"|\bDictConfig\(|\bTensor\(")

_MEASURE = """
window.addEventListener('load', async () => {
  const imgs = [...document.images];
  imgs.forEach(i => { i.loading = 'eager'; });
  await Promise.all(imgs.map(i => (i.complete && i.naturalWidth) ? null : new Promise(done => {
    i.addEventListener('load', done); i.addEventListener('error', done); setTimeout(done, 5000); })));
  const width = document.documentElement.clientWidth;
  const scrolls = el => { for (let p = el.parentElement; p; p = p.parentElement) {
    const o = getComputedStyle(p).overflowX; if (o === 'auto' || o === 'scroll') return true; } return false; };
  const wide = [];
  for (const el of document.body.querySelectorAll('*')) {
    const r = el.getBoundingClientRect();
    if (r.width && r.right > width + 0.5 && !scrolls(el))
      wide.push({tag: el.tagName.toLowerCase(), right: Math.round(r.right),
                 text: (el.innerText || el.getAttribute('src') || '').slice(0, 80)});
  }
  const result = {viewport: width, scroll_width: document.documentElement.scrollWidth,
    height: document.documentElement.scrollHeight, overflowing: wide, text: document.body.innerText,
    images: imgs.map(i => ({src: i.getAttribute('src'), natural_width: i.naturalWidth,
                            shown_width: Math.round(i.getBoundingClientRect().width)}))};
  const out = document.createElement('pre');
  out.id = '__measured__';
  out.textContent = btoa(unescape(encodeURIComponent(JSON.stringify(result))));
  document.body.appendChild(out);
});
"""


def find_browser() -> Optional[str]:
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def _run(browser: str, args: list[str], timeout: int = 120) -> str:
    with tempfile.TemporaryDirectory(prefix="img-browser-") as profile:
        done = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                              timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{browser} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def measure(page: Path, screenshot: Path, width: int = 1280, browser: Optional[str] = None) -> dict[str, Any]:
    """Render ``page`` ``width`` px wide; returns the measurements, with ``screenshot`` written."""
    browser = browser or find_browser()
    assert browser, NO_BROWSER
    probe = page.with_name(f".{page.stem}.measure.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", f"<script>{_MEASURE}</script></body>"),
                     encoding="utf-8")
    try:
        dom = _run(browser, [f"--window-size={width},900", "--virtual-time-budget=15000", "--dump-dom",
                             probe.resolve().as_uri()])
    finally:
        probe.unlink()
    found = re.search(r'<pre id="__measured__">([A-Za-z0-9+/=]+)</pre>', dom)
    assert found, f"the page's measurements are not in the DOM Chromium printed:\n{dom[-2000:]}"
    result = json.loads(base64.b64decode(found.group(1)).decode("utf-8"))
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    _run(browser, [f"--window-size={width},{min(int(result['height']) + 16, 16000)}", "--virtual-time-budget=15000",
                   f"--screenshot={screenshot.resolve()}", page.resolve().as_uri()])
    result["screenshot"] = str(screenshot)
    return result


def problems(result: dict[str, Any]) -> list[str]:
    """What a reader would see go wrong: horizontal overflow, images that did not load, reprs."""
    found = []
    if result["scroll_width"] > result["viewport"]:
        found.append(f"the page is {result['scroll_width']} px wide in a {result['viewport']} px window")
    found += [f"<{o['tag']}> reaches {o['right']} px (window {result['viewport']}): {o['text']!r}"
              for o in result["overflowing"][:10]]
    found += [f"image {i['src']} did not load" for i in result["images"] if not i["natural_width"]]
    found += [f"the text shows {m.group(0)!r}: ...{result['text'][max(0, m.start() - 40):m.end() + 40]!r}..."
              for m in BAD_TEXT.finditer(result["text"])]
    return found
