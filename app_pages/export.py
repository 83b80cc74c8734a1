"""Export: download a run's config (YAML, JSON), its ONNX models (and the int8 one as OpenVINO IR when OpenVINO
is installed), a self-contained HTML report, or all of them
in one zip, each named for people (``digits-cnn_W8A8_int8.onnx``); import a config file to start a new run."""

import streamlit as st

from app_pages import _common as common
from qat_core import export, files, planning, report, runner, runtimes
from qat_core.errors import StoreError

st.title("Export")
records = common.runs()
run_id = common.run_picker(records) if records else None

if run_id is None:
    st.info("No finished run yet: fine-tune one first. You can still import a config below.")
else:
    store = common.store()
    config = store.get(run_id)["config"]
    stem = export.file_stem(config)  # downloads named for people, not by run id
    st.subheader("Config (reproduce with `qat-studio train <file>`)")
    c1, c2 = st.columns(2)
    c1.download_button("Download config (YAML)", common.config_payload(run_id, "yaml"),
                       report.config_file_name(config), "application/x-yaml", key="dl_yaml")
    c2.download_button("Download config (JSON)", common.config_payload(run_id, "json"),
                       report.config_file_name(config, "json"), "application/json", key="dl_json")

    st.subheader("ONNX models")
    onnx_files = {name: store.artifact(run_id, name) for name in ("int8.onnx", "fp32.onnx")}
    if not all(p.exists() for p in onnx_files.values()):
        if st.button("Export to ONNX", type="primary", key="export"):
            with st.spinner("Exporting FP32 and int8 ONNX…"):
                common.call(export.export_run, store, run_id)
            st.rerun()
    cols = st.columns(2)
    for col, (name, path) in zip(cols, onnx_files.items(), strict=False):
        if path.exists():
            data = common.call(files.read_bytes, path, export.ONNX_LIMIT, name, StoreError)  # never waits on a FIFO
            col.download_button(f"Download {name}", data, f"{stem}_{name}", "application/octet-stream",
                                key=f"dl_{name}")
    if not runtimes.installed():
        st.caption(f"OpenVINO IR: {runtimes.NOT_INSTALLED}")
    elif onnx_files["int8.onnx"].exists():
        # written on click, off the page's thread: OpenVINO reads int8.onnx and saves it as IR (.xml + .bin)
        st.download_button("Download int8 as OpenVINO IR (.zip)", lambda: runtimes.ir_zip(store, run_id),
                           f"{stem}_{runtimes.IR_STEM}.zip", "application/zip", key="dl_openvino")
        st.caption("The same int8 graph OpenVINO compiles from int8.onnx, saved as its IR (.xml + .bin, "
                   "float constants kept in f32).")

    st.subheader("Report")
    st.caption("One HTML file with figures and tables, for people without the app.")
    if st.button("Build HTML report", key="build_report"):
        with st.spinner("Measuring every layer and drawing the figures…"):
            common.build_report(run_id)
    payload = common.built_report(run_id)
    if payload is not None:
        st.download_button("Download HTML report", payload, f"{stem}_report.html", "text/html", key="dl_report")

    st.subheader("Everything in one file")
    held = ["the config", "the metrics"] + [name for name, p in onnx_files.items() if p.exists()]
    held += ["the report"] if payload is not None else []
    st.caption(f"A zip of {', '.join(held[:-1])} and {held[-1]}."
               + ("" if all(p.exists() for p in onnx_files.values()) else " Export to ONNX above to add the models.")
               + ("" if payload is not None else " Build the report above to add it."))
    # built on click, off the page's thread: the ONNX models are read again only when someone wants the zip
    st.download_button("Download everything (.zip)", lambda: export.run_bundle(store, run_id, payload),
                       f"{stem}.zip", "application/zip", key="dl_zip", type="primary")

st.divider()
st.subheader("Import a config")
# no type= and no 1 MB max_upload_size: the browser would refuse those files with a note seen only on hover;
# here every file reaches the server, which says what is wrong with it (common.parse_upload)
upload = st.file_uploader("A config file (YAML or JSON) from `qat-studio config init` or a download above",
                          key="upload")
if upload is None:
    st.stop()
config = common.call(common.parse_upload, upload.name, upload.getvalue())
st.success(f"{upload.name}: {config.model} · {planning.plan_summary(config)} · fine-tune {config.finetune.epochs:g} epochs")
c1, c2 = st.columns(2)
if c1.button("Use as this tab's draft", key="import_draft"):
    common.call(common.model_info, config.model)  # a bad model id or plugin fails here, with its message
    common.save_draft(config)
    st.switch_page(common.PAGES["plan"])
if c2.button("Start a run from it", type="primary", key="import_run"):
    common.call(common.model_info, config.model)
    run_id = common.call(runner.launch, config, common.store())
    common.select_run(run_id)
    st.switch_page(common.PAGES["finetune"])
