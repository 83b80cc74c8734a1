"""Range estimators: statistics of a tensor → (scale, zero point).

Observers are kept apart from the quantizer that uses them (as in ``torch.ao``): a quantizer
asks its observer for qparams after calibration batches, or every step for moving averages.
"""

from __future__ import annotations

import torch

from qat_core.quant_math import fake_quantize, qparams_from_minmax

MSE_CANDIDATES = 24  # clip ratios tried by the MSE search, from MSE_LOWEST_RATIO to 1
MSE_LOWEST_RATIO = 0.2
EMA_MOMENTUM = 0.01  # moving-average update weight (torch.ao's default averaging constant)
PERCENTILE_SAMPLE = 1 << 20  # elements sampled per batch for the percentile (keeps it O(1) memory)


def _reduce_dims(x: torch.Tensor, axis: int | None) -> tuple[int, ...] | None:
    if axis is None:
        return None
    return tuple(d for d in range(x.dim()) if d != axis)


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
            flat = x.reshape(-1)
            if flat.numel() > PERCENTILE_SAMPLE:  # a fixed stride: deterministic and O(1) memory
                flat = flat[:: flat.numel() // PERCENTILE_SAMPLE + 1]
            lo, hi = torch.quantile(flat, q)
            return lo, hi
        flat = x.transpose(0, self.axis).reshape(x.shape[self.axis], -1)
        bounds = torch.quantile(flat, q, dim=1)  # (2, C)
        return bounds[0], bounds[1]

    def _mse_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shrink the min-max range by the ratio that minimises ||x - fq(x)||^2 (per channel)."""
        lo, hi = _minmax(x, self.axis)
        dims = _reduce_dims(x, self.axis)
        best_err, best_ratio = None, torch.ones_like(hi)
        for ratio in torch.linspace(MSE_LOWEST_RATIO, 1.0, MSE_CANDIDATES):
            scale, zp = qparams_from_minmax(lo * ratio, hi * ratio, self.qmin, self.qmax, self.symmetric)
            err = (fake_quantize(x, scale, zp, self.qmin, self.qmax, self.axis) - x).pow(2)
            err = err.sum() if dims is None else err.sum(dim=dims)
            if best_err is None:
                best_err = err
                best_ratio = torch.full_like(hi, float(ratio))
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_ratio = torch.where(better, torch.full_like(hi, float(ratio)), best_ratio)
        return lo * best_ratio, hi * best_ratio
