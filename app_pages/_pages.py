"""The page files, for st.navigation (app.py) and st.switch_page / st.page_link. Apart from _common, so
app.py draws the menu before PyTorch is imported (seconds on a cold server)."""

PAGES = {  # page files, for st.navigation (app.py) and st.switch_page / st.page_link
    "home": "app_pages/home.py", "model": "app_pages/model.py", "plan": "app_pages/plan.py",
    "finetune": "app_pages/finetune.py", "inspect": "app_pages/inspect_run.py", "benchmark": "app_pages/benchmark.py",
    "compare": "app_pages/compare.py", "export": "app_pages/export.py", "sweep": "app_pages/sweep.py",
}
