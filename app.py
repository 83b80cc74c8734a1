"""QAT Studio entry point (placeholder: replace with the real navigation)."""
import streamlit as st

st.set_page_config(page_title="QAT Studio", layout="wide")

pg = st.navigation([st.Page("pages/home.py", title="Home", default=True)])
pg.run()
