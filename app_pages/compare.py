"""Compare: every run in the workspace, several side by side, and Pareto charts of accuracy vs size / latency."""

import streamlit as st

from app_pages import _common as common
from qat_core import plots, report

st.title("Compare runs")
records = common.runs()
if not records:
    st.info("No runs yet: fine-tune one first (Home → Quick start).")
    st.stop()

frame = common.runs_frame(records)
common.show_table(frame[report.RUN_SUMMARY], report.RUN_HEADERS)
with st.expander("Every column (FP32 and PTQ accuracy, bit-packed size, quantized layers, FP32 latency, errors)"):
    common.show_table(frame, report.RUN_HEADERS)

with st.expander("Manage runs: rename or delete"):
    common.manage_runs(records)

done = frame[frame["status"] == "done"]
if "compare_runs" in st.session_state:  # a run deleted since it was picked is no option any more
    st.session_state["compare_runs"] = [r for r in st.session_state["compare_runs"] if r in set(done["run"])]
picked = st.multiselect("Runs side by side", list(done["run"]), default=list(done["run"][:4]), key="compare_runs",
                        format_func=dict(zip(done["run"], done["name"], strict=True)).get)
if not picked:
    st.info("Pick finished runs above to compare them.")
    st.stop()
chosen = done[done["run"].isin(picked)]
# the headline of the best of them: ONNX Runtime's int8 accuracy where measured, else the run's own
best = chosen.loc[chosen["ORT int8 acc %"].fillna(chosen["QAT acc %"]).fillna(-1.0).idxmax(), "run"]
st.markdown(f"**Best of these runs:** {common.run_label(common.store().get(best))}")
common.headline_strip(common.call(report.run_headline, common.store(), best))
side = chosen.drop(columns=["status", "error"]).rename(columns=report.RUN_HEADERS).set_index("run").T
# one column a run, values of every kind in it: as text
common.show_table(side.map(common.cell_text), hide_index=False, height=common.rows_height(side))

# full width, one under the other: each point is numbered on the chart and named in the legend below it
common.show_plot(plots.runs_pareto_figure(chosen.rename(columns={"size KB": report.SIZE_AXIS}), report.SIZE_AXIS,
                                          "Accuracy vs int8.onnx file size"), key="pareto_size")
timed = chosen[chosen["int8 latency ms"].notna()]
batches = sorted(timed["latency batch"].dropna().unique())
if len(batches) == 1:
    common.show_plot(plots.runs_pareto_figure(timed, "int8 latency ms",
                                              f"Accuracy vs int8 latency (ORT, batch {batches[0]})"),
                     key="pareto_latency")
elif batches:
    st.info(f"These runs were benchmarked at different batch sizes ({', '.join(map(str, batches))}); "
            "latencies compare only at one batch size. Benchmark them at the same batch to see the chart.")
else:
    st.info("No benchmarks yet for these runs: open **Benchmark** to measure latency.")
