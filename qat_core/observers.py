"""Range estimators: statistics of a tensor → (scale, zero point).

Observers are kept apart from the quantizer that uses them (as in ``torch.ao``): a quantizer
asks its observer for qparams after calibration batches, or every step for moving averages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from qat_core.quant_math import qparams_from_minmax

MSE_CANDIDATES = 24  # clip ratios tried by the MSE search, from MSE_LOWEST_RATIO to 1
MSE_LOWEST_RATIO = 0.2
MSE_SAMPLE = 1 << 16  # elements of a large batch that every candidate is scored on (per-tensor ranges)
MSE_RESCORED = 1  # candidates each side of the estimate's best scored again on the whole batch
MSE_BLOCK = 1 << 20  # candidate × element errors computed at once: two 4 MB buffers, and few enough passes
EMA_MOMENTUM = 0.01  # moving-average update weight (torch.ao's default averaging constant)
PERCENTILE_SAMPLE = 1 << 20  # elements sampled per batch for the percentile (keeps it O(1) memory)


def subsample(flat: torch.Tensor, size: int) -> torch.Tensor:
    """At most about ``size`` elements of a 1-D tensor, at a fixed stride: deterministic and O(1) memory."""
    if flat.numel() <= size:
        return flat
    return flat[:: flat.numel() // size + 1]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One intra-op thread for the MSE search (this thread's setting; restored after).

    The search is hundreds of short passes over a few MB: with a second thread each pass waits at an
    OpenMP barrier, and on 2 shared cores with anything else running that wait is a scheduler slice,
    so calibrating resnet18 took over 10x longer with 2 threads than with 1.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _minmax(x: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if axis is None:
        lo, hi = torch.aminmax(x)
        return lo, hi
    flat = x.transpose(0, axis).reshape(x.shape[axis], -1)  # (C, N)
    lo, hi = torch.aminmax(flat, dim=1)
    return lo, hi


class Observer:
    """Collects statistics over batches; ``qparams()`` turns them into scale and zero point.

    ``method``: "minmax" (running extremes), "moving_average" (EMA of batch extremes),
    "percentile" (running mean of batch percentiles), "mse" (running mean of the clip range that
    minimises the batch's fake-quantization MSE; also LSQ's initial step size).
    """

    def __init__(self, method: str, qmin: int, qmax: int, symmetric: bool, axis: int | None = None,
                 percentile: float = 99.99):
        self.method = "mse" if method == "lsq" else method
        self.qmin, self.qmax, self.symmetric, self.axis = qmin, qmax, symmetric, axis
        self.percentile = percentile
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.batches = 0

    def reset(self) -> None:
        self.lo = self.hi = None
        self.batches = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.method == "percentile":
            lo, hi = self._percentile(x)
        elif self.method == "mse":
            lo, hi = self._mse_range(x)
        else:
            lo, hi = _minmax(x, self.axis)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        elif self.method == "minmax":
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)
        elif self.method == "moving_average":
            self.lo = self.lo + EMA_MOMENTUM * (lo - self.lo)
            self.hi = self.hi + EMA_MOMENTUM * (hi - self.hi)
        else:  # percentile, mse: running mean over batches
            w = 1.0 / (self.batches + 1)
            self.lo, self.hi = self.lo + w * (lo - self.lo), self.hi + w * (hi - self.hi)
        self.batches += 1

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise RuntimeError("observer has seen no data")
        return qparams_from_minmax(self.lo, self.hi, self.qmin, self.qmax, self.symmetric)

    def _percentile(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
        if self.axis is None:
            lo, hi = torch.quantile(subsample(x.reshape(-1), PERCENTILE_SAMPLE), q)
            return lo, hi
        flat = x.transpose(0, self.axis).reshape(x.shape[self.axis], -1)
        bounds = torch.quantile(flat, q, dim=1)  # (2, C)
        return bounds[0], bounds[1]

    @_one_thread()
    def _mse_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shrink the min-max range by the ratio that minimises ||x - fq(x)||^2 (per channel).

        A per-channel (weight) search scores every candidate on every element. A per-tensor search of a
        large batch first estimates each candidate's error from a sample (:func:`_sampled_errors`), then
        scores the estimate's best and its ``MSE_RESCORED`` neighbours each side on the whole batch: the
        choice scoring every candidate on the whole batch makes, wherever the estimate's best is that close.
        """
        lo, hi = _minmax(x, self.axis)
        if self.axis is None:
            rows = x.reshape(1, -1)  # (1, N)
        else:
            rows = x.transpose(0, self.axis).reshape(x.shape[self.axis], -1)  # (C, N)
        ratios = torch.linspace(MSE_LOWEST_RATIO, 1.0, MSE_CANDIDATES, device=x.device).reshape(-1, 1)  # (K, 1)
        scale, zp = qparams_from_minmax(lo.reshape(1, -1) * ratios, hi.reshape(1, -1) * ratios,
                                        self.qmin, self.qmax, self.symmetric)  # (K, C)
        if self.axis is None and rows.shape[1] > 4 * MSE_SAMPLE:
            estimate = _sampled_errors(rows[0], scale, zp, self.qmin, self.qmax, bool(lo >= 0))
            first = max(0, int(estimate.argmin()) - MSE_RESCORED)
            near = slice(first, min(MSE_CANDIDATES, first + 2 * MSE_RESCORED + 1))
            best = first + _squared_errors(rows, scale[near], zp[near], self.qmin, self.qmax).argmin(0)
        else:
            best = _squared_errors(rows, scale, zp, self.qmin, self.qmax).argmin(0)  # the first of equal errors
        best = ratios.reshape(-1)[best].reshape(hi.shape)  # (C,)
        return lo * best, hi * best


def _sampled_errors(flat: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                    qmax: int, non_negative: bool) -> torch.Tensor:
    """An estimate of :func:`_squared_errors` over ``flat`` (N,) from about 2 × ``MSE_SAMPLE`` elements.

    Stratified: the largest magnitudes (where clipping errors are, which a plain sample misses in a
    heavy-tailed batch) are all scored; the rest by a strided sample weighted by how many it stands for.
    ``non_negative`` (the batch's minimum is 0 or more: after a ReLU) skips a pass that takes magnitudes.
    """
    sample = subsample(flat, MSE_SAMPLE)
    threshold = sample.abs().kthvalue(max(1, sample.numel() - MSE_SAMPLE * sample.numel() // flat.numel())).values
    large = flat[(flat if non_negative else flat.abs()) > threshold]
    body = sample[sample.abs() <= threshold]
    err = _squared_errors(large.reshape(1, -1), scale, zero_point, qmin, qmax)
    if body.numel():
        weight = (flat.numel() - large.numel()) / body.numel()
        err += weight * _squared_errors(body.reshape(1, -1), scale, zero_point, qmin, qmax)
    return err


def _squared_errors(rows: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int,
                    qmax: int) -> torch.Tensor:
    """(K, C) sums over each row of ``rows`` (C, N) of (x - fq(x))^2 for K candidate qparams (K, C), a
    block of ``MSE_BLOCK`` candidate-elements at a time.

    With ``v = x * (1/s) + z`` as :func:`fake_quantize` rounds it and ``q`` its code, ``fq(x) - x = s * (q - v)``:
    six passes a block (seven with an offset) into two buffers used again for every block, where quantizing,
    dequantizing and subtracting took seven to nine into a fresh tensor each block.
    """
    inv = (1.0 / scale).unsqueeze(-1)  # (K, C, 1)
    z = zero_point.round().clamp(qmin, qmax).unsqueeze(-1)
    offset = bool(z.any())  # a zero offset skips its pass, as fake_quantize's does
    err = torch.zeros(scale.shape, dtype=torch.float64, device=scale.device)
    step = max(1, min(rows.shape[1], MSE_BLOCK // scale.numel()))
    # a fresh 4 MB tensor costs its page faults again (about 120 here: more than the pass itself)
    v_buf, d_buf = (torch.empty(*scale.shape, step, dtype=rows.dtype, device=rows.device) for _ in range(2))
    for start in range(0, rows.shape[1], step):
        block = rows[:, start:start + step]  # (C, n)
        v, d = v_buf[..., :block.shape[1]], d_buf[..., :block.shape[1]]
        torch.mul(block, inv, out=v)  # (K, C, n)
        if offset:
            v.add_(z)
        torch.clamp(v, qmin, qmax, out=d).round_().sub_(v)  # q - v (round and clamp commute: integer bounds)
        err += d.square_().sum(-1)
    return err * scale.double().square()
