"""``FakeQuantizer``: the module that holds one tensor's scale and zero point.

Two switches drive it: ``observing`` (feed the observer, refresh qparams) and ``enabled``
(fake-quantize in forward). With ``learned=True`` (LSQ) the scale (and, when asymmetric, the
zero point) are parameters trained by the optimizer; their start comes from the MSE observer.
"""

from __future__ import annotations

import torch
from torch import nn

from qat_core.integer import Grid, Weights, quantize_linear, weight_codes
from qat_core.observers import Observer
from qat_core.quant_math import (
    EPS,
    fake_quantize,
    fake_quantize_onnx,
    lsq_fake_quantize,
    lsq_grad_scale,
    qrange,
    quantize,
)

INT8_SIGNED = qrange(8, signed=True)  # weights are stored as int8 whatever their bit width
INT8_UNSIGNED = qrange(8, signed=False)  # activations are stored as uint8


class FakeQuantizer(nn.Module):
    """Fake-quantizes a weight (``signed=True``, optional channel ``axis``) or an activation.

    forward: x_out = (clamp(round(x/scale + zero_point), qmin, qmax) - zero_point) * scale
    """

    def __init__(self, bits: int, signed: bool, symmetric: bool, method: str, channels: int = 1,
                 axis: int | None = None, percentile: float = 99.99, bounds: tuple[float, float | None] | None = None):
        super().__init__()
        self.bits, self.signed, self.symmetric, self.method, self.axis = bits, signed, symmetric, method, axis
        self.qmin, self.qmax = qrange(bits, signed)
        # the output range [0, upper] of a fused clipping activation (ReLU: upper None; ReLU6: 6.0)
        self.bounds = bounds
        self.learned = method == "lsq"
        scale, zero_point = torch.ones(channels), torch.zeros(channels)
        if self.learned:
            self.scale = nn.Parameter(scale)
            # a symmetric zero point is fixed by the code range; an asymmetric one is learned (LSQ+)
            self.zero_point = nn.Parameter(zero_point, requires_grad=not symmetric and bounds is None)
        else:
            self.register_buffer("scale", scale)
            self.register_buffer("zero_point", zero_point)
        self.observer = Observer(method, self.qmin, self.qmax, symmetric, axis, percentile)
        self.observing = False  # feed batches to the observer and refresh qparams from it
        self.enabled = True  # fake-quantize in forward (off: identity)
        self.export_int8 = False  # ONNX export: same qparams, int8/uint8 storage range
        self.integer = False  # an activation computes as ONNX Runtime's QuantizeLinear (see integer)
        self._grad_scale: float | None = None
        self._zero_point_seen = (-1, True)  # (zero_point's version, whether it is non-zero)
        self.calibrated = False

    def extra_repr(self) -> str:
        granularity = "per_channel" if self.axis is not None else "per_tensor"
        return f"bits={self.bits}, {'signed' if self.signed else 'unsigned'}, {granularity}, {self.method}"

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        if self.signed:  # a weight is seen whole each time: its range is the current one, not a history
            self.observer.reset()
        self.observer.update(x)
        scale, zero_point = self.observer.qparams()
        self.scale.copy_(scale.reshape(self.scale.shape))
        self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
        self.keep_in_bounds()
        self.calibrated = True

    @torch.no_grad()
    def keep_in_bounds(self) -> None:
        """After a fused activation with range ``[0, upper]``: code ``qmin`` is 0.0 and the highest
        code stays at or below ``upper``.

        Then the activation changes nothing the quantizer lets through, and ONNX Runtime drops it
        (ReluQuantFusion needs the zero point at the code minimum; ClipQuantFusion needs the
        QuantizeLinear's range inside the Clip's, to float32 epsilon) and fuses the layer into one
        integer kernel: what is deployed is what was trained.
        """
        if self.bounds is None:
            return
        self.zero_point.fill_(self.qmin)
        upper = self.bounds[1]
        if upper is not None:
            limit = upper * (1 - 2**-20) / (self.qmax - self.qmin)
            self.scale.copy_(self.scale.clamp(EPS, limit))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
        if not self.enabled:
            return x
        if self.integer and not self.signed:
            return quantize_linear(x, self.grid())
        if self.export_int8:
            qmin, qmax = INT8_SIGNED if self.signed else INT8_UNSIGNED
            return fake_quantize_onnx(x, self.scale.detach(), self.zero_point.detach(), qmin, qmax, self.axis)
        if self.learned and self.training and self.scale.requires_grad:
            if self._grad_scale is None:  # N = elements per scale; Q_P = the positive code range
                per_scale = x.numel() // self.scale.numel() if self.axis is not None else x[0].numel()
                self._grad_scale = lsq_grad_scale(per_scale, self.qmax - (0 if self.signed else self.qmin))
            return lsq_fake_quantize(x, self.scale, self._offset(), self.qmin, self.qmax, self._grad_scale, self.axis)
        return fake_quantize(x, self.scale.detach(), self._offset(), self.qmin, self.qmax, self.axis)

    def _offset(self) -> torch.Tensor | None:
        """The zero point, or None when it is 0 (the kernel then skips its passes).

        Checked again only when the tensor changed (its version counter moves on every in-place
        write: calibration, load_state_dict, an optimizer step), so the check costs nothing a step.
        """
        if self.zero_point.requires_grad:  # a learned LSQ+ offset
            return self.zero_point
        version = self.zero_point._version
        if version != self._zero_point_seen[0]:
            self._zero_point_seen = (version, bool(self.zero_point.any()))
        return self.zero_point if self._zero_point_seen[1] else None

    def grid(self) -> Grid:
        """An activation's grid as the int8 model stores it (one scale and zero point)."""
        zero_point = self.zero_point.detach().round().clamp(self.qmin, self.qmax)
        return Grid(float(self.scale.detach().float().reshape(-1)[0]), int(zero_point.reshape(-1)[0]), self.qmin,
                    self.qmax)

    def integer_weights(self, w: torch.Tensor) -> Weights:
        """A weight's integer codes as the int8 model stores them."""
        codes = weight_codes(w, self.scale, self.zero_point, self.qmin, self.qmax, self.axis)
        return Weights(codes, self.zero_point.detach().round(), self.scale.detach())

    def quantize_int(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``x`` under the current qparams (for export and analysis)."""
        return quantize(x, self.scale.detach(), self.zero_point.detach().round(), self.qmin, self.qmax, self.axis)


def quantizers(model: nn.Module) -> list[FakeQuantizer]:
    """Every distinct ``FakeQuantizer`` of a model (a shared one is listed once)."""
    seen, out = set(), []
    for m in model.modules():
        if isinstance(m, FakeQuantizer) and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def set_observing(model: nn.Module, on: bool, weights: bool = True, activations: bool = True) -> None:
    """Switch observers on/off; weight quantizers are the signed ones (activations are unsigned)."""
    for q in quantizers(model):
        if (q.signed and weights) or (not q.signed and activations):
            q.observing = on


def set_enabled(model: nn.Module, on: bool) -> None:
    for q in quantizers(model):
        q.enabled = on


@torch.no_grad()
def clamp_learned(model: nn.Module) -> None:
    """After an optimizer step: keep learned steps positive and learned offsets on the code range."""
    for q in quantizers(model):
        if q.learned:
            q.scale.clamp_(min=EPS)
            if not q.symmetric:
                q.zero_point.clamp_(q.qmin, q.qmax)
            q.keep_in_bounds()


def freeze_ranges(model: nn.Module) -> None:
    """Stop observers and LSQ updates: qparams stay as they are from now on."""
    for q in quantizers(model):
        q.observing = False
        if q.learned:
            q.scale.requires_grad_(False)
            q.zero_point.requires_grad_(False)
