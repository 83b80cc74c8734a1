"""Quantization plan: an editable table of layers (bits, granularity, symmetry, range method), presets,
and the predicted model size. Every edit is validated on the server before it is saved."""

import streamlit as st

from app_pages import _common as common
from qat_core import planning, summary
from qat_core.config import RANGE_METHODS
from qat_core.errors import ConfigError

st.title("Quantization plan")
config = common.draft()
info = common.draft_info(config)
rows = info["rows"]
st.caption(f"Model **{config.model}** · {summary.layers_in_table(rows)} layers (and the input) in the table · "
           "edits are saved to this tab's draft (it survives a reload).")

st.write("Presets")
cols = st.columns(5)
for col, preset in zip(cols, planning.PRESET_NAMES, strict=False):
    col.button(preset, key=f"preset_{preset}", width="stretch", on_click=common.use_preset, args=(rows, preset))
suggestion = common.latest_suggestion(config.model)
if cols[4].button("Suggestion from analysis", key="preset_suggest", width="stretch",
                  help="The newest mixed-precision suggestion for this model (made on Inspect)."):
    if suggestion is None:
        st.switch_page(common.PAGES["inspect"])
    common.replace_plan(common.call(common.plan_config, suggestion["run"], suggestion["plan"]), "the suggestion")
    st.rerun()
if common.UNDO_KEY in st.session_state:
    st.button(f"Undo {st.session_state[common.UNDO_KEY][0]}: back to the plan before it", key="undo_plan",
              on_click=common.undo_plan, icon="↩️")

column_config = {
    "layer": st.column_config.TextColumn("layer", disabled=True),
    "kind": st.column_config.TextColumn("kind", disabled=True),
    "params": st.column_config.NumberColumn("params", disabled=True, format="%d"),
    "quantize": st.column_config.CheckboxColumn("quantize", help="Untick to keep the layer in FP32"),
    # no min/max: the grid would drop a value outside them without a word; the server says why instead
    "weight_bits": st.column_config.NumberColumn("weight bits", step=1, help="2..8; empty = FP32 weights"),
    "act_bits": st.column_config.NumberColumn("act bits", step=1, help="2..8; empty = FP32 output activations"),
    "granularity": st.column_config.SelectboxColumn("granularity", options=["per_channel", "per_tensor"]),
    "symmetric": st.column_config.CheckboxColumn("symmetric"),
    "range_method": st.column_config.SelectboxColumn("range method", options=list(RANGE_METHODS)),
    "note": st.column_config.TextColumn("note", disabled=True, help="Why a layer stays float, or how layers were found"),
}
edited = st.data_editor(planning.plan_frame(rows, config.plan), key=common.PLAN_EDITOR, hide_index=True,
                        column_config=column_config, num_rows="fixed", width="stretch", placeholder=common.MISSING)

try:
    new = planning.plan_from_frame(config, rows, edited)
except ConfigError as err:
    st.error(f"This edit was not saved: {err}. Change the cell back, or press a preset.", icon="⚠️")
    st.stop()
if new != config:
    common.save_draft(new)
    config = new

advice = planning.reduce_range_advice(config.plan, rows)
if advice:
    st.info(advice)
    st.button("Use 7-bit weights (reduce range)", key="reduce_range", on_click=common.use_reduce_range)

size = common.draft_size(config, rows)
c1, c2 = st.columns(2)  # two to a row: "Size (int8.onnx, predicted)" stays whole at 800 px
common.size_metric(c1, size)
c2.metric(f"FP32 size ({size.fp32_label})", summary.size_text(size.fp32_bytes),
          help="BatchNorm folded into its convolution")
c3, c4 = st.columns(2)
c3.metric("File size cut", f"{size.ratio:.1f}×", help="FP32 file / int8 file")
common.layers_metric(c4, summary.quantized_layers(rows, config.plan))
st.page_link(common.PAGES["finetune"], label="Next: fine-tune this plan →", icon="🏋️")
