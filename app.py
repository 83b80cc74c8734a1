"""QAT Studio: the browser app. One page per task; the pages call ``qat_core`` (see app_pages/_common.py)."""

import sys

import streamlit as st

from app_pages._pages import PAGES

st.set_page_config(page_title="QAT Studio", page_icon="🧮", layout="wide")

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
