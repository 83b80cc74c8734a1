"""Home page (placeholder)."""
import streamlit as st

st.title("QAT Studio")
