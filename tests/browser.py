"""Headless Chromium for the report's tests: what a page draws, measured inside the page
(after its images have loaded), and screenshots."""

from __future__ import annotations

import html
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

# Runs in the page once it has loaded: every thumbnail (decoded size), every box and tile
# (their rectangles relative to their picture), every chart point; written into the DOM.
MEASURE = """
<script>
window.addEventListener('load', () => {
  const box = e => { const r = e.getBoundingClientRect();
    return {x: r.left, y: r.top, w: r.width, h: r.height}; };
  const found = {
    images: [...document.querySelectorAll('img.thumb')].map(img => ({
      source: img.closest('figure').dataset.source, complete: img.complete,
      width: img.naturalWidth, height: img.naturalHeight, at: box(img)})),
    missing: [...document.querySelectorAll('.missing')].map(
      e => e.closest('figure').dataset.source),
    boxes: [...document.querySelectorAll('rect.box')].map(rect => ({
      source: rect.closest('figure').dataset.source, at: box(rect),
      image: box(rect.closest('figure').querySelector('img'))})),
    tiles: [...document.querySelectorAll('rect.tile')].map(rect => ({
      label: rect.dataset.label, at: box(rect), scene: box(rect.closest('svg'))})),
    strips: [...document.querySelectorAll('.strip')].map(s => ({
      title: s.dataset.title,
      sources: [...s.querySelectorAll('figure')].map(f => f.dataset.source)})),
    errors: [...document.querySelectorAll('tr.error')].map(
      tr => [...tr.querySelectorAll('td')].map(td => td.textContent)),
    points: [...document.querySelectorAll('circle.point')].map(c => ({
      chart: c.closest('svg').dataset.chart, series: c.dataset.series, run: c.dataset.run,
      value: Number(c.dataset.value), at: box(c), plot: box(c.closest('svg').querySelector(
        'rect.plot')), low: Number(c.closest('svg').dataset.low),
      high: Number(c.closest('svg').dataset.high)})),
  };
  const out = document.createElement('pre');
  out.id = 'measured';
  out.textContent = JSON.stringify(found);
  document.body.appendChild(out);
});
</script>
"""


def measure(page: str, folder: Path) -> dict[str, Any]:
    """What headless Chromium drew of the page `page` (HTML text)."""
    path = folder / "measured.html"
    path.write_text(page.replace("</body>", MEASURE + "</body>"))
    dom = _chromium(folder, ["--dump-dom", "--virtual-time-budget=10000", path.as_uri()])
    start = dom.index('<pre id="measured">') + len('<pre id="measured">')
    found: dict[str, Any] = json.loads(html.unescape(dom[start : dom.index("</pre>", start)]))
    return found


def screenshot(page: Path, shot: Path, size: tuple[int, int] = (1000, 700)) -> None:
    _chromium(
        page.parent,
        [f"--window-size={size[0]},{size[1]}", f"--screenshot={shot}", page.as_uri()],
    )


def _chromium(folder: Path, arguments: list[str]) -> str:
    command = [str(CHROMIUM), *FLAGS, f"--user-data-dir={folder / 'profile'}", *arguments]
    done = subprocess.run(command, capture_output=True, timeout=120, check=True, text=True)
    return done.stdout
