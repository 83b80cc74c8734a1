"""Inspect: histograms with grid and clip marks (before/after the fine-tune), the per-layer error table,
sensitivity and a mixed-precision suggestion that becomes a new plan in one click."""

import pandas as pd
import streamlit as st

from app_pages import _common as common
from qat_core import analysis, plots, progress, report, search, summary

SENSITIVITY_TOP = 30  # layers the sensitivity chart shows before "Show all"

st.title("Inspect")
records = common.runs()
run_id = common.run_picker(records) if records else None
if run_id is None:
    st.info("No finished run yet: fine-tune one first (Home → Quick start).")
    st.stop()
root = str(common.store().root)
loaded = common.load_run(run_id)
hist_tab, error_tab, sens_tab = st.tabs(["Histograms", "Per-layer error", "Sensitivity & suggestion"])

with hist_tab:
    c1, c2, c3 = st.columns([3, 2, 1])
    tensor = c2.radio("Tensor", ["weight", "activation"], horizontal=True, key="hist_tensor")
    names = analysis.weight_layers(loaded.qat) if tensor == "weight" else analysis.activation_layers(loaded.qat)
    if not names:
        st.info(f"This run has no quantized {tensor}s.")
    else:
        layer = c1.selectbox("Layer", names, key=f"hist_layer_{tensor}")
        log_y = c3.checkbox("log y", key="hist_log")
        hists = common.call(common.histograms, root, run_id, layer, tensor)
        common.show_plot(plots.histogram_figure(hists, log_y), key="histogram")
        st.caption("Before (PTQ: calibrated, not fine-tuned) and after (QAT) the fine-tune, on shared bins. "
                   "Dashed lines: clip range; thin lines: the quantization grid (toggle in the legend).")
        channels = [h.channels for h in hists if h.channels is not None]
        if channels:
            common.show_plot(plots.channel_ranges_figure(channels[-1]), key="channels")

with error_tab:
    stage = st.radio("Model", ["qat", "ptq"], horizontal=True, key="error_stage",
                     format_func={"qat": "after fine-tune (QAT)", "ptq": "before fine-tune (PTQ)"}.get)
    errors = common.call(common.error_table, root, run_id, stage)
    shown = errors[[c for c in report.ERROR_COLUMNS if c in errors.columns]].round(4)
    for column in ("weight_share_clipped", "act_share_clipped"):  # as the report and the histograms say them
        shown[column] = [common.MISSING if pd.isna(v) else plots.share_text(v) for v in shown[column]]
    common.show_table(shown, report.ERROR_HEADERS)
    st.caption("SQNR in dB (higher is better). Clipped: the share of a layer's weights, and of its output "
               "activations on the calibration batches, beyond the quantizer's clip range (saturated to it). "
               "The CSV has every column (scales, zero points, MSE).")
    st.download_button("Download CSV", analysis.to_csv(errors), f"{run_id}-{stage}-errors.csv", "text/csv",
                       key="dl_errors")
    common.show_plot(plots.sqnr_figure(errors), key="sqnr")

with sens_tab:
    c1, c2 = st.columns(2)
    bits = c1.multiselect("Widths to try", [8, 6, 4, 3, 2], default=[4, 2], key="sens_bits")
    if c2.button("Measure sensitivity", key="sens_run", disabled=not bits):
        bar = st.progress(0.0, text="measuring…")

        def on_progress(p):
            if p.get("total") and p["done"] < p["total"]:
                bar.progress(p["done"] / p["total"], text=progress.task_text(
                    p, f"Measuring {p['layer']} at {p['bits']} bits (one layer at a time, on the test set)"))

        sens = common.call(search.sensitivity, loaded, sorted(bits, reverse=True), on_progress=on_progress)
        common.save_frame(run_id, "sensitivity_page", sens)
        bar.empty()
    sens = common.saved_frame(run_id, "sensitivity_page")
    if sens is None:
        st.info("Measure sensitivity to rank the layers and get a mixed-precision suggestion.")
        st.stop()
    layers = sens["layer"].nunique()
    every = layers <= SENSITIVITY_TOP or st.checkbox(
        f"Show all {layers} layers", key="sens_all",
        help=f"The chart shows the {SENSITIVITY_TOP} most sensitive layers; all of them make a long chart")
    common.show_plot(plots.sensitivity_figure(sens, top=None if every else SENSITIVITY_TOP), key="sensitivity")
    st.subheader("Mixed-precision suggestion")
    c1, c2 = st.columns(2)
    avg = c1.number_input("Average weight bits (budget)", 2.0, 8.0, 3.0, 0.25, key="sug_bits")
    if c2.button("Suggest a plan", key="sug_run"):
        sug_bar = st.progress(0.0, text="Ranking plans by predicted damage…")

        def on_suggest(p):
            if p["done"] < p["total"]:
                why = {"fits": "best predicted within the budget", "front": "on the predicted trade-off"}
                left = progress.left_text(p["seconds_left"])
                sug_bar.progress(p["done"] / p["total"], text=f"Measuring candidate plan {p['done'] + 1} of "
                                 f"{p['total']} ({why.get(p['candidate'], p['candidate'])}): calibrating and "
                                 "evaluating…" + (f" · {left}" if left else ""))

        sug = common.call(search.suggest_plan, loaded, sens, average_bits=avg, measure=4, on_progress=on_suggest)
        sug_bar.empty()
        common.save_frame(run_id, "suggestion_page", sug.candidates)
        common.store().write_result(run_id, "suggested_plan_page", {
            "plan": sug.plan.model_dump(mode="json"), "widths": sug.widths, "size_bytes": sug.size_bytes,
            "average_bits": sug.average_bits, "accuracy": sug.accuracy})
    suggestion = common.store().read_result(run_id, "suggested_plan_page")
    if suggestion is None:
        st.stop()
    m1, m2, m3 = st.columns(3)
    m1.metric("Suggested size, bit-packed", summary.size_text(suggestion["size_bytes"]), help=common.PACKED_NOTE)
    m2.metric("Average weight bits", f"{suggestion['average_bits']:.2f}")
    m3.metric("Accuracy after calibration", summary.pct(suggestion["accuracy"]))
    st.write("Weight bits per layer: " + ", ".join(f"`{k}` {v}" for k, v in suggestion["widths"].items()))
    candidates = common.saved_frame(run_id, "suggestion_page")
    if candidates is not None and not candidates.empty:
        common.show_plot(plots.pareto_figure(candidates), key="suggest_pareto")
    if st.button("Use this suggestion as a new plan", type="primary", key="use_suggestion"):
        common.replace_plan(common.call(common.plan_config, run_id, suggestion["plan"]), "the suggestion")
        st.switch_page(common.PAGES["plan"])
