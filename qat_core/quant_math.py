"""Pure tensor functions of uniform affine quantization.

For a scale ``s > 0``, an integer zero point ``z`` and an integer range ``[qmin, qmax]``::

    q     = clamp(round(x / s + z), qmin, qmax)        # quantize (round half to even)
    x_hat = (q - z) * s                                # dequantize
    fake_quantize(x) = x_hat, with the straight-through estimator:
        d x_hat / d x = 1 where qmin <= round(x/s + z) <= qmax, else 0

Per-channel variants take ``s``/``z`` of shape ``(C,)`` and the channel ``axis`` of ``x``.
Weights use signed ranges ``[-2^(b-1), 2^(b-1)-1]``; activations are stored unsigned,
``[0, 2^b - 1]`` (zero point 0 after a ReLU, mid-range for symmetric signed tensors), which is
what ONNX Runtime's u8 activations × s8 weights integer kernels take.
"""

from __future__ import annotations

import torch

EPS = 1e-8  # smallest scale: keeps division finite for all-zero tensors


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-wide code: signed (weights) or unsigned (activations)."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def qparams_from_minmax(
    min_val: torch.Tensor, max_val: torch.Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map ``[min_val, max_val]`` (extended to hold 0) onto ``[qmin, qmax]``.

    Symmetric: zero point is the centre of the code range (0 for signed codes, 2^(b-1) for
    unsigned ones; 0 as well for unsigned codes of a non-negative tensor), scale from ``max|x|``.
    """
    min_val = torch.minimum(min_val, torch.zeros_like(min_val))
    max_val = torch.maximum(max_val, torch.zeros_like(max_val))
    if symmetric:
        if qmin < 0 or bool((min_val < 0).any()):
            centre = (qmin + qmax + 1) // 2
            amax = torch.maximum(-min_val, max_val)
            scale = amax / max(qmax - centre, centre - qmin)
            zero_point = torch.full_like(scale, centre)
        else:  # non-negative tensor on an unsigned code: all codes for [0, max]
            scale = max_val / (qmax - qmin)
            zero_point = torch.full_like(scale, qmin)
    else:
        scale = (max_val - min_val) / (qmax - qmin)
        scale = torch.clamp(scale, min=EPS)
        zero_point = torch.clamp(qmin - torch.round(min_val / scale), qmin, qmax)
    return torch.clamp(scale, min=EPS), zero_point


def _shape(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
             axis: int | None = None) -> torch.Tensor:
    """Integer codes (as a float tensor) of ``x``; see the module docstring."""
    s, z = _shape(scale, x, axis), _shape(zero_point, x, axis)
    return torch.clamp(torch.round(x / s + z), qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    return (q - _shape(zero_point, q, axis)) * _shape(scale, q, axis)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  axis: int | None = None) -> torch.Tensor:
    """Quantize-dequantize with the straight-through estimator (PyTorch's fused kernels)."""
    zp = zero_point.round().to(torch.int32)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()).float(), zp.reshape(()), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale.float(), zp, axis, qmin, qmax)


def lsq_grad_scale(numel_per_scale: int, qmax: int) -> float:
    """LSQ's step-size gradient scale g = 1 / sqrt(N * Q_P) (Esser et al., ICLR 2020, sec. 2.2)."""
    return 1.0 / (max(numel_per_scale, 1) * max(qmax, 1)) ** 0.5


def lsq_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                      grad_scale: float, axis: int | None = None) -> torch.Tensor:
    """Fake quantization with a learned step size (LSQ); ``scale`` (and ``zero_point``) get gradients.

    Forward equals :func:`fake_quantize`. Backward, with ``v = x/s + z`` (PyTorch's fused
    learnable kernel, which implements the paper's formulas):
        dL/dx = dL/dy                               where qmin <= round(v) <= qmax, else 0
        dL/ds = g * sum dL/dy * (round(v) - v)      inside the range
                g * sum dL/dy * (qmin - z | qmax - z) outside it
        dL/dz = g * sum dL/dy * (-s)                outside the range, else 0   (LSQ+ offset)
    The range test is on the rounded code, like PyTorch's straight-through kernels; the paper
    tests ``v`` itself, which differs only for values within half a step beyond the range ends.
    """
    if axis is None:
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, scale.reshape(1), zero_point.reshape(1), qmin, qmax, grad_scale)
    return torch._fake_quantize_learnable_per_channel_affine(x, scale, zero_point, axis, qmin, qmax, grad_scale)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum ref^2 / sum (ref - approx)^2)."""
    signal = reference.double().pow(2).sum()
    noise = (reference.double() - approx.double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10.0 * torch.log10(signal / noise))
