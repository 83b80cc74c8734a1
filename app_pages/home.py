"""Start here: what QAT Studio does, the few clicks to an int8 model with a benchmark, and recent runs."""

import streamlit as st

from app_pages import _common as common
from qat_core import report

st.title("QAT Studio")
st.markdown(
    "Make a model **int8** and see what it costs: plan which layers get how many bits, fine-tune with "
    "quantization in the loop (QAT) to win back accuracy, see what changed, export ONNX and measure it on this CPU.")

st.subheader("First time? Three clicks to a fine-tuned int8 model with a benchmark")
st.markdown(
    "1. **Quick start** below fine-tunes the small digits CNN at 8 bits with the default settings (about 15 s).\n"
    "2. When it is done, open **Benchmark** and press *Export and benchmark*.\n"
    "3. **Export** downloads the int8 ONNX model, its config and an HTML report.\n\n"
    "To choose another model or bit widths: **Model & data** → **Quantization plan** → **Fine-tune**. To find the "
    "best plan for a size budget, **Sweep** trains many plans at once and draws their Pareto front.")

if st.button("Quick start: fine-tune digits-cnn at 8 bits", type="primary", key="quick_start"):
    config = common.default_config(common.DEFAULT_MODEL)
    common.save_draft(config)
    run_id = common.start_run(config)
    common.select_run(run_id)
    st.switch_page(common.PAGES["finetune"])

records = common.runs()
st.subheader("Recent runs")
if not records:
    st.info("No runs yet in this workspace. Press **Quick start**, or begin with **Model & data**.")
    st.stop()
recent = common.runs_frame(records[:10])
common.show_table(recent[["name", "model", "status", "QAT acc %", "ORT int8 acc %", "size KB", "size from",
                          "quantized layers", "int8 latency ms", "error", "run"]], report.RUN_HEADERS)
st.caption(f"Workspace: `{common.store().root}` (set `QAT_STUDIO_HOME` to use another).")
