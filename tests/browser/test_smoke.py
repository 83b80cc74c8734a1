"""Smoke test: the app serves, renders its title, and can be screenshotted."""
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

SCREENSHOT = str(Path(tempfile.gettempdir()) / "qat-studio-smoke.png")


def test_home_renders_title(app_server, page):
    t0 = time.monotonic()
    page.goto(app_server, wait_until="domcontentloaded")
    title = page.get_by_role("heading", name="QAT Studio")
    title.wait_for(state="visible", timeout=30_000)
    print(f"\n[smoke] first render of the title after {time.monotonic() - t0:.1f} s")
    # No uncaught exception box on the page.
    assert page.locator('[data-testid="stException"]').count() == 0
    page.screenshot(path=SCREENSHOT, full_page=True)
