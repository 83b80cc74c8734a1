"""Model + layer plan → QAT model: find the quantizable layers, fold BN, swap in QAT modules.

Layers are found in the model's traced graph (``graph.analyze``): Conv→BN and layer→ReLU/ReLU6
are fused wherever they stand, and functional ops (``+``, ``cat``, ``@``, ``mean``) get output
quantizers of their own. The QAT model is that traced graph with each layer's node calling its QAT
module. A model whose ``forward`` cannot be traced falls back to module hooks, which find only
modules (fused where they are neighbours in an ``nn.Sequential``), and says so in the plan table.
Anything that stays in float is reported by name with the reason.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn

from qat_core import graph, integer
from qat_core.config import LayerPlan
from qat_core.errors import PluginError
from qat_core.modules import (
    Arg,
    FunctionalOp,
    QATModel,
    QuantConv2d,
    QuantLinear,
    QuantOutput,
    activation_quantizer,
)
from qat_core.quantizers import FakeQuantizer

WEIGHT_LAYERS = graph.WEIGHT_LAYERS


def layer_table(model: nn.Module, example: torch.Tensor) -> list[dict]:
    """The quantizable layers of a float model, in execution order (``input`` first).

    Each row: name, kind, params, weight_params, out_channels, has_weights, is_output, fused, note
    (why a layer is special: weights left in float, or how the layers were found).
    """
    try:
        rows = _graph_rows(graph.analyze(model, example), example)
    except graph.TracingError as err:
        rows = _hook_rows(model, example, str(err))
    notes = getattr(model, "layer_notes", {})  # set where a model was built (a replaced head, say)
    return [r | {"note": "; ".join(filter(None, (r["note"], notes[r["name"]])))} if r["name"] in notes else r
            for r in rows]


def prepare(model: nn.Module, plan: LayerPlan, example: torch.Tensor) -> QATModel:
    """A QAT copy of ``model`` following ``plan`` (the float model is left untouched)."""
    try:
        mg = graph.analyze(model, example)
    except graph.TracingError as err:
        return _hook_prepare(model, plan, example, str(err))
    rows = _graph_rows(mg, example)
    plan.check_names([r["name"] for r in rows])
    for row in rows:
        row["spec"] = plan.spec_for(row["name"]).model_dump()
    gm, float_layers = mg.module, dict(mg.float_layers)
    originals = dict(gm.named_modules())  # a module called twice is swapped at its first call
    for layer in mg.layers:
        why = _swap_in(gm, layer, plan, originals)
        if why:
            float_layers[layer.name] = why
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    input_quant = activation_quantizer(plan.spec_for("input")) if mg.input_is_float else None
    if not mg.input_is_float:
        float_layers["input"] = "the model's input is not floating point (token ids): nothing to quantize"
    _link_input_quantizers(gm, input_quant)
    return QATModel(gm, input_quant, rows, float_layers)


def _link_input_quantizers(gm: fx.GraphModule, input_quant: FakeQuantizer | None) -> None:
    """Tell each conv and linear layer which quantizer produced its input (through ops that only move
    values), so that it rounds its bias to the int32 grid ``s_x * s_w`` the export gives it."""
    def producer(node: Any) -> FakeQuantizer | None:
        while isinstance(node, fx.Node):
            if node.op == "placeholder":
                return input_quant
            mod = gm.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(mod, (QuantConv2d, QuantLinear, QuantOutput)):
                return mod.act_quant
            moving = (isinstance(mod, integer.MOVING_MODULES) or (node.op == "call_function" and node.target in
                      integer.MOVING_FUNCTIONS) or (node.op == "call_method" and node.target in integer.MOVING_METHODS))
            if not moving or not node.args:
                return None
            node = node.args[0]
        return None

    for node in gm.graph.nodes:
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, (QuantConv2d, QuantLinear)) and node.args:
            mod.link_input_quantizer(producer(node.args[0]))


def _graph_rows(mg: graph.ModelGraph, example: torch.Tensor) -> list[dict]:
    rows = [_row("input", "input", 0, 0, 0, False, False, "", "" if mg.input_is_float else
                 "the input is not floating point: it is not quantized")]
    for layer in mg.layers:
        mod = mg.submodule(layer.node) if layer.node.op == "call_module" else None
        weight = getattr(mod, "weight", None) if layer.has_weights else None
        params = sum(p.numel() for p in mod.parameters()) if mod is not None else 0
        rows.append(_row(layer.name, layer.kind, params, weight.numel() if weight is not None else 0,
                         weight.shape[0] if weight is not None else 0, layer.has_weights, layer.is_output,
                         layer.fused, mg.float_layers.get(layer.name, "")))
    return rows


def _row(name: str, kind: str, params: int, weight_params: int, out_channels: int, has_weights: bool,
         is_output: bool, fused: str, note: str) -> dict:
    return {"name": name, "kind": kind, "params": params, "weight_params": weight_params, "out_channels": out_channels,
            "has_weights": has_weights, "is_output": is_output, "fused": fused, "note": note}


def _swap_in(gm: fx.GraphModule, layer: graph.Layer, plan: LayerPlan, originals: dict[str, nn.Module]) -> str | None:
    """Make ``layer``'s node call its QAT module; the folded BN and fused activation nodes go.
    Returns why the layer stays float, if it does."""
    node = layer.node
    spec = plan.spec_for(layer.name)
    quantize_output = spec.act_bits is not None and not layer.is_output  # logits stay float
    activation = _activation_module(layer.activation, originals) if layer.activation is not None else None
    bounds = layer.bounds if activation is not None else None
    if layer.has_weights:
        mod = originals[node.target]
        if isinstance(mod, nn.Conv2d):
            bn = originals[layer.bn.target] if layer.bn is not None else None
            new = QuantConv2d.from_float(mod, bn, activation, bounds, spec, quantize_output)
        else:
            new = QuantLinear.from_float(mod, activation, bounds, spec, quantize_output)
        gm.add_submodule(layer.name, new)
        _drop(layer.bn, node)
        _drop(layer.activation, node)
        return "weight bits are off in the plan" if spec.weight_bits is None else None
    op, args, kwargs = _op_module(node, originals)  # a module even when the plan leaves it float: rows ↔ modules
    gm.add_submodule(layer.name, QuantOutput(op, activation_quantizer(spec, bounds) if quantize_output else None,
                                             activation))
    with gm.graph.inserting_after(node):
        new_node = gm.graph.call_module(layer.name, args, kwargs)
    node.replace_all_uses_with(new_node)
    new_node.meta = dict(node.meta)
    gm.graph.erase_node(node)
    _drop(layer.activation, new_node)
    return None if quantize_output or layer.is_output else "activation bits are off in the plan"


def _drop(node: fx.Node | None, replacement: fx.Node) -> None:
    """Remove a node that joined ``replacement``'s module (a folded BN, a fused activation)."""
    if node is not None:
        node.replace_all_uses_with(replacement)
        node.graph.erase_node(node)


def _op_module(node: fx.Node, originals: dict[str, nn.Module]) -> tuple[nn.Module, tuple, dict]:
    """The op of a node as a module, and the args and kwargs to call that module with."""
    if node.op == "call_module":
        return originals[node.target], node.args, dict(node.kwargs)
    inputs: list[fx.Node] = []

    def template(a: object) -> object:
        if isinstance(a, fx.Node):
            if a not in inputs:
                inputs.append(a)
            return Arg(inputs.index(a))
        return a

    args = fx.node.map_aggregate(node.args, template)
    kwargs = fx.node.map_aggregate(dict(node.kwargs), template)
    return FunctionalOp(node.target, args, kwargs), tuple(inputs), {}


def _activation_module(node: fx.Node, originals: dict[str, nn.Module]) -> nn.Module:
    """A fused activation as a module of one input (a shared ReLU module is copied)."""
    op, _, _ = _op_module(node, originals)
    return copy.deepcopy(op) if node.op == "call_module" else op


# --- the fallback for models whose forward cannot be traced ---------------------------------------
# Layers are found with forward hooks; Conv→BN(→ReLU) and Linear→ReLU fuse only where they are
# neighbours in an nn.Sequential. Functional ops are not seen, so they stay float.

HOOKED_OPS = (nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.LayerNorm, nn.Softmax, nn.GELU)


def _hook_fusions(model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    bn_of, relu_of = {}, {}
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        prefix = f"{seq_name}." if seq_name else ""
        for i, name in enumerate(names):
            if not isinstance(seq._modules[name], WEIGHT_LAYERS):
                continue
            j = i + 1
            if isinstance(seq._modules[name], nn.Conv2d) and j < len(names) \
                    and isinstance(seq._modules[names[j]], nn.BatchNorm2d):
                bn_of[prefix + name] = prefix + names[j]
                j += 1
            if j < len(names) and isinstance(seq._modules[names[j]], nn.ReLU):
                relu_of[prefix + name] = prefix + names[j]
    return bn_of, relu_of


def _hook_order(model: nn.Module, example: torch.Tensor, why: str) -> tuple[list[str], str | None]:
    """Execution order of quantizable modules, and the one that produces the output."""
    order: list[str] = []
    produced: dict[int, str] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, WEIGHT_LAYERS + HOOKED_OPS):
            def hook(m, inp, out, name=name):
                if name not in order:
                    order.append(name)
                produced[id(out)] = name
            handles.append(mod.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as err:  # the model's own error, with why tracing stopped too
        raise PluginError(f"the model does not run on one batch of its data ({graph.first_line(err)}); "
                          f"and it could not be traced: {why}") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return order, produced.get(id(out))


def _hook_rows(model: nn.Module, example: torch.Tensor, why: str) -> list[dict]:
    order, output_layer = _hook_order(model, example, why)
    bn_of, relu_of = _hook_fusions(model)
    rows = [_row("input", "input", 0, 0, 0, False, False, "",
                 f"layers found by module hooks, not the traced graph ({why}): functional ops such as +, cat "
                 "and @ are not quantized, and only neighbours in an nn.Sequential are fused")]
    for name in order:
        mod = model.get_submodule(name)
        fused = "+".join(part for part, key in (("BN", bn_of), ("ReLU", relu_of)) if name in key)
        weight = getattr(mod, "weight", None) if isinstance(mod, WEIGHT_LAYERS) else None
        params = sum(p.numel() for p in mod.parameters())
        rows.append(_row(name, type(mod).__name__, params, weight.numel() if weight is not None else 0,
                         weight.shape[0] if weight is not None else 0, isinstance(mod, WEIGHT_LAYERS),
                         name == output_layer, fused, ""))
    return rows


def _hook_prepare(model: nn.Module, plan: LayerPlan, example: torch.Tensor, why: str) -> QATModel:
    net = copy.deepcopy(model)
    rows = _hook_rows(net, example, why)
    plan.check_names([r["name"] for r in rows])
    bn_of, relu_of = _hook_fusions(net)
    float_layers: dict[str, str] = {}
    for row in rows:
        row["spec"] = plan.spec_for(row["name"]).model_dump()
        name = row["name"]
        if name == "input":
            continue
        spec = plan.spec_for(name)
        mod = net.get_submodule(name)
        quantize_output = spec.act_bits is not None and not row["is_output"]
        relu = nn.ReLU() if name in relu_of else None
        bounds = (0.0, None) if relu is not None else None
        if isinstance(mod, nn.Conv2d):
            bn = net.get_submodule(bn_of[name]) if name in bn_of else None
            new = QuantConv2d.from_float(mod, bn, relu, bounds, spec, quantize_output)
        elif isinstance(mod, nn.Linear):
            new = QuantLinear.from_float(mod, relu, bounds, spec, quantize_output)
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
    return QATModel(net, activation_quantizer(plan.spec_for("input")), rows, float_layers)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def size_bytes(layers: list[dict], plan: LayerPlan) -> dict[str, float]:
    """Model size at each layer's weight width, against FP32: the one size model every page shows.

    ``quantized_bytes`` is bit-packed: ``bits/8`` bytes a quantized weight plus a 4-byte scale per
    channel (or tensor). ``stored_bytes`` is what int8.onnx holds: ONNX has no type narrower than
    8 bits, so a 2..7-bit weight takes a byte too, plus a scale and a zero point per channel.
    Biases and float layers cost 4 bytes a parameter in both; ``fp32_bytes`` counts the deployed
    layers' parameters (BatchNorm folded into its convolution).
    """
    fp32 = packed = stored = 0.0
    for row in layers:
        fp32 += 4 * row["params"]
        spec = plan.spec_for(row["name"])
        if row["has_weights"] and spec.weight_bits is not None:
            scales = row["out_channels"] if spec.granularity == "per_channel" else 1
            rest = 4 * (row["params"] - row["weight_params"])
            packed += row["weight_params"] * spec.weight_bits / 8 + 4 * scales + rest
            stored += row["weight_params"] + 5 * scales + rest
        else:
            packed += 4 * row["params"]
            stored += 4 * row["params"]
    return {"fp32_bytes": fp32, "quantized_bytes": packed, "stored_bytes": stored,
            "ratio": packed / fp32 if fp32 else 1.0}
