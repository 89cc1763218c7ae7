"""Screenshot a report.html with headless Chromium.

    python scripts/screenshot_report.py runs/demo/report.html docs/report.png --height 4000

Needs a ``chromium`` (or ``chromium-browser`` / ``google-chrome``) binary on PATH; on Debian:
``apt-get install -y chromium``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


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
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=4000)
    args = ap.parse_args(argv)
    try:
        out = screenshot(args.html, args.png, args.width, args.height)
    except (RuntimeError, FileNotFoundError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
