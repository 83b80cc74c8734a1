"""The fine-tune engine on real data: BN folding, PTQ vs QAT, determinism, divergence, cancel."""

import collections
import copy
import re
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from qat_core import data, runner, train, zoo
from qat_core.config import BaselineConfig, DataConfig, FineTuneConfig, LayerPlan, QuantSpec, RunConfig
from qat_core.errors import CancelledError, ConfigError, TrainingError
from qat_core.modules import QuantConv2d
from qat_core.prepare import prepare
from qat_core.quantizers import quantizers, set_enabled
from tests.conftest import quick_config

sys.path.insert(0, str(Path(__file__).parent / "plugins"))


@pytest.fixture(scope="module")
def digits():
    return data.digits(DataConfig())


def _trained_cnn(digits, steps=60):
    train.seed_everything(0)
    model = zoo.digits_cnn()
    train.train_fp32(model, digits.train_loader(64, True, 0), digits.test_loader(),
                     BaselineConfig(epochs=5, max_steps=steps), lambda e: None)
    return model


class _AuxOutputs(torch.nn.Module):
    """GoogLeNet's and Inception v3's pattern: in training mode an auxiliary classifier's logits come back
    beside the main ones, in a namedtuple (main first); in eval mode the main logits alone."""

    Outputs = collections.namedtuple("Outputs", ["logits", "aux_logits"])

    def __init__(self):
        super().__init__()
        self.body, self.main, self.aux = zoo.mlp(16), torch.nn.Linear(16, 10), torch.nn.Linear(16, 10)

    def forward(self, x):
        h = self.body(x)
        return self.Outputs(self.main(h), self.aux(h)) if self.training else self.main(h)


def test_a_model_with_auxiliary_outputs_in_training_trains_on_its_main_logits(digits):
    train.seed_everything(0)
    model = _AuxOutputs()
    metrics = train.train_fp32(model, digits.train_loader(64, True, 0), digits.test_loader(),
                               BaselineConfig(epochs=1, max_steps=20), lambda e: None)
    assert metrics["accuracy"] > 0.5  # the main head learned (before: cross_entropy of a namedtuple, exit 70)
    qat = prepare(model.eval(), LayerPlan(), digits.example())
    assert "aux" not in {r["name"] for r in qat.layers}  # traced in eval mode: the deployed model has no aux head
    twin = copy.deepcopy(model)
    assert train.seconds_per_step(twin, digits.train_loader(64, True, 0), torch.optim.SGD(twin.parameters(), lr=0.01)) > 0


def test_folded_network_equals_the_float_network_with_quantizers_off(digits):
    """BN folding changes nothing but the arithmetic order: eval outputs match the FP32 model."""
    fp32 = _trained_cnn(digits).eval()
    qat = prepare(fp32, LayerPlan(), digits.example()).eval()
    set_enabled(qat, False)
    x = digits.test_x[:64]
    assert_close(qat(x), fp32(x), atol=1e-4, rtol=1e-4)
    assert sum(isinstance(m, QuantConv2d) and m.bn is not None for m in qat.modules()) == 3
    assert qat.float_layers == {}


def test_training_mode_folding_tracks_batch_statistics(digits):
    fp32 = _trained_cnn(digits)
    qat = prepare(fp32, LayerPlan(), digits.example())
    set_enabled(qat, False)
    fp32.train(), qat.train()
    x = digits.train_x[:128]
    assert_close(qat(x), fp32(x), atol=1e-4, rtol=1e-4)  # before freezing: batch statistics, as in FP32


def test_quantized_layers_run_on_their_grid(digits):
    fp32 = _trained_cnn(digits)
    plan = LayerPlan(default=QuantSpec(weight_bits=3, act_bits=3))
    qat = prepare(fp32, plan, digits.example())
    train.calibrate(qat, digits.train_loader(64), 2)
    layer = qat.layer("conv2.conv")
    codes = layer.weight_quant.quantize_int(layer.folded()[0])
    assert codes.min() >= -4 and codes.max() <= 3
    captured = []
    layer.act_quant.register_forward_hook(lambda m, i, o: captured.append(o))
    qat.eval()(digits.test_x[:32])
    levels = torch.unique(captured[0])
    assert len(levels) <= 8  # a 3-bit unsigned activation has at most 8 distinct values


def test_qat_recovers_what_ptq_loses_at_2_bits(workspace):
    config = quick_config(weight_bits=2, act_bits=4)
    record = workspace.get(runner.execute(config, workspace))
    m = record["metrics"]
    assert m["qat"]["accuracy"] >= 0.96
    assert m["qat"]["accuracy"] > m["ptq"]["accuracy"] + 0.03
    assert m["size"]["ratio"] < 0.25


def test_same_seed_same_result(workspace):
    config = quick_config(max_steps=15)
    a = workspace.get(runner.execute(config, workspace))["metrics"]
    b = workspace.get(runner.execute(config, workspace))["metrics"]
    assert a["qat"] == b["qat"] and a["ptq"] == b["ptq"]


def test_baseline_is_trained_once_and_reused(workspace, digits_run):
    config = quick_config()
    events = []
    runner.baseline(config, workspace, events.append)
    assert events == []  # cached by the digits_run fixture: no training step ran


def test_diverging_finetune_without_its_guard_stops_with_a_clear_message_and_a_failed_run(workspace, digits_run):
    config = RunConfig.model_validate({"model": "tiny_plugin:unstable", "baseline": {"epochs": 5},
                                       "finetune": {"lr": 10.0, "optimizer": "sgd", "epochs": 3, "guard": False}})
    with pytest.raises(TrainingError, match="diverged at step .*loss is nan. Lower the learning rate"):
        runner.execute(config, workspace)
    failed = [r for r in workspace.list() if r["status"] == "failed"]
    assert failed and "diverged" in failed[0]["error"]
    assert not (workspace.run_dir(failed[0]["id"]) / "qat.pt").exists()


def test_a_plugin_without_a_validation_split_is_guarded_by_its_loss(workspace):
    """A plugin's own loaders cannot be split: its guard watches the loss alone, and stops a NaN at once."""
    config = RunConfig.model_validate({"model": "tiny_plugin:unstable", "baseline": {"epochs": 5},
                                       "finetune": {"lr": 10.0, "optimizer": "sgd", "epochs": 3}})
    m = workspace.get(runner.execute(config, workspace))["metrics"]
    assert m["guard"]["action"] == "stopped" and m["guard"]["validation_samples"] is None
    assert m["qat"]["accuracy"] == m["ptq"]["accuracy"]


@pytest.mark.parametrize("lr, optimizer, message", [
    # lr 10 explodes or collapses first, depending on the baseline's last bits (thread count): either is a failure
    # with its reason, where it used to end "done" at 10%
    (10.0, "sgd", r"(diverged at step \d+: the loss exploded to .* guessing uniformly gives 2.3|collapsed to chance)"),
    (0.1, "adam", r"collapsed to chance during training: test accuracy \d+\.\d\d%, from 99\.\d\d% .* most common class "
                  r"scores 10"),
])
def test_without_its_guard_a_finetune_that_explodes_or_collapses_to_chance_fails_with_the_reason(
        workspace, digits_run, lr, optimizer, message):
    with pytest.raises(TrainingError, match=message + f".*Lower the learning rate \\(now {lr:g}\\)"):
        runner.execute(quick_config(lr=lr, optimizer=optimizer, guard=False), workspace)
    record = workspace.list()[0]
    assert record["status"] == "failed" and re.search(message, record["error"])


def test_an_exploding_loss_is_stopped_with_its_size_and_chance_level():
    train._check_loss(50.0, 0.01, 10, 3, 0.1)  # high, but within 100× chance (ln 10 = 2.3): training goes on
    with pytest.raises(TrainingError, match=r"diverged at step 4: the loss exploded to 294.5 \(it started at 0.01; "
                                            r"guessing uniformly gives 2.3\)\. Lower the learning rate \(now 10\)"):
        train._check_loss(294.5, 0.01, 10, 4, 10.0)
    with pytest.raises(TrainingError, match=r"loss is nan"):
        train._check_loss(float("nan"), 0.01, 10, 1, 1.0)


def test_only_a_start_well_above_chance_can_collapse(digits):
    """W2A2 PTQ can start near chance, and a short fine-tune may stay there: that is no collapse."""
    train.seed_everything(0)
    fp32 = zoo.digits_cnn().eval()  # untrained: at chance, quantized or not
    chance = train.chance_accuracy(digits.test_loader())
    assert 0.09 < chance < 0.12  # digits: ten nearly balanced classes

    def finetune_w2a2(start_accuracy: float) -> dict[str, float]:
        qat = prepare(fp32, LayerPlan(default=QuantSpec(weight_bits=2, act_bits=2)), digits.example())
        train.calibrate(qat, digits.train_loader(64), 2)
        return train.finetune(qat, digits.train_loader(64), digits.test_loader(),
                              FineTuneConfig(max_steps=1, lr=1e-9, guard=False), lambda e: None,
                              start_accuracy=start_accuracy)[0]

    metrics = finetune_w2a2(start_accuracy=chance + 0.1)
    assert metrics["accuracy"] < chance + train.COLLAPSE_MARGIN  # at chance, yet not called a collapse
    with pytest.raises(TrainingError, match="collapsed to chance"):
        finetune_w2a2(start_accuracy=0.99)


class CancelAfter:
    def __init__(self, n):
        self.n = n

    def is_set(self):
        self.n -= 1
        return self.n < 0


def test_cancel_stops_the_run_and_keeps_nothing_half_written(workspace, digits_run):
    with pytest.raises(CancelledError):
        runner.execute(quick_config(), workspace, cancel=CancelAfter(5))
    record = workspace.list()[0]
    assert record["status"] == "cancelled"
    assert sorted(p.name for p in workspace.run_dir(record["id"]).iterdir()) == ["config.yaml", "events.jsonl",
                                                                                  "run.json"]


def test_float_layers_are_reported_by_name(digits):
    fp32 = _trained_cnn(digits, steps=5)
    plan = LayerPlan.model_validate({"overrides": {"conv2.conv": {"weight_bits": "off"}}})
    qat = prepare(fp32, plan, digits.example())
    assert qat.float_layers == {"conv2.conv": "weight bits are off in the plan"}
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.BatchNorm2d(4))
    qat = prepare(model, LayerPlan(), torch.zeros(2, 1, 8, 8))
    assert "cannot be folded" in qat.float_layers["2"]


def test_frozen_ranges_stop_moving(digits):
    fp32 = _trained_cnn(digits, steps=5)
    qat = prepare(fp32, LayerPlan(default=QuantSpec(range_method="moving_average")), digits.example())
    train.calibrate(qat, digits.train_loader(64), 2)
    before = [q.scale.clone() for q in quantizers(qat)]
    train.finetune(qat, digits.train_loader(64), digits.test_loader(), FineTuneConfig(max_steps=5, freeze_ranges_epoch=0),
                   lambda e: None)
    assert all(torch.equal(a, q.scale) for a, q in zip(before, quantizers(qat)))
    qat2 = copy.deepcopy(qat)
    train.finetune(qat2, digits.train_loader(64), digits.test_loader(), FineTuneConfig(max_steps=5), lambda e: None)
    assert not all(torch.equal(a, q.scale) for a, q in zip(before, quantizers(qat2)))


def test_cuda_without_a_gpu_is_a_clear_error(workspace):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = quick_config().model_copy(update={"device": "cuda"})
    with pytest.raises(ConfigError, match="device: cuda was asked for, but PyTorch sees no CUDA GPU"):
        runner.execute(config, workspace)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_finetune_on_cuda_matches_the_cpu_pipeline(workspace):
    record = workspace.get(runner.execute(quick_config(max_steps=20).model_copy(update={"device": "cuda"}), workspace))
    assert record["status"] == "done" and record["metrics"]["qat"]["accuracy"] > 0.9
    assert runner.load(workspace, record["id"]).qat(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
