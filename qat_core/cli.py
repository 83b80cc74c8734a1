"""``qat-studio``: the command line over the same functions the pages call.

Contract users script against: the last line of ``train``'s stdout is the run id; ``--json``
output is machine-readable; errors are one message on stderr (never a traceback) and a non-zero
exit code: 2 for a problem the user can fix, 70 for a bug in QAT Studio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from qat_core import plugins
from qat_core.errors import QATError, StoreError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 70  # EX_SOFTWARE: a bug, reported in one line (QAT_STUDIO_DEBUG=1 shows the traceback)
EXIT_BROKEN_PIPE = 141  # as a shell reports a command whose reader went away (`qat-studio runs | head -1`)
DEBUG_ENV = "QAT_STUDIO_DEBUG"
MAX_MESSAGE = 2000  # characters of an error message: a quote of bad input never floods the terminal


class ProgressBar:
    """A one-line progress bar on stderr (kept off stdout, which scripts parse)."""

    def __init__(self, stream=sys.stderr):
        self.stream, self._last = stream, 0.0
        self._first: dict[str, dict[str, Any]] = {}  # each phase's first step: the pace is measured after it

    def __call__(self, event: dict[str, Any]) -> None:
        from qat_core import progress

        if event.get("done"):
            self.stream.write(f"\r{event['phase']:>4}: test accuracy {event['test_accuracy']:.2%}".ljust(78) + "\n")
            return
        if "step" not in event:  # calibration batches: the bar follows training steps
            return
        first = self._first.setdefault(event["phase"], event)
        now = time.monotonic()
        if now - self._last < 0.1 and event["step"] != event["total"] and "test_accuracy" not in event:
            return
        self._last = now
        width = 24
        filled = int(width * event["step"] / event["total"])
        acc = f" acc {event['test_accuracy']:.2%}" if "test_accuracy" in event else ""
        left = progress.left_text(progress.step_seconds_left([first, event]))
        line = (f"\r{event['phase']:>4} [{'#' * filled}{'.' * (width - filled)}] {event['step']}/{event['total']} "
                f"loss {event['loss']:.4f}{acc}" + (f" {left}" if left else ""))
        self.stream.write(line.ljust(78))
        if event["step"] == event["total"]:
            self.stream.write("\n")
        self.stream.flush()


def _store(args: argparse.Namespace):
    from qat_core.store import RunStore

    here = getattr(args, "workspace_here", None)  # given after the subcommand: it wins, as a later option does
    return RunStore(here if here is not None else args.workspace)


def cmd_models(args: argparse.Namespace) -> None:
    from qat_core.zoo import MODELS

    for model_id, entry in MODELS.items():
        print(f"{model_id:<14} {entry.description}")


def cmd_config_init(args: argparse.Namespace) -> None:
    from qat_core.runner import default_config
    from qat_core.zoo import default_dataset

    data = {k: v for k, v in (("path", args.data), ("label_column", args.label_column),
                              ("text_column", args.text_column), ("image_size", args.image_size),
                              ("max_samples", args.max_samples)) if v is not None}
    if args.data is not None and Path(args.data).is_dir():
        data["dataset"] = "image-folder"
    elif args.data is not None:  # a file: texts for a text model (or where a text column is named), else numbers
        texts = args.text_column is not None or default_dataset(args.model) == "text-table"
        data["dataset"] = "text-table" if texts else "table"
    print(default_config(args.model, args.weight_bits, args.act_bits, data, args.weights, args.checkpoint).to_yaml(),
          end="")


def cmd_train(args: argparse.Namespace) -> None:
    from qat_core import config as cfg
    from qat_core import cpu
    from qat_core.runner import execute
    from qat_core.summary import pct, remarks
    from qat_core.zoo import check_plugin

    config = cfg.load(args.config)
    check_plugin(config.model)  # before a run is recorded: a config naming code the user did not allow
    cpu.requested_threads(args.threads)  # refused before a run is created for it
    store = _store(args)
    if args.run_id:
        _check_prepared(store, args.run_id)
    run_id = args.run_id or store.create_run(config)
    print(f"run {run_id} in {store.run_dir(run_id)}", file=sys.stderr)
    execute(config, store, run_id, on_event=None if args.quiet else ProgressBar(), threads=args.threads)
    record = store.get(run_id)
    m = record["metrics"]
    print(f"FP32 {pct(m['fp32']['accuracy'])}  PTQ {pct(m['ptq']['accuracy'])}  QAT {pct(m['qat']['accuracy'])}  "
          f"({m['threads']} thread{'s' if m['threads'] > 1 else ''}, {m['seconds']:.1f} s)", file=sys.stderr)
    for remark in remarks(m, record["config"]):
        print(f"{remark.level}: {remark.text}", file=sys.stderr)
    print(run_id)


def _check_prepared(store, run_id: str) -> None:
    """``--run-id`` (how the app starts a run it created) trains only a run that nothing has trained yet."""
    record = store.get(run_id)
    if record["status"] != "running" or record["metrics"] or store.events(run_id):
        raise StoreError(f"run {run_id} is {record['status']} and already has results; --run-id only starts a run "
                         "the app created and nothing has trained yet. Train a new run without --run-id")


def cmd_runs(args: argparse.Namespace) -> None:
    records = _store(args).list()
    if args.json:
        print(json.dumps([{k: r[k] for k in ("id", "name", "path", "status", "error", "model", "metrics")}
                          for r in records],
                         indent=2))
        return
    for r in records:
        qat = r["metrics"].get("qat", {}).get("accuracy")
        acc = f"{qat:.2%}" if qat is not None else "-"
        damage = f"  ({r['error']})" if r["status"] == "damaged" else ""
        name = f"  {r['name']}" if r["name"] else ""
        print(f"{r['id']}  {r['status']:<9} {r['model']:<14} QAT {acc}{name}{damage}")


def cmd_show(args: argparse.Namespace) -> None:
    from qat_core.report import report_title, run_headline
    from qat_core.summary import pct

    store = _store(args)
    r = store.get(args.run)
    head = run_headline(store, args.run, r)
    out = {k: r[k] for k in ("id", "path", "status", "error", "config", "metrics")} | {"headline": head.to_dict()}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"run {r['id']} ({r['status']}): {report_title(r)} at {r['path']}")
    if r["error"]:
        print(f"error: {r['error']}")
    if r["status"] == "done":
        print(head.text())
    for phase in ("fp32", "ptq", "qat"):
        if phase in r["metrics"]:
            print(f"  {phase.upper():<5} accuracy {pct(r['metrics'][phase]['accuracy'])}")
    if head.size is not None:
        packed = head.size.packed_text()
        print(f"  size  {head.size.text()}; FP32 {head.size.fp32_text()}" + (f"; {packed}" if packed else ""))
    if head.quantized_layers is not None:
        print(f"  quantized layers {head.quantized_layers}")
    for remark in head.warnings():
        print(f"{remark.level}: {remark.text}")


def cmd_rename(args: argparse.Namespace) -> None:
    from qat_core.planning import run_title

    record = _store(args).rename(args.run, args.name)
    print(f"run {record['id']} is now named {run_title(record['config'])!r}")


def cmd_delete(args: argparse.Namespace) -> None:
    from qat_core.sweep import delete_run

    store = _store(args)
    record = store.get(args.run)
    if not args.yes:  # stdin is /dev/null here: there is no one to ask
        raise StoreError(f"deleting run {record['id']} removes its folder {record['path']} (weights, ONNX files, "
                         "results) for good; add --yes to delete it")
    delete_run(store, record["id"])
    print(f"deleted run {record['id']}")


def cmd_analyze(args: argparse.Namespace) -> None:
    from qat_core.report import analyze_run

    def progress(event: dict[str, Any]) -> None:
        if not args.quiet and event.get("total"):
            sys.stderr.write(f"\r{event['task']}: {event['done']}/{event['total']}".ljust(40))
            sys.stderr.flush()

    store = _store(args)
    written = analyze_run(store, args.run, bits=args.bits, budget_bytes=args.budget_bytes,
                          average_bits=args.budget_bits, batches=args.batches, on_progress=progress,
                          cancel=store.cancel_flag(args.run))
    if not args.quiet:
        sys.stderr.write("\n")
    if args.json:
        print(json.dumps({name: str(path) for name, path in written.items()}, indent=2))
        return
    for path in written.values():
        print(path)


def cmd_export(args: argparse.Namespace) -> None:
    from qat_core import runtimes
    from qat_core.export import export_run
    from qat_core.summary import coverage_text, float_parts, run_size

    store = _store(args)
    result = export_run(store, args.run)
    ir = {suffix[1:]: str(path) for suffix, path in runtimes.run_ir(store, args.run).items()} \
        if runtimes.installed() else None
    if args.json:
        print(json.dumps(result | {"openvino_ir": ir}, indent=2))
        return
    size = run_size(store.get(args.run)["metrics"])
    print(f"{size.text()} · FP32 {size.fp32_text()} · {size.ratio_text()}")
    print(coverage_text(result))
    for name, why in float_parts(result).items():
        print(f"  float: {name}: {why}")
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"OpenVINO IR: {ir['xml']} (+ .bin)" if ir else f"OpenVINO IR: {runtimes.NOT_INSTALLED}")


def cmd_eval(args: argparse.Namespace) -> None:
    from qat_core.export import parity
    from qat_core.summary import coverage_text, float_parts

    result = parity(_store(args), args.run)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"ORT int8 accuracy {result['accuracy']:.2%}  evaluated {result['sim_accuracy']:.2%}  "
          f"agreement {result['agreement']:.2%}  max logit diff {result['max_logit_diff']:.4g}")
    print(f"fake-quant simulation {result['fake_quant_accuracy']:.2%} (agreement {result['fake_quant_agreement']:.2%})")
    print(coverage_text(result))
    for name, why in float_parts(result).items():
        print(f"  float: {name}: {why}")
    differing = sum(r["differing"] for r in result["layers"])
    print(f"layers compared with ONNX Runtime: {len(result['layers'])}; {differing} differ")
    if result.get("explanation"):
        print(f"why they differ: {result['explanation']}")


def cmd_bench(args: argparse.Namespace) -> None:
    from qat_core.bench import bench_run
    from qat_core.report import runtime_frame, runtime_notes

    store = _store(args)
    result = bench_run(store, args.run, batch_sizes=args.batch, threads=args.threads, warmup=args.warmup,
                       iters=args.iters)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    m = result["machine"]
    flags = " ".join(f for f, on in m["flags"].items() if on) or "none of " + "/".join(m["flags"])
    print(f"{m['cpu']}, {m['cores']} cores, {flags}")
    for r in result["rows"]:
        print(f"  {r['backend']:<15} batch {r['batch']:>4} threads {r['threads']:>2}  median {r['median_ms']:8.3f} ms  "
              f"p90 {r['p90_ms']:8.3f}  p99 {r['p99_ms']:8.3f}  {r['throughput']:9.1f}/s")
    for c in result["comparisons"]:
        tag = "  (overhead-bound)" if c["overhead_bound"] else ""
        print(f"  int8/fp32 batch {c['batch']} threads {c['threads']}: x{c['int8_over_fp32']:.2f}{tag}")
    parity = store.read_result(args.run, "parity")
    print("runtimes (the same int8.onnx in each; speed-up = FP32 / int8 in that runtime)"
          + ("; ONNX Runtime's parity: run `qat-studio eval RUN`" if parity is None else "") + ":")
    for r in runtime_frame(result, parity).to_dict("records"):
        vs_ort = "" if r["int8 vs ORT int8"] is None else f"  x{r['int8 vs ORT int8']:.2f} vs ORT int8"
        print(f"  {r['runtime']}  batch {r['batch']} threads {r['threads']}:  FP32 p50 {r['FP32 p50 (ms)']:.4g} "
              f"p99 {r['FP32 p99 (ms)']:.4g} ms  int8 p50 {r['int8 p50 (ms)']:.4g} p99 {r['int8 p99 (ms)']:.4g} ms  "
              f"speed-up x{r['int8 speed-up']:.2f}{vs_ort}  accuracy {r['int8 accuracy']}  agreement "
              f"{r['agreement']}  int8 kernels {r['int8 kernels']}")
    for note in runtime_notes(result):
        print(f"{note.level}: {note.text}")
    if result.get("note"):
        print(f"note: {result['note']}")


def cmd_report(args: argparse.Namespace) -> None:
    from qat_core.report import write_report

    print(write_report(_store(args), args.run, args.output))


def cmd_sweep(args: argparse.Namespace) -> None:
    from qat_core import sweep
    from qat_core.runner import default_config

    if args.example:
        print(sweep.example_spec(default_config(args.model)).to_yaml(), end="")
        return
    if args.spec is None:
        raise QATError("give a sweep spec (YAML), or --example to print one: "
                       "qat-studio sweep --example > sweep.yaml")
    spec = sweep.load_spec(args.spec)
    store = _store(args)

    def progress(event: dict[str, Any]) -> None:
        if args.quiet:
            return
        if event["event"] == "finished":
            acc = f"QAT {event['accuracy']:.2%}" if event.get("accuracy") is not None else event.get("error") or ""
            line = f"[{event['done']}/{event['total']}] {event['status']:<9} {event['label']}  {acc}"
        elif event["event"] == "kept":
            line = f"kept (trained before): {event['label']}"
        elif event["event"] == "latency":
            line = f"[{event['done'] + 1}/{event['total']}] int8 latency of {event['label'] or event['run']}"
        elif "run" in event:
            line = f"{event['event']}: {event['run']} {event.get('error') or ''}"
        else:
            line = event["message"]
        print(line, file=sys.stderr, flush=True)

    frame = sweep.run_sweep(spec, store, workers=args.workers, threads=args.threads, ray=args.ray, on_event=progress)
    state = sweep.state(store, spec.name)
    if args.json:
        print(frame.to_json(orient="records", indent=2))
    else:
        columns = ["label", "status", "QAT acc %", "avg weight bits", "size KB", "int8 latency ms", "run"]
        print(frame[columns].to_string(index=False))
    if state["state"] != "done":
        raise QATError(f"sweep {spec.name} {state['state']}: {state.get('error') or state.get('message')}; "
                       "run the same command again: it trains only the runs that did not finish")


def _threads(text: str) -> int | str:
    if text == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"threads must be a whole number >= 1 or 'all', got {text!r}") from None


WORKSPACE_HELP = "workspace folder for runs (default: $QAT_STUDIO_HOME, else ~/.qat-studio)"
ALLOW_HELP = ("run model factories (package.module:factory in a config) from this top-level package; repeatable. "
              "Only allowed packages and entry points in group qat_studio.models run; see also $QAT_STUDIO_PLUGINS")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qat-studio", description="Quantization-aware training studio (engine CLI).")
    p.add_argument("--workspace", type=Path, default=None, help=WORKSPACE_HELP)
    # also after each subcommand that reads or writes runs (``qat-studio runs --workspace W``), under its own name
    ws = argparse.ArgumentParser(add_help=False)
    ws.add_argument("--workspace", type=Path, default=None, dest="workspace_here", help=WORKSPACE_HELP)
    p.add_argument("--allow-plugin", action="append", default=[], metavar="PKG", help=ALLOW_HELP)
    # also after each subcommand that builds a model, under its own name: its value would replace the global one
    allow = argparse.ArgumentParser(add_help=False)
    allow.add_argument("--allow-plugin", action="append", default=[], metavar="PKG", dest="allow_plugin_here",
                       help=ALLOW_HELP)
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the zoo models").set_defaults(func=cmd_models)

    config = sub.add_parser("config", help="work with run configs").add_subparsers(dest="config_command", required=True)
    init = config.add_parser("init", parents=[allow], help="print a default config (YAML) for a model")
    init.add_argument("--model", required=True, help="zoo id (see `qat-studio models`) or package.module:factory")
    init.add_argument("--weight-bits", type=_bits, default=8, help="weight bits for inner layers: 2..8 or off")
    init.add_argument("--act-bits", type=_bits, default=8, help="activation bits for inner layers: 2..8 or off")
    init.add_argument("--data", default=None, help="data.path: a folder with one sub-folder of images per class, or "
                                                   "a CSV or Parquet table (numbers for table-mlp, texts for a text classifier)")
    init.add_argument("--label-column", default=None, help="the table's label column (default: label)")
    init.add_argument("--text-column", default=None, help="a text table's text column (default: text); a table "
                                                          "given to a Hugging Face text classifier is a text table")
    init.add_argument("--image-size", type=int, default=None, help="an image folder's crop side in pixels "
                                                                   "(default: what the model's weights expect)")
    init.add_argument("--max-samples", type=int, default=None, help="use a seeded random subset of this many samples")
    init.add_argument("--weights", default=None, help="a library model's pretrained weights by name, from the "
                                                      "local cache (DEFAULT, IMAGENET1K_V1, …)")
    init.add_argument("--checkpoint", default=None, help="your trained state_dict file (a head for another number "
                                                         "of classes is replaced)")
    init.set_defaults(func=cmd_config_init)

    tr = sub.add_parser("train", parents=[allow, ws], help="train a run from a config; prints the run id last")
    tr.add_argument("config", type=Path)
    tr.add_argument("--run-id", default=None, help=argparse.SUPPRESS)  # the app pre-creates runs it launches
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.add_argument("--threads", type=_positive, default=None,
                    help="torch intra-op threads (default: $QAT_STUDIO_THREADS, else 1 for a model under 2M "
                         "parameters and every core up to 4 for a larger one)")
    tr.set_defaults(func=cmd_train)

    runs = sub.add_parser("runs", parents=[ws], help="list runs")
    runs.add_argument("--json", action="store_true")
    runs.set_defaults(func=cmd_runs)

    show = sub.add_parser("show", parents=[ws], help="show one run")
    show.add_argument("run")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)

    rn = sub.add_parser("rename", parents=[ws], help="give a run another name (an empty name: its model and plan name it)")
    rn.add_argument("run", help="run id (see `qat-studio runs`)")
    rn.add_argument("name")
    rn.set_defaults(func=cmd_rename)

    de = sub.add_parser("delete", parents=[ws], help="delete a run and its folder (not while it runs)")
    de.add_argument("run", help="run id (see `qat-studio runs`)")
    de.add_argument("--yes", action="store_true", help="delete without asking (required: the command never waits "
                                                       "for an answer)")
    de.set_defaults(func=cmd_delete)

    an = sub.add_parser("analyze", parents=[allow, ws], help="write per-layer error, histograms, sensitivity (CSV) and "
                                                         "figures (HTML) into a finished run's analysis/ folder")
    an.add_argument("run", help="run id (see `qat-studio runs`)")
    an.add_argument("--bits", type=int, nargs="*", default=[4, 2],
                    help="weight widths for the sensitivity scan (2..8; none: skip it); default 4 2")
    budget = an.add_mutually_exclusive_group()
    budget.add_argument("--budget-bits", type=float, default=None,
                        help="suggest a mixed-precision plan at this average weight width (uses the --bits widths)")
    budget.add_argument("--budget-bytes", type=float, default=None,
                        help="suggest a mixed-precision plan within this model size in bytes")
    an.add_argument("--batches", type=int, default=None,
                    help="calibration batches for activation histograms (default: the run's; 0: whole training set)")
    an.add_argument("--json", action="store_true", help="print the written files as JSON")
    an.add_argument("--quiet", action="store_true", help="no progress on stderr")
    an.set_defaults(func=cmd_analyze)
    ex = sub.add_parser("export", parents=[allow, ws],
                        help="write fp32.onnx and int8.onnx (QDQ, the run's own scales) into a run, and "
                        "int8 as OpenVINO IR when OpenVINO is installed")
    ex.add_argument("run", help="run id (see `qat-studio runs`)")
    ex.add_argument("--json", action="store_true")
    ex.set_defaults(func=cmd_export)

    ev = sub.add_parser("eval", parents=[allow, ws],
                        help="accuracy of the exported int8 model and its agreement with the simulation")
    ev.add_argument("run", help="run id (see `qat-studio runs`)")
    ev.add_argument("--backend", choices=["onnxruntime"], default="onnxruntime")
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(func=cmd_eval)

    be = sub.add_parser("bench", parents=[allow, ws], help="latency: FP32 vs int8 in ONNX Runtime and OpenVINO "
                        "(when installed), PyTorch eager; each runtime's parity")
    be.add_argument("run", help="run id (see `qat-studio runs`)")
    be.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes (>= 1); default 1 32")
    be.add_argument("--threads", type=_threads, nargs="+", default=[1, "all"],
                    help="intra-op threads (>= 1, or all); default 1 all")
    be.add_argument("--warmup", type=int, default=10)
    be.add_argument("--iters", type=int, default=50)
    be.add_argument("--json", action="store_true")
    be.set_defaults(func=cmd_bench)

    sw = sub.add_parser("sweep", parents=[allow, ws], help="train a base config × variations (widths, plans, suggestions, "
                                                       "range methods, learning rates, seeds) in parallel; run it "
                                                       "again to resume")
    sw.add_argument("spec", type=Path, nargs="?", help="sweep spec (YAML); see --example")
    sw.add_argument("--example", action="store_true", help="print an example spec for --model and exit")
    sw.add_argument("--model", default="digits-cnn", help="the example's model (default digits-cnn)")
    sw.add_argument("--workers", type=_positive, default=None,
                    help="runs at a time (default: the spec's executor.workers, else cores / threads)")
    sw.add_argument("--threads", type=_positive, default=None, help="torch threads per run (default: the spec's, "
                                                                    "else 1 for a model under 2M parameters)")
    sw.add_argument("--ray", default=None, metavar="ADDRESS",
                    help="run on a Ray cluster (auto, HOST:6379, ray://HOST:10001; local starts one here)")
    sw.add_argument("--json", action="store_true", help="print the runs as JSON")
    sw.add_argument("--quiet", action="store_true", help="no progress on stderr")
    sw.set_defaults(func=cmd_sweep)

    rp = sub.add_parser("report", parents=[allow, ws],
                        help="write a self-contained HTML report of a run; prints its path")
    rp.add_argument("run", help="run id (see `qat-studio runs`)")
    rp.add_argument("-o", "--output", type=Path, default=None, help="HTML file (default: report.html in the run folder)")
    rp.set_defaults(func=cmd_report)
    return p


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def _bits(text: str) -> int | None:
    if text.lower() == "off":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits must be 2..8 or off, got {text!r}") from None
    if not 2 <= value <= 8:
        raise argparse.ArgumentTypeError(f"bits must be 2..8 or off, got {value}")
    return value


def _short(err: BaseException) -> str:
    text = str(err)
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 1] + "…"


def _stdin_at_devnull() -> None:
    """Nothing QAT Studio does reads stdin: a library's or a plugin's prompt reads end-of-file, never waits."""
    fd = os.open(os.devnull, os.O_RDONLY)
    if fd != 0:  # 0 where stdin was closed: it is /dev/null now
        os.dup2(fd, 0)
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (``run`` is the process's entry point)."""
    args = parser().parse_args(argv)
    _stdin_at_devnull()
    try:
        plugins.allow(args.allow_plugin + getattr(args, "allow_plugin_here", []))
        args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers, not at exit
    except QATError as err:
        print(f"error: {_short(err)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader stopped reading (`| head`): not an error worth a message
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        return EXIT_BROKEN_PIPE
    except Exception as err:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"internal error: {type(err).__name__}: {_short(err)}. This is a bug in QAT Studio; "
              f"rerun with {DEBUG_ENV}=1 for the traceback and report it", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    return 0


def run() -> None:
    """The ``qat-studio`` command: ``main``, then the process ends with its code when the command is done,
    even where a plugin left a non-daemon thread running."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away, a closed stream: nothing more to say
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
