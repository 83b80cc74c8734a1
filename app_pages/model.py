"""Model & data: pick a zoo model or a plugin, see its layers and parameters, train or reuse its FP32 baseline."""

import pandas as pd
import streamlit as st

from app_pages import _common as common
from qat_core import runner, zoo

st.title("Model & data")
config = common.draft()

source = st.radio("Model source", ["Zoo", "Plugin"], horizontal=True, key="model_source",
                  index=1 if zoo.is_plugin(config.model) else 0)
if source == "Zoo":
    ids = list(zoo.MODELS)
    model_id = st.selectbox("Zoo model", ids, index=ids.index(config.model) if config.model in ids else 0,
                            format_func=lambda m: f"{m} — {zoo.MODELS[m].description}", key="zoo_model")
else:
    path = st.text_input("Plugin path", value=config.model if zoo.is_plugin(config.model) else "",
                         placeholder="package.module:factory", key="plugin_path",
                         help="A function returning (model, train_loader, test_loader); its package must be importable.")
    if not path:
        st.info("Enter `package.module:factory`: a function that returns `(model, train_loader, test_loader)`.")
        st.stop()
    model_id = path

if model_id != config.model:  # a new model starts a new default plan
    config = common.call(common.default_config, model_id)
    common.save_draft(config)

info = common.call(common.model_info, model_id)
c1, c2, c3, c4 = st.columns(4)
c1.metric("Parameters", f"{info['params']:,}")
c2.metric("Quantizable layers", sum(r["has_weights"] for r in info["rows"]))
c3.metric("FP32 size", f"{info['params'] * 4 / 1024:,.1f} KB")
c4.metric("Classes", info["classes"])
st.caption(f"Data: {info['data']} · input {info['input_shape']} · {info['train']} train samples"
           + (f" / {info['test']} test" if info["test"] else ""))
if info["generated"]:
    st.warning("This model trains on generated data: its accuracy only shows that training ran. "
               "Use it for size and latency.")

st.subheader("Layers (execution order)")
st.dataframe(pd.DataFrame(info["rows"]).drop(columns=["has_weights"]), hide_index=True, width="stretch")

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
    bar = st.progress(0.0, text="loading data…")

    def on_event(event):
        if "step" in event:
            bar.progress(event["step"] / event["total"], text=f"step {event['step']}/{event['total']}, "
                                                               f"loss {event['loss']:.4f}")

    _, _, metrics = common.call(runner.baseline, config, common.store(), on_event)
    bar.progress(1.0, text="done")
    st.rerun()
