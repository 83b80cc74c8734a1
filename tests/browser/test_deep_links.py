"""A bookmark or a deep link opened first on a freshly started server shows the app's own menu
(Streamlit must not fall back to listing a pages folder: app, common, …)."""

from __future__ import annotations

from tests.browser.conftest import REPO_ROOT

MENU = ["Home", "Model & data", "Quantization plan", "Fine-tune", "Sweep", "Inspect", "Benchmark", "Compare", "Export"]
PATHS = ["model", "plan", "finetune", "sweep", "inspect_run", "benchmark", "compare", "export", ""]


def test_every_page_opened_first_by_deep_link_shows_the_apps_menu(fresh_server, browser):
    assert not (REPO_ROOT / "pages").exists()  # Streamlit would auto-discover it before app.py runs
    for path in PATHS:  # "/" last: nobody has opened the main page before the deep links
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        page = context.new_page()
        page.goto(f"{fresh_server}/{path}")
        nav = page.locator('[data-testid="stSidebarNav"]')
        nav.get_by_text("Quantization plan").wait_for(timeout=30_000)
        links = [t.strip().splitlines()[-1].strip() for t in nav.locator("a").all_inner_texts() if t.strip()]
        assert links == MENU, (path, links)
        assert page.locator('[data-testid="stException"]').count() == 0
        context.close()
