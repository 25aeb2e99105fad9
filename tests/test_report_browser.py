"""The report as a person sees it (issue 18): the smoke run's ``report.html`` opened in a real headless
Chromium at a laptop size, 1366x768.

Chromium runs from its command line (no Python browser driver is a dependency): ``--dump-dom`` after
``--virtual-time-budget`` lets the page finish loading, ``--screenshot`` saves what a laptop shows
first. What the page cannot tell from outside, a small probe script reports from inside: it is
injected at the top of a copy of the page (the copy sits in a copy of the report folder, so images
kept as files beside the page still resolve), records every uncaught exception, unhandled rejection,
``console.error`` and failed resource load, and on ``load`` writes JSON with its findings into
``data-raysynth-probe`` on ``<html>``, which the dumped DOM carries back. Chromium's own console
lines (``--enable-logging=stderr``) are a second look at console output.

Checked: (1) every ``<img>`` loaded (``complete`` and ``naturalWidth > 0``); (2) no JavaScript error
and no console message at all (the report has no scripts, so any is a fault); (3) no horizontal
scroll at 1366 px: ``document.documentElement.scrollWidth <= clientWidth``, the culprits (outermost
elements whose right edge passes the viewport) named in the failure; (4) screenshots under tmp_path:
the first screen (1366x768) and the whole page at 1366 px wide.

Without /usr/bin/chromium (Debian package ``chromium``) the tests skip; ``.ci/run`` installs it.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
WIDTH, HEIGHT = 1366, 768
PROBE_ATTR = "data-raysynth-probe"

PROBE = """<script>/* raysynth browser-test probe */
(function () {
  var errors = [], resources = [], consoleErrors = [];
  window.addEventListener("error", function (e) {
    if (e instanceof ErrorEvent) {
      errors.push(String(e.message) + " at " + e.filename + ":" + e.lineno);
    } else if (e.target && e.target !== window) {
      resources.push((e.target.tagName || "?") + " " + String(e.target.src || e.target.href || "").slice(0, 120));
    }
  }, true);
  window.addEventListener("unhandledrejection", function (e) { errors.push("unhandled rejection: " + String(e.reason)); });
  var origError = console.error;
  console.error = function () {
    consoleErrors.push(Array.prototype.map.call(arguments, String).join(" "));
    return origError.apply(console, arguments);
  };
  function describe(el) {
    var r = el.getBoundingClientRect();
    return {tag: el.tagName.toLowerCase(), id: el.id || null, cls: el.className ? String(el.className) : null,
            left: Math.round(r.left), right: Math.round(r.right), width: Math.round(r.width),
            text: (el.textContent || el.getAttribute("alt") || "").trim().replace(/\\s+/g, " ").slice(0, 80)};
  }
  function outermost(limit) {
    var out = [];
    document.querySelectorAll("body *").forEach(function (el) {
      var p = el.parentElement;
      if (el.getBoundingClientRect().right > limit + 0.5 &&
          !(p && p !== document.body && p.getBoundingClientRect().right > limit + 0.5)) out.push(describe(el));
    });
    return out.slice(0, 20);
  }
  window.addEventListener("load", function () {
    var doc = document.documentElement, body = document.body;
    var bodyRight = body.getBoundingClientRect().right - parseFloat(getComputedStyle(body).paddingRight || "0");
    var images = Array.prototype.map.call(document.images, function (img) {
      var r = img.getBoundingClientRect();
      return {src: (img.currentSrc || img.src || "").slice(0, 80), alt: (img.alt || "").slice(0, 80),
              complete: img.complete, naturalWidth: img.naturalWidth, naturalHeight: img.naturalHeight,
              shownWidth: Math.round(r.width), shownHeight: Math.round(r.height)};
    });
    doc.setAttribute("%(attr)s", JSON.stringify({
      errors: errors, consoleErrors: consoleErrors, failedResources: resources, images: images,
      innerWidth: window.innerWidth, innerHeight: window.innerHeight,
      clientWidth: doc.clientWidth, scrollWidth: doc.scrollWidth, bodyScrollWidth: body.scrollWidth,
      scrollHeight: doc.scrollHeight,
      pastViewport: outermost(doc.clientWidth), pastBodyColumn: outermost(bodyRight)
    }));
  });
})();
</script>
""".replace("%(attr)s", PROBE_ATTR)


def _need_chromium() -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: install Debian's package 'chromium' (apt-get install -y chromium) "
                    "to open the report in a headless browser")


def _with_probe(page: str) -> str:
    """The probe as early as possible (so it sees every page script) but after ``<meta charset>``,
    which must stay within the page's first 1024 bytes."""
    for pattern in (r"<meta[^>]*charset[^>]*>", r"<head[^>]*>", r"<html[^>]*>"):
        m = re.search(pattern, page, flags=re.I)
        if m:
            return page[:m.end()] + "\n" + PROBE + page[m.end():]
    return PROBE + page


def _chromium(page: Path, profile: Path, size: tuple[int, int], screenshot: Path) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-quic", "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-extensions", "--mute-audio",
           f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=5000",
           "--enable-logging=stderr", "--v=0", f"--screenshot={screenshot}", "--dump-dom", page.as_uri()]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=180)
    assert proc.returncode == 0, f"chromium exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert screenshot.is_file() and screenshot.stat().st_size > 0, f"no screenshot:\n{proc.stderr[-3000:]}"
    return proc


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def open_in_browser(report_dir: Path, work: Path, page_name: str = "report.html") -> dict:
    """Open a probed copy of ``report_dir/page_name`` at 1366x768; return the probe's findings plus
    Chromium's console lines and the screenshot paths (first screen, and the whole page)."""
    _need_chromium()
    copy = work / "report"
    shutil.copytree(report_dir, copy)
    probed = copy / f"browser-{page_name}"
    probed.write_text(_with_probe((report_dir / page_name).read_text(encoding="utf-8")), encoding="utf-8")

    first = work / f"report_{WIDTH}x{HEIGHT}.png"
    proc = _chromium(probed, work / "profile", (WIDTH, HEIGHT), first)
    m = re.search(rf'<html[^>]*\s{PROBE_ATTR}="([^"]*)"', proc.stdout)
    assert m, "the probe never reported: the page's load event did not fire within the time budget\n" \
              + proc.stdout[:2000]
    found = json.loads(html.unescape(m.group(1)))
    # Chromium logs every console message of the page as "...:CONSOLE...] "text", source: url (line)".
    found["console"] = [line.split("] ", 1)[-1] for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    found["screenshot"] = first

    # The whole page at the same width: a window as tall as the page (bounded: Chromium cannot
    # capture an arbitrarily tall surface).
    full = work / f"report_full_{WIDTH}.png"
    _chromium(probed, work / "profile", (WIDTH, min(found["scrollHeight"], 16000)), full)
    found["full_screenshot"] = full
    (work / "browser_findings.json").write_text(json.dumps(
        {k: (str(v) if isinstance(v, Path) else v) for k, v in found.items()}, indent=1))
    return found


def problems(found: dict) -> list[str]:
    """Everything a person would call broken, one line each; empty when the page is fine."""
    out = []
    for img in found["images"]:
        if not img["complete"] or img["naturalWidth"] <= 0:
            out.append(f"image did not load: alt={img['alt']!r} src={img['src']!r}")
    out += [f"failed to load: {r}" for r in found["failedResources"]]
    out += [f"JavaScript error: {e}" for e in found["errors"]]
    out += [f"console.error: {e}" for e in found["consoleErrors"]]
    out += [f"console message: {c}" for c in found["console"]]
    if found["scrollWidth"] > found["clientWidth"]:
        out.append(f"horizontal scroll at {WIDTH}px: page {found['scrollWidth']}px wide, viewport "
                   f"{found['clientWidth']}px; past the viewport: {found['pastViewport']}")
    return out


@pytest.fixture(scope="module")
def smoke_report(smoke_cli) -> Path:
    """The report of the session's smoke run (conftest.smoke_cli, shared with test_pipeline_e2e and
    test_console: no pipeline of its own when the suite runs whole)."""
    assert smoke_cli.returncode == 0, smoke_cli.output[-3000:]
    report = smoke_cli.out / "report"
    assert (report / "report.html").is_file()
    return report


@pytest.mark.slow
def test_smoke_report_reads_in_a_browser_at_laptop_width(smoke_report, tmp_path):
    found = open_in_browser(smoke_report, tmp_path)
    assert found["innerWidth"] == WIDTH
    assert len(found["images"]) >= 5  # the figures are there at all (data: URIs in today's report)
    broken = problems(found)
    assert not broken, "the report, opened in Chromium at 1366x768:\n" + "\n".join(broken)
    for shot in (found["screenshot"], found["full_screenshot"]):
        assert _png_size(shot)[0] == WIDTH
    print(f"\nreport in Chromium: {len(found['images'])} images, page {found['scrollWidth']}x"
          f"{found['scrollHeight']} px, screenshots {found['screenshot']} and {found['full_screenshot']}")


def test_the_probe_sees_what_is_broken(tmp_path):
    """The check itself: a page with a broken image, a thrown error, a console.error and a too-wide
    element must yield exactly those problems (else a green report test would mean nothing)."""
    _need_chromium()
    src = tmp_path / "src"
    src.mkdir()
    ok_png = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==")
    (src / "report.html").write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>t</title></head><body>'
        f'<img alt="fine" src="data:image/png;base64,{ok_png}">'
        '<img alt="gone" src="missing.png">'
        '<div style="width:3000px">too wide</div>'
        '<script>console.error("said so"); throw new Error("boom");</script>'
        '</body></html>', encoding="utf-8")
    found = open_in_browser(src, tmp_path / "work")
    text = "\n".join(problems(found))
    assert [i["naturalWidth"] for i in found["images"]] == [1, 0]
    assert "image did not load: alt='gone'" in text and "missing.png" in text
    assert "fine" not in text
    assert "JavaScript error: Uncaught Error: boom" in text
    assert "console.error: said so" in text
    assert "horizontal scroll at 1366px" in text and "'tag': 'div'" in text
