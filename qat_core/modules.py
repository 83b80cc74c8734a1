"""QAT layers, each a float layer plus its quantizers, with paired ``from_float``/``to_float``.

A quantized layer computes what its integer kernel in ONNX Runtime will compute:
``act_quant(relu(conv(x, weight_quant(folded_weight)) + folded_bias))`` — BatchNorm folded into
the convolution, the ReLU fused, the output quantized once for its consumers. ``Add`` and
``MatMul`` are tiny modules so that models can name their residual sums and attention products,
which lets ``prepare`` give them an output quantizer like ONNX Runtime's QLinearAdd/QLinearMatMul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qat_core.config import QuantSpec
from qat_core.quantizers import FakeQuantizer


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


def activation_quantizer(spec: QuantSpec) -> FakeQuantizer | None:
    if spec.act_bits is None:
        return None
    return FakeQuantizer(spec.act_bits, signed=False, symmetric=spec.symmetric, method=spec.range_method,
                         percentile=spec.percentile)


class QuantConv2d(nn.Module):
    """Conv2d (+ folded BatchNorm2d) (+ ReLU) with fake-quantized weights and output.

    While BN statistics train, the conv runs on weights folded with the running statistics and
    the output is rescaled and normalized by the batch statistics (Krishnamoorthi 2018, as in
    torch.ao); once BN is frozen, and in eval, it is exactly the folded conv that is deployed.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, relu: bool,
                 weight_quant: FakeQuantizer | None, act_quant: FakeQuantizer | None):
        super().__init__()
        self.conv, self.bn, self.relu = conv, bn, relu
        self.weight_quant, self.act_quant = weight_quant, act_quant
        self.bn_frozen = False

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, relu: bool, spec: QuantSpec,
                   quantize_output: bool) -> QuantConv2d:
        return cls(conv, bn, relu, weight_quantizer(spec, conv.out_channels),
                   activation_quantizer(spec) if quantize_output else None)

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
            y = self._conv(x, self.weight_quant(w) if self.weight_quant is not None else w, b)
        if self.relu:
            y = F.relu(y)
        return self.act_quant(y) if self.act_quant is not None else y

    @torch.no_grad()
    def to_float(self) -> nn.Module:
        """A plain Conv2d (+ ReLU) carrying the folded, quantized weights: the deployed layer."""
        c = self.conv
        conv = nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, c.dilation, c.groups,
                         bias=True)
        _, b = self.folded()
        conv.weight.copy_(self.quantized_weight())
        conv.bias.copy_(b if b is not None else torch.zeros(c.out_channels))
        return nn.Sequential(conv, nn.ReLU()) if self.relu else conv


class QuantLinear(nn.Module):
    """Linear (+ ReLU) with fake-quantized weights and output."""

    def __init__(self, linear: nn.Linear, relu: bool, weight_quant: FakeQuantizer | None,
                 act_quant: FakeQuantizer | None):
        super().__init__()
        self.linear, self.relu = linear, relu
        self.weight_quant, self.act_quant = weight_quant, act_quant

    @classmethod
    def from_float(cls, linear: nn.Linear, relu: bool, spec: QuantSpec, quantize_output: bool) -> QuantLinear:
        return cls(linear, relu, weight_quantizer(spec, linear.out_features),
                   activation_quantizer(spec) if quantize_output else None)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.linear.weight, self.linear.bias

    def quantized_weight(self) -> torch.Tensor:
        w = self.linear.weight
        return self.weight_quant(w) if self.weight_quant is not None else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        lead = x.shape[:-1]
        if x.dim() > 2:  # run as (N, in): exports as Gemm, which ONNX Runtime fuses into QGemm
            x = x.reshape(-1, x.shape[-1])
        y = F.linear(x, self.quantized_weight(), self.linear.bias)
        if self.relu:
            y = F.relu(y)
        y = self.act_quant(y) if self.act_quant is not None else y  # per-tensor: same before or after reshape
        return y.reshape(*lead, y.shape[-1]) if len(lead) > 1 else y

    @torch.no_grad()
    def to_float(self) -> nn.Module:
        lin = nn.Linear(self.linear.in_features, self.linear.out_features, bias=self.linear.bias is not None)
        lin.weight.copy_(self.quantized_weight())
        if lin.bias is not None:
            lin.bias.copy_(self.linear.bias)
        return nn.Sequential(lin, nn.ReLU()) if self.relu else lin


class QuantOutput(nn.Module):
    """A weightless op (pooling, Add, MatMul, LayerNorm, Softmax, GELU) whose output is quantized."""

    def __init__(self, op: nn.Module, act_quant: FakeQuantizer):
        super().__init__()
        self.op, self.act_quant = op, act_quant

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.act_quant(self.op(*args))

    def to_float(self) -> nn.Module:
        return self.op


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
