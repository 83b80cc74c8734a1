"""Fine-tune: launch a QAT fine-tune (PTQ is measured beside it) as a background job; live progress,
curves and Cancel. The job lives in the run store, so a reload or a second tab finds it."""

import streamlit as st

from app_pages import _common as common
from qat_core import planning, report, runner
from qat_core.store import STATUSES

st.title("Fine-tune")
config = common.draft()

with st.expander(f"New run from this tab's draft: {config.model} · {planning.plan_summary(config)}",
                 expanded=True):
    ft = config.finetune
    c1, c2, c3, c4 = st.columns(4)
    epochs = c1.number_input("Fine-tune epochs", 0.0, 1000.0, float(ft.epochs), 1.0, key="ft_epochs",
                             help="0 = PTQ only (calibrate, no training)")
    lr = c2.number_input("Learning rate", 1e-6, 1.0, float(ft.lr), format="%.0e", key="ft_lr")
    batch = c3.number_input("Batch size", 1, 4096, int(ft.batch_size), key="ft_batch")
    base_epochs = c4.number_input("Baseline epochs", 1, 1000, int(config.baseline.epochs), key="ft_base_epochs",
                                  help="FP32 baseline training (cached and reused once trained)")
    config = common.update_draft(config, finetune={"epochs": epochs, "lr": lr, "batch_size": int(batch)},
                                 baseline={"epochs": int(base_epochs)})
    if st.button("Start fine-tune", type="primary", key="start"):
        run_id = common.call(runner.launch, config, common.store())
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
    events = store.events(run_id)
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
        c1.metric("FP32 accuracy", f"{m['fp32']['accuracy']:.2%}")
        c2.metric("PTQ accuracy", f"{m['ptq']['accuracy']:.2%}",
                  f"{(m['ptq']['accuracy'] - m['fp32']['accuracy']) * 100:+.2f} pt")
        c3.metric("QAT accuracy", f"{m['qat']['accuracy']:.2%}",
                  f"{(m['qat']['accuracy'] - m['fp32']['accuracy']) * 100:+.2f} pt",
                  help="Computed as ONNX Runtime will compute the int8 model (integer arithmetic)"
                  + (f"; the fake-quantized float simulation gives {m['qat']['fake_quant_accuracy']:.2%}"
                     if "fake_quant_accuracy" in m["qat"] else ""))
        c4.metric("Size", f"{m['size']['quantized_bytes'] / 1024:,.1f} KB",
                  help=f"{m['size']['ratio']:.2f}× of the FP32 model ({m['size']['fp32_bytes'] / 1024:,.1f} KB)")
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
        st.warning(f"Run cancelled: {record['error']}. Its partial weights were discarded; start a new run.")
    elif record["status"] == "damaged":
        st.error(f"Run damaged: {record['error']}. The other runs are unaffected.")
    else:
        st.error(f"Run failed: {record['error']}")
    if events:
        common.show_plot(common.curves_figure(events), key="curves")
    if record["status"] == "done":
        st.page_link(common.PAGES["benchmark"], label="Next: export and benchmark it →", icon="⏱️")


running = record["status"] == "running"
st.fragment(show_run, run_every=common.POLL_SECONDS if running else None)(run_id, running)
