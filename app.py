"""QAT Studio: the browser app. One page per task; the pages call ``qat_core`` (see app_pages/_common.py)."""

import streamlit as st

from app_pages._common import PAGES

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
nav.run()
