"""ONNX Runtime's integer arithmetic, in torch: what the exported int8 model computes, code for code.

The QAT model trains with fake quantization: float ops on dequantized values, rounded to the
output grid. ONNX Runtime's CPU kernels compute differently — an exact int32 sum, then one float32
multiply and a round — so near a rounding boundary the two differ by one code, and over a deep
network an image can flip. These functions compute what the kernels compute, so a run's evaluation
(``QATModel.integer_arithmetic``) reports the accuracy the int8 model will have once deployed.

Each formula follows ONNX Runtime's CPU kernels on x86-64 (MLAS; checked bit for bit against
onnxruntime 1.32 on AVX2): ``f32(·)`` rounds to float32, ``rne`` rounds half to even.

    QuantizeLinear       q = clamp(rne(f32(x / s)) + z, 0, 255)                (a division, not x * (1/s))
    DequantizeLinear     x = f32((q - z) * s)
    requantize           q = clamp(rne(f32(f32(acc) * M)) + z_y, 0, 255)      (acc: the exact int32 sum)
    QLinearConv, QGemm   M = f32(f32(s_x * s_w) / s_y), acc = sum (x - z_x)(w - z_w) + bias (int32)
    QGemm, float output  y = f32(f32(acc) * f32(s_x * s_w))
    QLinearMatMul        as QGemm, without bias
    QLinearAdd           r_a = f32(s_a / s_c), r_b = f32(s_b / s_c),
                         k = f32(z_c - fma(r_a, z_a, f32(r_b * z_b))), q = rne(fma(a, r_a, fma(b, r_b, k)))
    QLinearMul           q = rne(f32(f32((a - z_a)(b - z_b) * f32(f32(s_a * s_b) / s_c)) + z_c))
    QLinearGlobalAvgPool acc = sum x - z_x * N, M = f32(s_x / f32(s_y * N))
    QLinearSoftmax       a table of exp over code differences, summed in order, scaled by floor(1/s_y)

An activation narrower than 8 bits is then clipped to its own codes (``Clip`` after QuantizeLinear
in the export). Ops without an integer kernel (LayerNorm, GELU, a mean over tokens) run in float
between DequantizeLinear and QuantizeLinear, as they do here; their float rounding can differ from
ONNX Runtime's by a unit in the last place. Weights are exact: the export stores them as the codes
computed here, and on a CPU without VNNI stores any that could saturate its 16-bit pair sums as
uint8 (see ``cpu``), so every accumulation is exact.

At the speed of the fake-quantized forward: the exact sums run in float32 wherever a bound proves
every partial sum a whole number float32 holds (``_accumulate``), and QLinearAdd / QLinearMul read
a table of their formula over all code pairs (``_by_table``).
"""

from __future__ import annotations

import math
import operator
import platform
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

UINT8 = (0, 255)  # activations are stored as uint8 whatever their width

# modules and functions that only move or pick values: their output keeps the input's codes
MOVING_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                  nn.AlphaDropout, nn.Identity, nn.Flatten, nn.Unflatten, nn.ChannelShuffle, nn.PixelShuffle,
                  nn.PixelUnshuffle, nn.ZeroPad2d)
MOVING_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
                    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                    torch.chunk, torch.split, torch.narrow, torch.select, torch.flip, torch.roll, torch.t,
                    torch.movedim, torch.swapaxes, torch.channel_shuffle, F.pixel_shuffle, F.pixel_unshuffle,
                    operator.getitem}
MOVING_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous",
                  "expand", "expand_as", "view_as", "reshape_as", "chunk", "split", "narrow", "select", "flip",
                  "roll", "t", "movedim", "swapaxes", "repeat", "unfold", "clone", "detach", "to", "float",
                  "unbind"}
# arithmetic with its neutral element (timm MobileOne's ``scale_out + 0`` in a block without an identity branch):
# its output is its input, so it keeps the input's codes. A quantizer of its own would stand back to back with the
# input's (Q→DQ→Q→DQ), which ONNX Runtime merges into one rounding on a third scale (DoubleQDQPairsRemover)
NEUTRAL_ELEMENT = {"add": 0, "iadd": 0, "radd": 0, "mul": 1, "imul": 1, "rmul": 1, "sub": 0, "isub": 0,
                   "truediv": 1, "itruediv": 1, "div": 1}
COMMUTATIVE = {"add", "iadd", "radd", "mul", "imul", "rmul"}


@dataclass(frozen=True)
class Grid:
    """One activation's quantization: ``x = (q - zero_point) * scale`` for codes ``qmin <= q <= qmax``."""

    scale: float  # a float32 value
    zero_point: int
    qmin: int
    qmax: int

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """QuantizeLinear, then the Clip of a narrow activation: codes as a float tensor."""
        q = torch.round(x.float() / self.scale) + self.zero_point
        return q.clamp_(*UINT8).clamp_(self.qmin, self.qmax)

    def values(self, q: torch.Tensor) -> Quantized:
        """DequantizeLinear of codes ``q`` (already on this grid)."""
        return Quantized.wrap((q - self.zero_point) * _f32(self.scale), self)

    def requantize(self, acc: torch.Tensor, multiplier: torch.Tensor) -> Quantized:
        """An integer sum ``acc`` (exact in float64, or already rounded to float32) → this grid's codes:
        one float32 multiply, then round. Clamped as centred codes (``q - z``, whole numbers within
        ±255, so moving ``z`` across the clamp is exact) and scaled in place: one pass each."""
        low, high = max(self.qmin, UINT8[0]) - self.zero_point, min(self.qmax, UINT8[1]) - self.zero_point
        f = (acc.to(torch.float32) * multiplier).round_().clamp_(low, high)
        return Quantized.wrap(f.mul_(_f32(self.scale)), self)


class Quantized(torch.Tensor):
    """An activation as the int8 model holds it: its values are ``(q - z) * s`` of codes ``q`` on
    ``grid``. Ops that only move values (views, slicing, max-pool) keep the grid; any other op
    returns a plain tensor."""

    grid: Grid

    @staticmethod
    def wrap(values: torch.Tensor, grid: Grid) -> Quantized:
        t = values.as_subclass(Quantized)
        t.grid = grid
        return t

    def codes(self) -> torch.Tensor:
        """The codes, as a float tensor."""
        return self.centred().add_(self.grid.zero_point)

    def centred(self) -> torch.Tensor:
        """``q - z`` as a float tensor (exact: ``x / s`` of ``x = (q - z) * s`` rounds back to ``q - z``)."""
        with torch._C.DisableTorchFunctionSubclass():
            return torch.div(self, self.grid.scale).round_()

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        source = next((a for a in args if isinstance(a, Quantized)), None)
        if source is None or not _moves_values(func, source, out, args, kwargs or {}):
            return out
        if isinstance(out, torch.Tensor):
            return cls.wrap(out, source.grid)
        if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
            return type(out)(cls.wrap(o, source.grid) for o in out)
        return out


def is_neutral_arithmetic(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether ``name(*args, **kwargs)`` adds or subtracts the number 0, or multiplies or divides by 1."""
    name = name.strip("_")
    if name not in NEUTRAL_ELEMENT or kwargs or len(args) != 2:
        return False
    numbers = args[::-1] if name in COMMUTATIVE else args[1:]
    return any(isinstance(c, (int, float)) and not isinstance(c, bool) and c == NEUTRAL_ELEMENT[name]
               for c in numbers)


def _moves_values(func: Any, source: torch.Tensor, out: Any, args: tuple, kwargs: dict) -> bool:
    if func in MOVING_FUNCTIONS:
        return True
    name = getattr(func, "__name__", "")
    if is_neutral_arithmetic(name, args, kwargs):
        return isinstance(out, torch.Tensor) and out.dtype == source.dtype
    if name == "__getitem__" or (name in MOVING_METHODS and getattr(torch.Tensor, name, None) is func):
        return not isinstance(out, torch.Tensor) or out.dtype == source.dtype
    return isinstance(out, torch.Tensor) and out.dtype == source.dtype and \
        out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()  # dropout in eval, identity


def _f32(v: float | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float32)


def quantize_linear(x: torch.Tensor, grid: Grid) -> Quantized:
    """ONNX Runtime's QuantizeLinear of a float tensor (then a narrow activation's Clip)."""
    return grid.values(grid.codes(x))


def weight_codes(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                 axis: int | None) -> torch.Tensor:
    """The integer weights the export stores: ``clamp(rint(w * (1/s)) + z, qmin, qmax)`` in float32 —
    PyTorch's fake-quantization formula, so they are the weights the model trained with."""
    s, z = scale.detach().float(), zero_point.detach().round()
    if axis is not None:
        shape = [1] * w.dim()
        shape[axis] = -1
        s, z = s.reshape(shape), z.reshape(shape)
    return (torch.round(w.detach().float() * (1.0 / s)) + z).clamp(qmin, qmax)


def bias_codes(bias: torch.Tensor, input_scale: float, weight_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int32 bias of an integer conv or gemm, and its scale ``f32(s_x * s_w)`` (one per channel)."""
    scale = _f32(input_scale) * weight_scale.detach().float().reshape(-1)
    scale = scale.expand(bias.shape[0]) if scale.numel() == 1 else scale
    codes = torch.round(bias.detach().double() / scale.double()).clamp(-(2**31), 2**31 - 1)
    return codes, scale


@dataclass(frozen=True)
class Weights:
    """A layer's integer weights: codes, zero points and scales (per tensor, or one per output channel)."""

    codes: torch.Tensor
    zero_point: torch.Tensor
    scale: torch.Tensor

    @cached_property
    def centred(self) -> torch.Tensor:  # (C_out, ...) float32: w - z_w, whole numbers within ±255
        z = self.zero_point.detach().round().float().reshape([-1] + [1] * (self.codes.dim() - 1))
        return self.codes.float() - z if z.any() else self.codes.float()

    @cached_property
    def reach(self) -> torch.Tensor:  # (C_out, C_in) float64: Σ|w - z_w| of the first i inputs, over a kernel's taps
        c = self.centred.abs()
        return (c.flatten(2).sum(2) if c.dim() > 2 else c).double().cumsum(1)

    def channel(self, dims: int) -> list[int]:
        return [1, -1] + [1] * (dims - 2)


EXACT = 2**24  # float32 holds every whole number up to 2^24: a sum whose partial sums all stay within it is exact
INT32 = 2**31


def _multiplier(input_scale: float, weights: Weights, output: Grid | None, dims: int) -> torch.Tensor:
    m = _f32(input_scale) * weights.scale.detach().float().reshape(-1)
    if output is not None:
        m = m / _f32(output.scale)
    return m.reshape(weights.channel(dims)) if m.numel() > 1 else m.reshape(())


def _extent(grid: Grid) -> int:
    """The largest ``|q - z|`` of an activation on ``grid``."""
    return max(grid.zero_point - max(grid.qmin, UINT8[0]), min(grid.qmax, UINT8[1]) - grid.zero_point)


def exact_runs(reach: torch.Tensor, budget: float) -> list[slice] | None:
    """Consecutive runs of the reduced inputs, each as long as it can be while every output's bound
    (``reach``: (outputs, inputs), nondecreasing along the inputs) grows by at most ``budget`` over it.
    None when one input alone can exceed it."""
    runs, start, inputs = [], 0, reach.shape[1]
    while start < inputs:
        base = reach[:, start - 1:start] if start else torch.zeros_like(reach[:, :1])
        fits = int(((reach[:, start:] - base).amax(0) <= budget).sum())  # a prefix, as the bound only grows
        if fits == 0:
            return None
        runs.append(slice(start, start + fits))
        start += fits
    return runs


def _float32_sums_exact(device: torch.device) -> bool:
    """Whether this device's float32 conv and matmul only add exact products: oneDNN's direct convolution
    and MKL's GEMM on x86-64 CPUs (NNPACK, whose Winograd and FFT transforms round, is switched off around
    the call). Elsewhere (cuDNN may pick Winograd or FFT algorithms) the sums run in float64."""
    return device.type == "cpu" and platform.machine().lower() in ("x86_64", "amd64")


def _accumulate(x: Quantized, weights: Weights, bias: torch.Tensor | None,
                compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], chunkable: bool) -> torch.Tensor:
    """ONNX Runtime's int32 accumulator ``Σ (x - z_x)(w - z_w) + bias`` (wrapped as int32 wraps), rounded
    to float32 as the kernel's requantization does. ``compute(x - z_x, w - z_w)`` reduces over dim 1 of both.

    Float32 sums are exact while a bound (``|x - z_x|``'s extent times ``Σ|w - z_w|``, per output) stays
    within 2^24: whatever order a kernel adds in, no partial sum leaves float32's whole numbers. One
    float32 addition of exact operands then rounds as the kernel's int32 → float32 conversion does. So:
    one call ending with the bias; or two runs of input channels, the first exact with the bias, the
    second exact alone, added last; or runs exact in float32 summed in int32 (float64 if it could wrap);
    or all in float64.
    """
    xc, wc = x.centred().float(), weights.centred
    codes = bias_codes(bias, x.grid.scale, weights.scale)[0] if bias is not None else None
    b = float(codes.abs().max()) if codes is not None else 0.0
    reach = weights.reach * _extent(x.grid) if _float32_sums_exact(xc.device) else None
    if reach is not None and b <= EXACT:
        total, inputs = reach[:, -1], reach.shape[1]
        first = int((reach + b <= EXACT).all(0).sum())  # the longest prefix exact together with the bias
        if first == inputs or (chunkable and first and bool((total - reach[:, first - 1] <= EXACT).all())):
            with torch.backends.nnpack.flags(enabled=False):
                acc = compute(xc[:, :first], wc[:, :first]) if first < inputs else compute(xc, wc)
                if codes is not None:
                    acc.add_(codes.float().reshape(weights.channel(acc.dim())))
                if first < inputs:
                    acc.add_(compute(xc[:, first:], wc[:, first:]))  # the one addition that may round
            return acc
    runs = exact_runs(reach, EXACT) if reach is not None else None
    if runs is not None and (chunkable or len(runs) == 1):
        with torch.backends.nnpack.flags(enabled=False):
            parts = [compute(xc[:, r], wc[:, r]) for r in runs] if len(runs) > 1 else [compute(xc, wc)]
        if float(reach[:, -1].max()) + b < INT32:  # no wrap: add them as the kernel does, in int32
            acc = parts[0].to(torch.int32)
            for part in [*parts[1:], *([codes.reshape(weights.channel(acc.dim()))] if codes is not None else [])]:
                acc.add_(part.to(torch.int32))
            return acc.to(torch.float32)
        acc = sum(part.double() for part in parts)
    else:
        acc = compute(xc.double(), wc.double())
    if codes is not None:
        acc = acc + codes.reshape(weights.channel(acc.dim()))
    # int32 arithmetic wraps (a bias near its limit)
    return (torch.remainder(acc + float(INT32), float(2 * INT32)) - INT32).to(torch.float32)


def conv2d(x: Quantized, weights: Weights, bias: torch.Tensor | None, conv: nn.Conv2d, output: Grid) -> Quantized:
    """QLinearConv (padding holds the input's zero point, i.e. 0 after centring)."""
    acc = _accumulate(x, weights, bias, lambda a, w: F.conv2d(a, w, None, conv.stride, conv.padding, conv.dilation,
                                                              conv.groups), chunkable=conv.groups == 1)
    return output.requantize(acc, _multiplier(x.grid.scale, weights, output, acc.dim()))


def linear(x: Quantized, weights: Weights, bias: torch.Tensor | None, output: Grid | None) -> torch.Tensor:
    """QGemm of ``x`` (N, in): requantized to ``output``, or float logits when ``output`` is None."""
    acc = _accumulate(x, weights, bias, lambda a, w: a @ w.T, chunkable=True)
    m = _multiplier(x.grid.scale, weights, output, 2)
    if output is None:
        return acc * m
    return output.requantize(acc, m)


def matmul(a: Quantized, b: Quantized, output: Grid | None) -> torch.Tensor:
    """QLinearMatMul (MatMulIntegerToFloat when the output stays float): in float32 where its reduction
    length times both extents is within 2^24 (exact, as in ``_accumulate``), else in float64."""
    ac, bc = a.centred().float(), b.centred().float()
    if not (_float32_sums_exact(ac.device) and ac.shape[-1] * _extent(a.grid) * _extent(b.grid) <= EXACT):
        ac, bc = ac.double(), bc.double()
    acc = (ac @ bc).to(torch.float32)
    m = _f32(a.grid.scale) * _f32(b.grid.scale)
    if output is None:
        return acc * m
    return output.requantize(acc, m / _f32(output.scale))


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a * b + c`` rounded once to float32 (the float32 product is exact in float64)."""
    return (a.double() * b.double() + c.double()).to(torch.float32)


def _by_table(a: Quantized, b: Quantized, output: Grid, codes: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
              ) -> Quantized:
    """An elementwise kernel of two uint8 inputs as a lookup: ``codes(q_a, q_b)`` (the kernel's formula)
    is computed once for all 256 × 256 code pairs, then each output value is read at ``256 q_a + q_b``.
    Exact by construction, and a few float32 passes where the formula takes a dozen in float64."""
    q = torch.arange(256, dtype=torch.float32, device=a.device)
    table = output.values(codes(q[:, None], q[None, :])).as_subclass(torch.Tensor).reshape(-1)  # (65536,)
    index = torch.add(b.codes(), a.codes(), alpha=256).to(torch.int32)  # (broadcast shape)
    return Quantized.wrap(table.index_select(0, index.reshape(-1)).reshape(index.shape), output)


def add(a: Quantized, b: Quantized, output: Grid) -> Quantized:
    """QLinearAdd: both inputs rescaled to the output's step with fused multiply-adds (AVX2 kernel).

    The kernel runs over spans of the output; an input broadcast within a span is its second operand.
    """
    if a.numel() < b.numel():
        a, b = b, a
    ra, rb = _f32(a.grid.scale) / output.scale, _f32(b.grid.scale) / output.scale
    za, zb = _f32(a.grid.zero_point), _f32(b.grid.zero_point)
    fixed = _f32(output.zero_point) - _fma(ra, za, rb * zb)

    def codes(qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        v = _fma(qa, ra, _fma(qb, rb, fixed))
        return torch.round(v).clamp_(*UINT8).clamp_(output.qmin, output.qmax)
    return _by_table(a, b, output, codes)


def mul(a: Quantized, b: Quantized, output: Grid) -> Quantized:
    """QLinearMul: the exact product of centred codes, one float32 rescale, the zero point added in float."""
    r = (_f32(a.grid.scale) * _f32(b.grid.scale)) / _f32(output.scale)

    def codes(qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        p = (qa - a.grid.zero_point) * (qb - b.grid.zero_point)  # |p| <= 255^2: exact in float32
        return torch.round(p * r + output.zero_point).clamp_(*UINT8).clamp_(output.qmin, output.qmax)
    return _by_table(a, b, output, codes)


def global_average_pool(x: Quantized, output: Grid) -> Quantized | None:
    """QLinearGlobalAveragePool of (B, C, H, W) → (B, C, 1, 1); None where its rescale factor is out of
    the kernel's range, so the export runs it in float (see ``export.guard_global_average_pool``)."""
    n = x.shape[-1] * x.shape[-2]
    m = _f32(x.grid.scale) / (_f32(output.scale) * float(n))
    if not 2.0**-32 <= float(m) < 256.0:
        return None
    acc = x.codes().double().sum(dim=(-2, -1), keepdim=True) - x.grid.zero_point * n
    return output.requantize(acc, m)


def softmax(x: Quantized, dim: int, output: Grid) -> Quantized:
    """QLinearSoftmax along ``dim``: exp of code differences from a 256-entry table built in double,
    a row sum in order (float32), each ``e * floor(1/s_y) / sum`` computed in double and rounded.

    The output step is in effect ``1 / floor(1/s_y)``, not ``s_y``: the kernel's, reproduced here.
    """
    x = x.movedim(dim, -1)
    d = x.shape[-1]
    s = float(x.grid.scale)
    # log of float32 values in float32 (logf), the rest in double, as the kernel builds its table
    shift = max(0.0, float(_f32(math.log(float(_f32(torch.finfo(torch.float32).max) / _f32(float(d)))))) - 5.0) / s
    table = torch.tensor([math.exp((i - 255 + shift) * s) for i in range(256)], dtype=torch.float64)
    codes = x.codes().long()
    e = table.to(torch.float32).to(codes.device)[codes + 255 - codes.amax(dim=-1, keepdim=True)]  # (..., D)
    total = torch.zeros(e.shape[:-1], dtype=torch.float32, device=e.device)
    for j in range(d):  # the kernel's order: a sum in float32, one term after another
        total = total + e[..., j]
    steps = torch.floor(torch.tensor(1.0, dtype=torch.float32) / _f32(output.scale))
    q = torch.round((e.double() * steps.double()) / total[..., None].double()) + output.zero_point  # in double
    # codes (whole numbers to 255, exact in float32) back in the input's dtype: DequantizeLinear's float32, which
    # ops without an integer kernel (einsum) then take with their other float32 operand
    return output.values(q.clamp_(*UINT8).clamp_(output.qmin, output.qmax).to(x.dtype).movedim(-1, dim))
