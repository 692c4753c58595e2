"""Debian's Chromium for the browser tests (never a browser Playwright downloads), and how to start it here."""

from __future__ import annotations

import os
import shutil

# The machine's network is closed: without the background-networking flags Chromium keeps trying
# Google's hosts. Playwright adds --headless itself (headless=True).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    """The system's Chromium, or None where it is not installed."""
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")
