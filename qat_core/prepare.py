"""Model + layer plan → QAT model: find the quantizable layers, fold BN, swap in QAT modules.

Layers are found by running one example batch through the float model with forward hooks, so
the plan lists them in execution order; Conv→BN(→ReLU) and Linear→ReLU are fused where they
stand next to each other in an ``nn.Sequential`` (the way the zoo models are written).
Anything that stays in float is reported by name with the reason.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from qat_core.config import LayerPlan
from qat_core.modules import Add, MatMul, QATModel, QuantConv2d, QuantLinear, QuantOutput, activation_quantizer

WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)
# weightless ops whose output leaves the previous grid: they get an output quantizer of their own
ACTIVATION_OPS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, Add, MatMul, nn.LayerNorm, nn.Softmax, nn.GELU)
# ops with parameters that prepare cannot quantize: reported as float
UNSUPPORTED = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d, nn.Embedding, nn.LSTM, nn.GRU, nn.RNN,
               nn.MultiheadAttention, nn.BatchNorm1d)


def _fusions(model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """Conv→BN pairs and Conv/Linear(→BN)→ReLU pairs inside nn.Sequential containers."""
    bn_of, relu_of = {}, {}
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        prefix = f"{seq_name}." if seq_name else ""
        for i, name in enumerate(names):
            mod = seq._modules[name]
            if not isinstance(mod, WEIGHT_LAYERS):
                continue
            j = i + 1
            if isinstance(mod, nn.Conv2d) and j < len(names) and isinstance(seq._modules[names[j]], nn.BatchNorm2d):
                bn_of[prefix + name] = prefix + names[j]
                j += 1
            if j < len(names) and isinstance(seq._modules[names[j]], nn.ReLU):
                relu_of[prefix + name] = prefix + names[j]
    return bn_of, relu_of


def _trace(model: nn.Module, example: torch.Tensor) -> tuple[list[str], str | None, dict[str, str]]:
    """Execution order of quantizable modules, the one that produces the output, and float ones."""
    order: list[str] = []
    float_layers: dict[str, str] = {}
    produced: dict[int, str] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, WEIGHT_LAYERS + ACTIVATION_OPS):
            def hook(m, inp, out, name=name):
                if name not in order:
                    order.append(name)
                produced[id(out)] = name
            handles.append(mod.register_forward_hook(hook))
        elif isinstance(mod, UNSUPPORTED):
            float_layers[name] = f"{type(mod).__name__} is not supported by QAT Studio's quantizer"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return order, produced.get(id(out)), float_layers


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def layer_table(model: nn.Module, example: torch.Tensor) -> list[dict]:
    """The quantizable layers of a float model, in execution order (``input`` first)."""
    order, output_layer, _ = _trace(model, example)
    bn_of, relu_of = _fusions(model)
    rows = [{"name": "input", "kind": "input", "params": 0, "weight_params": 0, "out_channels": 0,
             "has_weights": False, "is_output": False, "fused": ""}]
    for name in order:
        mod = model.get_submodule(name)
        fused = "+".join(part for part, key in (("BN", bn_of), ("ReLU", relu_of)) if name in key)
        weight = getattr(mod, "weight", None) if isinstance(mod, WEIGHT_LAYERS) else None
        rows.append({
            "name": name,
            "kind": type(mod).__name__,
            "params": sum(p.numel() for p in mod.parameters()),
            "weight_params": weight.numel() if weight is not None else 0,
            "out_channels": weight.shape[0] if weight is not None else 0,
            "has_weights": isinstance(mod, WEIGHT_LAYERS),
            "is_output": name == output_layer,
            "fused": fused,
        })
    return rows


def prepare(model: nn.Module, plan: LayerPlan, example: torch.Tensor) -> QATModel:
    """A QAT copy of ``model`` following ``plan`` (the float model is left untouched)."""
    net = copy.deepcopy(model)
    order, output_layer, float_layers = _trace(net, example)
    plan.check_names(["input", *order])
    bn_of, relu_of = _fusions(net)
    layers = layer_table(net, example)
    for row in layers:
        row["spec"] = plan.spec_for(row["name"]).model_dump()
    for name in order:
        spec = plan.spec_for(name)
        mod = net.get_submodule(name)
        quantize_output = spec.act_bits is not None and name != output_layer  # logits stay float
        if isinstance(mod, nn.Conv2d):
            bn = net.get_submodule(bn_of[name]) if name in bn_of else None
            new = QuantConv2d.from_float(mod, bn, name in relu_of, spec, quantize_output)
        elif isinstance(mod, nn.Linear):
            new = QuantLinear.from_float(mod, name in relu_of, spec, quantize_output)
        elif spec.act_bits is not None:
            new = QuantOutput(mod, activation_quantizer(spec))
        else:
            float_layers[name] = "activation bits are off in the plan"
            continue
        if isinstance(mod, WEIGHT_LAYERS) and spec.weight_bits is None:
            float_layers[name] = "weight bits are off in the plan"
        _set(net, name, new)
        for fused in (bn_of.get(name), relu_of.get(name)):
            if fused:
                _set(net, fused, nn.Identity())
    folded = {id(m.bn) for m in net.modules() if isinstance(m, QuantConv2d) and m.bn is not None}
    for name, mod in net.named_modules():
        if isinstance(mod, nn.BatchNorm2d) and id(mod) not in folded:
            float_layers[name] = "BatchNorm2d does not follow a Conv2d in an nn.Sequential, so it cannot be folded"
    input_spec = plan.spec_for("input")
    return QATModel(net, activation_quantizer(input_spec), layers, float_layers)



def size_bytes(layers: list[dict], plan: LayerPlan) -> dict[str, float]:
    """Model size at each layer's weight width (bit-packed), against FP32, for the plan table.

    Quantized weights cost ``bits/8`` bytes each plus a 4-byte scale per channel (or tensor);
    biases and float layers cost 4 bytes a parameter.
    """
    fp32 = quant = 0.0
    for row in layers:
        fp32 += 4 * row["params"]
        spec = plan.spec_for(row["name"])
        if row["has_weights"] and spec.weight_bits is not None:
            scales = row["out_channels"] if spec.granularity == "per_channel" else 1
            quant += row["weight_params"] * spec.weight_bits / 8 + 4 * scales + 4 * (row["params"] - row["weight_params"])
        else:
            quant += 4 * row["params"]
    return {"fp32_bytes": fp32, "quantized_bytes": quant, "ratio": quant / fp32 if fp32 else 1.0}
