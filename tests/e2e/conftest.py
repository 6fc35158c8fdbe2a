"""The browser both end-to-end files drive: Debian's Chromium through Playwright.

Never runs ``playwright install``: the binary is ``/usr/bin/chromium`` or
``$MLFLOW_EIGENCAM_CHROMIUM``. Without it (or without playwright) the browser tests skip,
unless ``MLFLOW_EIGENCAM_REQUIRE_BROWSER=1`` (CI), where they fail.
"""

from __future__ import annotations

import os
from typing import Iterator, List

import pytest

from tests.helpers.explorer_page import TIMEOUT_MS

CHROMIUM = os.environ.get("MLFLOW_EIGENCAM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _unavailable(reason: str) -> None:
    """Skip, or fail when CI said the browser must be there."""
    if os.environ.get("MLFLOW_EIGENCAM_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (and MLFLOW_EIGENCAM_REQUIRE_BROWSER=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """Headless Chromium driven by Playwright, from the system binary (one per test file)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _unavailable(f"playwright is not importable ({exc}); pip install playwright")
    if not os.path.isfile(CHROMIUM) or not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set "
                     f"MLFLOW_EIGENCAM_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    """A fresh page (1400 x 1000, downloads accepted) that fails the test on a JavaScript error."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: List[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
