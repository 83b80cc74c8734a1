"""A run from end to end — config in, artifacts out — and the way back from a run to its models.

FP32 baseline (cached per model, data, training settings and seed) → PTQ (calibrate only) →
QAT (calibrate, fine-tune) → metrics and weights in the run store. The CLI and the app's
background jobs both call :func:`execute`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qat_core import config as cfg
from qat_core import cpu, library, train, zoo
from qat_core.config import MAX_SEED, RunConfig, with_uniform_plan
from qat_core.data import MAX_VALIDATION_SAMPLES, Data, data_fingerprint, hold_out, validation_size
from qat_core.errors import CancelledError, ConfigError, QATError
from qat_core.modules import QATModel
from qat_core.prepare import layer_table, prepare
from qat_core.quantizers import quantizers
from qat_core.store import RunStore, new_log
from qat_core.summary import predicted_sizes, quantized_layers


def validation_fraction(config: RunConfig) -> float:
    """The share of the training split a run holds out for its fine-tune's guard (``data.hold_out``): none without
    a guard, or for a plugin (its own loaders cannot be split)."""
    return config.finetune.validation_fraction if config.finetune.guard and not zoo.is_plugin(config.model) else 0.0


def baseline_key(config: RunConfig) -> str:
    unset = cfg.DataConfig()  # fields added after baselines were first cached count only when set
    data = {k: v for k, v in config.data.model_dump().items()
            if k not in cfg.IMAGE_FIELDS + cfg.TEXT_FIELDS or v != getattr(unset, k)}
    identity = {"model": config.model, "checkpoint": config.checkpoint, "data": data,
                "baseline": config.baseline.model_dump(), "seed": config.seed, "torch": torch.__version__}
    if config.weights:  # keys of baselines cached before these settings existed stay as they were
        identity["weights"] = config.weights
    if validation_fraction(config):  # the baseline does not train on the guard's validation split
        identity["validation"] = [validation_fraction(config), MAX_VALIDATION_SAMPLES]
    files = data_fingerprint(config.data)
    if files:  # data from disk: edited files mean another baseline
        identity["files"] = files
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def cached_baseline(config: RunConfig, store: RunStore) -> dict[str, float] | None:
    """The metrics of the cached FP32 baseline for this config, or None if it was never trained."""
    cached = store.load_baseline(baseline_key(config))
    return None if cached is None else cached["metrics"]


def default_config(model_id: str, weight_bits: int | None = 8, act_bits: int | None = 8,
                   data: dict[str, Any] | None = None, weights: str | None = None,
                   checkpoint: str | None = None) -> RunConfig:
    """A sensible starting config for a model: first and last layer at 8 bits, the rest as chosen.
    ``data``: data settings over the model's own (a table's or image folder's ``path``, …); an image
    folder's preprocessing is filled in from the model's weights metadata, so the config records it."""
    entry = zoo.MODELS.get(model_id)
    settings: dict[str, Any] = {"model": model_id, "weights": weights, "checkpoint": checkpoint,
                                "data": {"dataset": zoo.default_dataset(model_id)} | (data or {})}
    if settings["data"]["dataset"] in ("image-folder", "text-table"):  # real data: train the head (or more) properly
        settings |= {"baseline": zoo.USER_DATA_BASELINE, "finetune": zoo.USER_DATA_FINETUNE}
    elif entry is not None:
        settings |= {"baseline": entry.baseline_defaults, "finetune": entry.finetune_defaults}
    elif library.library_of(model_id):  # torchvision, timm: image classifiers
        settings |= {"baseline": zoo.VISION_BASELINE, "finetune": zoo.VISION_FINETUNE}
    base = cfg.from_dict(settings)
    base = base.model_copy(update={"data": library.resolve_data(model_id, base.data, weights)})
    model, data = zoo.build(model_id, base.data, weights, checkpoint)
    if not zoo.is_plugin(model_id):  # a small data set: batches no larger than the samples it trains on
        trained = trained_samples(base, len(data.train_x))
        base = base.model_copy(update={s: getattr(base, s).model_copy(update={"batch_size": min(
            getattr(base, s).batch_size, trained)}) for s in ("baseline", "finetune")})
    names = [r["name"] for r in layer_table(model, data.example()) if r["has_weights"]]
    return cfg.from_dict(with_uniform_plan(base, names, weight_bits, act_bits).to_dict())


@dataclass
class Loaded:
    """A finished run, rebuilt: its float model, its quantized model before (PTQ) and after (QAT)
    the fine-tune, and its data."""

    config: RunConfig
    fp32: nn.Module
    ptq: QATModel
    qat: QATModel
    data: Data


def training_device(config: RunConfig) -> torch.device:
    """The device a run trains on; export, analysis and benchmarks always work on the CPU copy."""
    cuda = torch.cuda.is_available()
    if config.device == "cuda" and not cuda:
        raise ConfigError("device: cuda was asked for, but PyTorch sees no CUDA GPU here; use cpu or auto")
    return torch.device("cuda" if config.device == "cuda" or (config.device == "auto" and cuda) else "cpu")


def trained_samples(config: RunConfig, train_samples: int) -> int:
    """The samples a run trains on, of a training split of ``train_samples``: all but the guard's validation
    split (each class rounds its own share: the split may differ from this by a sample a class)."""
    return train_samples - validation_size(train_samples, validation_fraction(config))


def data_problems(config: RunConfig, train_samples: int) -> dict[str, str]:
    """Settings that the data (a training split of ``train_samples``) cannot honour, by field (as
    ``config.field_errors``): a batch larger than the samples trained on would silently become one short batch
    an epoch."""
    problems = {}
    trained = trained_samples(config, train_samples)
    held = f" ({train_samples - trained:,} more are held out to validate the fine-tune)" if trained < train_samples else ""
    for section in ("finetune", "baseline"):
        size = getattr(config, section).batch_size
        if train_samples and size > trained:
            problems[f"{section}.batch_size"] = (f"{size:,} is more than the {trained:,} training samples{held}; "
                                                 f"use at most {trained:,}")
    return problems


def _build_fp32(config: RunConfig) -> tuple[nn.Module, Data]:
    """The config's model and data, the guard's validation split held out of the training split."""
    train.seed_everything(config.seed)
    model, data = zoo.build(config.model, config.data, config.weights, config.checkpoint)
    problems = data_problems(config, len(data.train_x) if not zoo.is_plugin(config.model) else 0)
    if problems:
        raise ConfigError("; ".join(f"{field}: {why}" for field, why in problems.items()))
    return model, hold_out(data, validation_fraction(config), config.data.split_seed)


TIMED_SAMPLES = 16  # samples of a batch timed for a pass's pace (a large batch or test set is not run whole)


def _seconds_per_sample(run: Callable[[list[train.Batch]], Any], loader: Iterable[train.Batch]) -> float:
    """Seconds ``run`` takes per sample on up to ``TIMED_SAMPLES`` samples of ``loader``'s first batch, after an
    untimed warm-up on two (the first call of a path allocates and dispatches for the first time)."""
    x, y = next(iter(loader))
    run([(x[:2], y[:2])])
    x, y = x[:TIMED_SAMPLES], y[:TIMED_SAMPLES]
    started = time.perf_counter()
    run([(x, y)])
    return (time.perf_counter() - started) / len(x)


def _startup_seconds() -> float:
    """What a launched run spends before its first line of work: a new Python importing torch and QAT Studio."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import qat_core.cli, qat_core.runner"], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    return time.perf_counter() - started


def seconds_per_step(config: RunConfig, threads: int = 1) -> dict[str, float]:
    """What the parts of a run of this config take on this machine with ``threads`` torch threads, measured
    on copies of the model: a training step of its FP32 baseline and of its QAT fine-tune, a calibration
    batch, a test pass of the FP32 and of the quantized model (integer arithmetic and fake-quantized: a
    run evaluates both) and a batch of BatchNorm re-estimation (from a few samples' pace), building the model and preparing it, and a
    launched run's start (Python importing torch); and the sizes of the training split (the guard's validation split held
    out), the test split and the validation split."""
    startup = _startup_seconds()
    started = time.perf_counter()
    fp32, data = _build_fp32(config)
    build = time.perf_counter() - started
    b, ft = config.baseline, config.finetune
    test = data.test_loader()
    with train.torch_threads(threads):
        model = copy.deepcopy(fp32)
        baseline = train.seconds_per_step(model, data.train_loader(b.batch_size, True, config.seed),
                                          train.make_optimizer(model, "adam", b.lr, 0.0))
        with torch.no_grad():  # as train.reestimate_batchnorm: forward in training mode, no gradients
            bn_sample = _seconds_per_sample(lambda xs: [model.train()(x) for x, _ in xs],
                                            data.train_loader(b.batch_size, True, config.seed))
        fp32_sample = _seconds_per_sample(lambda xs: train.evaluate(model, xs), test)
        started = time.perf_counter()
        layer_table(fp32, data.example())
        qat = prepare(fp32, config.plan, data.example())
        preparing = time.perf_counter() - started
        marks = [time.perf_counter()]
        train.calibrate(qat, data.train_loader(ft.batch_size, True, config.seed), 2,
                        on_batch=lambda seen: marks.append(time.perf_counter()))
        # the first batch also searches every weight's range (MSE ranges: the most); later ones only activations'
        calibration, calibration_next = marks[1] - marks[0], marks[-1] - marks[-2]
        quantized_sample = _seconds_per_sample(
            lambda xs: (train.evaluate(qat, xs, integer=True), train.evaluate(qat, xs)), test)
        finetune = train.seconds_per_step(qat, data.train_loader(ft.batch_size, True, config.seed),
                                          train.make_optimizer(qat, ft.optimizer, ft.lr, ft.weight_decay))
    return {"baseline": baseline, "finetune": finetune, "calibration": calibration,
            "calibration_next": calibration_next, "train_samples": len(data.train_x),
            "fp32_eval": fp32_sample * len(data.test_x), "quantized_eval": quantized_sample * len(data.test_x),
            "test_samples": len(data.test_x), "validation_samples": len(data.validation.y) if data.validation else 0,
            "bn_batch": bn_sample * min(b.batch_size, len(data.train_x)), "build": build, "prepare": preparing,
            "startup": startup}


def time_estimate(config: RunConfig, per_step: dict[str, float], train_baseline: bool = True) -> dict[str, float]:
    """Seconds the parts of a run take, from :func:`seconds_per_step`'s measurements:

    - ``baseline_epoch`` / ``baseline_total``: its training steps (an epoch's batches, capped by max_steps),
      ``baseline_evaluation``: its evaluations (each re-estimates BatchNorm, then a test pass; and a last one);
    - ``calibration_total``: the calibration batches before PTQ;
    - ``finetune_epoch`` / ``finetune_total``: the QAT steps, ``quantized_evaluation``: PTQ's and QAT's test passes (integer arithmetic and fake-quantized) and
      the fine-tune's evaluations (of the test set, and of the validation split for its guard);
    - ``overhead``: starting the run's process, building and preparing the model;
    - ``run_total``: all of it; without the baseline's training when ``train_baseline`` is False (cached,
      or the user's trained weights).
    """
    steps: dict[str, tuple[int, int]] = {}
    out: dict[str, float] = {}
    for part in ("baseline", "finetune"):
        section = getattr(config, part)
        per_epoch = math.ceil(per_step["train_samples"] / section.batch_size)
        total = min(math.ceil(per_epoch * section.epochs), section.max_steps or math.ceil(per_epoch * section.epochs))
        steps[part] = (total, per_epoch)
        out[f"{part}_epoch"] = per_epoch * per_step[part]
        out[f"{part}_total"] = total * per_step[part]
    ft = config.finetune
    batches = min(ft.calibration_batches, steps["finetune"][1])
    out["calibration_total"] = per_step["calibration"] + per_step.get("calibration_next", per_step["calibration"]) \
        * (batches - 1)
    if "fp32_eval" not in per_step:  # measured before evaluation was timed: steps only
        return out
    total, per_epoch = steps["baseline"]
    evals = len(train.evaluation_steps(total, per_epoch, train.baseline_eval_every(config.baseline.epochs)))
    bn = per_step["bn_batch"] * min(train.BN_BATCHES, per_epoch)
    out["baseline_evaluation"] = evals * (bn + per_step["fp32_eval"]) + per_step["fp32_eval"]
    total, per_epoch = steps["finetune"]
    evals = len(train.evaluation_steps(total, per_epoch, ft.eval_every_epochs)) if total else 0
    # quantized_eval is both passes (integer arithmetic, fake-quantized): PTQ's and QAT's metrics take both,
    # the fine-tune's own evaluations the integer one; its guard's, the integer one on the validation split
    # at the start and at each evaluation (measured with the splits' sizes; older measurements have none)
    validation = per_step.get("validation_samples", 0) / per_step["test_samples"] if total and "test_samples" in \
        per_step else 0.0
    out["quantized_evaluation"] = (2 + evals / 2 + (1 + evals) * validation / 2) * per_step["quantized_eval"]
    out["overhead"] = per_step["startup"] + per_step["build"] + per_step["prepare"]
    parts = ["calibration_total", "finetune_total", "quantized_evaluation", "overhead"]
    out["run_total"] = sum(out[k] for k in parts + (["baseline_total", "baseline_evaluation"] if train_baseline else []))
    return out


def baseline(config: RunConfig, store: RunStore, on_event: train.OnEvent = lambda e: None,
             cancel: train.Cancel = train.NeverCancel(),
             built: tuple[nn.Module, Data] | None = None) -> tuple[nn.Module, Data, dict[str, float]]:
    """The trained FP32 model for a config: from the cache, or trained now and cached. ``built``: the
    config's model and data, where the caller has them already."""
    model, data = built or _build_fp32(config)
    model.to(training_device(config))
    key = baseline_key(config)
    cached = store.load_baseline(key)
    if cached is not None:
        model.load_state_dict(cached["state"])
        return model, data, cached["metrics"]
    if (config.checkpoint or config.weights) and not library.new_head(model):  # trained weights are the baseline
        metrics = train.evaluate(model, data.test_loader())
    else:
        b = config.baseline
        metrics = train.train_fp32(model, data.train_loader(b.batch_size, True, config.seed), data.test_loader(), b,
                                   on_event, cancel)
    store.save_baseline(key, {"state": model.state_dict(), "metrics": metrics})
    return model, data, metrics


def _quantize(fp32: nn.Module, data: Data, config: RunConfig, on_event: train.OnEvent | None = None) -> QATModel:
    """The config's plan on a copy of ``fp32``, calibrated; ``on_event`` gets ``{"phase": "ptq", "calibrated",
    "of", "elapsed"}`` after each calibration batch (no "step": these are not training steps)."""
    device = next(fp32.parameters()).device
    model = prepare(fp32, config.plan, data.example().to(device)).to(device)
    ft = config.finetune
    loader = data.train_loader(ft.batch_size, True, config.seed)
    of, started = min(ft.calibration_batches, len(loader)), time.perf_counter()
    train.calibrate(model, loader, ft.calibration_batches, on_batch=None if on_event is None else lambda seen: on_event(
        {"phase": "ptq", "calibrated": seen, "of": of, "elapsed": time.perf_counter() - started}))
    return model


def calibrated(config: RunConfig, store: RunStore, cancel: train.Cancel = train.NeverCancel(),
               on_event: train.OnEvent = lambda e: None) -> Loaded:
    """The config's FP32 baseline (trained now unless cached: ``on_event`` follows it) and its calibrated,
    not fine-tuned, model as ``ptq`` and ``qat``: what a sensitivity scan needs before any run exists."""
    fp32, data, _ = baseline(config, store, on_event, cancel=cancel)
    fp32 = fp32.cpu().eval()
    train.seed_everything(config.seed)
    ptq = _quantize(fp32, data, config).eval()
    return Loaded(config, fp32, ptq, ptq, data)


def execute(config: RunConfig, store: RunStore, run_id: str | None = None, on_event: train.OnEvent | None = None,
            cancel: train.Cancel | None = None, threads: int | None = None) -> str:
    """Train a run and record it; returns its id. Errors are recorded on the run, then raised.
    ``threads``: torch's intra-op threads for it (else ``cpu.training_threads`` chooses)."""
    run_id = run_id or store.create_run(config)
    log = store.event_log(run_id)
    cancel = cancel or store.cancel_flag(run_id)

    def emit(event: dict[str, Any]) -> None:
        log(event)
        if on_event is not None:
            on_event(event)

    started = time.perf_counter()
    try:
        built = _build_fp32(config)
        threads = cpu.training_threads(sum(p.numel() for p in built[0].parameters()), threads)
        torch.set_num_threads(threads)  # for the whole process: the CLI and the app's worker run one run each
        fp32, data, fp32_metrics = baseline(config, store, emit, cancel, built)
        emit({"phase": "fp32", "done": True, "test_accuracy": fp32_metrics["accuracy"]})
        rows = layer_table(fp32, data.example().to(next(fp32.parameters()).device))
        train.seed_everything(config.seed)
        ptq = _quantize(fp32, data, config, emit)  # prepare copies: fp32 stays the baseline
        qat = copy.deepcopy(ptq)  # calibrated once (MSE ranges of a large model: many seconds), fine-tuned next
        ptq_metrics = train.quantized_metrics(ptq, data.test_loader())
        emit({"phase": "ptq", "done": True, "test_accuracy": ptq_metrics["accuracy"]})
        train.seed_everything(config.seed)
        ft = config.finetune
        loader = data.train_loader(ft.batch_size, True, (config.seed + 1) % (MAX_SEED + 1))  # not the calibration order
        qat_metrics, guard = train.finetune(qat, loader, data.test_loader(), ft, emit, cancel, ptq_metrics["accuracy"],
                                            data.validation, fp32 if ft.distill else None)
        store.save_state(run_id, "fp32.pt", fp32.state_dict())
        store.save_state(run_id, "ptq.pt", ptq.state_dict())  # "before the fine-tune", for comparisons
        store.save_state(run_id, "qat.pt", qat.state_dict())
        store.write_result(run_id, "layers", rows)
        store.update_metrics(run_id, fp32=fp32_metrics, ptq=ptq_metrics, qat=qat_metrics,
                             size=predicted_sizes(rows, config.plan),
                             quantized_layers=quantized_layers(rows, config.plan), float_layers=qat.float_layers,
                             generated_data=data.generated, seconds=time.perf_counter() - started, threads=threads,
                             **({"guard": guard} if guard else {}))
        store.finish(run_id)
    except CancelledError as err:
        store.fail(run_id, str(err), cancelled=True)
        raise
    except KeyboardInterrupt:
        store.fail(run_id, "interrupted (Ctrl-C)", cancelled=True)
        raise
    except QATError as err:
        store.fail(run_id, str(err))
        raise
    except Exception as err:  # a bug, not the user's fault: still recorded so the run store stays consistent
        fault = zoo.plugin_fault(config.model, err)  # unless a plugin's own code raised it
        store.fail(run_id, str(fault) if fault else f"internal error: {type(err).__name__}: {err}")
        if fault:
            raise fault from None
        raise
    finally:
        log.flush()
    return run_id


def load(store: RunStore, run_id: str) -> Loaded:
    """Rebuild a finished run's FP32 and QAT models (eval mode) and its data."""
    store.require_done(run_id)
    config = store.config(run_id)
    fp32, data = _build_fp32(config)
    fp32.load_state_dict(store.load_state(run_id, "fp32.pt"))
    models = []
    prepared = prepare(fp32, config.plan, data.example())  # once: tracing and checking a large model takes seconds
    for name in ("ptq.pt", "qat.pt"):
        model = copy.deepcopy(prepared)
        model.load_state_dict(store.load_state(run_id, name))
        for q in quantizers(model):
            q.calibrated = True
        models.append(model.eval())
    return Loaded(config, fp32.eval(), models[0], models[1], data)


def launch(config: RunConfig, store: RunStore, threads: int = 1) -> str:
    """Start a run in a separate process (the app's background job) and return its id at once.

    A process, not a thread: it survives page reloads, keeps the server responsive on 2 cores,
    and is cancelled through the store's flag file. Its output goes to the run's ``worker.log``.
    ``threads``: torch's threads for it (1 by default: a core stays with the web server).
    """
    zoo.check_plugin(config.model)  # refused here, not in the worker: no run is recorded for it
    run_id = store.create_run(config)
    config_path = store.run_dir(run_id) / "config.yaml"
    log = new_log(store.run_dir(run_id) / "worker.log")
    env = os.environ | {cpu.THREADS_ENV: str(threads)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qat_core.cli", "--workspace", str(store.root), "train", str(config_path),
         "--run-id", run_id, "--quiet"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    log.close()
    store.set_pid(run_id, proc.pid)
    return run_id
