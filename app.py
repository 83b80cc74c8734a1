"""QAT Studio: the browser app. One page per task; the pages call ``qat_core`` (see app_pages/_common.py)."""

import sys

import streamlit as st

from app_pages._pages import PAGES

SIDEBAR_PX = 220  # the menu's longest entry fits; Streamlit's 300 px left 500 of an 800-px window to the page
# The sidebar folds away by itself only under 768 px; at 800 px it stays open. A narrower one, metric labels that
# wrap instead of ending in "…", values that shrink with the window, and columns of metrics that wrap onto a
# second line rather than shrink below a number's width keep every number readable there.
st.set_page_config(page_title="QAT Studio", page_icon="🧮", layout="wide", initial_sidebar_state=SIDEBAR_PX)
st.html("""<style>
[data-testid="stMetricLabel"], [data-testid="stMetricLabel"] * {
  white-space: normal !important; overflow: visible !important; text-overflow: clip !important; height: auto !important;
}
[data-testid="stMetricValue"] { font-size: clamp(1.4rem, 2.6vw, 2.25rem); }
[data-testid="stHorizontalBlock"]:has(> [data-testid="stColumn"] [data-testid="stMetric"]) { flex-wrap: wrap; }
[data-testid="stColumn"]:has([data-testid="stMetric"]) { min-width: 7.5rem; }
</style>""")

nav = st.navigation({
    "Start": [st.Page(PAGES["home"], title="Home", icon="🏠", default=True)],
    "Build": [
        st.Page(PAGES["model"], title="Model & data", icon="🧱"),
        st.Page(PAGES["plan"], title="Quantization plan", icon="🎚️"),
        st.Page(PAGES["finetune"], title="Fine-tune", icon="🏋️"),
        st.Page(PAGES["sweep"], title="Sweep", icon="🧪"),
    ],
    "Understand": [
        st.Page(PAGES["inspect"], title="Inspect", icon="🔬"),
        st.Page(PAGES["benchmark"], title="Benchmark", icon="⏱️"),
        st.Page(PAGES["compare"], title="Compare", icon="📊"),
        st.Page(PAGES["export"], title="Export", icon="📦"),
    ],
})
if "app_pages._common" not in sys.modules:  # a cold server: the menu shows while PyTorch loads, once
    with st.spinner("Starting QAT Studio: loading PyTorch (once, when the server starts)…"):
        import app_pages._common  # noqa: F401
nav.run()
