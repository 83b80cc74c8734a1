"""What the pages share: the run store, caches, session and URL keys, the draft plan, tables and payloads.

Pages stay thin (widgets → guard → one ``qat_core`` call → render); everything stateful or cached is
here; the logic they call (plan table, drafts, run tables, report) lives in ``qat_core``. Nothing users make lives only in ``st.session_state``: runs are in the run store, and the draft
config a user is editing is a YAML file in the workspace (``drafts/<id>.yaml``) whose id rides in the
URL (``?draft=<id>``), so a reload or a second tab finds it again.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from collections.abc import Callable
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages._pages import PAGES  # noqa: F401  (the pages' own import of their files)
from qat_core import analysis, cpu, library, planning, plots, prepare, progress, report, runner, summary, sweep, zoo
from qat_core import config as cfg
from qat_core import data as datasets
from qat_core.errors import ConfigError, QATError
from qat_core.store import NAME_LIMIT, RunStore, default_workspace

# --- keys (session_state and URL) -----------------------------------------------------------------
DRAFT_PARAM = "draft"  # URL query parameter: the draft config being edited
RUN_PARAM = "run"  # URL query parameter: the run the pages show
DRAFT_KEY = "draft_id"  # session copy of the draft id (query params can be dropped on page switch)
RUN_KEY = "run_id"  # session copy of the selected run
RUN_PICKER = "run_picker"  # the run selectbox
PLAN_EDITOR = "plan_editor"  # st.data_editor of the quantization plan
SWEEP_PICKER = "sweep_picker"  # the Sweep page's selectbox of sweeps
ESTIMATE_KEY = "estimated_source"  # the Model page's source (model, weights, data) whose training was timed
DEFAULT_MODEL = "digits-cnn"
POLL_SECONDS = 0.5


# --- errors ---------------------------------------------------------------------------------------
def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run an engine call; a QATError becomes an ``st.error`` with its message and stops the page."""
    try:
        return fn(*args, **kwargs)
    except QATError as err:
        st.error(str(err))
        st.stop()


# --- run store ------------------------------------------------------------------------------------
@st.cache_resource
def _store(root: str) -> RunStore:
    return RunStore(root)


def store() -> RunStore:
    """The workspace's run store ($QAT_STUDIO_HOME or ~/.qat-studio); shared by every session."""
    return call(_store, str(default_workspace()))


def runs() -> list[dict[str, Any]]:
    return store().list()


def run_label(record: dict[str, Any]) -> str:
    """A run in a picker: its name (if given), model and plan, status, accuracies as the metrics show them, id."""
    if record["status"] == "damaged":  # its config and metrics could not be read
        return f"{record['id']} · {record['model']} · damaged"
    qat = record["metrics"].get("qat", {}).get("accuracy")
    ort = record["metrics"].get("parity", {}).get("accuracy")
    acc = f" · QAT {summary.pct(qat)}" if qat is not None else ""
    acc += f" (ONNX Runtime {summary.pct(ort)})" if ort is not None else ""
    name = record["config"].get("name")
    return f"{name + ' · ' if name else ''}{planning.default_name(record['config'])} · {record['status']}{acc} · " \
           f"{record['id']}"


def selected_run_id(records: list[dict[str, Any]]) -> str | None:
    """The run the pages show: the picker's choice, else the URL's, else this session's, else the newest."""
    ids = [r["id"] for r in records]
    for candidate in (st.session_state.get(RUN_PICKER), st.query_params.get(RUN_PARAM), st.session_state.get(RUN_KEY)):
        if candidate in ids:
            return candidate
    return ids[0] if ids else None


def start_run(config: cfg.RunConfig, threads: int = 1) -> str:
    """Start a run from this tab's draft, once: a second click or rerun on the same draft (before the first
    is drawn, or from another tab) gets the run the first started (``RunStore.start_draft``)."""
    s = store()
    run_id, _ = call(s.start_draft, draft_id(), config, lambda c: runner.launch(c, s, threads))
    return run_id


def select_run(run_id: str) -> None:
    """Show this run from now on (call before the picker is drawn, e.g. after launching it)."""
    st.session_state[RUN_KEY] = run_id
    st.session_state.pop(RUN_PICKER, None)  # the picker follows the URL on the next run
    st.query_params[RUN_PARAM] = run_id


def run_picker(records: list[dict[str, Any]], statuses: tuple[str, ...] = ("done",), label: str = "Run") -> str | None:
    """A selectbox of runs (newest first) remembering the pick in the session and the URL."""
    shown = [r for r in records if r["status"] in statuses]
    if not shown:
        return None
    labels = {r["id"]: run_label(r) for r in shown}
    st.session_state[RUN_PICKER] = selected_run_id(shown)
    picked = st.selectbox(label, list(labels), format_func=labels.__getitem__, key=RUN_PICKER)
    st.session_state[RUN_KEY] = picked
    if st.query_params.get(RUN_PARAM) != picked:
        st.query_params[RUN_PARAM] = picked
    return picked


MANAGE_PICKER = "manage_run"  # the run chosen under "Manage runs"
MANAGED = "managed"  # what the last rename or delete did, said once after the rerun that redraws the list


def manage_runs(records: list[dict[str, Any]]) -> None:
    """Rename or delete a run. A delete needs a ticked confirmation; a running run is refused with the reason."""
    if MANAGED in st.session_state:
        st.success(st.session_state.pop(MANAGED))
    labels = {r["id"]: run_label(r) for r in records}
    if st.session_state.get(MANAGE_PICKER) not in labels:  # deleted (here or in another tab): set, so the browser
        st.session_state[MANAGE_PICKER] = next(iter(labels))  # shows the new pick, not the deleted run's label
    run_id = st.selectbox("Run to rename or delete", list(labels), format_func=labels.__getitem__, key=MANAGE_PICKER)
    record = next(r for r in records if r["id"] == run_id)
    running = record["status"] == "running"
    if running:
        st.info("This run is running: cancel it on **Fine-tune** (or let it finish) to rename or delete it.")
    c1, c2 = st.columns([4, 1], vertical_alignment="bottom")
    name = c1.text_input("New name (empty: its model and plan name it)", value=record["name"] or "",
                         key=f"rename_{run_id}", max_chars=NAME_LIMIT, disabled=running)
    if c2.button("Rename", key="rename_run", disabled=running or record["status"] == "damaged"):
        renamed = call(store().rename, run_id, name)
        st.session_state[MANAGED] = f"Run {run_id} is now named “{planning.run_title(renamed['config'])}”."
        st.rerun()
    sure = st.checkbox(f"Yes, delete run {run_id} and its files (weights, ONNX models, results, report)",
                       key=f"confirm_delete_{run_id}", disabled=running)
    if st.button("Delete run", key="delete_run", disabled=running or not sure,
                 help=None if sure else "Tick the box above to confirm: a deleted run cannot be restored"):
        call(sweep.delete_run, store(), run_id)
        what = record["model"] if record["status"] == "damaged" else planning.run_title(record["config"])
        st.session_state[MANAGED] = f"Deleted run {run_id} ({what})."
        st.rerun()


# --- models ---------------------------------------------------------------------------------------
@st.cache_data(show_spinner="Reading the model…", max_entries=32)
def model_info(model_id: str, data_json: str | None = None, weights: str | None = None,
               checkpoint: str | None = None) -> dict[str, Any]:
    """Layers (execution order), parameter count and data description of a model on its data: the draft's
    (``config.data.model_dump_json()``, e.g. a table's path), else the model's default data set; with the
    draft's weights, so a replaced head shows in the layer table."""
    data_cfg = cfg.from_dict({"model": model_id, "data": json.loads(data_json) if data_json else
                              {"dataset": zoo.default_dataset(model_id)}}).data
    model, data = zoo.build(model_id, data_cfg, weights, checkpoint)
    rows = prepare.layer_table(model, data.example())
    return {"rows": rows, "params": sum(p.numel() for p in model.parameters()), "data": data.description,
            "generated": data.generated, "classes": data.num_classes, "train": len(data.train_x),
            "test": len(data.test_x), "input_shape": list(data.example(1).shape[1:]), "skipped": len(data.skipped),
            "new_head": library.new_head(model)}


def draft_size(config: cfg.RunConfig, rows: list[dict]) -> summary.Size:
    """The draft's size: an exported run's files when one has the same model, data and plan, else predicted."""
    return call(report.draft_size, store(), config, rows)


def draft_info(config: cfg.RunConfig) -> dict[str, Any]:
    """``model_info`` of the draft's model, data and weights."""
    return call(model_info, config.model, config.data.model_dump_json(), config.weights, config.checkpoint)


@st.cache_data(show_spinner="Timing a few training steps on this machine…", max_entries=16)
def _seconds_per_step(config_json: str, threads: int) -> dict[str, float]:
    return runner.seconds_per_step(cfg.RunConfig.model_validate_json(config_json), threads)


def time_estimate(config: cfg.RunConfig, threads: int, train_baseline: bool = True) -> dict[str, float]:
    """Seconds the parts of a run of the draft take (``runner.time_estimate``), from steps and passes timed
    once per model, data, plan and batch size (epochs only multiply)."""
    timed = config.model_copy(update={"name": "", "baseline": config.baseline.model_copy(update={"epochs": 1}),
                                      "finetune": config.finetune.model_copy(update={"epochs": 1})})
    return runner.time_estimate(config, call(_seconds_per_step, timed.model_dump_json(), threads), train_baseline)


@st.cache_data(max_entries=16)
def _table_columns(path: str, modified: float) -> list[str]:
    return datasets.table_columns(path)


def table_columns(path: str) -> list[str]:
    """A table file's column names (read again when the file changes)."""
    return _table_columns(path, os.path.getmtime(path) if os.path.isfile(path) else 0.0)


duration = progress.duration  # "12 s", "3 min 20 s": every page and the CLI spell times alike


def save_upload(upload: Any) -> str:
    """An uploaded file (a checkpoint, a table), kept in the workspace; its path, for the config."""
    return str(call(store().save_upload, upload.name, upload.getvalue()))


@st.cache_data(show_spinner="Building the default plan…", max_entries=32)
def _default_config(model_id: str, data_json: str | None, weights: str | None, checkpoint: str | None) -> dict[str, Any]:
    data = json.loads(data_json) if data_json else None
    return runner.default_config(model_id, data=data, weights=weights, checkpoint=checkpoint).to_dict()


def default_config(model_id: str, data: dict[str, Any] | None = None, weights: str | None = None,
                   checkpoint: str | None = None) -> cfg.RunConfig:
    """A model's default config (its plan, training settings, data), on ``data`` when given."""
    data_json = json.dumps(data, sort_keys=True) if data else None
    return cfg.RunConfig.model_validate(_default_config(model_id, data_json, weights, checkpoint))


def with_data(config: cfg.RunConfig, data: dict[str, Any]) -> cfg.RunConfig:
    """The draft on other settings of its data set (``data``: what Model & data shows), its plan kept; an image
    folder's preprocessing not given is taken from the model's weights, as ``default_config`` does."""
    typed = cfg.from_dict({"model": config.model, "data": data}).data
    return config.model_copy(update={"data": library.resolve_data(config.model, typed, config.weights)})


def baseline_metrics(config: cfg.RunConfig) -> dict[str, float] | None:
    """The cached FP32 baseline's metrics for this config, or None if it was never trained."""
    return runner.cached_baseline(config, store())


# --- the draft config (what the Model, Plan and Fine-tune pages edit; stored by RunStore) ---------
def draft_id() -> str:
    """This tab's draft id: from the URL (survives reloads), else the session, else a new draft."""
    did = st.query_params.get(DRAFT_PARAM) or st.session_state.get(DRAFT_KEY)
    if not store().has_draft(did):  # none yet, malformed (an edited URL) or deleted: start a new one
        did = secrets.token_hex(4)
        save_draft(default_config(DEFAULT_MODEL), did)
    st.session_state[DRAFT_KEY] = did
    if st.query_params.get(DRAFT_PARAM) != did:
        st.query_params[DRAFT_PARAM] = did
    return did


def draft() -> cfg.RunConfig:
    did = draft_id()
    try:
        return store().load_draft(did)
    except QATError as err:
        st.warning(f"The saved draft could not be read ({err}); starting from the defaults.")
        config = default_config(DEFAULT_MODEL)
        save_draft(config, did)
        return config


def save_draft(config: cfg.RunConfig, did: str | None = None) -> None:
    call(store().save_draft, did or draft_id(), config)


def _merged(config: cfg.RunConfig, sections: dict[str, Any]) -> dict[str, Any]:
    data = config.to_dict()
    for name, values in sections.items():
        data[name] = data[name] | values if isinstance(values, dict) else values
    return data


def update_draft(config: cfg.RunConfig, **sections: Any) -> cfg.RunConfig:
    """Merge widget values into the draft (``finetune={...}``, ``name=...``), validate, save if changed."""
    new = call(cfg.from_dict, _merged(config, sections))
    if new != config:
        save_draft(new)
    return new


def parse_number(text: str) -> float | str:
    """A number typed as text ("1e-3", "0.0005"); the text itself when it is not one (the config says why)."""
    try:
        return float(text.strip())
    except ValueError:
        return text


def form_problems(config: cfg.RunConfig, sections: dict[str, Any]) -> dict[str, str]:
    """What is wrong with a form's values, by config field (``finetune.lr`` → message), before anything starts:
    the config's own limits, then what the model's data cannot honour (a batch larger than the training set)."""
    data = _merged(config, sections)
    problems = cfg.field_errors(data)
    if not problems and not zoo.is_plugin(config.model):
        problems = runner.data_problems(cfg.from_dict(data), draft_info(config)["train"])
    return problems


# --- the plan editor (the table itself is qat_core.planning) -------------------------------------
UNDO_KEY = "plan_undo"  # (what replaced it, the draft before) for one Undo on the Plan page


def replace_plan(config: cfg.RunConfig, what: str) -> None:
    """Make ``config`` the draft (a preset, a suggestion: the whole plan at once), keeping the draft it
    replaces for one Undo."""
    before = draft()
    if config != before:
        st.session_state[UNDO_KEY] = (what, before.to_dict())
        save_draft(config)
    reset_plan_editor()


def undo_plan() -> None:
    """Button callback: back to the draft before the last :func:`replace_plan`."""
    _, before = st.session_state.pop(UNDO_KEY)
    save_draft(cfg.from_dict(before))
    reset_plan_editor()


def use_preset(rows: list[dict[str, Any]], preset: str) -> None:
    """Button callback (runs before the page, so one rerun shows the new plan): apply a preset to the draft."""
    replace_plan(call(planning.apply_preset, draft(), rows, preset), f"preset {preset}")


def use_reduce_range() -> None:
    """Button callback: every 8-bit weight of the draft's plan at 7 bits (see planning.reduce_range)."""
    replace_plan(call(planning.reduce_range, draft()), "7-bit weights")


def reset_plan_editor() -> None:
    """Drop the editor's pending edits (after a preset), so they are not replayed over the new plan."""
    st.session_state.pop(PLAN_EDITOR, None)


# --- progress and curves --------------------------------------------------------------------------
def curves_figure(events: list[dict[str, Any]]) -> go.Figure:
    """Loss and test accuracy per step, one colour a phase, with the FP32 and PTQ accuracies as reference
    lines once known; sized for the Fine-tune page."""
    curves = analysis.training_curves(events)
    finals = curves.attrs["final_accuracy"]
    fig = plots.training_figure(curves, reference={"FP32": finals.get("fp32"), "PTQ": finals.get("ptq")})
    fig.update_layout(height=560, margin={"t": 70})
    return fig


def progress_of(events: list[dict[str, Any]]) -> tuple[float, str]:
    """Overall progress 0..1 and what a running job is doing, with the time left in its stage."""
    return progress.run_progress(events)


PACKED_NOTE = ("ONNX has no type narrower than 8 bits, so int8.onnx stores 2..7-bit weights a byte each (their values "
               "stay on the narrow grid): the bit-packed size is what a runtime that packs them would load.")


def size_metric(column: Any, size: summary.Size) -> None:
    """The headline size as a metric (``summary.Size``): the int8.onnx file, measured or predicted, its FP32
    file and ratio in the help, and the bit-packed size under it when the plan has narrow weights."""
    column.metric(f"Size ({size.label})", summary.size_text(size.int8_bytes),
                  help=f"{size.ratio_text()}: FP32 is {size.fp32_text()}."
                  + ("" if size.measured else " Predicted from the layer table: export the run (Benchmark) for the "
                                              "file's own bytes."))
    if size.packed_text():
        column.caption(size.packed_text(), help=PACKED_NOTE)


def layers_metric(column: Any, count: int) -> None:
    column.metric("Quantized layers", count, help="Layers whose weights or output activations the plan quantizes "
                                                  "(the input is not a layer)")


def headline_strip(head: summary.Headline) -> None:
    """A run's headline (``summary.Headline``) as one line that wraps at any width, with its remarks and the
    noisy-timing warning under it."""
    with st.container(border=True):
        st.markdown(f"**{_md(head.text())}**")
    for remark in head.warnings():
        (st.warning if remark.level == "warning" else st.info)(_md(remark.text), icon="⚠️" if remark.level ==
                                                               "warning" else "ℹ️")


def _md(text: str) -> str:
    """Plain text for st.markdown: characters markdown would read as formatting are escaped."""
    return re.sub(r"([\\`*_\[\]<>#|$~])", r"\\\1", text)


def points_delta(value: float, reference: float, gain: bool = True) -> dict[str, str]:
    """``st.metric``'s delta for an accuracy against a reference, in percentage points: no arrow and no
    colour for a change that rounds to zero (a green "+0.00 pt" reads as a gain), nor for a rise that is
    no gain (``gain=False``: QAT above an undertrained baseline, see ``summary.remarks``)."""
    points = round((value - reference) * 100, 2)
    if not points:
        return {"delta": "±0.00 pt", "delta_color": "off", "delta_arrow": "off"}
    if points > 0 and not gain:
        return {"delta": summary.points(value - reference), "delta_color": "off", "delta_arrow": "off"}
    return {"delta": summary.points(value - reference), "delta_color": "normal", "delta_arrow": "auto"}


def show_plot(fig: go.Figure, key: str | None = None) -> None:
    st.plotly_chart(fig, width="stretch", config={"displayModeBar": False}, key=key)


# --- runs as tables (qat_core.report) ------------------------------------------------------------
def runs_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    return report.runs_frame(store(), records)


def cell_text(value: Any) -> str:
    """A table cell as people read it: "—" when missing, numbers without float noise."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{value:,.6g}" if isinstance(value, float) else str(value)


MISSING = "—"  # what a table shows for a missing value (Streamlit's default is "None")


def show_table(frame: pd.DataFrame, headers: dict[str, str] | None = None, **kwargs: Any) -> None:
    """A table for people: human column labels and "—" where a value is missing (numbers stay numbers,
    so columns sort as numbers)."""
    st.dataframe(frame.rename(columns=headers or {}), hide_index=kwargs.pop("hide_index", True), width="stretch",
                 placeholder=MISSING, **kwargs)


def rows_height(frame: pd.DataFrame) -> int:
    """A table height in pixels that shows every row without a scroll bar (Streamlit's rows are 35 px)."""
    return 35 * (len(frame) + 1) + 3


SWEEP_HEADERS = report.RUN_HEADERS | {"label": "variation", "avg weight bits": "avg weight bits"}


def sweep_name(config: cfg.RunConfig) -> str:
    """A first sweep name for a draft: its model, as a sweep id can spell it."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", config.model.lower().rsplit("/", 1)[-1]).strip("-_")[:30]
    return f"{slug or 'model'}-sweep"


# --- download payloads ----------------------------------------------------------------------------
def config_payload(run_id: str, fmt: str) -> bytes:
    """The run's config as YAML or JSON bytes; ``qat-studio train <file>`` reproduces the run."""
    config = store().config(run_id)
    return (config.to_yaml() if fmt == "yaml" else config.to_json()).encode("utf-8")


def _upload_text(name: str, data: bytes) -> str:
    if len(data) > cfg.MAX_INPUT_SIZE:  # before decoding: a large upload is refused, not read
        raise ConfigError(f"{name} is {len(data) / 1e6:.1f} MB; a config file is at most "
                          f"{cfg.MAX_INPUT_SIZE / 1e6:g} MB (a real one is a few KB)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{name} is not a text file; a config is a YAML or JSON file "
                          "(download one from this page to see the format)") from None


def parse_upload(name: str, data: bytes) -> cfg.RunConfig:
    """An uploaded config file → RunConfig. Only parsed as YAML/JSON text: never unpickled or executed; a
    model factory the user did not allow is refused at once, not when a run starts."""
    config = cfg.parse(_upload_text(name, data), source=name)
    zoo.check_plugin(config.model)
    return config


def parse_spec_upload(name: str, data: bytes) -> sweep.SweepSpec:
    """An uploaded sweep spec → SweepSpec, checked as ``parse_upload`` checks a config."""
    spec = sweep.parse_spec(_upload_text(name, data), name)
    zoo.check_plugin(spec.base.model)
    return spec


@st.cache_data(max_entries=8, show_spinner=False)
def _report(root: str, run_id: str, updated: float) -> bytes:
    store = RunStore(root)
    loaded = loaded_run(root, run_id) if store.get(run_id)["status"] == "done" else None
    return report.report_html(store, run_id, loaded)


def report_html(run_id: str) -> bytes:
    """The run's HTML report (``qat_core.report``), rebuilt when the run changes (new bench, parity)."""
    s = store()
    return _report(str(s.root), run_id, s.get(run_id)["updated"])


REPORT_KEY = "report_built"  # (run id, run's updated time) of the report this session built


def build_report(run_id: str) -> None:
    """Build a run's HTML report (seconds: it measures every layer); the bytes stay in the cache."""
    call(report_html, run_id)
    st.session_state[REPORT_KEY] = (run_id, store().get(run_id)["updated"])


def built_report(run_id: str) -> bytes | None:
    """The report this session built for the run, unless the run changed since (a new benchmark, say)."""
    if st.session_state.get(REPORT_KEY) == (run_id, store().get(run_id)["updated"]):
        return report_html(run_id)
    return None


# --- analysis (Inspect) and export/benchmark: cached per run ---------------------------------------
@st.cache_resource(max_entries=4, show_spinner="Loading the run's models…")
def loaded_run(root: str, run_id: str):
    """A finished run's FP32, PTQ and QAT models (read-only; shared by sessions)."""
    return runner.load(RunStore(root), run_id)


def load_run(run_id: str):
    return call(loaded_run, str(store().root), run_id)


@st.cache_data(max_entries=64, show_spinner="Binning…")
def histograms(root: str, run_id: str, layer: str, tensor: str) -> list:
    loaded = loaded_run(root, run_id)
    if tensor == "weight":
        return analysis.weight_histograms(loaded, layer)
    return analysis.activation_histograms(loaded, layer)


@st.cache_data(max_entries=16, show_spinner="Measuring every layer, before and after the fine-tune (once a run)…")
def error_table(root: str, run_id: str, stage: str) -> pd.DataFrame:
    return analysis.run_error_tables(RunStore(root), run_id, loaded_run(root, run_id))[stage]


def saved_frame(run_id: str, name: str) -> pd.DataFrame | None:
    """A table the pages saved with the run (sensitivity, suggestion), so it survives a reload."""
    records = store().read_result(run_id, name)
    return None if records is None else pd.DataFrame(records)


def save_frame(run_id: str, name: str, frame: pd.DataFrame) -> None:
    store().write_result(run_id, name, json.loads(frame.to_json(orient="records")))


def plan_config(run_id: str, plan: Any) -> cfg.RunConfig:
    """A new draft: the run's config with another layer plan (validated)."""
    return planning.with_plan(store().config(run_id), plan)


def latest_suggestion(model_id: str) -> dict[str, Any] | None:
    """The newest suggestion made on Inspect for a run of this model: {"run", "plan", ...}, or None."""
    for record in runs():
        if record["model"] == model_id and record["status"] == "done":
            found = store().read_result(record["id"], "suggested_plan_page")
            if found is not None:
                return found | {"run": record["id"]}
    return None


def thread_choices() -> list[int]:
    """1 and every core this process may use."""
    return sorted({1, cpu.cores()})
