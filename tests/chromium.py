"""Debian's Chromium for the browser tests (never a browser Playwright downloads), and how to start it here."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def chromium_context(profile_dir):
    """A headless Chromium context with an empty profile in ``profile_dir``; skips the test where Chromium
    or Playwright is missing, and closes the browser afterwards."""
    import pytest

    chromium = chromium_path()
    if chromium is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile_dir),
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()
