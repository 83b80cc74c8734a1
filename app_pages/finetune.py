"""Fine-tune: launch a QAT fine-tune (PTQ is measured beside it) as a background job; live progress,
curves and Cancel. The job lives in the run store, so a reload or a second tab finds it."""

import streamlit as st

from app_pages import _common as common
from qat_core import planning, report, runner
from qat_core.store import STATUSES

st.title("Fine-tune")
config = common.draft()

with st.expander(f"New run from this tab's draft: {config.model} · {planning.run_title(config)}", expanded=True):
    ft = config.finetune
    name = st.text_input("Run name (optional)", value=config.name, key="ft_name", max_chars=80,
                         placeholder=planning.plan_summary(config), help="Shown in Compare, the run picker and the report")
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
    values = {"name": name.strip(), "finetune": {"epochs": epochs, "lr": common.parse_number(lr_text),
                                                 "batch_size": batch}, "baseline": {"epochs": base_epochs}}
    problems = common.form_problems(config, values)
    for column, field in zip((c1, c2, c3, c4), ("finetune.epochs", "finetune.lr", "finetune.batch_size",
                                                 "baseline.epochs"), strict=True):
        if field in problems:
            column.error(problems[field], icon="⚠️")
    if not problems:
        config = common.update_draft(config, **values)
    if st.button("Start fine-tune", type="primary", key="start", disabled=bool(problems),
                 help="Fix the values marked above first" if problems else None):
        run_id = common.call(runner.launch, config, common.store(), threads)
        common.select_run(run_id)
        st.rerun()

records = common.runs()
if not records:
    st.info("No runs yet: press **Start fine-tune**.")
    st.stop()
run_id = common.run_picker(records, statuses=STATUSES)
record = next(r for r in records if r["id"] == run_id)


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
        c1, c2, c3, c4 = st.columns(4)
        fp32, ptq, qat = (m[phase]["accuracy"] for phase in ("fp32", "ptq", "qat"))
        c1.metric("FP32 accuracy", f"{fp32:.2%}")
        c2.metric("PTQ accuracy", f"{ptq:.2%}", **common.points_delta(ptq, fp32), help="vs FP32")
        c3.metric("QAT accuracy", f"{qat:.2%}", **common.points_delta(qat, fp32),
                  help="vs FP32. Computed as ONNX Runtime will compute the int8 model (integer arithmetic)"
                  + (f"; the fake-quantized float simulation gives {m['qat']['fake_quant_accuracy']:.2%}"
                     if "fake_quant_accuracy" in m["qat"] else ""))
        size = m["size"]
        c4.metric("Size (bit-packed)", f"{size['quantized_bytes'] / 1024:,.1f} KB",
                  help=f"{size['ratio']:.2f}× of the FP32 model ({size['fp32_bytes'] / 1024:,.1f} KB). "
                  + (common.STORED_SIZE_NOTE.format(kb=size["stored_bytes"] / 1024) if "stored_bytes" in size else ""))
        if qat < ptq - 0.0005:
            st.info(f"The fine-tune ended below PTQ ({ptq:.2%} → {qat:.2%}): for this plan, calibration alone "
                    "was better. Keep the PTQ result, or retry with a lower learning rate or fewer epochs.")
        out = report.deployed(m)
        if out is None:
            st.caption("Deployed accuracy: not measured yet — **Benchmark** runs the int8 model in ONNX Runtime.")
        elif out["same"]:
            st.success(f"Deployed: the int8 model in ONNX Runtime scores {out['accuracy']:.2%}, the same predictions "
                       "as this evaluation.")
        else:
            st.warning(f"Deployed: the int8 model in ONNX Runtime scores {out['accuracy']:.2%} (evaluated "
                       f"{out['evaluated']:.2%}). {out['why']}")
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
