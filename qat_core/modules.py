"""QAT layers, each a float layer plus its quantizers, with paired ``from_float``/``to_float``.

A quantized layer computes what its integer kernel in ONNX Runtime will compute:
``act_quant(activation(conv(x, weight_quant(folded_weight)) + folded_bias))`` — BatchNorm folded
into the convolution, a clipping activation (ReLU, ReLU6) fused, the output quantized once for its
consumers. Any other op of a traced graph (``+``, ``cat``, ``@``, softmax, pooling, …) becomes a
``QuantOutput``: the op, then its output quantizer, as one module, so that it has a plan name and
an export scope of its own. ``Add`` and ``MatMul`` are tiny modules for models that want to name
their residual sums and attention products themselves (the zoo's do).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat_core import integer
from qat_core.config import QuantSpec
from qat_core.integer import Grid, Quantized
from qat_core.quantizers import FakeQuantizer, quantizers

Bounds = tuple[float, float | None]  # a fused activation's output range: [0, upper]

class Add(nn.Module):
    """``a + b`` (then ReLU when ``relu``): a residual sum that can carry an output quantizer."""

    def __init__(self, relu: bool = False):
        super().__init__()
        self.relu = relu

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y = a + b
        return F.relu(y) if self.relu else y


class MatMul(nn.Module):
    """``a @ b`` between two activations (attention), so it can carry an output quantizer."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


def weight_quantizer(spec: QuantSpec, out_channels: int) -> FakeQuantizer | None:
    if spec.weight_bits is None:
        return None
    per_channel = spec.granularity == "per_channel"
    return FakeQuantizer(spec.weight_bits, signed=True, symmetric=spec.symmetric, method=spec.range_method,
                         channels=out_channels if per_channel else 1, axis=0 if per_channel else None,
                         percentile=spec.percentile)


def activation_quantizer(spec: QuantSpec, bounds: Bounds | None = None) -> FakeQuantizer | None:
    if spec.act_bits is None:
        return None
    return FakeQuantizer(spec.act_bits, signed=False, symmetric=spec.symmetric, method=spec.range_method,
                         percentile=spec.percentile, bounds=bounds)


def _activate(activation: nn.Module | None, y: torch.Tensor) -> torch.Tensor:
    return activation(y) if activation is not None else y


def _with_activation(layer: nn.Module, activation: nn.Module | None) -> nn.Module:
    return nn.Sequential(layer, activation) if activation is not None else layer


def _int32_bias(bias: torch.Tensor | None, input_quant: FakeQuantizer | None,
                weight_quant: FakeQuantizer | None) -> torch.Tensor | None:
    """The bias as the export stores it: rounded to the int32 grid ``s_x * s_w`` of the integer kernel
    (straight-through: the float bias keeps its gradient). Coarse at low bit widths — a W2A2 layer's
    bias step can be a tenth of its output step — so training must see it, not only the export."""
    if bias is None or input_quant is None or weight_quant is None or not (input_quant.enabled and
                                                                           weight_quant.enabled):
        return bias
    scale = input_quant.scale.detach().float().reshape(()) * weight_quant.scale.detach().float().reshape(-1)
    codes = torch.round(bias.detach().double() / scale.double()).clamp(-(2**31), 2**31 - 1)
    return bias + ((codes * scale.double()).to(bias.dtype) - bias).detach()


def _integer_output(layer: nn.Module, x: Any) -> Grid | None | bool:
    """For ONNX Runtime's integer arithmetic (``QATModel.integer_arithmetic``): the output grid of a
    layer the export turns into one integer kernel, None for one that keeps float output (logits),
    False when it runs in float (its input is not quantized, or an activation stays between the op
    and its quantizer: only a fused one whose range the quantizer keeps is dropped by the export)."""
    if layer.training or not isinstance(x, Quantized):
        return False
    act_quant = layer.act_quant
    if act_quant is None:
        return None if layer.activation is None else False
    if layer.activation is not None and act_quant.bounds is None:
        return False
    return act_quant.grid()


@torch.no_grad()
def _integer_weights(layer: nn.Module) -> tuple[integer.Weights, torch.Tensor | None]:
    """A conv's or linear layer's integer weights and float bias (BN folded), kept while none of the
    tensors they come from changes: evaluation runs batch after batch on the same weights, and every
    write to a tensor (an optimizer step, ``load_state_dict``, calibration) moves its version counter.
    A write through ``.data`` does not, as autograd does not see it either: the engine never writes so."""
    sources = [*layer.parameters(), *layer.buffers()]  # held, not their ids: a new tensor is never taken for one
    versions = [(t._version, t.data_ptr()) for t in sources]  # `.data = ...` (Module.to) keeps the version
    cached = layer.__dict__.get("_integer_weights")
    if cached is None or len(cached[0]) != len(sources) or cached[1] != versions or \
            any(a is not b for a, b in zip(cached[0], sources, strict=True)):
        w, b = layer.folded()
        cached = (sources, versions, layer.weight_quant.integer_weights(w), b)
        object.__setattr__(layer, "_integer_weights", cached)
    return cached[2], cached[3]


class QuantConv2d(nn.Module):
    """Conv2d (+ folded BatchNorm2d) (+ a fused activation) with fake-quantized weights and output.

    While BN statistics train, the conv runs on weights folded with the running statistics and
    the output is rescaled and normalized by the batch statistics (Krishnamoorthi 2018, as in
    torch.ao); once BN is frozen, and in eval, it is exactly the folded conv that is deployed.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, activation: nn.Module | None,
                 weight_quant: FakeQuantizer | None, act_quant: FakeQuantizer | None):
        super().__init__()
        self.conv, self.bn, self.activation = conv, bn, activation
        self.weight_quant, self.act_quant = weight_quant, act_quant
        self.bn_frozen = False
        self.link_input_quantizer(None)

    def link_input_quantizer(self, quantizer: FakeQuantizer | None) -> None:
        """The quantizer of this layer's input (another layer's, not a submodule): sets the bias grid."""
        object.__setattr__(self, "input_quant", quantizer)

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, activation: nn.Module | None,
                   bounds: Bounds | None, spec: QuantSpec, quantize_output: bool) -> QuantConv2d:
        return cls(conv, bn, activation, weight_quantizer(spec, conv.out_channels),
                   activation_quantizer(spec, bounds) if quantize_output else None)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias with BN folded in using its running statistics."""
        w, b = self.conv.weight, self.conv.bias
        if self.bn is None:
            return w, b
        std = torch.sqrt(self.bn.running_var + self.bn.eps)
        factor = self.bn.weight / std  # (C_out,)
        bias = b if b is not None else torch.zeros_like(self.bn.running_mean)
        return w * factor.reshape(-1, 1, 1, 1), self.bn.bias + (bias - self.bn.running_mean) * factor

    def quantized_weight(self) -> torch.Tensor:
        w, _ = self.folded()
        return self.weight_quant(w) if self.weight_quant is not None else w

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        c = self.conv
        return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H', W')
        output = _integer_output(self, x)
        if output and self.weight_quant is not None:  # QLinearConv (a float output has no integer conv)
            weights, b = _integer_weights(self)
            return integer.conv2d(x, weights, b, self.conv, output)
        if self.bn is not None and self.training and not self.bn_frozen:
            factor = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
            w = self.conv.weight * factor.reshape(-1, 1, 1, 1)
            w = self.weight_quant(w) if self.weight_quant is not None else w
            y = self._conv(x, w, None) / factor.reshape(1, -1, 1, 1)
            if self.conv.bias is not None:
                y = y + self.conv.bias.reshape(1, -1, 1, 1)
            y = self.bn(y)  # batch statistics; updates the running ones
        else:
            w, b = self.folded()
            w = self.weight_quant(w) if self.weight_quant is not None else w
            y = self._conv(x, w, _int32_bias(b, self.input_quant, self.weight_quant))
        y = _activate(self.activation, y)
        return self.act_quant(y) if self.act_quant is not None else y

    @torch.no_grad()
    def to_float(self) -> nn.Module:
        """A plain Conv2d (+ activation) carrying the folded, quantized weights: the deployed layer."""
        c = self.conv
        conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                         bias=True)
        _, b = self.folded()
        conv.weight.copy_(self.quantized_weight())
        conv.bias.copy_(b if b is not None else torch.zeros(c.out_channels))
        return _with_activation(conv, self.activation)


class QuantLinear(nn.Module):
    """Linear (+ a fused activation) with fake-quantized weights and output."""

    def __init__(self, linear: nn.Linear, activation: nn.Module | None, weight_quant: FakeQuantizer | None,
                 act_quant: FakeQuantizer | None):
        super().__init__()
        self.linear, self.activation = linear, activation
        self.weight_quant, self.act_quant = weight_quant, act_quant
        self.link_input_quantizer(None)

    link_input_quantizer = QuantConv2d.link_input_quantizer

    @classmethod
    def from_float(cls, linear: nn.Linear, activation: nn.Module | None, bounds: Bounds | None, spec: QuantSpec,
                   quantize_output: bool) -> QuantLinear:
        return cls(linear, activation, weight_quantizer(spec, linear.out_features),
                   activation_quantizer(spec, bounds) if quantize_output else None)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.linear.weight, self.linear.bias

    def quantized_weight(self) -> torch.Tensor:
        w = self.linear.weight
        return self.weight_quant(w) if self.weight_quant is not None else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        lead = x.shape[:-1]
        if x.dim() > 2:  # run as (N, in): exports as Gemm, which ONNX Runtime fuses into QGemm
            x = x.reshape(-1, x.shape[-1])
        output = _integer_output(self, x)
        if output is not False and self.weight_quant is not None:  # QGemm, integer or float output
            weights, b = _integer_weights(self)
            y = integer.linear(x, weights, b, output)
        else:
            w = self.quantized_weight()
            y = _activate(self.activation, F.linear(x, w, _int32_bias(self.linear.bias, self.input_quant,
                                                                      self.weight_quant)))
            y = self.act_quant(y) if self.act_quant is not None else y  # per-tensor: same before or after reshape
        return y.reshape(*lead, y.shape[-1]) if len(lead) > 1 else y

    @torch.no_grad()
    def to_float(self) -> nn.Module:
        lin = nn.Linear(self.linear.in_features, self.linear.out_features, bias=self.linear.bias is not None)
        lin.weight.copy_(self.quantized_weight())
        if lin.bias is not None:
            lin.bias.copy_(self.linear.bias)
        return _with_activation(lin, self.activation)


class QuantOutput(nn.Module):
    """An op without quantized weights (pooling, add, matmul, LayerNorm, softmax, GELU, …), then a
    fused activation, then its output quantizer (None: the plan leaves its output in float)."""

    def __init__(self, op: nn.Module, act_quant: FakeQuantizer | None, activation: nn.Module | None = None):
        super().__init__()
        self.op, self.act_quant, self.activation = op, act_quant, activation

    def forward(self, *args: Any) -> torch.Tensor:
        output = _integer_output(self, args[0]) if args else False
        if output is not False and all(isinstance(a, Quantized) for a in args):
            y = _integer_op(self.op, args, output)
            if y is not None:
                return y
        y = _activate(self.activation, self.op(*args))
        return self.act_quant(y) if self.act_quant is not None else y

    def to_float(self) -> nn.Module:
        return _with_activation(self.op, self.activation)


def _integer_op(op: nn.Module, args: tuple[Quantized, ...], output: Grid | None) -> torch.Tensor | None:
    """ONNX Runtime's integer kernel for ``op`` when the export gets one (QLinearAdd, QLinearMul,
    QLinearMatMul, QLinearSoftmax, QLinearGlobalAveragePool); None: it runs in float."""
    name, constants = _call(op)
    if name in ("add", "mul", "matmul") and len(args) == 2 and not constants:
        if name == "matmul":
            return integer.matmul(args[0], args[1], output)
        relu = isinstance(op, Add) and op.relu  # a ReLU the export drops only where the zero point is code 0
        if output is None or (relu and output.zero_point != output.qmin):
            return None
        return (integer.add if name == "add" else integer.mul)(args[0], args[1], output)
    if output is None or len(args) != 1:
        return None
    if name == "softmax" and set(constants) <= {"dim"} and isinstance(constants.get("dim"), int):
        return integer.softmax(args[0], constants["dim"], output)
    if name == "adaptive_avg_pool2d" and constants.get("output_size") in (1, (1, 1), [1, 1]) and args[0].dim() == 4:
        return integer.global_average_pool(args[0], output)
    return None


_SAME_OP = {"__add__": "add", "__mul__": "mul", "__matmul__": "matmul", "bmm": "matmul", "AdaptiveAvgPool2d":
            "adaptive_avg_pool2d", "Softmax": "softmax", "Add": "add", "MatMul": "matmul"}


def _call(op: nn.Module) -> tuple[str, dict[str, Any]]:
    """The op's name (``add``, ``softmax``, …) and its arguments other than its tensor inputs."""
    if isinstance(op, FunctionalOp):
        target = op.target if isinstance(op.target, str) else getattr(op.target, "__name__", "")
        positional = [a for a in op.template_args if not isinstance(a, Arg)]
        names = {"softmax": ("dim",), "adaptive_avg_pool2d": ("output_size",)}.get(target, ())
        constants = dict(zip(names, positional, strict=False)) | dict(op.template_kwargs)
        constants.pop("_stacklevel", None)
        if len(positional) > len(names) or constants.pop("dtype", None) is not None:
            constants["unknown"] = True
        return _SAME_OP.get(target, target), constants
    if isinstance(op, nn.Softmax):
        return "softmax", {"dim": op.dim}
    if isinstance(op, nn.AdaptiveAvgPool2d):
        return "adaptive_avg_pool2d", {"output_size": op.output_size}
    return _SAME_OP.get(type(op).__name__, type(op).__name__), {}


class Arg(int):
    """In a ``FunctionalOp``'s argument template: "the forward's i-th input goes here"."""


# in-place operators become their plain form: the value they would overwrite may be saved for backward
PLAIN_OPERATOR = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                  operator.itruediv: operator.truediv}


class FunctionalOp(nn.Module):
    """One call of a function or tensor method from a traced graph (``x + y``, ``torch.cat([a, b], 1)``,
    ``t.mean(dim=1)``), as a module: its tensor (and traced) inputs come in ``forward``; everything
    else is fixed in the template, where ``Arg(i)`` marks the i-th input."""

    def __init__(self, target: Callable[..., Any] | str, args: tuple, kwargs: dict[str, Any]):
        super().__init__()
        self.target = PLAIN_OPERATOR.get(target, target) if not isinstance(target, str) else target.rstrip("_")
        self.template_args, self.template_kwargs = args, {k: v for k, v in kwargs.items() if k != "inplace"}

    def extra_repr(self) -> str:
        return self.target if isinstance(self.target, str) else getattr(self.target, "__name__", repr(self.target))

    def forward(self, *inputs: Any) -> Any:
        def fill(a: Any) -> Any:
            if isinstance(a, Arg):
                return inputs[a]
            if isinstance(a, (list, tuple)):
                return type(a)(fill(v) for v in a)
            if isinstance(a, dict):
                return {k: fill(v) for k, v in a.items()}
            if isinstance(a, slice):
                return slice(fill(a.start), fill(a.stop), fill(a.step))
            return a

        args, kwargs = fill(self.template_args), fill(self.template_kwargs)
        if isinstance(self.target, str):
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        return self.target(*args, **kwargs)


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
                      scale: float) -> torch.Tensor:
    """``softmax(q k^T · scale + mask)`` as separate ops, each quantizable: the scaled queries, the
    scores ``q @ k^T`` (an integer matmul after export) and the softmax.

    The scale goes on the queries, before the matmul, so that the matmul reads quantized inputs.
    ``mask``: boolean (True = attend) or additive float, broadcastable to ``(..., L, S)``.
    """
    scores = (q * scale) @ k.transpose(-2, -1)  # (..., L, S)
    if is_causal:
        scores = scores.masked_fill(~torch.ones_like(scores, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
              scale: float) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (eval) as quantizable ops: weights, then ``weights @ v``."""
    return attention_weights(q, k, mask, is_causal, scale) @ v  # (..., L, E_v)


class DecomposedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (eval semantics) as q/k/v/out Linear layers around :func:`attention`.

    Same parameters and results as the module it replaces; attention dropout is left out (the
    fine-tune is short, and ONNX export drops it anyway).
    """

    def __init__(self, embed_dim: int, num_heads: int, kdim: int, vdim: int, bias: bool, batch_first: bool):
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @staticmethod
    def supports(mha: nn.MultiheadAttention) -> bool:
        return mha.bias_k is None and mha.bias_v is None and not mha.add_zero_attn

    @classmethod
    @torch.no_grad()
    def from_float(cls, mha: nn.MultiheadAttention) -> DecomposedMultiheadAttention:
        new = cls(mha.embed_dim, mha.num_heads, mha.kdim, mha.vdim, mha.in_proj_bias is not None, mha.batch_first)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases, strict=True):
            proj.weight.copy_(w)
            if b is not None:
                proj.bias.copy_(b)
        new.out_proj.weight.copy_(mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.to(mha.out_proj.weight.device)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:  # (B, T, E) -> (B, H, T, dh)
        return t.reshape(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:  # (T, B, E) -> (B, T, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, t = query.shape[0], query.shape[1]
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        mask = _merged_mask(attn_mask, key_padding_mask, b, self.num_heads)  # additive, (B, H, T, S)-broadcastable
        weights = attention_weights(q, k, mask, is_causal and attn_mask is None, self.head_dim**-0.5)
        out = (weights @ v).transpose(1, 2).reshape(b, t, self.embed_dim)  # (B, T, E)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_attn_weights else weights


def _merged_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: Any,
                 heads: int) -> torch.Tensor | None:
    """nn.MultiheadAttention's masks (True or -inf = blocked) as one additive mask."""
    def additive(m: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(m, dtype=torch.float).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m

    mask = None
    if attn_mask is not None:  # (T, S) or (B*H, T, S)
        mask = additive(attn_mask)
        if mask.dim() == 3:
            mask = mask.reshape(batch, heads, mask.shape[-2], mask.shape[-1])
    if key_padding_mask is not None:  # (B, S) -> (B, 1, 1, S)
        pad = additive(key_padding_mask)[:, None, None, :]
        mask = pad if mask is None else mask + pad
    return mask


class QATModel(nn.Module):
    """The prepared network: an input quantizer in front of the model with swapped-in layers."""

    def __init__(self, net: nn.Module, input_quant: FakeQuantizer | None, layers: list[dict],
                 float_layers: dict[str, str]):
        super().__init__()
        self.net, self.input_quant = net, input_quant
        self.layers = layers  # one dict per quantizable layer, in execution order (see prepare.layer_table)
        self.float_layers = float_layers  # name -> why it runs in float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.input_quant(x) if self.input_quant is not None else x)

    @contextmanager
    def integer_arithmetic(self) -> Iterator[None]:
        """Compute as ONNX Runtime will run the exported int8 model (see ``integer``), for evaluation:
        each layer the export turns into an integer kernel computes that kernel's numbers."""
        activations = [q for q in quantizers(self) if not q.signed]
        for q in activations:
            q.integer = True
        try:
            yield
        finally:
            for q in activations:
                q.integer = False

    def layer(self, name: str) -> nn.Module:
        """The quantized module of a layer (``input`` is the input quantizer)."""
        if name == "input":
            return self.input_quant
        return self.net.get_submodule(name)

    def freeze_bn(self) -> None:
        for m in self.net.modules():
            if isinstance(m, QuantConv2d) and m.bn is not None:
                m.bn_frozen = True
                m.bn.eval()

    def train(self, mode: bool = True) -> QATModel:
        super().train(mode)
        for m in self.net.modules():  # frozen BN keeps its running statistics even in train()
            if isinstance(m, QuantConv2d) and m.bn is not None and m.bn_frozen:
                m.bn.eval()
        return self
