"""Headless Chromium for the tests that look at pages (report pages, the endpoint's playground):
the system's Chromium (Debian's `chromium` package, which scripts/test.sh installs), driven by
Playwright; its own browser downloads are never used. Screenshots are kept in test-artifacts/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# Text that would run if a page did not escape it: it sets the page's title.
SCRIPT = "<script>document.title='pwned'</script>"


def launch_chromium():
    """A context manager yielding a launched headless Chromium (Playwright's Browser)."""
    import contextlib

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no Chromium at {CHROMIUM}: run scripts/test.sh (it installs Debian's chromium), "
                    "or set CHROMIUM to a Chromium binary")
    from playwright.sync_api import sync_playwright

    @contextlib.contextmanager
    def _launched():
        with sync_playwright() as p:
            chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                yield chromium
            finally:
                chromium.close()

    return _launched()
