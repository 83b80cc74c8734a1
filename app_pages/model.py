"""Model & data: pick a zoo model or a plugin, see its layers and parameters, train or reuse its FP32 baseline."""

import time

import pandas as pd
import streamlit as st

from app_pages import _common as common
from qat_core import prepare, runner, train, zoo

LAYER_COLUMNS = {  # layer_table field → header; fields not listed (has_weights, is_output) are not shown
    "name": st.column_config.TextColumn("Layer", help="The layer's name in the model (what the plan refers to)."),
    "kind": st.column_config.TextColumn("Kind"),
    "params": st.column_config.NumberColumn("Parameters", format="localized",
                                            help="The layer's own parameters (a BatchNorm folded into it is not counted)."),
    "weight_params": st.column_config.TextColumn("Weights", alignment="right",
                                                 help="Of which weights: what a weight width applies to."),
    "out_channels": st.column_config.TextColumn("Output channels", alignment="right",
                                                help="One scale each when weights are quantized per channel."),
    "fused": st.column_config.TextColumn("Fused with", help="Layers folded into this one when it is deployed."),
    "note": st.column_config.TextColumn("Note"),
}
TRAIN_THREADS = 1  # torch threads for a baseline trained in the server (as in Quick start's worker): on 2 cores,
#                    2 OpenMP threads wait on each other whenever anything else runs (the server, the browser, a job)
PROGRESS_SECONDS = 0.2  # at most ~5 progress updates a second: each one is a message to the browser

st.title("Model & data")
config = common.draft()

if zoo.MODELS.get(config.model) is not None and zoo.MODELS[config.model].dataset == "table":
    st.info(f"This draft trains **{config.model}** on the table {config.data.path}: tables are set up with "
            "`qat-studio config init --model table-mlp --data FILE` for now; its plan and fine-tune work here.")
    st.stop()
external = ":" in config.model  # a plugin, or a library's architecture by name
source = st.radio("Model source", ["Zoo", "Plugin or library"], horizontal=True, key="model_source",
                  index=1 if external else 0)
if source == "Zoo":
    ids = [m for m, entry in zoo.MODELS.items() if entry.dataset != "table"]  # tables: CLI only, for now
    model_id = st.selectbox("Zoo model", ids, index=ids.index(config.model) if config.model in ids else 0,
                            format_func=lambda m: f"{m} — {zoo.MODELS[m].description}", key="zoo_model")
else:
    path = st.text_input("Plugin path or library model", value=config.model if external else "",
                         placeholder="package.module:factory, torchvision:NAME or timm:NAME", key="plugin_path",
                         help="A plugin: a function returning (model, train_loader, test_loader), its package "
                              "importable. A library model: torchvision's or timm's architecture by name.")
    if not path:
        st.info("Enter `package.module:factory` (a function that returns `(model, train_loader, test_loader)`), "
                "or an architecture by name: `torchvision:mobilenet_v3_small`, `timm:resnet10t`.")
        st.stop()
    model_id = path

if model_id != config.model:  # a new model starts a new default plan
    config = common.call(common.default_config, model_id)
    common.save_draft(config)

info = common.call(common.model_info, model_id)
fp32_bytes = prepare.size_bytes(info["rows"], config.plan)["fp32_bytes"]
folded = info["params"] - sum(r["params"] for r in info["rows"])  # BatchNorm scale and shift
c1, c2, c3, c4 = st.columns(4)
c1.metric("Parameters", f"{info['params']:,}", help="Every parameter of the model as written (BatchNorm included).")
c2.metric("Quantizable layers", sum(r["has_weights"] for r in info["rows"]))
c3.metric("FP32 size", f"{fp32_bytes / 1024:,.1f} KB",
          help="4 bytes for each parameter of the layers in the table below: the FP32 size the Plan page shows "
               "too." + (" BatchNorm is no layer of its own once deployed: it is folded into the convolution before "
                         f"it, so its scale and shift ({folded:,} parameters) are not counted, "
                         f"{folded * 4 / 1024:,.1f} KB less than Parameters × 4." if folded > 0 else ""))
c4.metric("Classes", info["classes"])
st.caption(f"Data: {info['data']} · input {info['input_shape']} · {info['train']} train samples"
           + (f" / {info['test']} test" if info["test"] else ""))
if info["generated"]:
    st.warning("This model trains on generated data: its accuracy only shows that training ran. "
               "Use it for size and latency.")

st.subheader("Layers (execution order)")
# every shown cell holds a value: the browser prints a missing one as "None", whatever a Styler says
layers = pd.DataFrame([r | {k: f"{r[k]:,}" if r["has_weights"] else "—" for k in ("weight_params", "out_channels")}
                       for r in info["rows"]]).fillna({"kind": "—", "fused": "", "note": ""})
st.dataframe(layers, column_config=LAYER_COLUMNS, column_order=list(LAYER_COLUMNS), hide_index=True,
             width="stretch")

st.subheader("FP32 baseline")
epochs = st.number_input("Baseline epochs", 1, 1000, int(config.baseline.epochs), key=f"baseline_epochs_{model_id}",
                         help="The float model is trained once per model, data, settings and seed, then reused.")
config = common.update_draft(config, baseline={"epochs": int(epochs)})
metrics = common.baseline_metrics(config)
if metrics is not None:
    st.success(f"FP32 baseline ready: test accuracy {metrics['accuracy']:.2%} (reused by every run of this model).")
    st.page_link(common.PAGES["plan"], label="Next: plan the quantization →", icon="🎚️")
    st.stop()
st.info("The baseline is trained on first use (a run trains it too). Train it now to see its accuracy.")
if st.button("Train FP32 baseline", type="primary", key="train_baseline"):
    bar = st.progress(0.0, text="Stage 1 of 3 · loading the data and building the model…")
    shown = [0.0]  # when the bar last changed

    def on_event(event):
        if "step" not in event:
            return
        last = event["step"] == event["total"]
        if last or time.monotonic() - shown[0] >= PROGRESS_SECONDS:
            shown[0] = time.monotonic()
            acc = f", test accuracy {event['test_accuracy']:.1%}" if "test_accuracy" in event else ""
            bar.progress(event["step"] / event["total"],
                         text="Stage 3 of 3 · evaluating on the test set and saving the baseline…" if last else
                         f"Stage 2 of 3 · training: step {event['step']}/{event['total']}, "
                         f"loss {event['loss']:.4f}{acc}")

    with train.torch_threads(TRAIN_THREADS):
        common.call(runner.baseline, config, common.store(), on_event)
    bar.progress(1.0, text="Done")
    st.rerun()
