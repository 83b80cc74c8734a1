"""Numerics: our fake quantization against PyTorch's reference kernels (bit for bit), LSQ's
gradients against the paper's formulas, and the closed forms of the qparam helpers."""

import pytest
import torch
from torch.testing import assert_close

from qat_core.quant_math import (
    dequantize,
    lsq_fake_quantize,
    lsq_grad_scale,
    qparams_from_minmax,
    qrange,
    quantize,
    sqnr_db,
)
from qat_core.quantizers import FakeQuantizer

EXACT = {"atol": 0, "rtol": 0}


@pytest.mark.parametrize("bits,signed", [(8, False), (8, True), (4, False), (4, True), (2, True), (3, False)])
def test_formula_matches_torch_per_tensor(bits, signed):
    torch.manual_seed(bits)
    x = torch.randn(4096) * 3
    qmin, qmax = qrange(bits, signed)
    scale, zp = torch.tensor(0.0731), torch.tensor(float(qmin + (qmax - qmin) // 3))
    ours = dequantize(quantize(x, scale, zp, qmin, qmax), scale, zp)
    ref = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zp), qmin, qmax)
    assert_close(ours, ref, **EXACT)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_formula_matches_torch_per_channel(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    qmin, qmax = qrange(bits, signed=True)
    scale = torch.rand(16) * 0.1 + 0.01
    zp = torch.zeros(16)
    ours = dequantize(quantize(w, scale, zp, qmin, qmax, axis=0), scale, zp, axis=0)
    ref = torch.fake_quantize_per_channel_affine(w, scale, zp.int(), 0, qmin, qmax)
    assert_close(ours, ref, **EXACT)


@pytest.mark.parametrize("method", ["minmax", "moving_average", "percentile", "mse", "lsq"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fake_quantizer_forward_is_the_reference_kernel(method, per_channel):
    """Every quantizer mode (incl. LSQ in training) computes exactly torch's fake quantization."""
    torch.manual_seed(1)
    w = torch.randn(8, 4, 3, 3)
    fq = FakeQuantizer(4, signed=True, symmetric=True, method=method, channels=8 if per_channel else 1,
                       axis=0 if per_channel else None)
    fq.observe(w)
    fq.train()
    out = fq(w)
    scale, zp = fq.scale.detach(), fq.zero_point.detach().int()
    if per_channel:
        ref = torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -8, 7)
    else:
        ref = torch.fake_quantize_per_tensor_affine(w, float(scale), int(zp), -8, 7)
    assert_close(out, ref, **EXACT)


def test_lsq_gradients_follow_the_paper():
    """Esser et al. 2020, eq. 3 and sec. 2.2: dL/ds = g·Σ dL/dy·(round(v)−v) inside the range,
    g·Σ dL/dy·(−Qn or Qp) outside; dL/dx = dL/dy inside, 0 outside (straight-through).
    "Inside" tests the rounded code, as PyTorch's kernels do (see lsq_fake_quantize)."""
    torch.manual_seed(2)
    x = (torch.randn(1000) * 2).requires_grad_()
    s = torch.tensor([0.25], requires_grad=True)
    z = torch.zeros(1)
    qmin, qmax = qrange(3, signed=True)  # [-4, 3]
    g = lsq_grad_scale(x.numel(), qmax)
    upstream = torch.randn(1000)
    lsq_fake_quantize(x, s, z, qmin, qmax, g).backward(upstream)

    v = x.detach() / s.detach()
    inside = (v.round() >= qmin) & (v.round() <= qmax)
    step_grad = torch.where(inside, v.round() - v, torch.where(v < 0, torch.tensor(float(qmin)), torch.tensor(float(qmax))))
    assert_close(s.grad, (upstream * step_grad).sum().reshape(1) * g, rtol=1e-5, atol=1e-6)
    assert_close(x.grad, upstream * inside, **EXACT)
    assert g == pytest.approx(1 / (1000 * 3) ** 0.5)


def test_lsq_per_channel_gradients():
    torch.manual_seed(3)
    w = torch.randn(4, 50).requires_grad_()
    s = torch.tensor([0.1, 0.2, 0.3, 0.4], requires_grad=True)
    qmin, qmax = qrange(2, signed=True)
    g = lsq_grad_scale(50, qmax)
    upstream = torch.randn(4, 50)
    lsq_fake_quantize(w, s, torch.zeros(4), qmin, qmax, g, axis=0).backward(upstream)
    v = w.detach() / s.detach()[:, None]
    inside = (v.round() >= qmin) & (v.round() <= qmax)
    step_grad = torch.where(inside, v.round() - v, v.round().clamp(qmin, qmax))
    assert_close(s.grad, (upstream * step_grad).sum(dim=1) * g, rtol=1e-5, atol=1e-6)


def test_qparams_symmetric_unsigned_after_relu_and_signed():
    scale, zp = qparams_from_minmax(torch.tensor(0.0), torch.tensor(2.55), 0, 255, symmetric=True)
    assert float(zp) == 0 and float(scale) == pytest.approx(0.01)  # ReLU output: the full code range
    scale, zp = qparams_from_minmax(torch.tensor(-1.0), torch.tensor(0.5), 0, 255, symmetric=True)
    assert float(zp) == 128 and float(scale) == pytest.approx(1 / 128)  # signed tensor on uint8: mid-range
    scale, zp = qparams_from_minmax(torch.tensor(-1.0), torch.tensor(3.0), 0, 15, symmetric=False)
    assert float(scale) == pytest.approx(4 / 15) and float(zp) == 4  # round(1 / (4/15)) = round(3.75)


def test_sqnr_of_full_scale_uniform_signal_is_the_closed_form():
    torch.manual_seed(4)
    bits = 6
    x = torch.rand(200_000) * 2 - 1
    qmin, qmax = qrange(bits, signed=True)
    scale = torch.tensor(2 / (qmax - qmin + 1))
    xq = dequantize(quantize(x, scale, torch.tensor(0.0), qmin, qmax), scale, torch.tensor(0.0))
    assert sqnr_db(x, xq) == pytest.approx(6.02 * bits, abs=0.3)  # uniform signal: 6.02 b dB (the +1.76 is for sines)


def test_lsq_with_a_learned_offset_matches_pytorchs_learnable_kernels():
    """LSQ+ (asymmetric): output exact, gradients of x, step and offset as PyTorch's own kernels."""
    torch.manual_seed(5)
    for axis in (None, 0):
        shape = (1,) if axis is None else (8,)
        x = (torch.randn(8, 50) * 3).requires_grad_()
        s = (torch.rand(shape) * 0.2 + 0.05).requires_grad_()
        z = torch.full(shape, 3.0, requires_grad=True)
        upstream = torch.randn(8, 50)
        if axis is None:
            ref = torch._fake_quantize_learnable_per_tensor_affine(x, s, z, 0, 15, 0.1)
        else:
            ref = torch._fake_quantize_learnable_per_channel_affine(x, s, z, 0, 0, 15, 0.1)
        ref_grads = torch.autograd.grad(ref, (x, s, z), upstream)
        out = lsq_fake_quantize(x, s, z, 0, 15, 0.1, axis)
        grads = torch.autograd.grad(out, (x, s, z), upstream)
        assert_close(out, ref, **EXACT)
        assert_close(grads[0], ref_grads[0], **EXACT)
        assert_close(grads[1], ref_grads[1], rtol=1e-5, atol=1e-5)
        assert_close(grads[2], ref_grads[2], rtol=1e-5, atol=1e-6)
