"""Screenshot a run's report.html with headless Chromium, to check how it renders.

    python scripts/screenshot_report.py runs/adgen-tiny/report.html --out /tmp/report.png

Needs a Chromium binary (Debian: `apt-get install -y chromium`). Exit 0 with the PNG written,
1 when Chromium is missing or fails. No network: the report is self-contained, and the flags
below switch off Chromium's own background traffic.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def find_browser() -> str | None:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(
    html: Path, png: Path, width: int = 1280, height: int = 2000, timeout: float = 120
) -> Path:
    """Render `html` at width x height into `png`; RuntimeError when it cannot."""
    browser = find_browser()
    if browser is None:
        raise RuntimeError(
            f"no Chromium found (tried {', '.join(BROWSERS)}); "
            "install it with `apt-get install -y chromium`"
        )
    html, png = Path(html).resolve(), Path(png).resolve()
    if not html.is_file():
        raise RuntimeError(f"{html}: not found")
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [
            browser,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={width},{height}",
            html.as_uri(),
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{browser} did not finish in {timeout:.0f} s") from None
    if not png.is_file() or png.stat().st_size == 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(
            f"{browser} exited {done.returncode} without a screenshot: " + " | ".join(tail)
        )
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="the report.html to render")
    parser.add_argument("--out", type=Path, default=Path("report.png"), help="PNG to write")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2000)
    args = parser.parse_args(argv)
    try:
        png = screenshot(args.report, args.out, args.width, args.height)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
