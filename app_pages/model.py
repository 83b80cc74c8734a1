"""Model & data: a zoo model, a library's architecture, a Hugging Face folder or a plugin; its weights;
its data (built in, an image folder, a table); the time a run takes here; its layers; the FP32 baseline."""

import time
from pathlib import Path

import pandas as pd
import streamlit as st

from app_pages import _common as common
from qat_core import config as cfg
from qat_core import library, plugins, runner, summary, train, zoo
from qat_core.files import MB
from qat_core.store import UPLOAD_LIMIT

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
BY_NAME = "By name or path"
FIELDS = {"data.image_size": "Image size", "data.max_samples": "Samples"}  # a config field → its control's name
WEIGHTS = {"init": "As built (the baseline trains them)", "checkpoint": "Checkpoint file",
           "pretrained": "Pretrained, by name"}
DATA = {"generated-images": "Generated images", "image-folder": "Image folder", "table": "Table (CSV, Parquet)",
        "text-table": "Text table (CSV, Parquet)"}


def path_input(label: str, value: str | None, key: str, help: str, upload_types: list[str] | None = None) -> str:
    """A path on this machine, typed; or, with ``upload_types``, a file uploaded into the workspace."""
    path = st.text_input(label, value=value or "", key=key, help=help, placeholder="/path/on/this/machine").strip()
    if upload_types:
        # no type=: the browser would refuse another kind of file with a note seen only on hover; said here
        upload = st.file_uploader(f"…or upload it ({', '.join(upload_types)})", key=f"{key}_upload",
                                  max_upload_size=UPLOAD_LIMIT // MB)
        if upload is not None and Path(upload.name).suffix.lower().lstrip(".") not in upload_types:
            kinds = ", ".join(f".{t}" for t in upload_types[:-1]) + f" or .{upload_types[-1]}"
            st.error(f"{upload.name} is not a {kinds} file: upload one of those, or give the file's path above.",
                     icon="⚠️")
        elif upload is not None:
            path = common.save_upload(upload)
    return path


st.title("Model & data")
config = common.draft()

# --- 1. the model --------------------------------------------------------------------------------
by_name = ":" in config.model  # a library's architecture, a Hugging Face folder or a plugin
source = st.radio("Model source", ["Zoo", BY_NAME], horizontal=True, key="model_source", index=1 if by_name else 0)
if source == "Zoo":
    ids = list(zoo.MODELS)
    model_id = st.selectbox("Zoo model", ids, index=ids.index(config.model) if config.model in ids else 0,
                            format_func=lambda m: f"{m} — {zoo.MODELS[m].description}", key="zoo_model")
else:
    model_id = st.text_input(
        "Architecture, folder or plugin", value=config.model if by_name else "", key="plugin_path",
        placeholder="torchvision:mobilenet_v3_small · timm:resnet10t · hf:/path/to/folder · package.module:factory",
        help="`torchvision:NAME`, `timm:NAME`: a library's architecture. `hf:FOLDER`: a Hugging Face image or text "
             "classifier saved with save_pretrained. `package.module:factory`: your function returning "
             "(model, train_loader, test_loader).").strip()
    st.caption(plugins.describe())
    if not model_id:
        st.info("Enter an architecture by name (`torchvision:mobilenet_v3_small`, `timm:resnet10t`), a Hugging Face "
                "folder (`hf:/path/to/folder`) or a plugin (`package.module:factory`).")
        st.stop()

kind = library.library_of(model_id)
plugin = zoo.is_plugin(model_id)
common.call(zoo.check_plugin, model_id)  # a factory the user did not allow: the message, nothing imported
entry = zoo.MODELS.get(model_id)
same_model = model_id == config.model

# --- 2. its weights --------------------------------------------------------------------------------
weights = checkpoint = None
if kind == "hf":
    st.caption("Weights: the folder's own. A head for another number of classes is replaced and trained.")
elif not plugin:
    choices = list(WEIGHTS) if kind in ("torchvision", "timm") else ["init", "checkpoint"]
    now = "pretrained" if config.weights else "checkpoint" if config.checkpoint else "init"
    chosen = st.radio("Weights", choices, format_func=WEIGHTS.get, horizontal=True, key="weights_source",
                      index=choices.index(now) if same_model and now in choices else 0)
    if chosen == "checkpoint":
        checkpoint = path_input("Checkpoint (a state_dict saved with torch.save)", config.checkpoint, "checkpoint_path",
                                "Loaded with weights_only=True: nothing in the file runs. A head trained for another "
                                "number of classes is replaced.", ["pt", "pth", "bin"]) or None
        if checkpoint is None:
            st.info("Give the checkpoint's path, or upload it.")
            st.stop()
    elif chosen == "pretrained":
        weights = st.text_input("Pretrained weights", value=config.weights or "DEFAULT", key="weights_name",
                                help="torchvision: DEFAULT, IMAGENET1K_V1, …; timm: DEFAULT or a tag. Read from the "
                                     "library's cache on this machine: nothing is downloaded.").strip() or None

# --- 3. its data -----------------------------------------------------------------------------------
data: dict = {}
notes: dict = {}  # config field → the place under its control where what is wrong with it shows
if plugin:
    st.caption("Data: the plugin's own loaders.")
else:
    own = entry.dataset if entry else common.call(zoo.default_dataset, model_id)  # an hf: folder may be damaged
    options = ["generated-images", "image-folder"] if own == "generated-images" else [own]
    current = config.data.dataset if same_model and config.data.dataset in options else options[0]
    if len(options) > 1:
        dataset = st.radio("Data", options, format_func=DATA.get, horizontal=True, key="data_source",
                           index=options.index(current))
    else:
        dataset = own  # a built-in data set is described below the model's numbers
    data["dataset"] = dataset
    keep = same_model and config.data.dataset == dataset  # the draft's own settings for this data set
    if dataset == "image-folder":
        data["path"] = path_input("Image folder path", config.data.path if keep else "", "data_path",
                                  "One sub-folder of images per class (torchvision's ImageFolder layout): "
                                  "folder/cat/1.jpg, folder/dog/2.png. Unreadable files are skipped and counted.")
        if keep and config.data.image_size:
            # no min/max on the numbers: the browser would only mark a value it refuses; the server says why
            data["image_size"] = int(st.number_input(
                "Image size (pixels)", value=config.data.image_size, step=1, key="image_size",
                help="The center crop the model sees. Filled in from the folder's images, at most the size the "
                     "model's weights were trained at; smaller trains faster."))
            notes["data.image_size"] = st.container()
    elif dataset in ("table", "text-table"):
        data["path"] = path_input("Table path", config.data.path if keep else "", "data_path",
                                  "A CSV or Parquet file, one row a sample.", ["csv", "parquet"])
        columns = common.call(common.table_columns, data["path"]) if data["path"] else []
        if columns:
            if dataset == "text-table":
                data["text_column"] = st.selectbox("Text column", columns, key="text_column", index=columns.index(
                    config.data.text_column) if keep and config.data.text_column in columns else 0)
            data["label_column"] = st.selectbox("Label column", columns, key="label_column", index=columns.index(
                config.data.label_column) if keep and config.data.label_column in columns else len(columns) - 1)
    if dataset in DATA and dataset != "generated-images":
        if not data.get("path"):
            st.info(f"Give the {DATA[dataset].lower()}'s path.")
            st.stop()
        cap = st.number_input("Use at most this many samples (0: all)", value=config.data.max_samples or 0 if keep
                              else 0, step=100, key="max_samples",
                              help="A seeded random subset, for short fine-tunes on a CPU.")
        data["max_samples"] = int(cap) or None
        notes["data.max_samples"] = st.container()

# --- apply: a new model, weights or data starts a new default plan --------------------------------
problems = cfg.field_errors({"model": model_id, "data": data}) if data else {}
for field, message in problems.items():  # the config's own limits, as the Fine-tune form says them
    notes.get(field, st).error(f"**{FIELDS.get(field, field)}**: {message}. The draft keeps its last valid settings.",
                               icon="⚠️")
wanted = (model_id, weights, checkpoint, data)
have = (config.model, config.weights, config.checkpoint,
        {k: v for k, v in config.data.model_dump().items() if k in data})
if wanted != have and not problems:
    if wanted[:3] == have[:3] and data.get("dataset") == config.data.dataset:
        # the same model and data set: what was typed (an image size, a sample cap) is saved before the default
        # plan is built (seconds for a large model), so a page left meanwhile trains what was typed
        common.save_draft(common.call(common.with_data, config, data))
    common.save_draft(common.call(common.default_config, model_id, data or None, weights, checkpoint))
    st.rerun()  # the widgets above show the new draft's settings (an image folder's crop from the weights)

info = common.draft_info(config)
size = common.draft_size(config, info["rows"])
folded = info["params"] - sum(r["params"] for r in info["rows"])  # BatchNorm scale and shift
c1, c2, c3, c4 = st.columns(4)
c1.metric("Parameters", f"{info['params']:,}", help="Every parameter of the model as written (BatchNorm included).")
common.layers_metric(c2, summary.quantized_layers(info["rows"], config.plan))
c3.metric(f"FP32 size ({size.fp32_label})", summary.size_text(size.fp32_bytes),
          help=f"The FP32 model as ONNX, the size the Plan page shows too; int8 with this draft's plan: {size.text()}."
               + (" BatchNorm is no layer of its own once deployed: it is folded into the convolution before "
                         f"it, so its scale and shift ({folded:,} parameters) are not counted, "
                         f"{summary.size_text(folded * 4)} less than Parameters × 4." if folded > 0 else ""))
c4.metric("Classes", info["classes"])
st.caption(f"Data: {info['data']} · input {info['input_shape']} · {info['train']} train samples"
           + (f" / {info['test']} test" if info["test"] else ""))
if info["generated"]:
    st.warning("This model trains on generated data: its accuracy only shows that training ran. "
               "Use it for size and latency.")
if info["new_head"]:
    note = next(r["note"] for r in info["rows"] if r["name"] == info["new_head"])
    st.info(f"**{info['new_head']}** is a {note}; the rest of the network keeps its weights.")
if info["skipped"]:
    st.warning(f"{info['skipped']} file(s) in the folder could not be read as images and are left out (named above).")

st.subheader("Layers (execution order)")
# every shown cell holds a value: the browser prints a missing one as "None", whatever a Styler says
layers = pd.DataFrame([r | {k: f"{r[k]:,}" if r["has_weights"] else "—" for k in ("weight_params", "out_channels")}
                       for r in info["rows"]]).fillna({"kind": "—", "fused": "", "note": ""})
st.dataframe(layers, column_config=LAYER_COLUMNS, column_order=list(LAYER_COLUMNS), hide_index=True,
             width="stretch")

st.subheader("FP32 baseline")
# keyed by the model's source: a new model, weights or data shows its own default epochs
source_id = hash((config.model, config.weights, config.checkpoint, config.data.model_dump_json()))
epochs = st.number_input("Baseline epochs", value=int(config.baseline.epochs), step=1,
                         key=f"baseline_epochs_{source_id}",
                         help="The float model is trained once per model, data, settings and seed, then reused.")
epoch_problems = cfg.field_errors(config.to_dict() | {"baseline": config.baseline.model_dump() | {"epochs": int(epochs)}})
if epoch_problems:
    st.error(f"**Baseline epochs**: {next(iter(epoch_problems.values()))}. Training keeps {config.baseline.epochs} "
             "epochs.", icon="⚠️")
else:
    config = common.update_draft(config, baseline={"epochs": int(epochs)})
metrics = common.baseline_metrics(config)
if not plugin and st.session_state.get(common.ESTIMATE_KEY) != source_id:
    if st.button("Estimate the training time on this machine", key="estimate_time",
                 help="Times a few training steps of the baseline and of the fine-tune here (a large model at "
                      "224 px: some seconds)."):
        st.session_state[common.ESTIMATE_KEY] = source_id
        st.rerun()
elif not plugin:
    trained = (config.checkpoint or config.weights) and not info["new_head"]  # the user's weights are the baseline
    est = common.time_estimate(config, TRAIN_THREADS, train_baseline=metrics is None and not trained)
    e1, e2, e3 = st.columns(3)
    e1.metric("Baseline training", "ready" if metrics is not None else "none: your weights" if trained else
              common.duration(est["baseline_total"] + est["baseline_evaluation"]),
              help=f"One epoch: {common.duration(est['baseline_epoch'])}; its evaluations (test set, BatchNorm "
                   f"statistics): {common.duration(est['baseline_evaluation'])}. Measured here with {TRAIN_THREADS} "
                   "thread on a few training steps and test batches.")
    e2.metric("Calibration and fine-tune", common.duration(est["calibration_total"] + est["finetune_total"]
                                                           + est["quantized_evaluation"]),
              help=f"Calibration: {common.duration(est['calibration_total'])}; one epoch of QAT: "
                   f"{common.duration(est['finetune_epoch'])}; PTQ's and QAT's evaluations: "
                   f"{common.duration(est['quantized_evaluation'])}. Measured the same way, with this draft's plan "
                   "and batch size (set on the Fine-tune page).")
    e3.metric("Whole run", common.duration(est["run_total"]),
              help=f"Both, plus starting the run's process and building the model "
                   f"({common.duration(est['overhead'])}).")
if metrics is not None:
    st.success(f"FP32 baseline ready: test accuracy {summary.pct(metrics['accuracy'])} (reused by every run of this "
               "model).")
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
            acc = f", test accuracy {summary.pct(event['test_accuracy'])}" if "test_accuracy" in event else ""
            bar.progress(event["step"] / event["total"],
                         text="Stage 3 of 3 · evaluating on the test set and saving the baseline…" if last else
                         f"Stage 2 of 3 · training: step {event['step']}/{event['total']}, "
                         f"loss {event['loss']:.4f}{acc}")

    with train.torch_threads(TRAIN_THREADS):
        common.call(runner.baseline, config, common.store(), on_event)
    bar.progress(1.0, text="Done")
    st.rerun()
