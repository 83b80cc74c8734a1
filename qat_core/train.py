"""Calibrate, fine-tune, evaluate. Progress goes to a callback; cancel is cooperative; no printing.

Every loop takes its data as iterables of ``(inputs, labels)`` batches and its settings as
config objects, so the same functions serve the CLI, the pages and the tests.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qat_core.config import BaselineConfig, FineTuneConfig
from qat_core.errors import CancelledError, TrainingError
from qat_core.modules import QATModel
from qat_core.quantizers import FakeQuantizer, clamp_learned, freeze_ranges, quantizers, set_observing
from qat_core.summary import LOSS_TOLERANCE, pct

Event = dict[str, Any]
OnEvent = Callable[[Event], None]
Batch = tuple[torch.Tensor, torch.Tensor]


class Cancel(Protocol):
    def is_set(self) -> bool: ...


class NeverCancel:
    def is_set(self) -> bool:
        return False


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Train with ``count`` intra-op threads for the duration (torch's setting is process-wide; restored after).

    On 2 shared cores, torch's default 2 OpenMP threads wait on each other at every barrier whenever
    anything else runs (a web server, a browser): a small training run became 5-30x slower.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def main_logits(output: Any) -> torch.Tensor:
    """The logits a training step's loss is taken on. GoogLeNet and Inception v3 (torchvision) return their
    auxiliary classifiers' logits beside the main ones in training mode (a namedtuple, main logits first); the
    loss uses the main output only: the auxiliary heads help train such a network from scratch, and the
    deployed model, traced in eval mode, has none."""
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return output


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[Batch], integer: bool = False) -> dict[str, float]:
    """Top-1 accuracy (a fraction) and mean cross-entropy of ``model`` on ``loader``.

    ``integer``: a QAT model computes as ONNX Runtime will run its int8 export (see
    ``QATModel.integer_arithmetic``), so the accuracy is the deployed model's.
    """
    was = model.training
    model.eval()
    device = device_of(model)
    correct, total, loss = 0, 0, 0.0
    with model.integer_arithmetic() if integer and isinstance(model, QATModel) else contextlib.nullcontext():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
            total += len(y)
    model.train(was)
    if total == 0:
        raise TrainingError("the test set is empty; use a larger test_fraction or give the plugin a test_loader")
    return {"accuracy": correct / total, "loss": loss / total}


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable[Batch]) -> torch.Tensor:
    """Logits for every test batch, concatenated (eval mode)."""
    was = model.training
    model.eval()
    device = device_of(model)
    out = torch.cat([model(x.to(device)).cpu() for x, _ in loader])
    model.train(was)
    return out


def _param_groups(model: nn.Module, lr: float) -> list[dict]:
    """Weights at ``lr``; each learned step size at ``lr`` times its own size.

    Adam moves every parameter by about ``lr`` a step whatever its gradient's scale, which for
    a step size of 1e-3 would be a 100% change (and LSQ's gradient scaling, meant for SGD, is
    normalised away). Scaling the rate by the step size makes every quantizer move by about
    ``lr`` relative to itself, like the weights; offsets move relative to their code range.
    """
    learned = [q for q in quantizers(model) if q.learned]
    quant_ids = {id(p) for q in learned for p in (q.scale, q.zero_point)}
    groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in quant_ids], "lr": lr}]
    for q in learned:
        if q.scale.requires_grad:
            groups.append({"params": [q.scale], "lr": lr * float(q.scale.detach().abs().mean()), "weight_decay": 0.0})
        if q.zero_point.requires_grad:
            groups.append({"params": [q.zero_point], "lr": lr * (q.qmax - q.qmin), "weight_decay": 0.0})
    return groups


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    groups = _param_groups(model, lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr, weight_decay=weight_decay, fused=True)  # one kernel a group: fewer tiny ops


# A loss this many times above chance level (ln C: a uniform guess over C classes), or above the
# first step's when higher, is past recovery: weights were thrown far from any trained state.
EXPLODED_LOSS = 100.0
# A fine-tune that started this far above chance and ends within COLLAPSE_MARGIN of it has collapsed.
MEANINGFUL_START = 0.2
COLLAPSE_MARGIN = 0.05

_FIX = "Lower the learning rate (now {lr:g}) or quantize fewer layers below 4 bits"


def _check_loss(loss: float, first: float, classes: int, step: int, lr: float) -> None:
    """Stop a diverging run early, with the reason: a NaN/inf loss, or one that exploded."""
    if not math.isfinite(loss):
        raise TrainingError(f"training diverged at step {step}: the loss is {loss}. " + _FIX.format(lr=lr))
    limit = EXPLODED_LOSS * max(math.log(max(classes, 2)), first)
    if loss > limit:
        raise TrainingError(f"training diverged at step {step}: the loss exploded to {loss:.4g} (it started at "
                            f"{first:.4g}; guessing uniformly gives {math.log(max(classes, 2)):.3g}). "
                            + _FIX.format(lr=lr))


def chance_accuracy(loader: Iterable[Batch]) -> float:
    """The accuracy of always predicting the test set's most common class: what a collapsed model scores."""
    counts = torch.bincount(torch.cat([y.reshape(-1).long().cpu() for _, y in loader]))
    return float(counts.max() / counts.sum()) if counts.numel() else 0.0


def check_not_collapsed(accuracy: float, start: float, chance: float, where: str, lr: float) -> None:
    """A fine-tune that starts well above chance must not end at it: the run would look "done"."""
    if start - chance >= MEANINGFUL_START and accuracy <= chance + COLLAPSE_MARGIN:
        raise TrainingError(f"the fine-tune collapsed to chance {where}: test accuracy {pct(accuracy)}, from "
                            f"{pct(start)} before it (always predicting the most common class scores {pct(chance)}). "
                            + _FIX.format(lr=lr))


PHASES = {"fp32": "FP32 baseline", "qat": "fine-tune"}  # a training phase in words, for messages


def lr_factor(step: int, total: int, warmup: int = 0) -> float:
    """The share of the base learning rate at ``step`` of ``total``: a linear rise over the first ``warmup``
    steps, then a cosine decay to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def total_steps(steps_per_epoch: int, epochs: float, max_steps: int | None) -> int:
    """The training steps of ``epochs`` epochs, at most ``max_steps``."""
    total = math.ceil(epochs * steps_per_epoch)
    return total if max_steps is None else min(total, max_steps)


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, inputs, labels) → loss


def _fit(model: nn.Module, loader: Iterable[Batch], epochs: float, max_steps: int | None, optimizer: torch.optim.Optimizer,
         phase: str, on_event: OnEvent, cancel: Cancel, evaluate_fn: Callable[[int], Event] | None = None,
         eval_every: float = 1.0, hooks: dict[float, Callable[[], None]] | None = None,
         after_step: Callable[[], None] | None = None, warmup: float = 0.0,
         watch: Callable[[int, float, int], bool] | None = None, loss_fn: LossFn | None = None) -> None:
    """The shared training loop: LR warm-up (``warmup``: a share of the steps) then cosine decay, events each
    step, evaluation every ``eval_every`` epochs (``evaluate_fn`` returns fields for the step's event).

    ``hooks`` maps an epoch (fractions allowed) to a call made once when training reaches it. ``watch(step,
    cross-entropy, classes)``, before each update, returns True to stop training there; without it, a diverged
    loss raises TrainingError. ``loss_fn``: what is minimised, when not the cross-entropy (which is reported).
    """
    steps_per_epoch = len(loader)  # type: ignore[arg-type]
    total = total_steps(steps_per_epoch, epochs, max_steps)
    if total == 0:
        return
    warmup_steps = min(math.ceil(warmup * total), total - 1)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    pending = sorted((hooks or {}).items())
    evaluated_at = set(evaluation_steps(total, steps_per_epoch, eval_every))
    device = device_of(model)
    start, step, first_loss = time.perf_counter(), 0, None
    model.train()
    while step < total:
        for x, y in loader:
            if cancel.is_set():
                raise CancelledError(f"Cancelled before the first {PHASES.get(phase, phase)} step" if step == 0 else
                                     f"Cancelled at step {step} of {total} ({PHASES.get(phase, phase)})")
            while pending and step >= pending[0][0] * steps_per_epoch:
                pending.pop(0)[1]()
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * lr_factor(step, total, warmup_steps)
            x, y = x.to(device), y.to(device)
            logits = main_logits(model(x))
            ce = F.cross_entropy(logits, y)
            value = ce.item()
            first_loss = value if first_loss is None else first_loss
            if watch is None:
                _check_loss(value, first_loss, logits.shape[-1], step, base_lrs[0])
            elif watch(step, value, logits.shape[-1]):
                return
            loss = ce if loss_fn is None else loss_fn(logits, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            step += 1
            event: Event = {"phase": phase, "step": step, "total": total, "epoch": step / steps_per_epoch,
                            "loss": value, "elapsed": time.perf_counter() - start}
            if evaluate_fn is not None and step in evaluated_at:
                event |= evaluate_fn(step)
                model.train()
            on_event(event)
            if step >= total:
                break


def evaluation_steps(total: int, steps_per_epoch: int, eval_every: float) -> list[int]:
    """The steps after which the training loop evaluates: every ``eval_every`` epochs, and the last step."""
    out, next_eval = [], eval_every * steps_per_epoch
    for step in range(1, total + 1):
        if step >= next_eval or step == total:
            out.append(step)
            next_eval += eval_every * steps_per_epoch
    return out


def baseline_eval_every(epochs: float) -> float:
    """Epochs between the FP32 baseline's evaluations: each epoch, at most ten times a training."""
    return max(1.0, epochs / 10)


def seconds_per_step(model: nn.Module, loader: Iterable[Batch], optimizer: torch.optim.Optimizer,
                     steps: int = 2) -> float:
    """The wall time of one training step (forward, loss, backward, optimizer) of ``model``, measured over
    ``steps`` steps after a warm-up step. The model's weights change: give it a copy."""
    model.train()
    device = device_of(model)
    batches = iter(loader)
    started = 0.0
    for i in range(steps + 1):
        if i == 1:  # the first step allocates and dispatches for the first time
            started = time.perf_counter()
        try:
            x, y = next(batches)
        except StopIteration:  # fewer batches than steps: start the epoch again
            batches = iter(loader)
            x, y = next(batches)
        loss = F.cross_entropy(main_logits(model(x.to(device))), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps


BN_BATCHES = 64  # batches that re-estimate BatchNorm statistics after the FP32 baseline's training


def train_fp32(model: nn.Module, train_loader: Iterable[Batch], test_loader: Iterable[Batch], cfg: BaselineConfig,
               on_event: OnEvent, cancel: Cancel = NeverCancel()) -> dict[str, float]:
    """Train the FP32 baseline (Adam, cosine LR); returns its test metrics."""
    optimizer = make_optimizer(model, "adam", cfg.lr, 0.0)

    def evaluate_now(step: int) -> Event:  # what the model is at this step: BatchNorm statistics included
        reestimate_batchnorm(model, train_loader)
        return {"test_accuracy": evaluate(model, test_loader)["accuracy"]}

    _fit(model, train_loader, cfg.epochs, cfg.max_steps, optimizer, "fp32", on_event, cancel, evaluate_now,
         eval_every=baseline_eval_every(cfg.epochs))
    return evaluate(model, test_loader)  # the last step was evaluated (and its statistics re-estimated)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, loader: Iterable[Batch], batches: int = BN_BATCHES) -> None:
    """BatchNorm's running statistics, recomputed as a plain average over training batches with the current
    weights. A short run leaves layers with a small momentum (torchvision's MobileNetV3 uses 0.01) close
    to their initial statistics, and the model then evaluates at chance however well it trained."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    model.train()
    device = device_of(model)
    for i, (x, _) in enumerate(loader):
        model(x.to(device))
        if i + 1 >= batches:
            break
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


@torch.no_grad()
def calibrate(model: QATModel, loader: Iterable[Batch], batches: int, cancel: Cancel = NeverCancel(),
              on_batch: Callable[[int], None] | None = None) -> None:
    """Run ``batches`` batches in eval mode (BN folded as deployed) with every observer on; ``on_batch(seen)``
    after each (MSE ranges of a large model take seconds a batch). A weight's range depends on the weight alone,
    which eval mode leaves as it is: weights are observed in the first batch only."""
    qs = quantizers(model)
    for q in qs:
        q.observer.reset()
        q.observing = True
    model.eval()
    device = device_of(model)
    seen = 0
    for x, _ in loader:
        if cancel.is_set():
            raise CancelledError("Cancelled during calibration")
        model(x.to(device))
        seen += 1
        set_observing(model, False, activations=False)
        if on_batch is not None:
            on_batch(seen)
        if seen >= batches:
            break
    for q in qs:
        q.observing = False
    if seen == 0:
        raise TrainingError("calibration saw no data: the training loader is empty")


def _track_during_training(q: FakeQuantizer) -> bool:
    """Which ranges keep moving in the fine-tune: moving averages, and weight ranges (not learned)."""
    return not q.learned and (q.method == "moving_average" or q.signed)


# The fine-tune's learning rate rises linearly over this share of its steps, then decays. Adam's first updates move
# every weight by about the full rate whatever its gradient: without a warm-up, digits-mlp at lr 0.03 jumped from
# loss 0.08 to 14.5 in its first step.
WARMUP_SHARE = 0.1
# The guard stops a fine-tune whose loss stays LOSS_PATIENCE steps above its limit (see loss_limit): one noisy
# batch is no divergence, three in a row are.
LOSS_RISE = 2.0
LOSS_PATIENCE = 3
# Distillation: the FP32 model's logits softened at this temperature, KL beside the labels' cross-entropy.
DISTILL_TEMPERATURE = 2.0


def loss_limit(start: float, classes: int) -> float:
    """A fine-tune loss "well above its start": twice the start, and at least half-way from it to what guessing
    uniformly over ``classes`` scores (ln C), so a near-zero start does not make every noisy batch a rise."""
    return max(LOSS_RISE * start, start + 0.5 * math.log(max(classes, 2)))


def distill_loss(teacher: nn.Module) -> LossFn:
    """Cross-entropy on the labels plus the KL divergence from ``teacher``'s softened outputs (Hinton et al.;
    T² keeps the soft term's gradients on the hard term's scale), half each."""
    teacher.eval()
    t = DISTILL_TEMPERATURE

    def loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft = F.log_softmax(main_logits(teacher(x)) / t, dim=-1)
        kl = F.kl_div(F.log_softmax(logits / t, dim=-1), soft, reduction="batchmean", log_target=True)
        return 0.5 * F.cross_entropy(logits, y) + 0.5 * t * t * kl

    return loss


def _finite(value: float) -> float | None:
    """A loss for the run's JSON metrics: None for one that is infinite or not a number."""
    return value if math.isfinite(value) else None


class Guard:
    """Keeps a fine-tune from ending worse than it started (its PTQ model).

    It measures the validation split (held out of all training: never the test set) at the start and at each
    evaluation point, and keeps a copy of the best point's weights and quantizer parameters (the state dict:
    BatchNorm statistics included). A loss that stays above ``loss_limit`` of its start for ``LOSS_PATIENCE``
    steps (or is not finite, or exploded) stops training; a fine-tune stopped so, or that ends worse than its
    start on the validation split (:meth:`harmed`), is rolled back to its best point. :meth:`record` says what
    happened, for the run's metrics and ``summary.remarks``.
    """

    def __init__(self, model: QATModel, val_loader: Iterable[Batch] | None, lr: float):
        self.model, self.val_loader, self.lr = model, val_loader, lr
        self.start = self._validate()
        self.best = (self.start, 0, self._snapshot())
        self.last = self.start
        self.first_loss: float | None = None
        self.peak = 0.0
        self.rising = 0
        self.stopped_at: int | None = None
        self.total = 0

    def _validate(self) -> dict[str, float] | None:
        return None if self.val_loader is None else evaluate(self.model, self.val_loader, integer=True)

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def watch(self, step: int, loss: float, classes: int) -> bool:
        """Before update ``step``: True stops the fine-tune (its loss has left its start far behind)."""
        if self.first_loss is None:  # the PTQ model's loss on a batch, or its validation loss when higher
            self.first_loss = max(loss, self.start["loss"]) if self.start else loss
        self.peak = max(self.peak, loss) if math.isfinite(loss) else math.inf
        exploded = EXPLODED_LOSS * max(math.log(max(classes, 2)), self.first_loss)
        self.rising = self.rising + 1 if not loss <= loss_limit(self.first_loss, classes) else 0
        if not math.isfinite(loss) or loss > exploded or self.rising >= LOSS_PATIENCE:
            self.stopped_at = step
            return True
        return False

    def harmed(self, metrics: dict[str, float] | None) -> bool:
        """Worse than the start on validation: accuracy more than ``LOSS_TOLERANCE`` lower, or the loss over
        ``LOSS_RISE`` times the start's (finer than accuracy on a small split: a fine-tune that cost digits-mlp
        2 test points moved its 136 validation samples' accuracy by one sample, and doubled their loss)."""
        return (self.start is not None and metrics is not None
                and (self.start["accuracy"] - metrics["accuracy"] > LOSS_TOLERANCE
                     or not metrics["loss"] <= LOSS_RISE * self.start["loss"]))

    def evaluated(self, step: int) -> Event:
        """At an evaluation point after ``step`` updates: validation metrics for the step's event; a point
        better than any before (accuracy, then loss), and no worse than the start, is kept."""
        metrics = self._validate()
        if metrics is None:
            return {}
        self.last = metrics
        best = self.best[0]
        if not self.harmed(metrics) and (metrics["accuracy"], -metrics["loss"]) > (best["accuracy"], -best["loss"]):
            self.best = (metrics, step, self._snapshot())
        return {"val_accuracy": metrics["accuracy"], "val_loss": metrics["loss"]}

    def finish(self, total: int) -> dict[str, Any]:
        """After the last step: roll back if the fine-tune did harm; what happened, as :meth:`record` says."""
        self.total = total
        worse = self.harmed(self.last)
        if self.stopped_at is not None or worse:
            self.model.load_state_dict(self.best[2])
        return self.record(worse)

    def record(self, worse: bool) -> dict[str, Any]:
        action = "stopped" if self.stopped_at is not None else "rolled_back" if worse else "kept"
        out: dict[str, Any] = {"action": action, "lr": self.lr, "total": self.total,
                               "validation_samples": None if self.val_loader is None else
                               sum(len(y) for _, y in self.val_loader)}
        if self.start is not None:
            out |= {"start_val_accuracy": self.start["accuracy"], "end_val_accuracy": self.last["accuracy"],
                    "start_val_loss": self.start["loss"], "end_val_loss": _finite(self.last["loss"])}
        if action != "kept":
            best, step, _ = self.best
            out |= {"kept_step": step, "kept_val_accuracy": None if best is None else best["accuracy"]}
        if action == "stopped":
            out |= {"stopped_step": self.stopped_at, "start_loss": self.first_loss,
                    "peak_loss": _finite(self.peak)}
        return out


def finetune(model: QATModel, train_loader: Iterable[Batch], test_loader: Iterable[Batch], cfg: FineTuneConfig,
             on_event: OnEvent, cancel: Cancel = NeverCancel(), start_accuracy: float | None = None,
             val_loader: Iterable[Batch] | None = None,
             teacher: nn.Module | None = None) -> tuple[dict[str, float], dict[str, Any] | None]:
    """QAT fine-tune of a calibrated model; returns its test metrics and what its guard did (None: no guard, or
    no step to guard).

    With ``cfg.guard``, a :class:`Guard` judges the fine-tune on ``val_loader`` (a split held out from
    ``train_loader``'s data) and its loss, and rolls a harmful one back (an event ``{"phase": "qat", "guard":
    record}`` says so). Without it, ``start_accuracy`` (the calibrated model's test accuracy, i.e. PTQ's): a
    fine-tune that falls from it to chance raises TrainingError at the evaluation that sees it, and a
    diverged loss raises too. ``teacher`` (the FP32 model, with ``cfg.distill``) is distilled from.
    """
    chance = chance_accuracy(test_loader) if start_accuracy is not None and not cfg.guard else 0.0

    def checked(metrics: dict[str, float], where: str) -> dict[str, float]:
        if start_accuracy is not None and not cfg.guard:
            check_not_collapsed(metrics["accuracy"], start_accuracy, chance, where, cfg.lr)
        return metrics

    total = total_steps(len(train_loader), cfg.epochs, cfg.max_steps)  # type: ignore[arg-type]
    guard = Guard(model, val_loader, cfg.lr) if cfg.guard and total else None

    def evaluate_now(step: int) -> Event:
        event = {"test_accuracy": checked(evaluate(model, test_loader, integer=True), "during training")["accuracy"]}
        return event | (guard.evaluated(step) if guard else {})

    for q in quantizers(model):
        q.observing = _track_during_training(q)
    hooks: dict[float, Callable[[], None]] = {}
    if cfg.freeze_bn_epoch is not None:
        hooks[cfg.freeze_bn_epoch] = model.freeze_bn
    if cfg.freeze_ranges_epoch is not None:
        hooks[cfg.freeze_ranges_epoch] = lambda: freeze_ranges(model)
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
    try:
        _fit(model, train_loader, cfg.epochs, cfg.max_steps, optimizer, "qat", on_event, cancel, evaluate_now,
             cfg.eval_every_epochs, hooks, lambda: clamp_learned(model), WARMUP_SHARE,
             None if guard is None else guard.watch, None if teacher is None else distill_loss(teacher))
    finally:
        for q in quantizers(model):
            q.observing = False
    record = None if guard is None else guard.finish(total)
    if record is not None and record["action"] != "kept":
        on_event({"phase": "qat", "guard": record})
    return checked(quantized_metrics(model, test_loader), "by the end"), record


def quantized_metrics(model: QATModel, test_loader: Iterable[Batch]) -> dict[str, float]:
    """A quantized model's test metrics as deployed (ONNX Runtime's integer arithmetic), and the
    accuracy of its fake-quantized float simulation beside them (what training sees)."""
    metrics = evaluate(model, test_loader, integer=True)
    metrics["fake_quant_accuracy"] = evaluate(model, test_loader)["accuracy"]
    return metrics
