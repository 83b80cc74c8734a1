"""Benchmark: export a run to ONNX and time int8 against FP32 on this CPU, in ONNX Runtime and (when installed)
OpenVINO side by side, with each runtime's parity (agreement with the run's evaluation, int8 kernels) beside
the latency."""

import streamlit as st

from app_pages import _common as common
from qat_core import bench, export, report, runtimes, summary

st.title("Benchmark")
records = common.runs()
run_id = common.run_picker(records) if records else None
if run_id is None:
    st.info("No finished run yet: fine-tune one first (Home → Quick start).")
    st.stop()
store = common.store()

c1, c2, c3 = st.columns(3)
batch = c1.selectbox("Batch size", [1, 8, 32, 64], key="bench_batch")
threads = c2.selectbox("Threads", common.thread_choices(), key="bench_threads")
if c3.button("Export and benchmark", type="primary", key="bench_run"):
    with st.status("Exporting and measuring…", expanded=True) as status:
        st.write("exporting FP32 and int8 ONNX…")
        common.call(export.export_run, store, run_id)
        st.write("checking parity: ONNX Runtime int8 vs the run's evaluation, layer by layer…")
        common.call(export.parity, store, run_id)
        st.write(f"timing batch {batch}, {threads} thread(s)"
                 + (", in ONNX Runtime and OpenVINO…" if runtimes.installed() else "…"))
        common.call(bench.bench_run, store, run_id, batch_sizes=[batch], threads=[threads])
        status.update(label="Done", state="complete", expanded=False)

parity = store.read_result(run_id, "parity")
exported = store.read_result(run_id, "export")
result = store.read_result(run_id, "bench")
# the headline first, what is measured yet or not: accuracy kept, file size cut, speed; then the evidence
head = common.call(report.run_headline, store, run_id)
common.headline_strip(head)
h1, h2, h3 = st.columns(3)  # three to a row: labels stay whole at 800 px
h1.metric("FP32 accuracy", summary.pct(head.fp32_accuracy))
h2.metric("int8 accuracy (ORT)", summary.pct(head.int8_accuracy),
          help=f"The int8 model in ONNX Runtime on the test split; the run's evaluation (integer arithmetic) said "
               f"{summary.pct(head.qat_accuracy)}")
h3.metric("int8 speed-up", f"{head.speedup:.1f}×" if head.speedup is not None else common.MISSING,
          help=f"{head.speed_value()} on this CPU: FP32 latency / int8 latency in ONNX Runtime (median), "
               f"{head.speedup_setting}"
          if head.speedup is not None else head.missing.get("latency"))
h4, h5, h6 = st.columns(3)
if head.size is not None:
    common.size_metric(h4, head.size)
    h5.metric("File size cut", f"{head.size.ratio:.1f}×", help=f"{head.size.fp32_text()} / {head.size.text()}")
if head.quantized_layers is not None:
    common.layers_metric(h6, head.quantized_layers)

if parity is None and result is None:
    st.info("Press **Export and benchmark**: it writes int8.onnx and fp32.onnx, checks that ONNX Runtime "
            "predicts what the simulation predicted, and times both on this CPU.")
    st.stop()

# parity, then latency, each full width: three metrics to a row stay whole at 800 px
st.subheader("Parity")
if parity:
    a1, a2, a3 = st.columns(3)
    a1.metric("Agreement", f"{parity['agreement']:.2%}",
              help="Top-1 agreement of ONNX Runtime int8 with the run's evaluation on the test split")
    a2.metric("Max logit diff", f"{parity['max_logit_diff']:.3g}")
    a3.metric("Integer-kernel coverage", summary.coverage_value(parity),
              help="Conv/Gemm/MatMul ops of the FP32 model that ONNX Runtime runs as integer kernels in int8.onnx")
    floating = summary.float_parts(parity)
    if floating:
        st.warning("Runs in float in ONNX Runtime: " + "; ".join(f"{k}: {v}" for k, v in floating.items()))
    if parity.get("float_ops"):
        with st.expander(f"{len(parity['float_ops'])} light ops run in float between integer kernels"):
            st.caption("; ".join(f"{k}: {v}" for k, v in parity["float_ops"].items()))
    if parity.get("layers"):
        differing = [r for r in parity["layers"] if r["differing"]]
        st.caption(f"Layers compared with ONNX Runtime: {len(parity['layers'])}; {len(differing)} layer(s) differ.")
    if parity.get("explanation"):
        st.warning(parity["explanation"])
if exported:
    for note in exported.get("notes", []):
        st.caption(note)
st.subheader("Latency")
if result is None:
    st.info("Press **Export and benchmark** to time it.")
else:
    if result.get("overhead_bound"):
        note = result.get("note", "this model is too small for int8 to pay off here").rstrip(".")
        st.warning(f"Overhead-bound: {note}. Try resnet18 or mobilenetv2 for real gains.")
    machine = result.get("machine", {})
    if machine:
        st.caption(f"CPU: {machine.get('cpu', '?')} · cores {machine.get('cores', '?')} · flags "
                   + (", ".join(report.cpu_flags(machine)) or "none of AVX2, AVX-512, VNNI"))
if result is not None:  # full width: every column on screen
    st.markdown("**Runtimes side by side** — the same int8.onnx in each, its FP32 model beside it")
    st.caption("OpenVINO compiles the run's own int8.onnx unchanged (no re-quantization): one stream, the latency "
               "hint, the same threads; under its f32 precision hint (float between the integer kernels exact) and "
               "its default hint (what it picks on this CPU, in brackets). Rounds are interleaved, so load hits "
               "every runtime alike. ONNX Runtime's parity is the Parity section's.")
    common.show_table(report.runtime_frame(result, parity))
    for note in report.runtime_notes(result):
        (st.warning if note.level == "warning" else st.info)(note.text)
    if not result.get("runtimes"):  # timed before OpenVINO was: say what timing again would add
        st.info(runtimes.NOT_INSTALLED if not runtimes.installed() else
                "Benchmark again to time OpenVINO beside ONNX Runtime.")
    st.markdown("**Every backend**")
    common.show_table(report.bench_frame(result))
st.page_link(common.PAGES["export"], label="Next: download the models and a report →", icon="📦")
