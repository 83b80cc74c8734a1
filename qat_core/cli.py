"""``qat-studio``: the command line over the same functions the pages call.

Contract users script against: the last line of ``train``'s stdout is the run id; ``--json``
output is machine-readable; errors are one message on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from qat_core.errors import QATError

EXIT_USER_ERROR = 2


class ProgressBar:
    """A one-line progress bar on stderr (kept off stdout, which scripts parse)."""

    def __init__(self, stream=sys.stderr):
        self.stream, self._last = stream, 0.0

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("done"):
            self.stream.write(f"\r{event['phase']:>4}: test accuracy {event['test_accuracy']:.2%}".ljust(78) + "\n")
            return
        now = time.monotonic()
        if now - self._last < 0.1 and event["step"] != event["total"] and "test_accuracy" not in event:
            return
        self._last = now
        width = 24
        filled = int(width * event["step"] / event["total"])
        acc = f" acc {event['test_accuracy']:.2%}" if "test_accuracy" in event else ""
        line = (f"\r{event['phase']:>4} [{'#' * filled}{'.' * (width - filled)}] {event['step']}/{event['total']} "
                f"loss {event['loss']:.4f}{acc}")
        self.stream.write(line.ljust(78))
        if event["step"] == event["total"]:
            self.stream.write("\n")
        self.stream.flush()


def _store(args: argparse.Namespace):
    from qat_core.store import RunStore

    return RunStore(args.workspace)


def cmd_models(args: argparse.Namespace) -> None:
    from qat_core.zoo import MODELS

    for model_id, entry in MODELS.items():
        print(f"{model_id:<14} {entry.description}")


def cmd_config_init(args: argparse.Namespace) -> None:
    from qat_core.runner import default_config

    print(default_config(args.model, args.weight_bits, args.act_bits).to_yaml(), end="")


def cmd_train(args: argparse.Namespace) -> None:
    from qat_core import config as cfg
    from qat_core.runner import execute

    config = cfg.load(args.config)
    store = _store(args)
    run_id = args.run_id or store.create_run(config)
    print(f"run {run_id} in {store.run_dir(run_id)}", file=sys.stderr)
    execute(config, store, run_id, on_event=None if args.quiet else ProgressBar())
    record = store.get(run_id)
    m = record["metrics"]
    print(f"FP32 {m['fp32']['accuracy']:.2%}  PTQ {m['ptq']['accuracy']:.2%}  QAT {m['qat']['accuracy']:.2%}",
          file=sys.stderr)
    print(run_id)


def cmd_runs(args: argparse.Namespace) -> None:
    records = _store(args).list()
    if args.json:
        print(json.dumps([{k: r[k] for k in ("id", "path", "status", "error", "model", "metrics")} for r in records],
                         indent=2))
        return
    for r in records:
        qat = r["metrics"].get("qat", {}).get("accuracy")
        acc = f"{qat:.2%}" if qat is not None else "-"
        print(f"{r['id']}  {r['status']:<9} {r['model']:<14} QAT {acc}")


def cmd_show(args: argparse.Namespace) -> None:
    r = _store(args).get(args.run)
    out = {k: r[k] for k in ("id", "path", "status", "error", "config", "metrics")}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"run {r['id']} ({r['status']}) at {r['path']}")
    if r["error"]:
        print(f"error: {r['error']}")
    for phase in ("fp32", "ptq", "qat"):
        if phase in r["metrics"]:
            print(f"  {phase.upper():<5} accuracy {r['metrics'][phase]['accuracy']:.2%}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qat-studio", description="Quantization-aware training studio (engine CLI).")
    p.add_argument("--workspace", type=Path, default=None,
                   help="workspace folder for runs (default: $QAT_STUDIO_HOME, else ~/.qat-studio)")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the zoo models").set_defaults(func=cmd_models)

    config = sub.add_parser("config", help="work with run configs").add_subparsers(dest="config_command", required=True)
    init = config.add_parser("init", help="print a default config (YAML) for a model")
    init.add_argument("--model", required=True, help="zoo id (see `qat-studio models`) or package.module:factory")
    init.add_argument("--weight-bits", type=_bits, default=8, help="weight bits for inner layers: 2..8 or off")
    init.add_argument("--act-bits", type=_bits, default=8, help="activation bits for inner layers: 2..8 or off")
    init.set_defaults(func=cmd_config_init)

    tr = sub.add_parser("train", help="train a run from a config; prints the run id last")
    tr.add_argument("config", type=Path)
    tr.add_argument("--run-id", default=None, help=argparse.SUPPRESS)  # the app pre-creates runs it launches
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)

    runs = sub.add_parser("runs", help="list runs")
    runs.add_argument("--json", action="store_true")
    runs.set_defaults(func=cmd_runs)

    show = sub.add_parser("show", help="show one run")
    show.add_argument("run")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)
    return p


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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except QATError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
