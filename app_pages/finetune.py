"""Fine-tune: launch a QAT fine-tune (PTQ is measured beside it) as a background job; live progress,
curves and Cancel. The job lives in the run store, so a reload or a second tab finds it."""

import streamlit as st

from app_pages import _common as common
from qat_core import planning, report, summary
from qat_core.config import RunConfig
from qat_core.store import STATUSES

st.title("Fine-tune")
config = common.draft()

with st.expander(f"New run from this tab's draft: {planning.default_name(config)}", expanded=True):
    ft = config.finetune
    st.caption(f"Data: {planning.data_summary(config.data)} (set on **Model & data**)")
    name = st.text_input("Run name (optional)", value=config.name, key="ft_name", max_chars=80,
                         placeholder=planning.default_name(config), help="Shown in Compare, the run picker and the report")
    c1, c2, c3, c4, c5 = st.columns(5)
    # No min/max on the inputs: the browser would silently replace an out-of-range value. Every value
    # reaches the server, which says what is wrong beside the control and keeps Start disabled.
    epochs = c1.number_input("Fine-tune epochs", value=float(ft.epochs), step=1.0, key="ft_epochs",
                             help="0 = PTQ only (calibrate, no training)")
    lr_text = c2.text_input("Learning rate", value=f"{ft.lr:g}", key="ft_lr", help="e.g. 1e-3 or 0.0005")
    batch = c3.number_input("Batch size", value=int(ft.batch_size), step=1, key="ft_batch")
    base_epochs = c4.number_input("Baseline epochs", value=int(config.baseline.epochs), step=1, key="ft_base_epochs",
                                  help="FP32 baseline training (cached and reused once trained)")
    threads = c5.selectbox("Threads", common.thread_choices(), key="ft_threads",
                           help="torch threads for this run. 1 leaves the other cores to this app and other work; "
                                "on a busy machine more threads can be slower, as each waits for the others")
    g1, g2 = st.columns(2)
    guard = g1.checkbox("Guard the fine-tune", value=ft.guard, key="ft_guard",
                        help=f"Judge the fine-tune on {ft.validation_fraction:.0%} of the training data held out from it: "
                             "a loss that rises well above its start stops it, and a fine-tune that ends worse than its "
                             "PTQ start is rolled back to its best point. The run says so, with advice")
    distill = g2.checkbox("Distil from the FP32 model", value=ft.distill, key="ft_distill",
                          help="Learn from the FP32 model's softened outputs as well as from the labels (the usual "
                               "recipe below 8 bits; each step also runs the FP32 model)")
    values = {"name": name.strip(), "finetune": {"epochs": epochs, "lr": common.parse_number(lr_text),
                                                 "batch_size": batch, "guard": guard, "distill": distill},
              "baseline": {"epochs": base_epochs}}
    problems = common.form_problems(config, values)
    for column, field in zip((c1, c2, c3, c4), ("finetune.epochs", "finetune.lr", "finetune.batch_size",
                                                 "baseline.epochs"), strict=True):
        if field in problems:
            column.error(problems[field], icon="⚠️")
    if not problems:
        config = common.update_draft(config, **values)
    started = common.store().draft_started(common.draft_id(), config)
    if st.button("Start fine-tune", type="primary", key="start", disabled=bool(problems) or started is not None,
                 help="Fix the values marked above first" if problems else
                 "This draft started its run already: change a setting (or the name) to start another" if started
                 else None):
        common.select_run(common.start_run(config, threads))
        st.rerun()
    if started:
        st.caption(f"This draft, as it is, started run `{started}` (shown below). Change a setting or the name to "
                   "start another.")

records = common.runs()
if not records:
    st.info("No runs yet: press **Start fine-tune**.")
    st.stop()
run_id = common.run_picker(records, statuses=STATUSES)
record = next(r for r in records if r["id"] == run_id)
if record["status"] != "damaged":  # the form above is the draft; what is shown below is this run, as it was trained
    shown = RunConfig.model_validate(record["config"])
    differ = planning.differences(shown, config)
    if differ:
        st.info(f"Shown below: run `{run_id}`, **not** this tab's draft above (they differ in {', '.join(differ)}). "
                f"The run's own settings: {planning.settings_summary(shown)}")
    else:
        st.caption(f"Shown below: run `{run_id}`, with the settings of the draft above: {planning.settings_summary(shown)}")


def show_run(run_id: str, was_running: bool) -> None:
    store = common.store()
    record = store.get(run_id)
    events = common.call(store.events, run_id)
    if was_running and record["status"] != "running":
        st.rerun()  # the job ended: redraw the page once, without the timer
    if record["status"] == "running":
        frac, text = common.progress_of(events)
        st.progress(frac, text=text)
        if st.button("Cancel", key="cancel"):
            store.request_cancel(run_id)
            st.toast("Cancel requested: the job stops at its next step.")
    elif record["status"] == "done" and "qat" not in record["metrics"]:
        st.error("This run is marked done but has no results: its files were changed outside QAT Studio. "
                 "Start a new run.")
    elif record["status"] == "done":
        m = record["metrics"]
        head = common.call(report.run_headline, store, run_id, record)
        common.headline_strip(head)
        c1, c2, c3 = st.columns(3)  # three to a row: labels stay whole at 800 px
        fp32, ptq, qat = (m[phase]["accuracy"] for phase in ("fp32", "ptq", "qat"))
        c1.metric("FP32 accuracy", summary.pct(fp32))
        c2.metric("PTQ accuracy", summary.pct(ptq), **common.points_delta(ptq, fp32), help="vs FP32")
        c3.metric("QAT accuracy", summary.pct(qat),
                  **common.points_delta(qat, fp32, gain=not summary.undertrained_baseline(m)),
                  help="vs FP32. Computed as ONNX Runtime will compute the int8 model (integer arithmetic)"
                  + (f"; the fake-quantized float simulation gives {summary.pct(m['qat']['fake_quant_accuracy'])}"
                     if "fake_quant_accuracy" in m["qat"] else ""))
        c4, c5, _ = st.columns(3)
        if head.size is not None:
            common.size_metric(c4, head.size)
        if head.quantized_layers is not None:
            common.layers_metric(c5, head.quantized_layers)
        out = report.deployed(m)
        if out is not None and out["same"]:  # not measured yet: the headline says where to measure it
            st.success(f"Deployed: the int8 model in ONNX Runtime scores {summary.pct(out['accuracy'])}, the same "
                       "predictions as this evaluation.")
        elif out is not None:
            st.warning(f"Deployed: the int8 model in ONNX Runtime scores {summary.pct(out['accuracy'])} (evaluated "
                       f"{summary.pct(out['evaluated'])}). {out['why']}")
        if m.get("float_layers"):
            st.warning("Layers left in float: " + "; ".join(f"{k}: {v}" for k, v in m["float_layers"].items()))
    elif record["status"] == "cancelled":
        why = record["error"] if record["error"].startswith("Cancelled") else f"Run cancelled: {record['error']}"
        st.warning(f"{why}. Its partial weights were discarded; start a new run.")
    elif record["status"] == "damaged":
        st.error(f"Run damaged: {record['error']}. The other runs are unaffected.")
    else:
        st.error(f"Run failed: {record['error']}")
    if any("step" in e for e in events):  # no empty axes while the job starts
        common.show_plot(common.curves_figure(events), key="curves")
    if record["status"] == "done":
        st.page_link(common.PAGES["benchmark"], label="Next: export and benchmark it →", icon="⏱️")


running = record["status"] == "running"
st.fragment(show_run, run_every=common.POLL_SECONDS if running else None)(run_id, running)
