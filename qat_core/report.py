"""Runs as tables, and one run as a self-contained HTML report (for people without the app).

:func:`runs_frame` is the Compare/Home table (one row a run: accuracies, size, latency);
:func:`report_html` is the Export page's download and ``qat-studio report RUN``'s output: accuracy,
size, training curves, per-layer error with its SQNR figure (finished runs), the layer plan, the
benchmark and parity results when they were measured, and the config. plotly.js is inlined once,
so the file opens offline and has no external ``<script src>``. :func:`analyze_run` writes a run's
``analysis/`` folder: its tables as CSV and its figures as HTML pages.
"""

from __future__ import annotations

import base64
import html
import json
import math
import numbers
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from qat_core import analysis, cpu, export, files, plots, runtimes, search, summary, train
from qat_core.config import RunConfig
from qat_core.errors import ConfigError, StoreError
from qat_core.planning import plan_frame, plan_summary, run_title
from qat_core.runner import Loaded, load
from qat_core.store import RunStore, atomic_write_bytes, atomic_write_text
from qat_core.summary import coverage_value, float_parts

ANALYSIS_DIR = "analysis"  # sub-folder of a run that analyze_run writes into
REPORT_FILE = "report.html"  # default name inside the run's folder
MISSING = "—"  # a value that was not measured, in the report's tables
BENCH_COLUMNS = ["backend", "batch", "threads", "median_ms", "p90_ms", "p99_ms", "throughput"]
ERROR_COLUMNS = ["layer", "kind", "weight_bits", "act_bits", "weight_sqnr_db", "act_sqnr_db", "output_sqnr_db",
                 "output_sqnr_vs_baseline_db", "weight_share_clipped", "act_share_clipped", "granularity",
                 "size_bytes"]  # the columns people read first, most telling first; the CSV has them all
ERROR_HEADERS = {"layer": "layer", "kind": "kind", "weight_bits": "weight bits", "act_bits": "act bits",
                 "granularity": "granularity", "weight_sqnr_db": "weight SQNR (dB)", "act_sqnr_db": "activation SQNR (dB)",
                 "weight_share_clipped": "weights clipped", "act_share_clipped": "activations clipped",
                 "size_bytes": "size (bytes)", "output_sqnr_db": "network output SQNR (dB)",
                 "output_sqnr_vs_baseline_db": "output SQNR vs FP32 (dB)"}
REPORT_ERROR_COLUMNS = ["layer", "kind", "weight_bits", "act_bits", "weight_sqnr_db", "act_sqnr_db",
                        "weight_share_clipped", "act_share_clipped", "size_bytes"]  # what fits an A4 page
BACKEND_NAMES = {"ort_fp32": "ONNX Runtime FP32", "ort_int8": "ONNX Runtime int8", "torch_fp32": "PyTorch FP32 (eager)",
                 "ov_fp32": "OpenVINO FP32 (f32 hint)", "ov_int8": "OpenVINO int8 (f32 hint)",
                 "ov_default_fp32": "OpenVINO FP32 (default hint)", "ov_default_int8": "OpenVINO int8 (default hint)"}
BENCH_HEADERS = {"median_ms": "median (ms)", "p90_ms": "p90 (ms)", "p99_ms": "p99 (ms)",
                 "throughput": "throughput (samples/s)"}
STAGES = ("fp32", "ptq", "qat")
STAGE_TITLES = {"fp32": "FP32 baseline", "ptq": "PTQ (calibrated, before fine-tune)", "qat": "QAT (after fine-tune)"}


# --- runs as tables ------------------------------------------------------------------------------
def latency_ms(bench: dict[str, Any] | None, backend: str = "int8", batch: int | None = 1) -> float | None:
    """Fastest median latency (ms) of ONNX Runtime ``backend`` ("int8", "fp32") at ``batch`` in a bench result."""
    rows = [r for r in (bench or {}).get("rows", []) if r.get("backend") == f"ort_{backend}" and r.get("batch") == batch]
    return min((float(r["median_ms"]) for r in rows), default=None)


def _legacy_layers(store: RunStore, record: dict[str, Any]) -> tuple[list[dict] | None, Any]:
    """The layer table and plan of a finished run saved before its metrics held the predicted files and
    the quantized-layer count (both are computed from these); (None, None) for other runs."""
    m = record["metrics"]
    if record["status"] != "done" or ("quantized_layers" in m and "int8_file_bytes" in m.get("size", {})):
        return None, None
    rows = store.read_result(record["id"], "layers")
    return (rows, RunConfig.model_validate(record["config"]).plan) if rows else (None, None)


def run_headline(store: RunStore, run_id: str, record: dict[str, Any] | None = None) -> summary.Headline:
    """``summary.headline`` of a run in ``store`` (its metrics, config and bench result): what Fine-tune,
    Benchmark, Compare, the CLI's ``show`` and the report's first lines say."""
    record = record or store.get(run_id)
    m = record["metrics"]
    bench = store.read_result(run_id, "bench") if "bench" in m else None
    return summary.headline(m, record["config"], bench, *_legacy_layers(store, record))


def draft_size(store: RunStore, config: RunConfig, rows: list[dict]) -> summary.Size:
    """A draft's size (Model & data, Plan): the exported files of the newest run of the same model, data,
    weights and plan when there is one (the same tensors and graph: the same bytes), else the prediction."""
    same = ("model", "data", "weights", "checkpoint", "plan")
    for record in store.list():
        if record["status"] != "done" or record["model"] != config.model or "onnx" not in record["metrics"]:
            continue
        try:
            other = RunConfig.model_validate(record["config"])
        except ValueError:  # a config this version cannot read is no match
            continue
        if all(getattr(other, k) == getattr(config, k) for k in same):
            return summary.run_size(record["metrics"])
    return summary.draft_size(rows, config.plan)


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
    in ONNX Runtime (once measured), size (``summary.run_size``: int8.onnx KB, measured or predicted, ×
    smaller than the FP32 file, bit-packed KB when some weights are under 8 bits), quantized layers, ONNX
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
        try:
            legacy = _legacy_layers(store, r)
        except StoreError as err:
            legacy, error = (None, None), str(err)
        size = summary.run_size(m, *legacy)
        layers = summary.run_quantized_layers(m, *legacy)
        damaged = r["status"] == "damaged"
        ft = r["config"].get("finetune", {})
        batch = min((row["batch"] for row in (bench or {}).get("rows", [])), default=None)
        out.append({"run": r["id"], "name": "" if damaged else run_title(r["config"]), "status": r["status"],
                    "model": r["model"], "plan": "" if damaged else plan_summary(r["config"]),
                    "lr": ft.get("lr", math.nan), "epochs": ft.get("epochs", math.nan),
                    "batch size": ft.get("batch_size", math.nan),
                    "FP32 acc %": _pct(m.get("fp32")), "PTQ acc %": _pct(m.get("ptq")), "QAT acc %": _pct(m.get("qat")),
                    "ORT int8 acc %": _pct(m.get("parity")),
                    "size KB": size.int8_bytes / 1024 if size else math.nan,
                    "size from": size.label if size else "",
                    "bit-packed KB": size.packed_bytes / 1024 if size and size.packed_bytes is not None else math.nan,
                    "× smaller file": size.ratio if size else math.nan,
                    "quantized layers": layers if layers is not None else math.nan,
                    "int8 latency ms": latency_ms(bench, "int8", batch), "fp32 latency ms": latency_ms(bench, "fp32", batch),
                    "latency batch": batch, "error": error})
    return pd.DataFrame(out, columns=RUN_COLUMNS).astype({"latency batch": "Int64", "quantized layers": "Int64"}).round({
        "FP32 acc %": 2, "PTQ acc %": 2, "QAT acc %": 2, "ORT int8 acc %": 2, "size KB": 1, "bit-packed KB": 1,
        "× smaller file": 1, "int8 latency ms": 4, "fp32 latency ms": 4})


RUN_COLUMNS = ["run", "name", "status", "model", "plan", "lr", "epochs", "batch size", "FP32 acc %", "PTQ acc %",
               "QAT acc %", "ORT int8 acc %", "size KB", "size from", "× smaller file", "bit-packed KB",
               "quantized layers", "int8 latency ms", "fp32 latency ms", "latency batch", "error"]
RUN_SUMMARY = ["name", "model", "status", "plan", "QAT acc %", "ORT int8 acc %", "size KB", "size from", "int8 latency ms", "lr",
               "epochs", "batch size", "run"]  # what fits a screen, most telling first
RUN_HEADERS = {"size KB": "int8.onnx KB", "bit-packed KB": f"KB {summary.PACKED_LABEL}", "latency batch": "at batch"}
SIZE_AXIS = "int8.onnx KB (predicted until exported)"  # the Pareto charts' size axis: the headline size


def bench_frame(result: dict[str, Any]) -> pd.DataFrame:
    """A bench result's timings (``bench.bench_run``): backend, batch, threads, latency percentiles, throughput."""
    frame = pd.DataFrame(result.get("rows", []))
    names = BACKEND_NAMES | {e[k]: f"{BACKEND_NAMES[e[k]][:-len('hint)')]}hint: {e['precision']})"
                             for e in result.get("runtimes") or [] if e.get("hint") == "default" for k in ("fp32", "int8")}
    if "backend" in frame:
        frame["backend"] = frame["backend"].map(lambda b: names.get(b, b))
    frame = frame.round({"median_ms": 4, "p90_ms": 4, "p99_ms": 4, "throughput": 0})
    return frame[[c for c in BENCH_COLUMNS if c in frame.columns]].rename(columns=BENCH_HEADERS)


RUNTIME_COLUMNS = ["runtime", "batch", "threads", "FP32 p50 (ms)", "FP32 p99 (ms)", "int8 p50 (ms)", "int8 p99 (ms)",
                   "int8 speed-up", "int8 vs ORT int8", "int8 accuracy", "agreement", "int8 kernels"]


def runtime_label(entry: dict[str, Any]) -> str:
    """A runtime as the tables name it: its version, and for OpenVINO the precision hint it ran under."""
    name = f"{entry['runtime']} {entry.get('version', '')}".strip()
    if entry.get("hint") == "f32":
        return f"{name} · f32 hint" + (" (also its default here)" if entry.get("default_is_f32") else "")
    if entry.get("hint"):
        return f"{name} · default hint ({entry.get('precision', '?')})"
    return name


def _runtime_parity(entry: dict[str, Any], parity: dict[str, Any] | None) -> tuple[Any, Any, str]:
    """Accuracy, agreement with the run's evaluation, and int8 kernels of one runtime: ONNX Runtime's from the
    ``parity`` result (``export.parity``), another runtime's from its bench entry."""
    if entry.get("key") == "ort":
        if parity is None:
            return None, None, MISSING
        n_int, n_float = len(parity["integer_layers"]), len(float_reasons(parity["float_layers"]))
        return parity["accuracy"], parity["agreement"], f"{n_int}/{n_int + n_float} layers"
    found, kernels = entry.get("parity") or {}, entry.get("kernels") or {}
    n_int, n_float = len(kernels.get("int8", [])), len(kernels.get("float", []))
    types = ", ".join(f"{k} ×{v}" for k, v in kernels.get("int8_types", {}).items())
    return found.get("accuracy"), found.get("agreement"), f"{n_int}/{n_int + n_float} nodes" + (f" ({types})" if types else "")


def runtime_frame(result: dict[str, Any], parity: dict[str, Any] | None = None) -> pd.DataFrame:
    """Runtime × (FP32, int8) of a bench result, one row per runtime, batch and threads: latency p50/p99, the
    int8 speed-up over the same runtime's FP32, int8 against ONNX Runtime's int8 (> 1: faster), and each
    runtime's parity line. ``parity`` is the run's ``parity`` result (ONNX Runtime's line). Results from
    before OpenVINO was timed give ONNX Runtime's row alone."""
    timed = {(r["backend"], r["batch"], r["threads"]): r for r in result.get("rows", [])}
    entries = [e for e in result.get("runtimes") or [{"runtime": "ONNX Runtime", "key": "ort", "fp32": "ort_fp32",
                                                       "int8": "ort_int8"}] if not e.get("error")]
    settings = sorted({(b, t) for _, b, t in timed})
    out = []
    for entry in entries:
        accuracy, agreement, kernels = _runtime_parity(entry, parity)
        for b, t in settings:
            fp32, int8 = timed.get((entry["fp32"], b, t)), timed.get((entry["int8"], b, t))
            ort = timed.get(("ort_int8", b, t))
            if fp32 is None or int8 is None:
                continue
            out.append({"runtime": runtime_label(entry), "batch": b, "threads": t,
                        "FP32 p50 (ms)": fp32["median_ms"], "FP32 p99 (ms)": fp32["p99_ms"],
                        "int8 p50 (ms)": int8["median_ms"], "int8 p99 (ms)": int8["p99_ms"],
                        "int8 speed-up": fp32["median_ms"] / int8["median_ms"],
                        "int8 vs ORT int8": ort["median_ms"] / int8["median_ms"] if ort else None,
                        "int8 accuracy": summary.pct(accuracy), "agreement": summary.pct(agreement),
                        "int8 kernels": kernels})
    return pd.DataFrame(out, columns=RUNTIME_COLUMNS).round({c: 4 for c in RUNTIME_COLUMNS if "(ms)" in c} | {
        "int8 speed-up": 2, "int8 vs ORT int8": 2})


def runtime_notes(result: dict[str, Any]) -> list[summary.Remark]:
    """What the runtime table cannot hold, one line each: a runtime not timed and why (info: not installed;
    warning: it could not compile the model), predictions that differ from the run's evaluation, named
    (warning), and conv, fully connected or matmul nodes a runtime ran in float (warning)."""
    notes = []
    for entry in result.get("runtimes") or []:
        if entry.get("error"):
            notes.append(summary.Remark("info" if entry["error"] == runtimes.NOT_INSTALLED else "warning",
                                        entry["error"]))
            continue
        label = runtime_label(entry)
        found = entry.get("parity") or {}
        if found.get("disagreements"):
            named = "; ".join(f"sample {d['sample']} (label {d['label']}): evaluated {d['evaluated']}, "
                              f"{entry['runtime']} {d['runtime']}" for d in found["differing"])
            more = found["disagreements"] - len(found["differing"])
            notes.append(summary.Remark("warning", f"{label}: {found['disagreements']} of {found['samples']} "
                                        f"predictions differ from the run's evaluation — {named}"
                                        + (f"; and {more} more" if more > 0 else "")))
        floating = (entry.get("kernels") or {}).get("float", [])
        if floating:
            notes.append(summary.Remark("warning", f"{label} runs in float: " + ", ".join(
                f"{k['layer']} ({k['type']}, {k['precision']})" for k in floating)))
    return notes


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
# Screen: at most 1100 px wide; tables scroll sideways in their box rather than run off the page. Print
# (A4): the whole width, smaller table text, headers repeated on each page, no row or figure split.
STYLE = """<style>
body{font-family:system-ui,sans-serif;color:#222;max-width:1100px;margin:2em auto;padding:0 1em}
h1{font-size:1.7em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
.wide{max-width:100%;overflow-x:auto}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left;vertical-align:top;overflow-wrap:break-word}
th{background:#f3f3f3}td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
table.kv th{text-align:left;font-weight:normal}
pre{background:#f6f6f6;padding:1em;overflow:auto;white-space:pre-wrap}
details summary{cursor:pointer;color:#2a5a8a;margin:.3em 0}
@page{size:A4;margin:12mm}
@media print{body{max-width:none;margin:0;padding:0;font-size:10pt}.wide{overflow:visible}
table{font-size:8pt}thead{display:table-header-group}tr,.js-plotly-plot{break-inside:avoid}
h2{break-after:avoid}details{display:none}pre{font-size:8pt}}
</style>"""


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float | np.floating) and math.isnan(value)) or value is pd.NA


def _cell(value: Any, fmt: Callable[[Any], str] | None) -> tuple[str, bool]:
    """A table cell's text and whether it is a number (right-aligned): MISSING for a missing value,
    yes/no for a flag, ``fmt`` for the column's values, else whole numbers with separators, 4 digits."""
    if _missing(value):
        return MISSING, False
    if isinstance(value, bool | np.bool_):
        return ("yes" if value else "no"), False
    if fmt is not None:
        return fmt(value), isinstance(value, numbers.Number)
    if isinstance(value, numbers.Integral):
        return f"{value:,}", True
    if isinstance(value, numbers.Real):
        return f"{value:,.4g}", True
    return str(value), False


def _table(frame: pd.DataFrame, formats: dict[str, Callable[[Any], str]] | None = None) -> str:
    """A table for people: a column's values in its format from ``formats`` (else :func:`_cell`'s), numbers
    right-aligned, "—" where nothing was measured; in a box that scrolls sideways on a narrow screen."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for values in frame.itertuples(index=False):
        cells = (_cell(v, (formats or {}).get(c)) for c, v in zip(frame.columns, values))
        rows.append("".join(f"<td class=\"num\">{html.escape(t)}</td>" if num else f"<td>{html.escape(t)}</td>"
                            for t, num in cells))
    body = "".join(f"<tr>{r}</tr>" for r in rows)
    return f"<div class=\"wide\"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _kv(pairs: dict[str, Any]) -> str:
    """Name → value rows (values already formatted as people read them; None is "—")."""
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(MISSING if _missing(v) else str(v))}</td></tr>"
                   for k, v in pairs.items())
    return f"<table class=\"kv\"><tbody>{rows}</tbody></table>"


ERROR_FORMATS: dict[str, Callable[[Any], str]] = {
    "weight_bits": str, "act_bits": str, "weight_sqnr_db": "{:.1f}".format, "act_sqnr_db": "{:.1f}".format,
    "output_sqnr_db": "{:.1f}".format, "output_sqnr_vs_baseline_db": "{:.1f}".format,
    "weight_share_clipped": plots.share_text, "act_share_clipped": plots.share_text, "size_bytes": summary.size_text}


def _accuracy_section(m: dict[str, Any]) -> list[str]:
    stages = [s for s in STAGES if s in m]
    if not stages:
        return []
    fp32 = m.get("fp32", {}).get("accuracy")
    rows = [{"model": STAGE_TITLES[s], "test accuracy": m[s]["accuracy"] * 100,
             "vs FP32 (pt)": (m[s]["accuracy"] - fp32) * 100 if fp32 is not None else math.nan,
             "loss": m[s].get("loss", math.nan)} for s in stages]
    out = deployed(m)
    if out is not None:
        rows.append({"model": "int8 in ONNX Runtime (deployed)", "test accuracy": out["accuracy"] * 100,
                     "vs FP32 (pt)": (out["accuracy"] - fp32) * 100 if fp32 is not None else math.nan,
                     "loss": math.nan})
    formats = {"test accuracy": "{:.2f}%".format, "vs FP32 (pt)": "{:+.2f} pt".format, "loss": "{:.4f}".format}
    parts = ["<h2>Accuracy</h2>",
             "<p>PTQ and QAT accuracies are computed with ONNX Runtime's integer arithmetic: what the int8 model "
             "predicts once deployed.</p>", _table(pd.DataFrame(rows), formats)]
    if out is not None and out["why"]:
        parts.append(f"<p>ONNX Runtime differs from the evaluation: {html.escape(out['why'])}</p>")
    return parts


def _size_section(head: summary.Headline, m: dict[str, Any]) -> list[str]:
    out = []
    size = head.size
    if size is not None:
        out.append(f"<p>Size: <b>{size.text()}</b> · FP32 {size.fp32_text()} · {size.ratio_text()}.</p>")
        if size.packed_text():
            out.append(f"<p>Bit-packed, the narrow weights would take {html.escape(size.packed_text())}: ONNX has "
                       "no type narrower than 8 bits, so int8.onnx stores 2..7-bit weights a byte each.</p>")
    if head.quantized_layers is not None:
        out.append(f"<p>Quantized layers: <b>{head.quantized_layers}</b> (layers whose weights or output "
                   "activations the plan quantizes).</p>")
    if m.get("float_layers"):
        out.append("<p><b>Layers left in float:</b> " + html.escape("; ".join(
            f"{k}: {v}" for k, v in float_reasons(m["float_layers"]).items())) + "</p>")
    return (["<h2>Size</h2>", *out]) if out else []


def report_title(record: dict[str, Any]) -> str:
    """The report's title: "model · plan" (the run's name beside it when the user gave one)."""
    config = record["config"]
    name = config.get("name") or ""
    return f"{record['model']} · {plan_summary(config)}" + (f" · {name}" if name else "")


def _errors_section(store: RunStore, run_id: str, loaded: Loaded | None,
                    on_progress: analysis.OnProgress | None) -> tuple[list[str], go.Figure]:
    tables = analysis.run_error_tables(store, run_id, loaded, on_progress=on_progress)  # saved: once a run
    errors = pd.concat([tables[stage] for stage in ("ptq", "qat")], ignore_index=True)
    qat = errors[errors["stage"] == "qat"]
    layers, network = qat[qat["layer"] != "(network)"], qat[qat["layer"] == "(network)"]
    headers = ERROR_HEADERS | {"size_bytes": "weights size"}  # in KB or MB here
    formats = {headers[c]: f for c, f in ERROR_FORMATS.items()}
    main = layers[REPORT_ERROR_COLUMNS].rename(columns=headers)
    every = qat[[c for c in ERROR_COLUMNS if c in qat.columns]].rename(columns=headers)
    out = ["<h2>Per-layer error (after fine-tune)</h2>",
           "<p>SQNR in dB (higher is better) of each layer's quantized weights and output activations against "
           "float; the share of its weights (of all of them) and of its output activations (of those seen on the "
           "calibration batches) that fall outside the quantizer's clip range and are clipped to it; and the "
           "bytes its weights take at their width.</p>"]
    if len(network):
        row = network.iloc[0]
        out.append(f"<p>Network output (logits, test set): SQNR <b>{row['output_sqnr_db']:.1f} dB</b> against the "
                   f"same weights in float (quantization noise alone), {row['output_sqnr_vs_baseline_db']:.1f} dB "
                   "against the FP32 baseline (quantization plus what the fine-tune changed).</p>")
    out += [_table(main, formats),
            "<details><summary>Every column (granularity, network row)</summary>", _table(every, formats), "</details>"]
    return out, plots.sqnr_figure(errors)


def _runtime_section(store: RunStore, run_id: str, result: dict[str, Any]) -> list[str]:
    """Per runtime: its latency (FP32 and int8), its parity line, and the file it runs."""
    ms = "{:.4g}".format
    formats = {c: ms for c in RUNTIME_COLUMNS if "(ms)" in c} | {"int8 speed-up": "{:.2f}×".format,
                                                                  "int8 vs ORT int8": "{:.2f}×".format}
    frame = runtime_frame(result, store.read_result(run_id, "parity"))
    out = ["<h3>Runtimes side by side</h3>", "<p>The same int8.onnx in each runtime, FP32 beside it; OpenVINO compiles "
           "it unchanged (one stream, latency hint, the same threads) under its f32 and its default precision hint. "
           "Speed-up: FP32 / int8 in the same runtime; against ONNX Runtime's int8, above 1 is faster.</p>",
           _table(frame, formats)]
    out += [f"<p>{'⚠️ ' if n.level == 'warning' else ''}{html.escape(n.text)}</p>" for n in runtime_notes(result)]
    shipped = {name: store.artifact(run_id, name) for name in ("int8.onnx", f"{runtimes.IR_STEM}.xml",
                                                               f"{runtimes.IR_STEM}.bin")}
    sizes = {name: summary.size_text(p.stat().st_size) for name, p in shipped.items() if p.is_file()}
    files_line = [f"ONNX Runtime and OpenVINO run int8.onnx ({sizes['int8.onnx']})"] if "int8.onnx" in sizes else []
    if f"{runtimes.IR_STEM}.bin" in sizes:
        files_line.append(f"OpenVINO also reads it as IR: {runtimes.IR_STEM}.xml + .bin "
                          f"({sizes[f'{runtimes.IR_STEM}.bin']} of weights)")
    if files_line:
        out.append(f"<p>Files: {html.escape('; '.join(files_line))}.</p>")
    return out


def _bench_section(store: RunStore, run_id: str, m: dict[str, Any]) -> list[str]:
    result = store.read_result(run_id, "bench")
    if result is None:
        if not m.get("bench"):
            return []
        return ["<h2>Benchmark</h2>", _kv(m["bench"])]
    ms = "{:.4g}".format
    formats = {"median (ms)": ms, "p90 (ms)": ms, "p99 (ms)": ms, "throughput (samples/s)": "{:,.0f}".format}
    out = ["<h2>Benchmark (this machine)</h2>", *_runtime_section(store, run_id, result),
           "<h3>Every backend</h3>", _table(bench_frame(result), formats)]
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
    shares = {"ORT int8 accuracy": "accuracy", "evaluated accuracy": "sim_accuracy", "top-1 agreement": "agreement",
              "fake-quant simulation accuracy": "fake_quant_accuracy"}
    summary = {k: f"{parity[v]:.2%}" for k, v in shares.items() if parity.get(v) is not None}  # beside the others
    if parity.get("max_logit_diff") is not None:
        summary["max logit difference"] = f"{parity['max_logit_diff']:.4g}"
    if "integer_layers" in parity:
        summary["integer-kernel coverage"] = coverage_value(parity)
    if parity.get("layers"):
        summary["layers with differing codes"] = f"{sum(1 for r in parity['layers'] if r['differing'])}/" \
                                                 f"{len(parity['layers'])}"
    if parity.get("explanation"):
        summary["why they differ"] = parity["explanation"]
    out = ["<h2>Parity (ONNX Runtime int8 vs the run's evaluation)</h2>", _kv(summary)]
    reasons = float_parts(parity)
    if reasons:
        out.append("<p>Runs in float in ONNX Runtime: " + html.escape("; ".join(f"{k}: {v}" for k, v in reasons.items()))
                   + "</p>")
    return out


def config_file_name(config: dict[str, Any] | RunConfig, kind: str = "yaml") -> str:
    """The name a run's config is downloaded under, by the Export page and the report's link (which also
    names it in the command to run): ``digits-cnn_W8A8.yaml`` / ``.json`` (:func:`export.file_stem`)."""
    return f"{export.file_stem(config)}.{kind}"


def _config_section(config: RunConfig) -> list[str]:
    name, yaml_text = html.escape(config_file_name(config)), config.to_yaml()
    data = base64.b64encode(yaml_text.encode("utf-8")).decode("ascii")
    link = f'<a download="{name}" href="data:application/x-yaml;base64,{data}">{name}</a>'
    return ["<h2>Config</h2>",
            f"<p>Reproduce the run: save this config as {link} (the link downloads it; the app's Export page saves "
            f"the same file), then run <code>qat-studio train {name}</code>.</p>",
            f"<pre>{html.escape(yaml_text)}</pre>"]


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
    head = run_headline(store, run_id, record)
    title = report_title(record)
    parts: list[str | go.Figure] = [f"<h1>{html.escape(title)}</h1>",
             f"<p class=\"headline\"><b>{html.escape(head.text())}</b></p>",
             *(f"<p class=\"remark\">{'⚠️ ' if r.level == 'warning' else ''}{html.escape(r.text)}</p>"
               for r in head.remarks + ([summary.Remark("warning", head.noisy)] if head.noisy else [])),
             f"<p>Model <b>{html.escape(record['model'])}</b>, plan <b>{html.escape(plan_summary(config))}</b>, "
             f"run {html.escape(run_id)}, status <b>{html.escape(record['status'])}</b>, created "
             f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record['created']))}.</p>"]
    if record["error"]:
        parts.append(f"<p><b>Error:</b> {html.escape(record['error'])}</p>")
    parts += _accuracy_section(m)
    parts += _size_section(head, m)
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
        plan = plan_frame(layers, config.plan)
        bits = ["weight_bits", "act_bits"]  # a width, or FP32 where the plan leaves the layer in float: text
        plan[bits] = plan[bits].astype("object").where(plan[bits].notna(), "FP32").astype(str)
        parts += ["<h2>Layer plan</h2>", _table(plan.rename(columns={c: c.replace("_", " ") for c in plan.columns}))]
    parts += _bench_section(store, run_id, m)
    parts += _parity_section(store, run_id, m)
    parts += _config_section(config)
    # figures become divs in place; plotly.js itself goes once into <head>
    body = "".join(p.to_html(full_html=False, include_plotlyjs=False) if isinstance(p, go.Figure) else p for p in parts)
    has_figures = any(isinstance(p, go.Figure) for p in parts)
    scripts = f'<script type="text/javascript">{plots.plotly_js()}</script>' if has_figures else ""
    doc = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)} · QAT Studio report</title>"
           f"{STYLE}{scripts}</head>\n<body>{body}</body></html>\n")
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
