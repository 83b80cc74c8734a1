"""Runs as tables, and one run as a self-contained HTML report (for people without the app).

:func:`runs_frame` is the Compare/Home table (one row a run: accuracies, size, latency);
:func:`report_html` is the Export page's download and ``qat-studio report RUN``'s output: accuracy,
size, training curves, per-layer error with its SQNR figure (finished runs), the layer plan, the
benchmark and parity results when they were measured, and the config. plotly.js is inlined once,
so the file opens offline and has no external ``<script src>``. :func:`analyze_run` writes a run's
``analysis/`` folder: its tables as CSV and its figures as HTML pages.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch

from qat_core import analysis, cpu, files, plots, search, train
from qat_core.errors import ConfigError, StoreError
from qat_core.planning import plan_frame, plan_summary, run_title
from qat_core.runner import Loaded, load
from qat_core.store import RunStore, atomic_write_bytes, atomic_write_text

ANALYSIS_DIR = "analysis"  # sub-folder of a run that analyze_run writes into
REPORT_FILE = "report.html"  # default name inside the run's folder
BENCH_COLUMNS = ["backend", "batch", "threads", "median_ms", "p90_ms", "p99_ms", "throughput"]
ERROR_COLUMNS = ["layer", "kind", "weight_bits", "act_bits", "weight_sqnr_db", "act_sqnr_db", "output_sqnr_db",
                 "output_sqnr_vs_baseline_db", "weight_share_clipped", "act_share_clipped", "granularity",
                 "size_bytes"]  # the columns people read first, most telling first; the CSV has them all
ERROR_HEADERS = {"layer": "layer", "kind": "kind", "weight_bits": "weight bits", "act_bits": "act bits",
                 "granularity": "granularity", "weight_sqnr_db": "weight SQNR (dB)", "act_sqnr_db": "activation SQNR (dB)",
                 "weight_share_clipped": "weights clipped", "act_share_clipped": "activations clipped",
                 "size_bytes": "size (bytes)", "output_sqnr_db": "network output SQNR (dB)",
                 "output_sqnr_vs_baseline_db": "output SQNR vs FP32 (dB)"}
BACKEND_NAMES = {"ort_fp32": "ONNX Runtime FP32", "ort_int8": "ONNX Runtime int8", "torch_fp32": "PyTorch FP32 (eager)"}
BENCH_HEADERS = {"median_ms": "median (ms)", "p90_ms": "p90 (ms)", "p99_ms": "p99 (ms)",
                 "throughput": "throughput (samples/s)"}
STAGES = ("fp32", "ptq", "qat")
STAGE_TITLES = {"fp32": "FP32 baseline", "ptq": "PTQ (calibrated, before fine-tune)", "qat": "QAT (after fine-tune)"}


# --- runs as tables ------------------------------------------------------------------------------
def latency_ms(bench: dict[str, Any] | None, backend: str = "int8", batch: int | None = 1) -> float | None:
    """Fastest median latency (ms) of ONNX Runtime ``backend`` ("int8", "fp32") at ``batch`` in a bench result."""
    rows = [r for r in (bench or {}).get("rows", []) if r.get("backend") == f"ort_{backend}" and r.get("batch") == batch]
    return min((float(r["median_ms"]) for r in rows), default=None)


def _pct(section: dict[str, Any] | None) -> float:
    return section["accuracy"] * 100 if section and "accuracy" in section else math.nan


def deployed(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The int8 model's accuracy in ONNX Runtime beside the run's (QAT) accuracy, once parity measured
    it: ``{"accuracy", "evaluated", "same", "why"}`` (``why``: the reason when they differ), else None."""
    parity = metrics.get("parity")
    if not parity or "accuracy" not in parity:
        return None
    same = parity["accuracy"] == parity.get("sim_accuracy") and parity.get("agreement") == 1.0
    return {"accuracy": parity["accuracy"], "evaluated": parity.get("sim_accuracy"), "same": same,
            "why": None if same else parity.get("explanation") or "ONNX Runtime's predictions differ from the run's"}


def runs_frame(store: RunStore, records: list[dict[str, Any]] | None = None) -> pd.DataFrame:
    """One row a run (``records`` from ``store.list()``, default all): its name (the user's, else its
    plan), status, model, plan, fine-tune settings, accuracy (%) of FP32/PTQ/QAT and of the int8 model
    in ONNX Runtime (once measured), size (KB bit-packed and as stored in int8.onnx, ratio), ONNX
    Runtime latency (ms) at the smallest batch benchmarked, error."""
    records = store.list() if records is None else records
    out = []
    for r in records:
        m = r["metrics"]
        error = r["error"] or ""
        try:
            bench = store.read_result(r["id"], "bench") if "bench" in m else None
        except StoreError as err:  # one damaged file costs its run a column, not the table
            bench, error = None, str(err)
        size = m.get("size", {})
        damaged = r["status"] == "damaged"
        ft = r["config"].get("finetune", {})
        batch = min((row["batch"] for row in (bench or {}).get("rows", [])), default=None)
        out.append({"run": r["id"], "name": "" if damaged else run_title(r["config"]), "status": r["status"],
                    "model": r["model"], "plan": "" if damaged else plan_summary(r["config"]),
                    "lr": ft.get("lr", math.nan), "epochs": ft.get("epochs", math.nan),
                    "batch size": ft.get("batch_size", math.nan),
                    "FP32 acc %": _pct(m.get("fp32")), "PTQ acc %": _pct(m.get("ptq")), "QAT acc %": _pct(m.get("qat")),
                    "ORT int8 acc %": _pct(m.get("parity")),
                    "size KB": size.get("quantized_bytes", math.nan) / 1024,
                    "stored KB": size.get("stored_bytes", math.nan) / 1024,
                    "size ratio": size.get("ratio", math.nan),
                    "int8 latency ms": latency_ms(bench, "int8", batch), "fp32 latency ms": latency_ms(bench, "fp32", batch),
                    "latency batch": batch, "error": error})
    return pd.DataFrame(out, columns=RUN_COLUMNS).astype({"latency batch": "Int64"}).round({
        "FP32 acc %": 2, "PTQ acc %": 2, "QAT acc %": 2, "ORT int8 acc %": 2, "size KB": 1, "stored KB": 1,
        "size ratio": 3, "int8 latency ms": 4, "fp32 latency ms": 4})


RUN_COLUMNS = ["run", "name", "status", "model", "plan", "lr", "epochs", "batch size", "FP32 acc %", "PTQ acc %",
               "QAT acc %", "ORT int8 acc %", "size KB", "stored KB", "size ratio", "int8 latency ms",
               "fp32 latency ms", "latency batch", "error"]
RUN_SUMMARY = ["name", "status", "plan", "QAT acc %", "ORT int8 acc %", "size KB", "int8 latency ms", "lr", "epochs",
               "batch size", "run"]  # what fits a screen, most telling first
RUN_HEADERS = {"size KB": "size KB (packed)", "stored KB": "KB in int8.onnx", "latency batch": "at batch"}


def bench_frame(result: dict[str, Any]) -> pd.DataFrame:
    """A bench result's timings (``bench.bench_run``): backend, batch, threads, latency percentiles, throughput."""
    frame = pd.DataFrame(result.get("rows", []))
    if "backend" in frame:
        frame["backend"] = frame["backend"].map(lambda b: BACKEND_NAMES.get(b, b))
    frame = frame.round({"median_ms": 4, "p90_ms": 4, "p99_ms": 4, "throughput": 0})
    return frame[[c for c in BENCH_COLUMNS if c in frame.columns]].rename(columns=BENCH_HEADERS)


def speedup(result: dict[str, Any]) -> dict[str, Any] | None:
    """The first batch/threads comparison of a bench result (speedup = FP32 / int8, overhead_bound), or None."""
    comparisons = result.get("comparisons") or []
    return comparisons[0] if comparisons else None


def cpu_flags(machine: dict[str, Any]) -> list[str]:
    """The SIMD flags a benchmark's CPU has (saved as {flag: present}; older results as a list)."""
    flags = machine.get("flags", [])
    return [f for f, on in flags.items() if on] if isinstance(flags, dict) else list(flags)


def float_reasons(float_layers: Any) -> dict[str, str]:
    """Layers left in float → why (parity and export give a dict; older results a list of names)."""
    if isinstance(float_layers, dict):
        return float_layers
    return {name: "runs in float" for name in float_layers or []}


# --- the report ----------------------------------------------------------------------------------
def _table(frame: pd.DataFrame, float_format: str = "%.3f") -> str:
    return frame.to_html(index=False, float_format=lambda v: float_format % v, na_rep="", border=0)


def _kv(pairs: dict[str, Any]) -> str:
    return _table(pd.DataFrame({"": list(pairs), "value": [str(v) for v in pairs.values()]}))


def _accuracy_section(m: dict[str, Any]) -> list[str]:
    stages = [s for s in STAGES if s in m]
    if not stages:
        return []
    fp32 = m.get("fp32", {}).get("accuracy")
    rows = [{"model": STAGE_TITLES[s], "test accuracy %": m[s]["accuracy"] * 100,
             "vs FP32 (pt)": (m[s]["accuracy"] - fp32) * 100 if fp32 is not None else math.nan,
             "loss": m[s].get("loss", math.nan)} for s in stages]
    out = deployed(m)
    if out is not None:
        rows.append({"model": "int8 in ONNX Runtime (deployed)", "test accuracy %": out["accuracy"] * 100,
                     "vs FP32 (pt)": (out["accuracy"] - fp32) * 100 if fp32 is not None else math.nan,
                     "loss": math.nan})
    parts = ["<h2>Accuracy</h2>",
             "<p>PTQ and QAT accuracies are computed with ONNX Runtime's integer arithmetic: what the int8 model "
             "predicts once deployed.</p>", _table(pd.DataFrame(rows), "%.2f")]
    if out is not None and out["why"]:
        parts.append(f"<p>ONNX Runtime differs from the evaluation: {html.escape(out['why'])}</p>")
    return parts


def _size_section(m: dict[str, Any], exported: dict[str, Any] | None) -> list[str]:
    out = []
    if "size" in m:
        sz = m["size"]
        out.append(f"<p>Predicted size: <b>{sz['quantized_bytes'] / 1024:,.1f} KB</b> vs FP32 "
                   f"{sz['fp32_bytes'] / 1024:,.1f} KB ({sz['ratio']:.3f}×).</p>")
    if exported and "files" in exported:
        files = exported["files"]
        out.append("<p>ONNX files: " + ", ".join(f"{html.escape(k)} {v / 1024:,.1f} KB" for k, v in files.items())
                   + "</p>")
    if m.get("float_layers"):
        out.append("<p><b>Layers left in float:</b> " + html.escape("; ".join(
            f"{k}: {v}" for k, v in float_reasons(m["float_layers"]).items())) + "</p>")
    return (["<h2>Size</h2>", *out]) if out else []


def _errors_section(store: RunStore, run_id: str, loaded: Loaded | None,
                    on_progress: analysis.OnProgress | None) -> tuple[list[str], go.Figure]:
    tables = analysis.run_error_tables(store, run_id, loaded, on_progress=on_progress)  # saved: once a run
    errors = pd.concat([tables[stage] for stage in ("ptq", "qat")], ignore_index=True)
    qat = errors[errors["stage"] == "qat"]
    table = qat[[c for c in ERROR_COLUMNS if c in qat.columns]].rename(columns=ERROR_HEADERS)
    return (["<h2>Per-layer error (after fine-tune)</h2>",
             "<p>SQNR in dB (higher is better) of each layer's quantized weights and output activations against "
             "float, share of values clipped, and the network output's SQNR against the FP32 model.</p>",
             _table(table, "%.4g")], plots.sqnr_figure(errors))


def _bench_section(store: RunStore, run_id: str, m: dict[str, Any]) -> list[str]:
    result = store.read_result(run_id, "bench")
    if result is None:
        if not m.get("bench"):
            return []
        return ["<h2>Benchmark</h2>", _kv(m["bench"])]
    out = ["<h2>Benchmark (ONNX Runtime and PyTorch, this machine)</h2>", _table(bench_frame(result), "%.4g")]
    first = speedup(result)
    if first is not None:
        out.append(f"<p>Speed-up of int8 over FP32 (ORT median, batch {first['batch']}, {first['threads']} "
                   f"thread(s)): <b>{first['speedup']:.2f}×</b>.</p>")
    if result.get("note"):
        out.append(f"<p>Note: {html.escape(result['note'])}</p>")
    machine = result.get("machine") or {}
    if machine:
        flags = cpu_flags(machine)
        out.append(f"<p>CPU: {html.escape(str(machine.get('cpu', '?')))}, {machine.get('cores', '?')} cores"
                   + (f", {html.escape(', '.join(map(str, flags)))}" if flags else "") + "</p>")
    return out


def _parity_section(store: RunStore, run_id: str, m: dict[str, Any]) -> list[str]:
    parity = store.read_result(run_id, "parity") or m.get("parity")
    if not parity:
        return []
    summary = {"ORT int8 accuracy": parity.get("accuracy"), "evaluated accuracy": parity.get("sim_accuracy"),
               "top-1 agreement": parity.get("agreement"), "max logit difference": parity.get("max_logit_diff"),
               "fake-quant simulation accuracy": parity.get("fake_quant_accuracy")}
    summary = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in summary.items() if v is not None}
    if "integer_layers" in parity:
        n_int, n_float = len(parity["integer_layers"]), len(parity.get("float_layers") or [])
        summary["integer-kernel coverage"] = f"{n_int}/{n_int + n_float} layers"
    if parity.get("layers"):
        summary["layers with differing codes"] = f"{sum(1 for r in parity['layers'] if r['differing'])}/" \
                                                 f"{len(parity['layers'])}"
    if parity.get("explanation"):
        summary["why they differ"] = parity["explanation"]
    out = ["<h2>Parity (ONNX Runtime int8 vs the run's evaluation)</h2>", _kv(summary)]
    reasons = float_reasons(parity.get("float_layers"))
    if reasons:
        out.append("<p>Runs in float in ONNX Runtime: " + html.escape("; ".join(f"{k}: {v}" for k, v in reasons.items()))
                   + "</p>")
    return out


def report_html(store: RunStore, run_id: str, loaded: Loaded | None = None,
                on_progress: analysis.OnProgress | None = None) -> bytes:
    """A self-contained HTML report of a run (UTF-8 bytes); see the module docstring for its sections.

    ``loaded`` (``runner.load(store, run_id)``) saves rebuilding a finished run's models when the
    caller has them already; unfinished runs get no per-layer error section. The per-layer errors
    are measured once a run (:func:`analysis.run_error_tables`); ``on_progress`` follows them.
    """
    record = store.get(run_id)
    config = store.config(run_id)
    m = record["metrics"]
    parts: list[str | go.Figure] = [f"<h1>QAT Studio report · run {html.escape(run_id)}</h1>",
             f"<p>Model <b>{html.escape(record['model'])}</b>, plan <b>{html.escape(plan_summary(config))}</b>, "
             f"status <b>{html.escape(record['status'])}</b>, created "
             f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record['created']))}.</p>"]
    if record["error"]:
        parts.append(f"<p><b>Error:</b> {html.escape(record['error'])}</p>")
    parts += _accuracy_section(m)
    parts += _size_section(m, store.read_result(run_id, "export"))
    events = store.events(run_id)
    if events:
        curves = analysis.training_curves(events)
        reference = {"FP32": m.get("fp32", {}).get("accuracy"), "PTQ": m.get("ptq", {}).get("accuracy")}
        parts += ["<h2>Training curves</h2>", plots.training_figure(curves, reference=reference)]
    if record["status"] == "done":
        section, fig = _errors_section(store, run_id, loaded, on_progress)
        parts += [*section, fig]
    layers = store.read_result(run_id, "layers")
    if layers:
        plan = plan_frame(layers, config.plan).astype({"weight_bits": "object", "act_bits": "object"})
        headers = {c: c.replace("_", " ") for c in plan.columns}
        parts += ["<h2>Layer plan</h2>", _table(plan.fillna("FP32").rename(columns=headers))]
    parts += _bench_section(store, run_id, m)
    parts += _parity_section(store, run_id, m)
    parts += ["<h2>Config</h2>", "<p>Reproduce the run with <code>qat-studio train config.yaml</code>.</p>",
              f"<pre>{html.escape(config.to_yaml())}</pre>"]
    # figures become divs in place; plotly.js itself goes once into <head>
    body = "".join(p.to_html(full_html=False, include_plotlyjs=False) if isinstance(p, go.Figure) else p for p in parts)
    has_figures = any(isinstance(p, go.Figure) for p in parts)
    script = f'<script type="text/javascript">{plots.plotly_js()}</script>' if has_figures else ""
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
             "pre{background:#f6f6f6;padding:1em;overflow:auto}")
    doc = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>QAT Studio report {html.escape(run_id)}</title>"
           f"<style>{style}</style>{script}</head>\n<body>{body}</body></html>\n")
    return doc.encode("utf-8")


def write_report(store: RunStore, run_id: str, path: str | Path | None = None) -> Path:
    """Write :func:`report_html` to ``path`` (default ``report.html`` in the run's folder), atomically:
    ``path`` is a regular file or a new one in an existing folder (:func:`files.output_file`)."""
    out = files.output_file(path, "report") if path is not None else store.artifact(run_id, REPORT_FILE)
    data = report_html(store, run_id)
    atomic_write_bytes(out, data)
    return out


# --- a run's analysis folder --------------------------------------------------------------------


def analyze_run(store: RunStore, run_id: str, bits: Sequence[int] = (4, 2), budget_bytes: float | None = None,
                average_bits: float | None = None, batches: int | None = None, bins: int = analysis.DEFAULT_BINS,
                on_progress: analysis.OnProgress | None = None, cancel: train.Cancel | None = None) -> dict[str, Path]:
    """Analyse a finished run and write tables (CSV) and figures (HTML) into ``runs/<id>/analysis/``.

    Writes errors.csv (both stages), histograms.csv + histogram_marks.csv + channel_ranges.csv,
    training.csv, sensitivity.csv (when ``bits``), suggestion.csv + suggested_plan.json (when a
    budget is given), and one HTML page per figure group (they share ``plotly.min.js`` in the same
    folder, so they open offline). Returns the written paths by name.
    """
    loaded = load(store, run_id)
    torch.set_num_threads(cpu.training_threads(sum(p.numel() for p in loaded.fp32.parameters())))  # as execute
    widths = search.check_bits(bits) if bits else []
    if (budget_bytes is not None or average_bits is not None) and not widths:
        raise ConfigError("a mixed-precision suggestion needs sensitivity widths to choose from; give bits, "
                          "e.g. (8, 6, 4, 3, 2)")
    written: dict[str, Path] = {}

    def put(name: str, text: str) -> None:
        path = store.artifact(run_id, f"{ANALYSIS_DIR}/{name}")
        atomic_write_text(path, text)
        written[name] = path

    # 1. histograms and per-layer error, before and after the fine-tune
    cal = analysis.calibration_batches(loaded, batches)
    tables, hists = [], []
    for stage in analysis.STAGES:
        search.progress(on_progress, cancel, "analysis", done=len(tables), total=2, layer="", bits=None)
        model = analysis._stage_model(loaded, stage)
        stats = analysis.capture_activations(model, cal, bins=bins, cancel=cancel)
        tables.append(analysis.error_table(loaded, stage, stats=stats))
        hists += [st.to_histogram(stage) for st in stats.values()]
    for layer in analysis.weight_layers(loaded.qat):
        hists += analysis.weight_histograms(loaded, layer, bins)
    errors = pd.concat(tables, ignore_index=True)
    put("errors.csv", analysis.to_csv(errors))
    put("histograms.csv", analysis.to_csv(pd.concat([h.frame() for h in hists], ignore_index=True)))
    put("histogram_marks.csv", analysis.to_csv(pd.DataFrame([h.marks() for h in hists])))
    channels = [h.channels for h in hists if h.channels is not None]
    if channels:
        put("channel_ranges.csv", analysis.to_csv(pd.concat(channels, ignore_index=True)))
    curves = analysis.training_curves(store.events(run_id))
    put("training.csv", analysis.to_csv(curves))
    figures: dict[str, list] = {
        "sqnr.html": [plots.sqnr_figure(errors)],
        "weights.html": [plots.histogram_figure([h for h in hists if h.tensor == "weight" and h.layer == layer])
                         for layer in analysis.weight_layers(loaded.qat)],
        "activations.html": [plots.histogram_figure([h for h in hists if h.tensor == "activation" and h.layer == layer])
                             for layer in analysis.activation_layers(loaded.qat)],
        "training.html": [plots.training_figure(curves)],
    }
    summary: dict[str, Any] = {"output_sqnr_db": {t.attrs["stage"]: t.attrs["output_sqnr_db"] for t in tables}}
    # 2. sensitivity and, with a budget, a mixed-precision suggestion
    if widths:
        sens = search.sensitivity(loaded, widths, batches=None, on_progress=on_progress, cancel=cancel)
        put("sensitivity.csv", analysis.to_csv(sens))
        figures["sensitivity.html"] = [plots.sensitivity_figure(sens)]
        if budget_bytes is not None or average_bits is not None:
            sug = search.suggest_plan(loaded, sens, budget_bytes, average_bits, on_progress=on_progress, cancel=cancel)
            put("suggestion.csv", analysis.to_csv(sug.candidates))
            put("suggested_plan.json", json.dumps(sug.plan.model_dump(mode="json"), indent=2))
            figures["pareto.html"] = [plots.pareto_figure(sug.candidates)]
            summary["suggestion"] = {"widths": sug.widths, "size_bytes": sug.size_bytes,
                                     "average_bits": sug.average_bits, "accuracy_ptq": sug.accuracy}
    put(plots.PLOTLY_JS, plots.plotly_js())
    for name, figs in figures.items():
        put(name, plots.page(figs, title=f"run {run_id}: {name.removesuffix('.html')}"))
    summary["files"] = {k: str(v) for k, v in written.items()}
    store.write_result(run_id, "analysis", summary)
    return written
