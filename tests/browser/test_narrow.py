"""An 800-px window, where Streamlit keeps the sidebar open: every metric reads in full (no "Agre… 1…"), and
Export's zip of everything arrives named for people."""

from __future__ import annotations

import io
import zipfile

import pytest

from tests.browser.conftest import running_server

pytestmark = pytest.mark.browser
NARROW = {"width": 800, "height": 900}
CUT = """() => [...document.querySelectorAll('[data-testid="stMetric"] *')]
    .filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.textContent)"""  # text cut to "…" by its box


def open_page(page, title: str) -> None:
    page.locator('[data-testid="stSidebarNav"] a', has_text=title).first.click()
    page.get_by_role("heading", name=title).first.wait_for(timeout=30_000)


def test_at_800_px_metrics_read_in_full_and_the_zip_is_named_for_people(workspace, digits_run, browser, tmp_path):
    from qat_core import export

    export.export_run(workspace, digits_run)
    export.parity(workspace, digits_run)  # Benchmark's metrics: agreement, ORT accuracy, max logit difference
    with running_server(workspace.root, tmp_path / "server.log") as url:
        context = browser.new_context(viewport=NARROW, accept_downloads=True)
        page = context.new_page()
        try:
            page.goto(url)
            page.get_by_role("heading", name="QAT Studio").wait_for(timeout=60_000)
            for title in ("Fine-tune", "Benchmark"):
                open_page(page, title)
                page.locator('[data-testid="stMetric"]').nth(3).wait_for(timeout=30_000)
                assert page.evaluate(CUT) == [], title
            open_page(page, "Export")
            with page.expect_download(timeout=30_000) as download:
                page.get_by_role("button", name="Download everything (.zip)").click()
            assert download.value.suggested_filename == "digits-cnn_W8A8.zip"
            names = zipfile.ZipFile(io.BytesIO(download.value.path().read_bytes())).namelist()
            assert "digits-cnn_W8A8/digits-cnn_W8A8.yaml" in names
        finally:
            context.close()
