"""Render a page with headless Chromium to a PNG (to check a report renders as it should)."""

import shutil
import subprocess
from pathlib import Path

from ..errors import LinearizeError

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 3000, timeout: int = 120) -> Path:
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        raise LinearizeError("no Chromium found for --screenshot: run `apt-get install -y chromium`")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--hide-scrollbars", f"--window-size={width},{height}", f"--screenshot={Path(png).resolve()}",
           Path(page).resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not Path(png).is_file():
        raise LinearizeError(f"chromium could not render {page}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return Path(png)
