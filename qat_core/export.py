"""FP32 and int8 QDQ ONNX export of a run, integer-kernel coverage, and parity with the simulation.

How the int8 model is made (no re-calibration: the run's own scales and zero points):

0. Every export (FP32 and int8) gets constant ``Reshape`` targets, ``-1`` standing for the batch,
   where the model computes them from ``x.shape`` (``static_reshapes``): ONNX Runtime cannot fold
   those chains through a QDQ graph, and a Transformer would run ~100 extra small nodes a call.
1. The QAT model itself is exported in eval mode (BN folded by ``QuantConv2d``) with every
   ``FakeQuantizer`` in ``export_int8`` mode: same scale and zero point, int8/uint8 storage range,
   so the legacy exporter writes ``QuantizeLinear``/``DequantizeLinear`` pairs.
2. Graph passes make the QDQ graph one that ONNX Runtime fuses into integer kernels:
   constant sub-graphs become initializers; ``QuantizeLinear(weight)`` becomes an int8
   initializer computed with the layer's own code range (a 4-bit layer keeps codes -8..7, exactly
   its training grid); a per-tensor ``DequantizeLinear`` moves past Flatten/Reshape so the ops on
   both sides see Q/DQ; float Conv/Gemm biases become int32 with scale ``s_x * s_w``.
3. ONNX Runtime's optimizer (``ORT_ENABLE_ALL``) then fuses DQ→op→Q groups into ``QLinearConv``,
   ``QGemm``, ``QLinearMatMul``, ``QLinearAdd``, … The optimized graph is inspected and every node
   is mapped back to our layer names through the exporter's scope names (``/net/conv1/conv/Conv``
   is layer ``conv1.conv``), so float layers are reported by name with the reason. It would also merge two
   Q/DQ pairs standing back to back into one rounding on a new scale (``DoubleQDQPairsRemover``), which the
   run's evaluation does not: preparation gives no quantizer to an op that leaves its input as it is, so the
   export writes none, and ``merged_quantizers`` names any that another pattern leaves.

Activations narrower than 8 bits are stored in uint8 with their scale and clipped to their own codes
(``clip_narrow_activations``). ``parity`` then compares ONNX Runtime with the run's integer
arithmetic (``integer``): predictions and every layer's output codes.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import tempfile
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from qat_core import cpu, files, graph, integer
from qat_core.errors import ExportError, StoreError
from qat_core.planning import plan_summary
from qat_core.quantizers import INT8_UNSIGNED, FakeQuantizer, quantizers

OPSET = 17  # LayerNormalization is one node; scaled_dot_product_attention exports
INPUT_NAME, OUTPUT_NAME = "input", "logits"
FP32_FILE, INT8_FILE = "fp32.onnx", "int8.onnx"
ONNX_LIMIT = 2 * files.GB  # protobuf's own limit: no ONNX file is larger
# ONNX Runtime ops that compute on integer codes (CPU execution provider, after its QDQ fusions)
INTEGER_OPS = frozenset({
    "QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "ConvInteger",
    "MatMulInteger", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool",
    "QLinearSoftmax", "QLinearLeakyRelu", "QLinearSigmoid", "QLinearConcat", "QLinearReduceMean",
    "QLinearWhere", "QLinearConvTranspose", "QAttention", "NhwcQLinearConv",
})
# ops that only move or pick codes: as exact on uint8 as on float, never reported (Clip: the narrow
# range of a sub-8-bit activation, on its codes; see clip_narrow_activations)
DATA_MOVEMENT = frozenset({"QuantizeLinear", "DequantizeLinear", "MaxPool", "NhwcMaxPool", "Reshape", "Flatten",
                           "Transpose", "Squeeze", "Unsqueeze", "Identity", "Shape", "Gather", "Concat", "Slice",
                           "Relu", "Cast", "Constant", "Clip"})
# layer kinds whose work is a matrix product of two activations (heavy, like a conv or linear)
MATMUL_KINDS = frozenset({"matmul", "bmm", "MatMul"})
# the heavy ops of an exported FP32 model (GPT-2's Conv1D exports as Gemm): what coverage is counted against
HEAVY_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum"})
# ONNX Runtime's integer kernels for them, and its float forms of them after its fusions
INTEGER_HEAVY_OPS = frozenset({"QLinearConv", "NhwcQLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat",
                               "DynamicQuantizeMatMul", "ConvInteger", "MatMulInteger", "QLinearConvTranspose",
                               "QAttention"})
FLOAT_HEAVY_OPS = HEAVY_OPS | {"FusedConv", "NhwcFusedConv", "FusedGemm", "FusedMatMul", "Attention",
                               "MultiHeadAttention"}


def is_heavy(row: dict) -> bool:
    """Conv, linear and matmul layers: the work an integer kernel saves; elementwise ops are light."""
    return bool(row["has_weights"]) or row["kind"] in MATMUL_KINDS


# --- layer names ---------------------------------------------------------------------------------

FLAT_SEP = "~"  # stands for "." in the flat module names of an exported traced graph (see _flat_scopes)


def _scope(node_name: str) -> str:
    """The module path of an exporter node name: ``/net/net.2/conv1/conv/Conv`` → ``net.2.conv1.conv``,
    ``/net/layer1~0~conv1/weight_quant/QuantizeLinear`` → ``net.layer1.0.conv1.weight_quant``.

    The exporter names each called module by its last name (a numbered child ``<parent>.<index>``;
    only the index is kept).
    """
    parts = node_name.strip("/").split("/")[:-1]
    return ".".join(p.rsplit(".", 1)[-1] for p in parts).replace(FLAT_SEP, ".")


def _flat_scopes(model: nn.Module) -> None:
    """Give every module a traced graph calls a flat name that spells its path (``layer1~0~conv1``).

    The exporter names a node after the modules *called* on the way to it; a traced graph calls
    its layers directly, not through their parent containers, so without this ``layer1.0.conv1``
    and ``layer2.0.conv1`` would both be exported as ``conv1``.
    """
    for gm in [m for m in model.modules() if isinstance(m, fx.GraphModule)]:
        for node in gm.graph.nodes:
            if node.op == "call_module" and "." in node.target:
                flat = node.target.replace(".", FLAT_SEP)
                if not hasattr(gm, flat):
                    gm.add_submodule(flat, gm.get_submodule(node.target))
                node.target = flat
        gm.delete_all_unused_submodules()
        gm.recompile()


def _layer_of(node_name: str, layers: list[str]) -> str | None:
    """Our layer name for an exporter node name: ``/net/conv1/conv/act_quant/QuantizeLinear`` → ``conv1.conv``.

    The longest layer name that prefixes the node's module scope wins (``input`` for ``/input_quant``).
    """
    scope = _scope(node_name)
    if scope == "input_quant" or scope.startswith("input_quant."):
        return "input"
    scope = scope.removeprefix("net.")
    best = None
    for name in layers:
        if (scope == name or scope.startswith(name + ".")) and (best is None or len(name) > len(best)):
            best = name
    return best


# --- torch → ONNX --------------------------------------------------------------------------------

def to_onnx(model: nn.Module, example: torch.Tensor, opset: int = OPSET) -> bytes:
    """Export ``model`` (eval mode, dynamic batch) with the TorchScript exporter; ONNX bytes.

    Raises ExportError naming the op when ONNX cannot express part of the model.
    """
    model = model.eval()
    buffer = io.BytesIO()
    dims = {0: "batch"}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=opset, do_constant_folding=True,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: dims, OUTPUT_NAME: dims})
    except Exception as err:  # the exporter raises many types; all mean "ONNX cannot express this"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"ONNX (opset {opset}) cannot express {_failed_op(err) or 'part of this model'}: {first}. "
                          "Replace that op in the model, or keep the layer that uses it out of the export") from None
    import onnx

    proto = onnx.load_from_string(buffer.getvalue())
    if static_reshapes(proto):
        cleanup(proto)
    return proto.SerializeToString()


def _failed_op(err: BaseException) -> str | None:
    """The op the TorchScript exporter was converting when ``err`` was raised, and where the model calls it
    (``aten::cat in layers.0.attn``, ``aten::cat at model.py(8): forward``): its messages (an assertion on
    ranks) name no op, and the graph it prints ends with the model's last op, not the failed one."""
    tb, node = err.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_run_symbolic_function":
            node = tb.tb_frame.f_locals.get("node")
        tb = tb.tb_next
    try:
        kind, scope, calls = node.kind(), node.scopeName(), str(node.sourceRange()).splitlines()
    except Exception:  # no node (the error came before the ops were converted), or a torch without these methods
        return None
    names = [part.split("::", 1)[1].rsplit(".", 1)[-1] for part in scope.split("/") if "::" in part]  # as _scope
    module = ".".join(n for n in names if n).replace(FLAT_SEP, ".")
    if scope.startswith("qat_core.modules.QATModel::"):
        module = module.removeprefix("net.")  # the QAT model's layer names (QATModel holds the model as .net)
    if module:
        return f"{kind} in {module}"
    call = next((c for c in calls if "<eval_with_key>" not in c and "/torch/" not in c), None)
    return f"{kind} at {call.strip()}" if call else kind


# --- graph passes (each takes and changes an onnx.ModelProto) -------------------------------------

class _Graph:
    """Look-ups over a graph, rebuilt after each pass."""

    def __init__(self, model: Any):
        from onnx import numpy_helper

        g = model.graph
        self.graph = g
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list] = defaultdict(list)
        for n in g.node:
            for i in n.input:
                self.consumers[i].append(n)
        self._array = numpy_helper.to_array

    def const(self, name: str) -> np.ndarray | None:
        t = self.inits.get(name)
        return None if t is None else self._array(t)


def _attr(node: Any, name: str, default: Any = None) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def fold_constants(model: Any) -> int:
    """Evaluate nodes whose inputs are all constants (zero-point casts, Identity copies, Constant)
    into initializers. Q/DQ are left for the passes that own them."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    known = {t.name for t in g.initializer}
    keep, folded = [], 0
    values: dict[str, np.ndarray] = {}
    for node in g.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") or not all(i in known for i in node.input if i):
            keep.append(node)
            continue
        inputs = {}
        for i in node.input:
            if i and i not in values:
                values[i] = numpy_helper.to_array(next(t for t in g.initializer if t.name == i))
            if i:
                inputs[i] = values[i]
        outputs = ReferenceEvaluator(node).run(None, inputs)
        for name, value in zip(node.output, outputs, strict=True):
            value = np.asarray(value)
            values[name] = value
            g.initializer.append(numpy_helper.from_array(value, name))
            known.add(name)
        folded += 1
    del g.node[:]
    g.node.extend(keep)
    return folded


def _multiple_of_batch(values: np.ndarray, batches: tuple[int, ...]) -> bool:
    """Whether ``values`` (one per batch size) are ``k·B`` for one whole ``k >= 1``."""
    k = values[0] // batches[0]
    return k >= 1 and all(v == k * b for v, b in zip(values, batches, strict=True))


def static_reshapes(model: Any, batches: tuple[int, ...] = (2, 3, 5)) -> int:
    """A ``Reshape`` whose target shape is computed at run time from ``Shape`` → ``Gather`` →
    ``Concat`` chains (``x.reshape(b, n, heads, dk)`` with ``b, n = x.shape``) gets a constant target
    with ``-1`` for the batch: ``(B, T, H, dk)`` → ``[-1, T, H, dk]``. The dead chains are dropped
    by ``cleanup``.

    ONNX Runtime fuses such chains itself only when the ``Shape`` reads the Reshape's own input, which
    QDQ graphs break (the Shape reads a DequantizeLinear output, the Reshape its codes), leaving
    ~100 small nodes a Transformer runs on every call. The targets are evaluated at a few batch
    sizes (all other input dimensions are fixed by the export); an entry that stays put is a constant,
    one that grows as ``k·B`` becomes ``-1``; a target with more than one such entry is left alone.
    """
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name for t in g.initializer}
    targets = list(dict.fromkeys(n.input[1] for n in g.node if n.op_type == "Reshape" and n.input[1] not in inits))
    dims = [d.dim_value for d in g.input[0].type.tensor_type.shape.dim] if len(g.input) == 1 else []
    if not targets or not dims or not all(dims[1:]):
        return 0
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in targets)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        elem = onnx.helper.tensor_dtype_to_np_dtype(g.input[0].type.tensor_type.elem_type)
        runs = [sess.run(targets, {g.input[0].name: np.zeros((b, *dims[1:]), elem)}) for b in batches]
    except Exception:  # a graph the probe cannot run keeps its dynamic reshapes: slower, never wrong
        return 0
    changed = 0
    for i, name in enumerate(targets):
        values = [np.asarray(r[i]).astype(np.int64).reshape(-1) for r in runs]
        if any(v.shape != values[0].shape for v in values):
            continue
        stack = np.stack(values)  # (len(batches), rank)
        grows = [j for j in range(stack.shape[1]) if not (stack[:, j] == stack[0, j]).all()]
        if len(grows) > 1 or (grows and -1 in stack[0]):
            continue  # two unknown entries: no single -1 can stand for them
        if grows and not _multiple_of_batch(stack[:, grows[0]], batches):
            continue
        target = stack[0].copy()
        target[grows] = -1
        const = name + "_static"
        g.initializer.append(numpy_helper.from_array(target, const))
        for node in g.node:
            if node.op_type == "Reshape" and node.input[1] == name:
                node.input[1] = const
        changed += 1
    return changed


def fold_weight_quantize(model: Any, code_ranges: dict[str, tuple[int, int]], as_uint8: bool = False) -> int:
    """``QuantizeLinear(float weight initializer)`` → int8 initializer of the layer's own codes.

    Codes are ``integer.weight_codes`` — PyTorch's fake-quant formula, so the int8 weights are
    bit-exact with training; ``qmin/qmax`` are the layer's real code range (``code_ranges``:
    quantizer module path → range), so narrow layers keep their exact grid.
    ``as_uint8``: a layer with codes beyond ±64 is stored as ``codes + 128`` in uint8 with zero point
    ``z + 128`` — the same values, run by ONNX Runtime's exact u8×u8 kernels, for CPUs where its
    u8×s8 kernels saturate (see ``cpu``); narrower weights cannot saturate and keep the faster kernels.
    """
    from onnx import numpy_helper

    gr = _Graph(model)
    g = model.graph
    keep, folded = [], 0
    for node in g.node:
        w = gr.const(node.input[0]) if node.op_type == "QuantizeLinear" else None
        if w is None or w.dtype != np.float32:
            keep.append(node)
            continue
        scale, zp = gr.const(node.input[1]), gr.const(node.input[2])
        if scale.size > 1:
            shape = [1] * w.ndim
            shape[_attr(node, "axis", 1)] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        if _scope(node.name) not in code_ranges:
            raise ExportError(f"cannot tell which weight quantizer {node.name} belongs to; the exporter's scope "
                              "names changed — report this model to the QAT Studio maintainers")
        qmin, qmax = code_ranges[_scope(node.name)]
        codes = integer.weight_codes(torch.tensor(w), torch.tensor(scale), torch.tensor(zp.astype(np.float32)),
                                     qmin, qmax, None).numpy().astype(zp.dtype)
        if as_uint8 and zp.dtype == np.int8 and np.abs(codes.astype(np.int16)).max() > cpu.SAFE_INT8_WEIGHT:
            codes = (codes.astype(np.int16) + 128).astype(np.uint8)
            zp_u8 = node.output[0] + "_zero_point_u8"
            g.initializer.append(numpy_helper.from_array(
                (gr.const(node.input[2]).astype(np.int16) + 128).astype(np.uint8), zp_u8))
            for dq in gr.consumers[node.output[0]]:
                dq.input[2] = zp_u8
        g.initializer.append(numpy_helper.from_array(codes, node.output[0]))
        folded += 1
    del g.node[:]
    g.node.extend(keep)
    return folded


def dq_past_shape_ops(model: Any) -> int:
    """``DQ(per-tensor) → Flatten/Reshape/Transpose/Gather/Slice/Split`` becomes ``Flatten/…(codes) → DQ``,
    through chains of them, so the ops on both sides (GlobalAveragePool and Gemm, a Q and a Gemm run on
    (B*T, D), a LayerNorm and the head that reads its class token ``x[:, 0]``, a qkv projection and
    the attention matmuls that read ``qkv.reshape(...).permute(...)[i]``) see Q/DQ next to them and
    are fused. A DQ with other consumers stays for them; each shape op gets its own copy."""
    from onnx import helper

    moved, before = 0, -1
    while moved != before:  # one hop a pass: a chain moves the DQ down one op at a time
        before = moved
        gr = _Graph(model)
        for node in list(gr.graph.node):
            if node.op_type not in ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Gather", "Slice",
                                    "Split"):
                continue
            dq = gr.producer.get(node.input[0])
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            scale = gr.const(dq.input[1])
            if scale is None or scale.size != 1:
                continue
            node.input[0] = dq.input[0]
            for i, out in enumerate(node.output):  # Split: a DQ for each part
                node.output[i] = out + "_codes"
                gr.graph.node.append(helper.make_node("DequantizeLinear", [out + "_codes", *dq.input[1:]], [out],
                                                      name=f"{node.name}/DequantizeLinear_{i}"))
            moved += 1
        cleanup(model)
    return moved


def quantize_bias(model: Any) -> int:
    """A float Conv/Gemm bias beside DQ'd input and weight becomes ``DQ(int32 rint(b / (s_x s_w)))``,
    the form ONNX Runtime needs to fuse the layer into QLinearConv/QGemm. A bias beyond int32 at that
    scale (a tiny input scale) is clipped and its layer listed in the metadata ``qat_studio.bias_saturated``."""
    from onnx import helper, numpy_helper

    gr = _Graph(model)
    g = model.graph
    added, count, saturated = [], 0, []

    def dq_scale(name: str) -> np.ndarray | None:
        d = gr.producer.get(name)
        return None if d is None or d.op_type != "DequantizeLinear" else gr.const(d.input[1])

    for node in g.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
            continue
        bias, sx, sw = gr.const(node.input[2]), dq_scale(node.input[0]), dq_scale(node.input[1])
        if bias is None or sx is None or sw is None or sx.size != 1:
            continue
        sb = (sx.astype(np.float32).reshape(()) * sw.astype(np.float32).reshape(-1)).astype(np.float32)
        if sb.size == 1:
            sb = np.full(bias.shape, sb[0], np.float32)
        exact = np.rint(bias.astype(np.float64) / sb.astype(np.float64))
        if np.abs(exact).max() > 2**31 - 1:
            saturated.append(_scope(node.name))
        codes = np.clip(exact, -(2**31), 2**31 - 1).astype(np.int32)
        base = node.input[2] + "_int32"
        g.initializer.extend([numpy_helper.from_array(codes, base), numpy_helper.from_array(sb, base + "_scale"),
                              numpy_helper.from_array(np.zeros(sb.shape, np.int32), base + "_zero_point")])
        added.append(helper.make_node("DequantizeLinear", [base, base + "_scale", base + "_zero_point"],
                                      [base + "_dq"], name=node.name.rsplit("/", 1)[0] + "/bias/DequantizeLinear",
                                      axis=0))
        node.input[2] = base + "_dq"
        count += 1
    g.node.extend(added)
    if saturated:
        model.metadata_props.add(key="qat_studio.bias_saturated", value=json.dumps(saturated))
    return count


def guard_global_average_pool(model: Any) -> dict[str, str]:
    """ORT's QLinearGlobalAveragePool needs ``s_x / (s_y · H·W)`` in ``[2^-32, 256)``; a pool whose
    learned scales fall outside becomes ``ReduceMean`` (run in float) and is reported by name."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    gr = _Graph(model)
    reasons = {}
    for node in gr.graph.node:
        if node.op_type != "GlobalAveragePool":
            continue
        dq, q = gr.producer.get(node.input[0]), (gr.consumers.get(node.output[0]) or [None])[0]
        shape = dims.get(node.input[0], [])
        if dq is None or q is None or dq.op_type != "DequantizeLinear" or q.op_type != "QuantizeLinear" \
                or len(shape) < 3 or not all(shape[2:]):
            continue
        sx, sy = float(gr.const(dq.input[1]).reshape(-1)[0]), float(gr.const(q.input[1]).reshape(-1)[0])
        factor = sx / (sy * int(np.prod(shape[2:])))
        if not 2.0**-32 <= factor < 256.0:
            node.op_type = "ReduceMean"
            node.attribute.extend([onnx.helper.make_attribute("axes", list(range(2, len(shape)))),
                                   onnx.helper.make_attribute("keepdims", 1)])
            why = (f"a learned scale is not positive (input {sx:.3g}, output {sy:.3g})" if min(sx, sy) <= 0 else
                   f"its rescale factor s_x/(s_y·H·W) = {factor:.3g} is outside [2^-32, 256)")
            reasons[_scope(node.name)] = (f"ONNX Runtime's integer average pool cannot run it: {why}; it runs in "
                                          "float — recalibrate or fine-tune longer")
    return reasons


def cleanup(model: Any) -> None:
    """Sort nodes topologically (the checker wants producers first), then drop nodes and
    initializers nothing reads (a DequantizeLinear whose consumers all got their own copy)."""
    g = model.graph
    ready = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    pending, ordered = list(g.node), []
    while pending:
        rest = []
        for n in pending:
            if all(i in ready for i in n.input):
                ordered.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ExportError("the exported graph has a cycle or a missing input; this model cannot be exported")
        pending = rest
    needed = {o.name for o in g.output}
    live = []
    for n in reversed(ordered):
        if any(o in needed for o in n.output):
            live.append(n)
            needed.update(n.input)
    del g.node[:]
    g.node.extend(reversed(live))
    for t in [t for t in g.initializer if t.name not in needed]:
        g.initializer.remove(t)


def _code_ranges(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Module path of each quantizer → its real code range (matched to QuantizeLinear scopes)."""
    return {name: (mod.qmin, mod.qmax) for name, mod in model.named_modules(remove_duplicate=False)
            if isinstance(mod, FakeQuantizer)}


def clip_narrow_activations(model: Any, code_ranges: dict[str, tuple[int, int]]) -> int:
    """``QuantizeLinear`` of an activation narrower than 8 bits → ``QuantizeLinear → Clip(qmin, qmax)``
    on its uint8 codes, so ONNX Runtime keeps the range the model was trained with (4 bits: codes
    0..15), not the whole uint8 range. The Clip sits between the integer kernels it separates, which
    ONNX Runtime still fuses (``QLinearConv → Clip → QLinearConv``), and runs on codes."""
    from onnx import helper, numpy_helper

    gr = _Graph(model)
    g = model.graph
    clipped = 0
    for node in list(g.node):
        if node.op_type != "QuantizeLinear" or gr.const(node.input[0]) is not None:
            continue  # weights are folded to their codes, which keep their narrow grid
        qmin, qmax = code_ranges.get(_scope(node.name), INT8_UNSIGNED)
        zp = gr.const(node.input[2]) if len(node.input) > 2 else None
        if (qmin, qmax) == INT8_UNSIGNED or zp is None or zp.dtype != np.uint8:
            continue
        codes, low, high = node.output[0] + "_unclipped", node.output[0] + "_min", node.output[0] + "_max"
        g.initializer.extend([numpy_helper.from_array(np.array(qmin, np.uint8), low),
                              numpy_helper.from_array(np.array(qmax, np.uint8), high)])
        g.node.append(helper.make_node("Clip", [codes, low, high], [node.output[0]],
                                       name=node.name.rsplit("/", 1)[0] + "/Clip"))
        node.output[0] = codes
        clipped += 1
    cleanup(model)
    return clipped


def int8_onnx(qat: nn.Module, example: torch.Tensor) -> bytes:
    """The int8 QDQ ONNX bytes of a QAT model (its qparams as they are; the model is not changed)."""
    import onnx

    model = copy.deepcopy(qat).eval()
    for q in quantizers(model):
        q.export_int8 = True
        q.observing = False
    code_ranges = _code_ranges(model)
    _flat_scopes(model)
    proto = onnx.load_from_string(to_onnx(model, example))
    fold_constants(proto)
    fold_weight_quantize(proto, code_ranges, as_uint8=cpu.int8_weights_saturate())
    clip_narrow_activations(proto, code_ranges)
    dq_past_shape_ops(proto)
    quantize_bias(proto)
    cleanup(proto)
    pool_reasons = guard_global_average_pool(proto)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"the int8 graph is not valid ONNX ({str(err).splitlines()[0]}); "
                          "report this model to the QAT Studio maintainers") from None
    proto.metadata_props.add(key="qat_studio.float_layers", value=json.dumps(pool_reasons))
    return proto.SerializeToString()


# --- ONNX Runtime ---------------------------------------------------------------------------------

def session(path: str | Path, threads: int = 1, optimized_path: str | Path | None = None) -> Any:
    """An ONNX Runtime CPU session (all graph optimizations); ExportError if the file is damaged."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():  # ONNX Runtime would wait on a FIFO
        raise StoreError(f"{path} does not exist; run `qat-studio export RUN` first" if not os.path.lexists(path) else
                         f"{path} is not a regular file; run `qat-studio export RUN` again to rewrite it")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own exception types for unreadable files
        first = str(err).strip().splitlines()[0][:300]
        raise ExportError(f"ONNX Runtime cannot load {path} ({first}); the file is damaged or not ONNX — "
                          "run `qat-studio export RUN` again to rewrite it") from None


def optimized_graph(path: str | Path) -> Any:
    """The graph ONNX Runtime actually runs (after ORT_ENABLE_ALL), as an onnx.ModelProto."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="qat-ort-") as tmp:
        opt = Path(tmp) / "optimized.onnx"
        session(path, optimized_path=opt)
        return onnx.load(str(opt))


def coverage(optimized: Any, layers: list[dict], float_reasons: dict[str, str], fp32: Any = None) -> dict[str, Any]:
    """Which quantized layers run as integer kernels in the optimized graph, and which in float (why).

    Counted independently of our layer table too, so that nothing can be missed: ``heavy_ops`` is the
    number of Conv / Gemm / MatMul nodes of the FP32 model (``fp32``, its ONNX graph),
    ``integer_heavy_ops`` the integer kernels among ONNX Runtime's optimized int8 graph, and
    ``float_heavy_ops`` every heavy op that graph still runs in float: its layer (or module scope) and why.

    ``layers`` are the QAT model's layer rows (with ``spec``); ``float_reasons`` are the layers the
    plan or prepare already left in float. ``float_layers`` names every layer that stays float and
    matters: conv, linear and matmul layers, and whatever the plan or preparation left float;
    ``float_ops`` names the light ops (norms, activations, elementwise) that ONNX Runtime runs in
    float between DequantizeLinear and QuantizeLinear because it has no integer kernel for them.
    """
    names = [r["name"] for r in layers]
    floating = {k: v for k, v in float_reasons.items() if k != "input"}
    for prop in optimized.metadata_props:
        if prop.key == "qat_studio.float_layers":
            for scope, why in json.loads(prop.value).items():
                layer = _layer_of(f"/{scope.replace('.', '/')}/op", names)
                if layer is not None:
                    floating[layer] = why
    kernels: dict[str, set[str]] = defaultdict(set)
    for node in optimized.graph.node:
        layer = _layer_of(node.name, names)
        if layer is not None:
            kernels[layer].add(node.op_type)
    integer, float_ops = [], {}
    for row in layers:
        name, spec = row["name"], row.get("spec", {})
        if name == "input" or name in floating:
            continue
        ops = kernels.get(name, set())
        int_ops = sorted(ops & INTEGER_OPS)
        other = sorted(ops - INTEGER_OPS - DATA_MOVEMENT)
        if int_ops and not (row["has_weights"] and other and not any(o.startswith("Q") for o in int_ops)):
            integer.append(name)
        elif row["has_weights"] and spec.get("weight_bits") is None:
            floating[name] = "weight bits are off in the plan"
        elif is_heavy(row):
            floating[name] = (f"ONNX Runtime kept {', '.join(other) or 'it'} in float: its input or output is not "
                              "quantized (no DequantizeLinear/QuantizeLinear next to it)" if ops else
                              "no node of this layer is left in ONNX Runtime's optimized graph")
        elif spec.get("act_bits") is not None or row.get("is_output"):
            float_ops[name] = (f"ONNX Runtime has no integer kernel for {row['kind']} here; it runs in float "
                               "between DequantizeLinear and QuantizeLinear")
    ops = Counter(n.op_type for n in optimized.graph.node)
    result = {"integer_layers": integer, "float_layers": floating, "float_ops": float_ops,
              "ops": dict(sorted(ops.items()))}
    if fp32 is not None:
        result |= _heavy_ops(optimized, fp32, names, floating)
    return result


COVERAGE_COUNTS = ("heavy_ops", "integer_heavy_ops", "float_heavy_ops")  # the export's, copied into parity


def _heavy_ops(optimized: Any, fp32: Any, names: list[str], floating: dict[str, str]) -> dict[str, Any]:
    """The heavy-op count of the FP32 graph, the integer kernels among them in ONNX Runtime's int8 graph,
    and each heavy op it runs in float, named by our layer (or its module scope) with the reason we know."""
    known = [*names, *floating]
    float_heavy = []
    for node in optimized.graph.node:
        if node.op_type not in FLOAT_HEAVY_OPS:
            continue
        name = node.name[node.name.find("/"):] if "/" in node.name else node.name  # ORT's "fused /net/…"
        layer = _layer_of(name, known)
        scope = _scope(name).removeprefix("net.").removeprefix("net")
        why = floating.get(layer) or ("ONNX Runtime runs it in float: its input or output is not quantized" if layer
                                      else "ONNX Runtime runs it in float: it is no layer of the traced graph, so "
                                      "no quantizer stands before it")
        float_heavy.append({"op": node.op_type, "layer": layer or scope, "why": why})
    return {"heavy_ops": sum(n.op_type in HEAVY_OPS for n in fp32.graph.node),
            "integer_heavy_ops": sum(n.op_type in INTEGER_HEAVY_OPS for n in optimized.graph.node),
            "float_heavy_ops": float_heavy}


# --- runs -----------------------------------------------------------------------------------------

def _load(store: Any, run_id: str) -> Any:
    from qat_core import runner

    return runner.load(store, run_id)


def _onnx_paths(store: Any, run_id: str) -> tuple[Path, Path]:
    return store.artifact(run_id, FP32_FILE), store.artifact(run_id, INT8_FILE)


def export_run(store: Any, run_id: str) -> dict[str, Any]:
    """Write ``fp32.onnx`` and ``int8.onnx`` into a finished run; returns (and saves as result
    ``export``) file sizes, integer and float layers.

    ``fp32.onnx`` is the run's FP32 baseline; ``int8.onnx`` is the fine-tuned QAT model with its
    learned scales and zero points, BN folded.
    """
    import onnx

    from qat_core.store import atomic_write_bytes

    loaded = _load(store, run_id)
    example = loaded.data.example(1)
    fp32_path, int8_path = _onnx_paths(store, run_id)
    fp32 = copy.deepcopy(loaded.fp32)
    graph.decompose_attention(fp32)  # the same numbers; MultiheadAttention's fused eval kernel has no ONNX form
    fp32_bytes = to_onnx(fp32, example)
    int8_bytes = int8_onnx(loaded.qat, example)
    atomic_write_bytes(fp32_path, fp32_bytes)
    atomic_write_bytes(int8_path, int8_bytes)
    optimized = optimized_graph(int8_path)
    cov = coverage(optimized, loaded.qat.layers, loaded.qat.float_layers, onnx.load_from_string(fp32_bytes))
    merged = merged_quantizers(onnx.load_from_string(int8_bytes), [r["name"] for r in loaded.qat.layers])
    result = {
        "files": {FP32_FILE: len(fp32_bytes), INT8_FILE: len(int8_bytes)},
        "size_ratio": len(int8_bytes) / len(fp32_bytes),
        "opset": OPSET,
        **cov,
        "merged_quantizers": merged,
        "notes": _notes(loaded.qat, optimized, merged),
    }
    store.write_result(run_id, "export", result)
    store.update_metrics(run_id, onnx={"fp32_bytes": len(fp32_bytes), "int8_bytes": len(int8_bytes),
                                       "size_ratio": result["size_ratio"],
                                       "integer_layers": len(cov["integer_layers"]),
                                       "float_layers": len(cov["float_layers"])})
    return result


def _notes(qat: nn.Module, optimized: Any, merged: list[tuple[str, str]]) -> list[str]:
    notes = []
    if merged:
        notes.append(f"the output quantizers of {', '.join(f'{a} → {b}' for a, b in merged)} stand back to back with "
                     "nothing computed between them: ONNX Runtime merges each pair into one rounding on a scale of its "
                     "own, while the run's evaluation rounds twice, so `qat-studio eval` can disagree there")
    names = [r["name"] for r in qat.layers]
    for prop in optimized.metadata_props:
        if prop.key == "qat_studio.bias_saturated":
            layers = sorted({_layer_of(f"/{s.replace('.', '/')}/op", names) or s for s in json.loads(prop.value)})
            notes.append(f"the bias of {', '.join(layers)} does not fit int32 at its input's scale: it is clipped, and "
                         "ONNX Runtime's int32 sums can wrap (the evaluation computes the same); the input's "
                         "activation range is nearly zero — recalibrate with more batches")
    narrow = sorted({q.bits for q in quantizers(qat) if not q.signed and q.bits < 8})
    if narrow:
        notes.append(f"{'/'.join(map(str, narrow))}-bit activations are stored as uint8 codes and clipped to their "
                     "own range (a Clip on the codes), as they were trained")
    if cpu.int8_weights_saturate() and any(q.signed and q.bits == 8 for q in quantizers(qat)):
        notes.append("this CPU has AVX2 but no VNNI, where ONNX Runtime's uint8×int8 kernels add pairs of products "
                     "in 16 bits and can saturate with 8-bit weights: layers with weights beyond ±64 are stored as "
                     "uint8 (zero point +128), the same values, run by its exact but slower uint8×uint8 kernels; "
                     "7-bit weights keep the fast kernels (the plan's reduce-range option)")
    return notes


def _ensure_exported(store: Any, run_id: str) -> tuple[Path, Path]:
    fp32_path, int8_path = _onnx_paths(store, run_id)
    if not (fp32_path.is_file() and int8_path.is_file()):
        export_run(store, run_id)
    return fp32_path, int8_path


def _code_outputs(proto: Any, names: list[str]) -> dict[str, str]:
    """Layer → the tensor holding its output codes in the int8 graph (after a narrow activation's Clip)."""
    gr = _Graph(proto)
    outputs = {}
    for node in proto.graph.node:
        scope = _scope(node.name)
        if node.op_type == "QuantizeLinear" and (scope.endswith("act_quant") or scope == "input_quant"):
            layer = _layer_of(node.name, names)
            if layer is not None:
                clip = [c for c in gr.consumers[node.output[0]] if c.op_type == "Clip"]
                outputs[layer] = clip[0].output[0] if clip else node.output[0]
    return outputs


def _scalar_qparams(gr: _Graph, node: Any) -> tuple[float, int] | None:
    """A Q/DQ node's constant scalar scale and explicit zero point; None when either is missing or not one number."""
    if len(node.input) != 3:
        return None
    scale, zp = gr.const(node.input[1]), gr.const(node.input[2])
    if scale is None or zp is None or scale.size != 1 or zp.size != 1:
        return None
    return float(scale.reshape(())), int(zp.reshape(()))


def _double_qdq(proto: Any) -> list[tuple[Any, Any]]:
    """The back-to-back pairs ``Q1 → DQ1 → Q2 → DQ2`` that ONNX Runtime's ``DoubleQDQPairsRemover`` (level 1)
    merges, as (Q1, Q2): it keeps ``Q1 → DQ2`` on one new scale spanning the intersection of both pairs' ranges,
    so one rounding replaces two. Its conditions: each tensor of the chain has exactly one consumer and none
    is a graph output, each pair's Q and DQ share one constant scalar scale and zero point, and both zero
    points have one type."""
    gr = _Graph(proto)
    outputs = {o.name for o in proto.graph.output}

    def only_consumer(name: str) -> Any:
        users = [n for n in gr.consumers[name] for i in n.input if i == name]  # ORT counts one edge per input
        return users[0] if len(users) == 1 and name not in outputs else None

    pairs = []
    for dq1 in proto.graph.node:
        q1 = gr.producer.get(dq1.input[0]) if dq1.op_type == "DequantizeLinear" else None
        q2 = only_consumer(dq1.output[0]) if q1 is not None else None
        dq2 = only_consumer(q2.output[0]) if q2 is not None and q2.op_type == "QuantizeLinear" else None
        if q1 is None or q1.op_type != "QuantizeLinear" or only_consumer(q1.output[0]) is not dq1 \
                or dq2 is None or dq2.op_type != "DequantizeLinear":
            continue
        params = [_scalar_qparams(gr, n) for n in (q1, dq1, q2, dq2)]
        if None in params or params[0] != params[1] or params[2] != params[3] \
                or gr.const(dq1.input[2]).dtype != gr.const(q2.input[2]).dtype:
            continue
        pairs.append((q1, q2))
    return pairs


def merged_quantizers(proto: Any, names: list[str]) -> list[tuple[str, str]]:
    """Layers whose output quantizers stand back to back in the int8 graph (nothing computed between them),
    which ONNX Runtime merges into one rounding while the run's evaluation rounds twice: (first, second)."""
    return [(_layer_of(q1.name, names) or _scope(q1.name), _layer_of(q2.name, names) or _scope(q2.name))
            for q1, q2 in _double_qdq(proto)]


def compare_codes(qat: nn.Module, int8_path: Path, x: np.ndarray) -> list[dict[str, Any]]:
    """Each quantized layer's output codes, ONNX Runtime against the model's integer arithmetic
    (``QATModel.integer_arithmetic``) on the same input codes, in execution order: how many codes
    differ and by how much.

    Every layer is fed ONNX Runtime's codes of the layers before it (its own output is compared,
    then replaced by ONNX Runtime's), so a difference is where the arithmetic differs, not where an
    earlier one spread to. The codes are read as extra graph outputs, which must not change what ONNX
    Runtime runs: QDQ fusions accept a QuantizeLinear whose output is a graph output, but the merge of
    back-to-back pairs (``merged_quantizers``) does not, so those codes are left unread and the merge
    shows in the first layer after it (fed the run's double rounding, where ONNX Runtime rounded once).
    """
    import onnx

    from qat_core.store import atomic_write_bytes

    names = [r["name"] for r in qat.layers]
    proto = onnx.load(str(int8_path))
    merged = {q.output[0] for pair in _double_qdq(proto) for q in pair}
    tensors = {layer: t for layer, t in _code_outputs(proto, names).items() if t not in merged}
    existing = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors.values()
                              if t not in existing)
    with tempfile.TemporaryDirectory(prefix="qat-parity-") as tmp:
        probe = Path(tmp) / "probe.onnx"
        atomic_write_bytes(probe, proto.SerializeToString())  # a full disk is "disk full", as everywhere
        sess = session(probe)
        ort_values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {INPUT_NAME: x}), strict=True))
    rows: dict[str, dict[str, Any]] = {}

    def compare(layer: str, out: Any) -> Any:
        theirs = ort_values.get(tensors[layer])
        if not isinstance(out, integer.Quantized) or theirs is None or theirs.size != out.numel():
            return out
        ours = out.codes().cpu().numpy().astype(np.int32).reshape(-1)
        diff = np.abs(ours - theirs.astype(np.int32).reshape(-1))
        rows[layer] = {"layer": layer, "codes": int(diff.size), "differing": int((diff > 0).sum()),
                       "mismatch": float((diff > 0).mean()), "max_code_diff": int(diff.max())}
        codes = torch.from_numpy(theirs.astype(np.float32)).reshape(out.shape).to(out.device)
        return out.grid.values(codes)

    handles = [qat.layer(layer).register_forward_hook(lambda m, i, out, layer=layer: compare(layer, out))
               for layer in tensors if qat.layer(layer) is not None]
    try:
        with torch.no_grad(), qat.integer_arithmetic():
            qat(torch.from_numpy(x))
    finally:
        for h in handles:
            h.remove()
    return [rows[layer] for layer in names if layer in rows]


PARITY_LAYER_SAMPLES = 64  # test samples whose codes are compared layer by layer (those that disagree first)


def parity(store: Any, run_id: str, batch_size: int = 256) -> dict[str, Any]:
    """ONNX Runtime's int8 model against the run's own evaluation on its test split; saved as result
    ``parity``.

    ``sim_accuracy`` is the run's quantized accuracy as evaluated (its integer arithmetic, see
    ``QATModel.integer_arithmetic``), ``agreement`` ONNX Runtime's top-1 agreement with it;
    ``fake_quant_accuracy`` / ``fake_quant_agreement`` compare the float simulation training used.
    ``layers`` compares every quantized layer's output codes on up to 64 samples (those that disagree
    first), each layer fed ONNX Runtime's codes of the layers before it; ``first_divergence`` is the
    first layer whose codes differ at all (None: every code equal), ``merged_quantizers`` the layers whose
    quantizers ONNX Runtime merges into one rounding (see ``merged_quantizers``), and ``explanation`` says
    why the results differ, if they do.
    """
    import onnx

    loaded = _load(store, run_id)
    _, int8_path = _ensure_exported(store, run_id)
    export = store.read_result(run_id, "export") or export_run(store, run_id)
    sess = session(int8_path)
    ort_logits, int_logits, fq_logits, labels, inputs = [], [], [], [], []
    with torch.no_grad():
        for x, y in loaded.data.test_loader(batch_size):
            ort_logits.append(_run_session(sess, x.numpy()))
            fq_logits.append(loaded.qat(x).numpy())
            with loaded.qat.integer_arithmetic():
                int_logits.append(loaded.qat(x).as_subclass(torch.Tensor).numpy())
            labels.append(y.numpy())
            inputs.append(x.numpy())
    if not labels:
        raise StoreError(f"run {run_id} has an empty test split; parity needs test data")
    o, s, f, y = (np.concatenate(v) for v in (ort_logits, int_logits, fq_logits, labels))
    if o.shape != s.shape:
        raise ExportError(f"{int8_path} gives outputs of shape {o.shape[1:]}, the run's model {s.shape[1:]}; "
                          "the file belongs to another model — run `qat-studio export RUN` again")
    agree = o.argmax(1) == s.argmax(1)
    order = np.argsort(agree, kind="stable")[:PARITY_LAYER_SAMPLES]  # the samples that disagree first
    layers = compare_codes(loaded.qat, int8_path, np.concatenate(inputs)[np.sort(order)])
    result: dict[str, Any] = {
        "samples": int(len(y)),
        "accuracy": float((o.argmax(1) == y).mean()),
        "sim_accuracy": float((s.argmax(1) == y).mean()),
        "agreement": float(agree.mean()),
        "disagreements": int((~agree).sum()),
        "max_logit_diff": float(np.abs(o - s).max()),
        "fake_quant_accuracy": float((f.argmax(1) == y).mean()),
        "fake_quant_agreement": float((o.argmax(1) == f.argmax(1)).mean()),
        "layers": layers,
        "first_divergence": next((r["layer"] for r in layers if r["differing"]), None),
        "merged_quantizers": merged_quantizers(onnx.load(str(int8_path)), [r["name"] for r in loaded.qat.layers]),
        "integer_layers": export["integer_layers"],
        "float_layers": export["float_layers"],
        "float_ops": export.get("float_ops", {}),
        **{k: export[k] for k in COVERAGE_COUNTS if k in export},
    }
    result["explanation"] = explain_parity(result)
    store.write_result(run_id, "parity", result)
    store.update_metrics(run_id, parity={k: result[k] for k in ("accuracy", "sim_accuracy", "agreement",
                                                                "max_logit_diff", "explanation")})
    return result


def explain_parity(result: dict[str, Any]) -> str | None:
    """Why ONNX Runtime's predictions differ from the run's evaluation (None when they agree and every
    compared code is equal)."""
    first = result.get("first_divergence")
    if result["agreement"] == 1.0 and first is None:
        return None
    merged = result.get("merged_quantizers") or []
    if merged:
        pairs = ", ".join(f"`{a}` → `{b}`" for a, b in merged)
        where = f"; `{first}` is the first layer whose codes differ" if first else ""
        return (f"ONNX Runtime merges quantizers that stand back to back into one rounding ({pairs}: its "
                "DoubleQDQPairsRemover turns QuantizeLinear→DequantizeLinear→QuantizeLinear→DequantizeLinear into one "
                f"pair on a scale spanning both ranges), where the run's evaluation rounds twice{where}. QAT Studio "
                "gives an op that leaves its input as it is (x + 0, x * 1) no quantizer of its own: train the run "
                "again with this version, or report this model to the QAT Studio maintainers")
    if first is None:
        return (f"{result['disagreements']} prediction(s) differ although every quantized layer's codes are equal "
                "on them: the float ops after the last quantizer (the logits) decide it")
    row = next(r for r in result["layers"] if r["layer"] == first)
    where = (f"`{first}` is the first layer whose codes differ ({row['differing']} of {row['codes']}, by up to "
             f"{row['max_code_diff']} step(s))")
    if first in result.get("float_ops", {}) or first in result.get("float_layers", {}):
        return (f"{where}: it runs in float between DequantizeLinear and QuantizeLinear, where ONNX Runtime's float "
                "kernel can round a value near a step boundary the other way")
    if row["max_code_diff"] > 1:
        return (f"{where}: more than a rounding step, so the int8 file does not hold this run's parameters — "
                "run `qat-studio export RUN` again")
    return (f"{where}: a rounding step where QAT Studio's emulation of ONNX Runtime's integer kernel differs; "
            "report this model to the QAT Studio maintainers")


def _run_session(sess: Any, x: np.ndarray) -> np.ndarray:
    try:
        return sess.run(None, {INPUT_NAME: x})[0]
    except Exception as err:
        raise ExportError(f"ONNX Runtime failed to run the model ({str(err).splitlines()[0][:300]}); "
                          "export the run again") from None


__all__ = ["export_run", "parity", "session", "optimized_graph", "coverage", "int8_onnx", "to_onnx"]


# --- downloads named for people -----------------------------------------------------------------------
NAME_CHARS = 80  # of a file name's stem: room for "_report.html" within every file system's 255
WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}


def safe_filename(text: str, fallback: str = "run") -> str:
    """``text`` as a file name every OS accepts: letters, digits, ``-`` and ``.`` kept, every run of anything
    else (spaces, ``/ : * ? " < > |``, control characters) one ``_``; no leading or trailing ``.``/``_``
    (a hidden file, a name Windows trims); at most ``NAME_CHARS``; ``fallback`` when nothing is left."""
    name = re.sub(r"_+", "_", re.sub(r"[^\w.-]+", "_", text)).strip("._")[:NAME_CHARS].rstrip("._")
    if name.split(".")[0].upper() in WINDOWS_RESERVED:  # CON.yaml cannot be saved on Windows
        name = f"{name}_"
    return name or fallback



def file_stem(config: dict[str, Any] | Any) -> str:
    """What a run's downloads are called (``digits-cnn_W8A8``, then ``digits-cnn_W8A8_int8.onnx``): the name its
    user gave it, else its model (``torchvision:mobilenet_v3_small`` → ``mobilenet_v3_small``, an ``hf:``
    folder → the folder's name) and its plan, as :func:`safe_filename` writes them."""
    data = config if isinstance(config, dict) else config.to_dict()
    if data.get("name"):
        return safe_filename(data["name"])
    model = re.split(r"[:/\\]", str(data["model"]).rstrip("/\\"))[-1]
    return safe_filename(f"{model}_{plan_summary(data)}")


BUNDLE_LIMIT = files.GB  # a run's zip is built in memory: its files past this are a download each


def run_bundle(store: Any, run_id: str, report_html: bytes | None = None) -> bytes:
    """Everything of a run in one zip, its files named for people under a folder ``file_stem``: the config
    (``.yaml``: ``qat-studio train`` reproduces the run), the metrics (``_metrics.json``), both ONNX models
    once exported and ``report_html`` when given (``report.report_html``'s, built by the caller). The ONNX
    models are stored as they are (protobuf floats hardly compress), the text deflated. Built in memory,
    refused past ``BUNDLE_LIMIT``."""
    import zipfile

    record = store.get(run_id)
    stem = file_stem(record["config"])
    onnx = {f"{stem}_{name}": path for name in (INT8_FILE, FP32_FILE)
            if (path := store.artifact(run_id, name)).is_file()}
    total = sum(p.stat().st_size for p in onnx.values()) + len(report_html or b"")
    if total > BUNDLE_LIMIT:
        raise StoreError(f"run {run_id}'s files take {total / files.MB:,.0f} MB, more than one zip of at most "
                         f"{BUNDLE_LIMIT / files.MB:,.0f} MB; download them one by one")
    text = {f"{stem}.yaml": store.config(run_id).to_yaml(),
            f"{stem}_metrics.json": json.dumps(record["metrics"], indent=1, default=str)}
    if report_html is not None:
        text[f"{stem}_report.html"] = report_html.decode("utf-8")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, body in text.items():
            bundle.writestr(f"{stem}/{name}", body, zipfile.ZIP_DEFLATED)
        for name, path in onnx.items():
            bundle.writestr(f"{stem}/{name}", files.read_bytes(path, ONNX_LIMIT, name, StoreError), zipfile.ZIP_STORED)
    return buffer.getvalue()

