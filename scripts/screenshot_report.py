"""Screenshot a report.html with headless Chromium, or check that it fits the screen.

    python scripts/screenshot_report.py runs/demo/report.html docs/report.png --height 4000
    python scripts/screenshot_report.py runs/demo/report.html phone.png --width 400
    python scripts/screenshot_report.py runs/demo/report.html --check-widths 1400 400

``--check-widths`` loads the report at each width (in an iframe of that width: a headless
window is never narrower than 500 px) and prints, per width, the page's ``scrollWidth`` against
its ``clientWidth``, the elements that stick out of the page, and the tables outside a
horizontal scroll box; it exits 1 when anything does not fit.

Needs a ``chromium`` (or ``chromium-browser`` / ``google-chrome``) binary on PATH; on Debian:
``apt-get install -y chromium``.
"""

from __future__ import annotations

import argparse
import html as html_mod
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Added to the report (a copy) for --check-widths: once loaded, it measures the page and posts
# the numbers to the parent page, which holds one iframe per width.
PROBE = """<script>
window.addEventListener("load", function () {
  var W = document.documentElement.clientWidth, out = [], unwrapped = 0;
  function scrolls(el) {
    for (var a = el.parentElement; a && a !== document.body; a = a.parentElement) {
      var o = getComputedStyle(a).overflowX;
      if (o === "auto" || o === "scroll" || o === "hidden") return true;
    }
    return false;
  }
  function right(el) {  /* its box, or its content where that spills out of the box */
    var r = el.getBoundingClientRect();
    if (getComputedStyle(el).overflowX !== "visible") return r.right;  /* a scroll box */
    return Math.max(r.right, r.left + el.scrollWidth);
  }
  var wide = Array.prototype.filter.call(document.querySelectorAll("body *"), function (el) {
    return right(el) > W + 1 && !scrolls(el);
  });
  wide.forEach(function (el) {  /* the innermost: what to fix */
    if (!wide.some(function (c) { return c !== el && el.contains(c); }))
      out.push(el.tagName.toLowerCase() + (el.className ? "." + el.className : "") + " " +
               Math.round(right(el)) + ": " + el.textContent.trim().slice(0, 60));
  });
  document.querySelectorAll("table").forEach(function (t) { if (!scrolls(t)) unwrapped++; });
  parent.postMessage({width: window.innerWidth, client: W,
    scroll: document.documentElement.scrollWidth, offenders: out.slice(0, 20),
    tables: document.querySelectorAll("table").length, unwrapped: unwrapped}, "*");
});
</script>"""


def find_chromium() -> str | None:
    """Path of the first Chromium-like binary on PATH, or None."""
    for name in BINARIES:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(
    html: str | Path, png: str | Path, width: int = 1280, height: int = 4000, timeout: float = 60.0
) -> Path:
    """Render ``html`` in headless Chromium and save a ``width`` x ``height`` PNG at ``png``."""
    binary = find_chromium()
    if binary is None:
        raise RuntimeError("chromium not found on PATH (apt-get install -y chromium)")
    html, png = Path(html).resolve(), Path(png).resolve()
    if not html.exists():
        raise FileNotFoundError(html)
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lorasweep-chromium-") as profile:
        cmd = [
            binary,
            *FLAGS,
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={width},{height}",
            html.as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not png.exists():
        raise RuntimeError(
            f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
        )
    return png


def check_widths(
    html: str | Path, widths: tuple[int, ...] = (1400, 400), timeout: float = 60.0
) -> dict[int, dict]:
    """Load ``html`` at each of ``widths`` (CSS px) in one headless Chromium and measure it:
    ``{width: {"client", "scroll", "offenders", "tables", "unwrapped"}}``. The page fits when
    ``scroll <= client`` (no sideways scrolling: ``scrollWidth`` within the viewport less its
    scrollbar); ``offenders`` are the outermost elements that stick out of it, ``unwrapped`` the
    tables outside a horizontal scroll box."""
    binary = find_chromium()
    if binary is None:
        raise RuntimeError("chromium not found on PATH (apt-get install -y chromium)")
    html = Path(html).resolve()
    if not html.exists():
        raise FileNotFoundError(html)
    with tempfile.TemporaryDirectory(prefix="lorasweep-chromium-") as tmp:
        d = Path(tmp)
        page = html.read_text(encoding="utf-8")
        head, sep, tail = page.rpartition("</body>")
        (d / "report.html").write_text(head + PROBE + sep + tail if sep else page + PROBE)
        frames = "".join(
            f'<iframe src="report.html" style="width:{w}px;height:900px;border:0"></iframe>'
            for w in widths
        )
        (d / "check.html").write_text(
            '<!DOCTYPE html><html><body><pre id="out"></pre>' + frames + "<script>var got = {};"
            "addEventListener('message', function (e) { got[e.data.width] = e.data;"
            "document.getElementById('out').textContent = JSON.stringify(got); });"
            "</script></body></html>"
        )
        cmd = [binary, *FLAGS, f"--user-data-dir={d / 'profile'}",
               f"--window-size={max(widths) + 100},1000", "--virtual-time-budget=10000",
               "--dump-dom", (d / "check.html").as_uri()]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    m = re.search(r'<pre id="out">(.*?)</pre>', proc.stdout, re.S)
    got = json.loads(html_mod.unescape(m.group(1))) if m and m.group(1) else {}
    missing = [w for w in widths if str(w) not in got]
    if missing:
        raise RuntimeError(
            f"chromium measured no page at width {missing} (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-500:]}"
        )
    return {w: got[str(w)] for w in widths}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("png", type=Path, nargs="?", help="the screenshot (not with --check-widths)")
    ap.add_argument("--width", type=int, default=1280, help="CSS px (a phone: 400)")
    ap.add_argument("--height", type=int, default=4000)
    ap.add_argument("--check-widths", type=int, nargs="+", metavar="PX")
    args = ap.parse_args(argv)
    try:
        if args.check_widths:
            res = check_widths(args.html, tuple(args.check_widths))
            print(json.dumps(res, indent=1))
            bad = [w for w, r in res.items() if r["scroll"] > r["client"] or r["unwrapped"]]
            return 1 if bad else 0
        if args.png is None:
            ap.error("give a PNG path, or --check-widths")
        out = screenshot(args.html, args.png, args.width, args.height)
    except (RuntimeError, FileNotFoundError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
