"""Calibration at the peers' speed, with the ranges it always had: the MSE search picks what scoring every
candidate on every element picks (the reference below), while touching a large batch only a few times, and
a weight's range is searched once per calibration."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from qat_core import observers, runner, train
from qat_core.prepare import prepare
from qat_core.quant_math import fake_quantize, qparams_from_minmax
from qat_core.quantizers import FakeQuantizer
from tests.plugins import third_party


def exhaustive_mse_range(x: torch.Tensor, qmin: int, qmax: int, symmetric: bool,
                         axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference (the search as it was): every clip ratio scored on every element, the first of equal
    errors kept."""
    lo, hi = observers._minmax(x, axis)
    dims = None if axis is None else [d for d in range(x.dim()) if d != axis]
    best_err, best = None, None
    for ratio in torch.linspace(observers.MSE_LOWEST_RATIO, 1.0, observers.MSE_CANDIDATES):
        scale, zp = qparams_from_minmax(lo * ratio, hi * ratio, qmin, qmax, symmetric)
        err = (fake_quantize(x, scale, zp, qmin, qmax, axis) - x).pow(2)
        err = err.sum() if dims is None else err.sum(dim=dims)
        if best_err is None:
            best_err, best = err, torch.full_like(hi, float(ratio))
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, float(ratio), best)
    return lo * best, hi * best


def quantizer_inputs(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[FakeQuantizer, torch.Tensor]]:
    """What each quantizer of a prepared model sees on batch ``x``, in eval mode (as calibration runs it)."""
    seen: list[tuple[FakeQuantizer, torch.Tensor]] = []
    handles = [q.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0].detach().float())))
               for q in train.quantizers(model)]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return seen


def default_plan():
    return runner.default_config("digits-cnn").plan.model_copy(update={"overrides": {}})


def assert_exhaustive_ranges(seen: list[tuple[FakeQuantizer, torch.Tensor]]) -> None:
    for q, x in seen:
        observer = observers.Observer("mse", q.qmin, q.qmax, q.symmetric, q.axis)
        lo, hi = observer._mse_range(x)
        expected = exhaustive_mse_range(x, q.qmin, q.qmax, q.symmetric, q.axis)
        torch.testing.assert_close((lo, hi), expected, atol=0, rtol=0)


def test_mse_ranges_of_a_trained_zoo_model_are_the_exhaustive_searchs(workspace, digits_run):
    loaded = runner.load(workspace, digits_run)
    x, _ = next(iter(loaded.data.train_loader(64, False, 0)))
    seen = quantizer_inputs(loaded.ptq, x)
    assert any(q.axis is not None for q, _ in seen) and any(q.axis is None for q, _ in seen)
    assert_exhaustive_ranges(seen)


def test_mse_ranges_of_a_torchvision_model_are_the_exhaustive_searchs():
    """mobilenet_v2 at 128 px: its early activations (1-2M elements a batch) take the sampled search."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 128, 128)
    model = prepare(third_party.torchvision_model("mobilenet_v2").eval(), default_plan(), x[:2])
    train.calibrate(model, [(x, None)], 1)  # what each quantizer sees then: its calibrated inputs, not codes of 1.0
    seen = quantizer_inputs(model, x)
    large = [t for q, t in seen if q.axis is None and t.numel() > 4 * observers.MSE_SAMPLE]
    assert len(large) >= 5 and all(bool(t.amax() > t.amin()) for t in large)
    assert_exhaustive_ranges(seen)


def heavy_tailed(n: int = 1 << 21) -> torch.Tensor:
    """A ReLU-like batch whose few large values sit where a strided sample of it never looks."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g).abs() * 0.01
    stride = n // observers.MSE_SAMPLE + 1
    x[1::stride * 97] = 0.2 + torch.rand(len(range(1, n, stride * 97)), generator=g)
    return x


@pytest.mark.parametrize("symmetric,qmin,qmax", [(True, 0, 255), (False, 0, 255), (True, 0, 15)])
def test_the_sampled_search_keeps_a_heavy_tail_it_cannot_sample(symmetric, qmin, qmax):
    x = heavy_tailed()
    torch.testing.assert_close(observers.Observer("mse", qmin, qmax, symmetric)._mse_range(x),
                               exhaustive_mse_range(x, qmin, qmax, symmetric), atol=0, rtol=0)


def test_a_large_batch_with_nothing_above_its_samples_largest_values():
    """A saturated batch (every value at the maximum a ReLU6 lets through, say): the stratified estimate's set
    of large values is empty."""
    x = torch.full((1 << 20,), 6.0)
    x[::3] = 0.0
    torch.testing.assert_close(observers.Observer("mse", 0, 255, True)._mse_range(x),
                               exhaustive_mse_range(x, 0, 255, True), atol=0, rtol=0)


class CountRounded(TorchFunctionMode):
    """Elements rounded, by tensor size: one per candidate and element scored."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.round, torch.Tensor.round, torch.Tensor.round_):
            self.elements += args[0].numel()
        return func(*args, **(kwargs or {}))


def test_a_large_batch_is_scored_whole_for_a_few_candidates_only():
    x = heavy_tailed(1 << 22)
    with CountRounded() as counted:
        observers.Observer("mse", 0, 255, True).update(x)
    # every candidate on about 2 × MSE_SAMPLE elements, and three on the whole batch (24 on it before)
    assert counted.elements <= (2 * observers.MSE_RESCORED + 1) * x.numel() + \
        observers.MSE_CANDIDATES * 3 * observers.MSE_SAMPLE


def test_calibration_searches_a_weights_range_once_and_activations_every_batch():
    torch.manual_seed(0)
    x = torch.randn(12, 3, 32, 32)
    model = prepare(third_party.torchvision_model("resnet18").eval(), default_plan(), x[:2])
    qs = train.quantizers(model)
    counts = {id(q): 0 for q in qs}
    for q in qs:
        q.register_forward_pre_hook(lambda mod, args: counts.__setitem__(id(mod), counts[id(mod)] + mod.observing))
    train.calibrate(model, [(x[i:i + 4], None) for i in range(0, 12, 4)], 3)
    assert {counts[id(q)] for q in qs if q.signed} == {1}
    assert {counts[id(q)] for q in qs if not q.signed} == {3}
    weight_ranges = [(q.scale.clone(), q.zero_point.clone()) for q in qs if q.signed]
    train.calibrate(model, [(x[4:8], None)], 1)  # another batch: the weights' ranges are the same
    for (scale, zp), q in zip(weight_ranges, [q for q in qs if q.signed]):
        torch.testing.assert_close((q.scale, q.zero_point), (scale, zp), atol=0, rtol=0)


class RecordThreads(TorchFunctionMode):
    """The intra-op thread count at every torch call made under it."""

    def __init__(self):
        super().__init__()
        self.threads: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.threads.add(torch.get_num_threads())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("axis", [None, 0])
def test_the_mse_search_runs_on_one_thread_and_gives_the_others_back(axis):
    """Its hundreds of short passes each wait at a barrier for a second thread (10x slower on 2 busy cores)."""
    x, before = heavy_tailed(1 << 20).reshape(64, -1), torch.get_num_threads()
    observer = observers.Observer("mse", -128 if axis == 0 else 0, 127 if axis == 0 else 255, True, axis)
    torch.set_num_threads(2)
    try:
        with RecordThreads() as seen:
            observer._mse_range(x)
        assert seen.threads == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


class CountConvolutions(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func in (torch.conv2d, torch.nn.functional.conv2d)
        return func(*args, **(kwargs or {}))


def test_prepare_runs_the_model_four_times_at_most():
    """The trace (which computes the graph's output at the example), the model at the example, and the model
    and its graph at batch size 1: no second run of the graph at the example, no conv run again to check it."""
    model, x, plan = third_party.torchvision_model("resnet18").eval(), torch.randn(2, 3, 32, 32), default_plan()
    with CountConvolutions() as once, torch.no_grad():
        model(x)
    with CountConvolutions() as counted:
        prepare(model, plan, x)
    assert counted.calls <= 4 * once.calls
