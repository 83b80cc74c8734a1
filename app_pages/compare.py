"""Compare: every run in the workspace, several side by side, and Pareto charts of accuracy vs size / latency."""

import streamlit as st

from app_pages import _common as common
from qat_core import plots

st.title("Compare runs")
records = common.runs()
if not records:
    st.info("No runs yet: fine-tune one first (Home → Quick start).")
    st.stop()

frame = common.runs_frame(records)
st.dataframe(frame, hide_index=True, width="stretch")

done = frame[frame["status"] == "done"]
picked = st.multiselect("Runs side by side", list(done["run"]), default=list(done["run"][:4]), key="compare_runs")
if not picked:
    st.info("Pick finished runs above to compare them.")
    st.stop()
chosen = done[done["run"].isin(picked)]
st.dataframe(chosen.drop(columns=["status", "error"]).set_index("run").T.astype(str), width="stretch")

c1, c2 = st.columns(2)
with c1:
    common.show_plot(plots.runs_pareto_figure(chosen, "size KB", "Accuracy vs model size"), key="pareto_size")
with c2:
    if chosen["int8 latency ms"].notna().any():
        common.show_plot(plots.runs_pareto_figure(chosen, "int8 latency ms", "Accuracy vs int8 latency (ORT, batch 1)"),
                         key="pareto_latency")
    else:
        st.info("No benchmarks yet for these runs: open **Benchmark** to measure latency.")
