"""Sweep: train this tab's draft × variations (widths, suggested plans, range methods, learning rates,
seeds) in parallel worker processes; watch the runs finish and the Pareto front fill in; cancel; start
it again to train only what is missing. The sweep runs in its own process, so it outlives the page."""

from typing import get_args

import streamlit as st

from app_pages import _common as common
from qat_core import config as cfg
from qat_core import cpu, planning, plots, report, sweep
from qat_core.errors import QATError
from qat_core.store import SWEEP_ID_RULE

FIELDS = {"name": "Sweep name", "vary.lr": "Learning rates", "vary.seed": "Seeds per plan", "vary": "Variations",
          "executor.workers": "Runs at a time", "executor.threads": "Threads per run",
          "executor": "Runs at a time × threads per run"}  # a spec field → the control that sets it

st.title("Sweep")
st.caption("Which plan is best for your budget? Train the candidates and read the answer off the measured "
           "Pareto front. The sensitivity scan on **Inspect** predicts it from one layer at a time; a sweep "
           "trains each plan for real.")
store = common.store()
config = common.draft()
ids = store.sweeps()
# what went wrong starting a sweep shows here, at the top: in a second tab the form below may be folded away
notice = st.container()

with st.expander(f"New sweep over this tab's draft: {planning.default_name(config)}",
                 expanded=not ids):
    name = st.text_input("Sweep name", value=common.sweep_name(config), key="sw_name", max_chars=40,
                         help=f"Its id: {SWEEP_ID_RULE}. Starting a sweep of the same name again trains only its "
                              "missing runs")
    name_note = st.container()  # what is wrong with the name, under it
    c1, c2 = st.columns(2)
    widths = c1.multiselect("Uniform weight widths", list(range(cfg.MAX_BITS, cfg.MIN_BITS - 1, -1)),
                            default=[8, 4, 3, 2], key="sw_widths",
                            help="One plan per width: every quantized weight layer at it, activations as drafted")
    budgets = c2.multiselect("Suggested plans at average weight bits", [6.0, 5.0, 4.0, 3.0, 2.5, 2.0], default=[3.0],
                             key="sw_budgets", help="The sensitivity scan's mixed-precision suggestion for each "
                                                    "budget (widths 8/4/3/2 per layer), trained like the others")
    c3, c4, c5 = st.columns(3)
    methods = c3.multiselect("Range methods", list(get_args(cfg.RangeMethod)), key="sw_methods",
                             placeholder=f"as drafted ({config.plan.default.range_method})")
    lr_text = c4.text_input("Learning rates", key="sw_lrs", placeholder=f"as drafted ({config.finetune.lr:g})",
                            help="Comma-separated, e.g. 1e-3, 3e-4")
    # No min/max on the numbers: the browser would silently replace an out-of-range value; the server says why
    seeds = c5.number_input("Seeds per plan", value=1, step=1, key="sw_seeds",
                            help=f"Each plan trained with seeds {config.seed}, {config.seed + 1}, …: the spread "
                                 "shows which differences are noise")
    c6, c7, c8 = st.columns(3)
    workers = c6.number_input("Runs at a time", value=0, step=1, key="sw_workers",
                              help=f"Worker processes; 0 chooses: this machine's {cpu.cores()} cores ÷ threads per run")
    threads = c7.number_input("Threads per run", value=0, step=1, key="sw_threads",
                              help=f"torch threads each run uses, 1 to this machine's {cpu.cores()} cores; 0 chooses: "
                                   "1 for a model under 2M parameters, else every core up to 4. Runs × threads may "
                                   "not exceed the cores")
    latency = c8.checkbox("Time int8 models", value=True, key="sw_latency",
                          help="Each int8 model in ONNX Runtime, batch 1, one at a time after training: the latency "
                               "axis")
    values = {"name": name.strip(), "base": config.to_dict(), "latency": latency,
              "vary": {"weight_bits": widths, "range_method": methods,
                       "lr": [common.parse_number(t) for t in lr_text.split(",") if t.strip()],
                       "suggested": {"average_bits": budgets, "widths": [8, 4, 3, 2]} if budgets else None},
              "executor": {"workers": int(workers) or None, "threads": int(threads) or None}}
    params = common.draft_info(config)["params"]
    spec, problems = sweep.from_form(values, params, int(seeds))
    beside = {"name": name_note, "vary.lr": c4, "vary.seed": c5, "executor.workers": c6, "executor.threads": c7}
    for field, message in problems.items():
        beside.get(field, st).error(f"**{FIELDS.get(field, field)}**: {message}", icon="⚠️")
    if spec is not None:
        settings = sweep.executor_settings(spec, params)
        count = sweep.variation_count(spec)
        st.caption(f"**{count} run{'s' if count > 1 else ''}**, {settings['workers']} at a time × "
                   f"{settings['threads']} thread{'s' if settings['threads'] > 1 else ''}; the FP32 baseline is "
                   "trained once and shared.")
        with st.expander("The spec (YAML): `qat-studio sweep spec.yaml` runs the same sweep"):
            st.code(spec.to_yaml(), language="yaml")
            st.download_button("Download spec", spec.to_yaml(), f"{spec.name}.yaml", "application/yaml",
                               key="sw_download")
    # no type=: a file of another kind reaches the server, which says why it is refused (not a note on hover)
    upload = st.file_uploader("…or start a spec file (YAML)", key="sw_upload")
    if upload is not None:
        try:
            spec = common.parse_spec_upload(upload.name, upload.getvalue())
        except QATError as err:
            st.error(f"{upload.name} cannot be used: {err}", icon="⚠️")
            spec = None
    if st.button("Start sweep", type="primary", key="sw_start", disabled=spec is None,
                 help="Fix the values marked above first" if spec is None else None):
        try:
            sweep.launch(spec, store)
        except QATError as err:
            notice.error(f"**The sweep was not started**: {str(err).rstrip('.')}.", icon="⚠️")
        else:
            st.session_state[common.SWEEP_PICKER] = spec.name
            st.rerun()

ids = store.sweeps()
if not ids:
    st.info("No sweeps yet: choose the variations above and press **Start sweep**.")
    st.stop()
if st.session_state.get(common.SWEEP_PICKER) not in ids:
    st.session_state[common.SWEEP_PICKER] = ids[0]
sweep_id = st.selectbox("Sweep", ids, key=common.SWEEP_PICKER)


def show_sweep(sweep_id: str, was_running: bool) -> None:
    state = sweep.state(store, sweep_id)
    live = sweep.running(store, sweep_id)
    if was_running and not live:
        st.rerun()  # it ended: redraw once, without the timer
    try:
        frame = sweep.sweep_frame(store, sweep_id)
    except QATError as err:  # its plan.json is damaged: said below, beside Resume, which writes it again
        frame, live, state = None, False, state | {"state": "damaged", "error": str(err)}
    done = 0 if frame is None else int((frame["status"] == "done").sum())
    total = (0 if frame is None else len(frame)) or state.get("total") or 0
    if live:
        st.progress(*sweep.progress_of(store, state, frame))
        if st.button("Cancel sweep", key="sw_cancel"):
            sweep.request_cancel(store, sweep_id)
            st.toast("Cancel requested: running runs stop at their next step.")
    elif state["state"] == "done" and done == total:
        st.success(f"Done: {done} of {total} runs trained.")
    else:  # incomplete, cancelled, failed, stopped; or done when it ended, and a run was deleted since
        how = "incomplete" if state["state"] == "done" else state["state"]
        if state["state"] == "damaged":  # the error says which file and what to do
            st.warning(f"Sweep damaged: {state['error']}.")
        else:
            why = state.get("error") or f"{total - done} of {total} runs did not finish"
            st.warning(f"Sweep {how}: {why}. {done} of {total} runs are done and kept; **Resume** trains only the "
                       "runs that did not finish (from a terminal: run the same `qat-studio sweep` command again).")
        if st.button("Resume", type="primary", key="sw_resume"):
            common.call(sweep.launch, common.call(sweep.saved_spec, store, sweep_id), store)
            st.rerun()
    if frame is None or frame.empty:
        return
    common.show_table(frame[SHOWN], common.SWEEP_HEADERS)
    finished = frame[frame["status"] == "done"].assign(name=lambda f: f["label"])
    if finished.empty:
        return
    # full width, one under the other: each run is numbered on the chart and named in the legend below it.
    # The files' size: 2..7-bit weights take a byte each in int8.onnx, so narrower plans are no smaller
    # files; the bit-packed sizes are in the table, named so
    common.show_plot(plots.runs_pareto_figure(finished.rename(columns={"size KB": report.SIZE_AXIS}),
                                              report.SIZE_AXIS, "Accuracy vs int8.onnx file size"),
                     key="sw_pareto_size")
    if finished["bit-packed KB"].notna().any():
        st.caption("Plans under 8 bits are no smaller as files: int8.onnx stores 2..7-bit weights a byte each. "
                   "Their bit-packed sizes (not a file yet) are in the table below.")
    timed = finished[finished["int8 latency ms"].notna()]
    if timed.empty:
        st.info("The latency chart appears once the int8 models are timed (after training)." if live else
                "No int8 latency measured in this sweep.")
        return
    common.show_plot(plots.runs_pareto_figure(timed, "int8 latency ms", "Accuracy vs int8 latency "
                                              "(ONNX Runtime, batch 1)"), key="sw_pareto_latency")
    if any(store.get(r)["metrics"].get("bench", {}).get("overhead_bound") for r in timed["run"]):
        st.caption("This model is so small that per-call overhead, not arithmetic, sets its latency: "
                   "the differences here are noise. Compare latency on a larger model or batch.")


SHOWN = ["label", "status", "QAT acc %", "PTQ acc %", "avg weight bits", "size KB", "size from", "bit-packed KB",
         "int8 latency ms", "error", "run"]
running = sweep.running(store, sweep_id)
st.fragment(show_sweep, run_every=common.POLL_SECONDS * 2 if running else None)(sweep_id, running)
