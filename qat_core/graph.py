"""The float model's traced graph: where its quantizable layers stand and what fuses with them.

A model is traced with ``torch.fx`` while one example batch runs alongside (every node also gets
its concrete value), so shapes, dtypes and rank-dependent Python (``(*x.shape[:-1], -1)``) are
known during the trace, and the graph is found wherever the layers stand — in an
``nn.Sequential``, a custom ``forward``, or a library's code (torchvision, timm, transformers):

- a ``Conv2d`` whose only user is a ``BatchNorm2d`` → the BN is folded into it (timm's ``BatchNormAct2d``
  is split into its BN and its activation first, so it folds and fuses too; transformers' ``Conv1D`` is
  replaced by the ``nn.Linear`` it is);
- a layer whose only user is ReLU / ReLU6 / Hardtanh / clamp with a lower bound of 0 → fused:
  the output quantizer sits after the activation and its range stays inside the activation's;
- every other op that computes new float values (``+``, ``*``, ``cat``, ``@``, ``mean``, pooling,
  softmax, norms, activations, …) → a layer of its own with an output quantizer;
- ops that only move values (views, reshapes, ``max_pool``, dropout in eval, slicing) → no
  quantizer: their output keeps the codes of their input.

``nn.MultiheadAttention`` and ``F.scaled_dot_product_attention`` are decomposed into Linear /
matmul / softmax pieces before and during the trace, so their projections and both matmuls get
quantizers. A module whose code cannot be traced is kept whole (a leaf) and named with the reason;
a model whose top-level ``forward`` cannot be traced is reported as such (``prepare`` then falls
back to finding layers with module hooks).
"""

from __future__ import annotations

import copy
import inspect
import math
import sys
import threading
import types
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import map_aggregate

from qat_core.integer import MOVING_FUNCTIONS, MOVING_METHODS, MOVING_MODULES, is_neutral_arithmetic
from qat_core.modules import PLAIN_OPERATOR, DecomposedMultiheadAttention, attention

MAX_LEAF_RETRIES = 32  # modules kept whole before tracing gives up
WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)
# modules with weights that QAT Studio has no QAT layer for: they run in float, by name
UNSUPPORTED_WEIGHTS = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Embedding,
                       nn.EmbeddingBag, nn.LSTM, nn.GRU, nn.RNN, nn.Bilinear, nn.MultiheadAttention)
# ops whose output takes only the shape of their input: masks and fills, not data
SHAPE_ONLY = {"ones_like", "zeros_like", "full_like", "empty_like", "rand_like", "randn_like", "randint_like"}


@dataclass
class Layer:
    """One plan row: a node of the traced graph whose output gets a quantizer."""

    name: str  # plan name: the module path (``layer1.0.conv1``) or a readable op name (``layer1.0.add``)
    kind: str  # ``Conv2d``, ``Linear``, a module class, or the op (``add``, ``matmul``, ``cat``)
    node: fx.Node
    has_weights: bool = False
    bn: fx.Node | None = None  # the folded BatchNorm2d's node
    activation: fx.Node | None = None  # the fused activation's node
    bounds: tuple[float, float | None] | None = None  # the fused activation's output range
    is_output: bool = False  # produces the model's output: its logits stay FP32

    @property
    def fused(self) -> str:
        parts = ["BN"] if self.bn is not None else []
        if self.activation is not None:
            parts.append(_activation_name(self.activation))
        return "+".join(parts)


@dataclass
class ModelGraph:
    """The traced float model (attention decomposed, in-place ops made plain) and its layers."""

    module: fx.GraphModule
    layers: list[Layer]
    input_is_float: bool
    float_layers: dict[str, str] = field(default_factory=dict)  # name -> why it stays float
    leaves: dict[str, str] = field(default_factory=dict)  # module kept whole -> why it could not be traced

    def submodule(self, node: fx.Node) -> nn.Module:
        return self.module.get_submodule(node.target)


class TracingError(Exception):
    """The model's own ``forward`` cannot be traced (``prepare`` falls back to module hooks)."""


# --- tracing -------------------------------------------------------------------------------------

class _ValueProxy(fx.Proxy):
    """A proxy that knows its example value, so rank-dependent Python (``*x.shape[:-1]``,
    ``len(t.shape)``) traces; branches on values are fixed at the example's and recorded."""

    def _value(self) -> Any:
        return self.tracer.values.get(self.node)

    def __getattr__(self, name: str) -> Any:
        # an attribute the example value lacks is absent, as in eager code (hasattr(x, "jax") is False)
        if name not in ("node", "tracer") and not name.startswith("__"):
            value = self._value()
            if value is not None and not hasattr(value, name):
                raise AttributeError(name)
            if name in ("dtype", "device") and isinstance(value, torch.Tensor):
                # fixed, like the model's dtype and device: a weight read only for them (transformers' ViT casts
                # its input to the patch projection's dtype, timm's EdgeNeXt builds its position grid on the
                # projection's device) then leaves the graph instead of pinning a swapped-out weight
                return getattr(value, name)
        return super().__getattr__(name)

    def __iter__(self):
        value = self._value()
        if isinstance(value, (tuple, list, torch.Tensor)):
            return iter([self[i] for i in range(len(value))])
        return super().__iter__()

    def __len__(self) -> int:
        value = self._value()
        if isinstance(value, (tuple, list, torch.Tensor)):
            return len(value)
        return super().__len__()

    def __bool__(self) -> bool:
        value = self._value()
        if isinstance(value, bool):
            self.tracer.fixed_branches.append(self.node.name)
            return value
        return super().__bool__()


# While it traces, torch.fx patches torch.nn.Module.__call__ and __getattr__ for the whole process. The
# app's server runs models in several threads (sessions, overlapping reruns): another thread's model then
# reached this tracer and failed with "module is not installed as a submodule". So a tracer passes other
# threads' calls through untouched, and one trace runs at a time (a trace ending restores the originals).
_TRACING = threading.Lock()


class _Tracer(fx.Tracer):
    def __init__(self, example: tuple[torch.Tensor, ...], leaves: set[str], fixed: dict[str, Any]):
        super().__init__()
        self.thread = threading.get_ident()
        self.proxy_buffer_attributes = True  # buffers sliced by traced sizes (position ids) become nodes
        self.example, self.leaves, self.fixed = list(example), leaves, fixed
        self.values: dict[fx.Node, Any] = {}
        self.fixed_branches: list[str] = []
        self.failed_in: tuple[str, str] | None = None  # innermost module whose code failed, and why

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # a library's own Conv2d / Linear subclass (timm's) is one layer, not code to trace through
        return qualname in self.leaves or isinstance(m, WEIGHT_LAYERS) or super().is_leaf_module(m, qualname)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        if threading.get_ident() != self.thread:  # another thread's model: not traced
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        if threading.get_ident() != self.thread:
            return forward(*args, **kwargs)
        if _built_in_forward(self, m):  # DistilBERT's FFN calls nn.ReLU() made on the spot: its ops are the caller's
            return forward(*args, **kwargs)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as err:
            if self.failed_in is None:
                self.failed_in = (self.path_of_module(m), first_line(err))
            raise

    def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, name: str | None = None,
                     type_expr: Any = None, proxy_factory_fn: Any = None) -> fx.Proxy:
        if kind == "call_function" and target is F.scaled_dot_product_attention:
            return _decomposed_sdpa(*args, **kwargs)  # traced as matmul / softmax pieces
        if kind == "call_function" and _library_function(target):
            traced = self._trace_through(target, args, kwargs)
            if traced is not None:
                return traced
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        from torch.fx._symbolic_trace import _maybe_revert_all_patches  # run real code, not traced code

        concrete = map_aggregate((args, kwargs), lambda a: self.values[a.node] if isinstance(a, fx.Proxy) else
                                 self.values[a] if isinstance(a, fx.Node) else a)
        try:
            with _maybe_revert_all_patches():
                self.values[proxy.node] = self._run(kind, target, *concrete)
        except Exception:  # a probe that fails in eager code too (hasattr(x, "jax")): not part of the graph
            self.graph.erase_node(proxy.node)
            raise
        return proxy

    def _trace_through(self, fn: Any, args: Any, kwargs: Any) -> Any:
        """A library function that ``torch.fx.wrap`` keeps whole (torchvision's ``shifted_window_attention``)
        traced through, so its products and projections get quantizers; None (and nothing recorded) if its
        code cannot be traced: it then stays one float op."""
        last, branches, failed = next(reversed(self.graph.nodes)), len(self.fixed_branches), self.failed_in
        stack = list(self.module_stack.items())  # a module call the failure left open would name later nodes
        try:
            return fn(*args, **kwargs)
        except Exception:
            while (node := next(reversed(self.graph.nodes))) is not last:
                self.values.pop(node, None)
                self.graph.erase_node(node)
            del self.fixed_branches[branches:]
            self.failed_in = failed
            self.module_stack.clear()
            self.module_stack.update(stack)
            return None

    def _run(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Any:
        if kind == "placeholder":
            name = target.lstrip("*").rsplit("_", 1)[0]  # a fixed argument's placeholder is "<name>_<n>"
            return self.fixed[name] if name in self.fixed else self.example.pop(0) if self.example else None
        if kind == "get_attr":
            return _attr(self.root, target)
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "call_module":
            return self.root.get_submodule(target)(*args, **kwargs)
        return None


def _library_function(target: Any) -> bool:
    """A Python function (not torch's own) that reaches the tracer as one call: ``torch.fx.wrap`` made it so."""
    return isinstance(target, types.FunctionType) and (target.__module__ or "").split(".")[0] not in ("torch", "qat_core")


def _built_in_forward(tracer: fx.Tracer, m: nn.Module) -> bool:
    """Whether ``m`` is a module without weights that a forward builds and calls on the spot (not a submodule)."""
    try:
        tracer.path_of_module(m)
        return False
    except NameError:
        return not any(True for _ in m.parameters()) and not any(True for _ in m.buffers())


def _decomposed_sdpa(query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0,
                     is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Any:
    """``F.scaled_dot_product_attention`` as matmul / softmax ops (in eval: dropout is off)."""
    if enable_gqa:
        raise TracingError("scaled_dot_product_attention with enable_gqa=True is not supported yet")
    head_dim = query.tracer.values[query.node].shape[-1]
    return attention(query, key, value, attn_mask, is_causal, scale if scale is not None else 1 / math.sqrt(head_dim))


def _attr(root: nn.Module, target: str) -> Any:
    """``root``'s attribute by dotted path, read without the tracer's patched ``__getattr__``."""
    *path, leaf = target.split(".")
    mod = root
    for part in path:
        mod = mod._modules[part]
    for table in (mod._parameters, mod._buffers, mod._modules):
        if leaf in table:
            return table[leaf]
    return mod.__dict__[leaf]


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def decompose_attention(model: nn.Module) -> None:
    """Replace every ``nn.MultiheadAttention`` that can be decomposed by an equivalent module of
    Linear projections and explicit matmul / softmax (in place)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.MultiheadAttention) and DecomposedMultiheadAttention.supports(mod):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, DecomposedMultiheadAttention.from_float(mod))


class _BatchNormAct(nn.Module):
    """timm's ``BatchNormAct2d`` (a BatchNorm2d subclass that also runs ``drop`` and ``act``) as its parts,
    so the trace sees a plain BatchNorm2d to fold and an activation to fuse; an Identity part is left out."""

    def __init__(self, norm_act: nn.BatchNorm2d):
        super().__init__()
        self.bn = nn.BatchNorm2d(norm_act.num_features, norm_act.eps, norm_act.momentum, norm_act.affine,
                                 norm_act.track_running_stats, device=norm_act.running_mean.device,
                                 dtype=norm_act.running_mean.dtype)
        self.bn.load_state_dict({k: v for k, v in norm_act.state_dict().items() if "." not in k})
        self.drop, self.act = norm_act.drop, norm_act.act
        self.train(norm_act.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(x)
        for part in (self.drop, self.act):
            if not isinstance(part, nn.Identity):
                x = part(x)
        return x


@torch.no_grad()
def _linear_from_conv1d(conv1d: nn.Module) -> nn.Linear:
    """transformers' ``Conv1D`` (GPT-2: ``x @ W + b``, ``W`` shaped (in, out)) as the Linear it is."""
    linear = nn.Linear(conv1d.nx, conv1d.nf, device=conv1d.weight.device, dtype=conv1d.weight.dtype)
    linear.weight.copy_(conv1d.weight.t())
    linear.bias.copy_(conv1d.bias)
    return linear


def split_library_layers(model: nn.Module) -> None:
    """Replace library layers that are a Linear or a BatchNorm2d + activation in disguise by those parts
    (in place): transformers' ``Conv1D`` becomes an ``nn.Linear``, timm's ``BatchNormAct2d`` its BN, drop
    and act. Their classes are looked up among the modules already imported: a model using one imported it."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    norm_act = getattr(sys.modules.get("timm.layers.norm_act"), "BatchNormAct2d", None)
    for name, mod in list(model.named_modules()):
        if conv1d is not None and isinstance(mod, conv1d):
            new = _linear_from_conv1d(mod)
        elif norm_act is not None and isinstance(mod, norm_act):
            new = _BatchNormAct(mod)
        else:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)


def trace(model: nn.Module, example: torch.Tensor) -> tuple[fx.GraphModule, dict[fx.Node, Any], dict[str, str], nn.Module]:
    """A traced copy of ``model`` in eval mode, the example value of every node, the modules that had
    to be kept whole (path -> why), and the module tree the trace was made from (attention decomposed).
    Raises TracingError when the top-level forward cannot be traced."""
    net = copy.deepcopy(model).eval()
    decompose_attention(net)
    split_library_layers(net)
    for mod in net.modules():  # in-place activations would overwrite values the quantizers saved
        if getattr(mod, "inplace", False) is True:
            mod.inplace = False
    leaves: dict[str, str] = {}
    fixed = _fixed_arguments(net)
    for _ in range(MAX_LEAF_RETRIES):
        tracer = _Tracer((example,), set(leaves), fixed)
        try:
            with torch.no_grad(), _TRACING:
                graph = tracer.trace(net, concrete_args=fixed)
        except Exception as err:
            failed = tracer.failed_in
            if failed is None or failed[0] in leaves or not failed[0]:
                raise TracingError(f"tracing stopped in the model's forward: {first_line(err)}") from None
            leaves[failed[0]] = failed[1]
            continue
        _skip_empty_in_cat(graph, tracer.values, net)
        _linear_calls(graph, net, tracer.values)
        for node in [n for n in graph.nodes if n.op == "get_attr" and not n.users]:
            graph.erase_node(node)  # read for metadata only (see _ValueProxy), or an empty tensor cat skipped
        gm = fx.GraphModule(net, graph, class_name=type(model).__name__)
        values = {node: tracer.values.get(node) for node in graph.nodes}
        output = next(n for n in graph.nodes if n.op == "output").args[0]
        _check_traced(model, gm, example, fx.node.map_arg(output, tracer.values.get), tracer.fixed_branches)
        return gm, values, leaves, net
    raise TracingError(f"more than {MAX_LEAF_RETRIES} modules could not be traced")


def _skip_empty_in_cat(graph: fx.Graph, values: dict[fx.Node, Any], root: nn.Module) -> None:
    """Drop the 1-D empty tensors of a ``torch.cat``, which torch skips whatever the others' rank
    (transformers' key/value cache starts as ``torch.tensor([])`` and each layer concatenates its keys to it).
    The trace keeps such a tensor as a constant attribute, which the ONNX exporter cannot skip ("All tensors
    must have the same rank"); a cat left with one tensor is that tensor, with no quantizer of its own."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (torch.cat, torch.concat, torch.concatenate) \
                or not node.args or not isinstance(node.args[0], (list, tuple)):
            continue
        parts = node.args[0]
        empty = [p for p in parts if isinstance(p, fx.Node) and p.op == "get_attr"  # a constant the trace made
                 and isinstance(t := _attr(root, p.target), torch.Tensor) and t.shape == (0,)]
        kept = [p for p in parts if p not in empty]
        if not kept or len(kept) == len(parts):
            continue
        if len(kept) > 1:
            node.args = (type(parts)(kept), *node.args[1:])
        elif isinstance(values.get(kept[0]), torch.Tensor) and values[kept[0]].dtype == values[node].dtype:
            node.replace_all_uses_with(kept[0])
            graph.erase_node(node)


def _linear_calls(graph: fx.Graph, net: nn.Module, values: dict[fx.Node, Any]) -> None:
    """``F.linear(x, P.weight, P.bias)`` of an ``nn.Linear`` P (torchvision's swin hands its projections' weights
    to a function) becomes the call ``P(x)``: a weight layer like any other call of P."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not F.linear or node.kwargs or len(node.args) not in (2, 3):
            continue
        x, weight, bias = (*node.args, None)[:3]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target.endswith(".weight")):
            continue
        path = weight.target.rpartition(".")[0]
        mod = net.get_submodule(path)
        want_bias = None if mod.bias is None else f"{path}.bias"
        if not isinstance(mod, nn.Linear) or (bias.target if isinstance(bias, fx.Node) and bias.op == "get_attr"
                                              else bias) != want_bias:
            continue
        with graph.inserting_before(node):
            call = graph.call_module(path, (x,))
        call.meta, values[call] = dict(node.meta), values.get(node)
        node.replace_all_uses_with(call)
        graph.erase_node(node)


def _fixed_arguments(net: nn.Module) -> dict[str, Any]:
    """The forward's arguments after the input, fixed at their defaults (``attn_mask=None``,
    ``is_causal=False``): the model is called with one tensor, so they are never given."""
    params = list(inspect.signature(net.forward).parameters.values())[1:]
    required = [p.name for p in params if p.default is inspect.Parameter.empty
                and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if required:
        raise TracingError(f"forward needs more than one input ({', '.join(required)}); wrap the model so that "
                           "forward takes one tensor")
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


@torch.no_grad()
def _check_traced(model: nn.Module, gm: fx.GraphModule, example: torch.Tensor, traced: Any, fixed: list[str]) -> None:
    """The traced graph must compute what the model computes, also at another batch size. At the example it
    is ``traced``, the output the trace computed node by node (what the graph computes, without running it
    again); at batch size 1 the graph's code runs."""
    was = model.training
    model.eval()
    try:
        for x, got in ((example, traced), (example[:1], None)):
            want = model(x)
            got = gm(x) if got is None else got
            if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)):
                raise TracingError("the model must return one tensor (the logits); wrap it so forward returns them")
            if want.shape != got.shape or not torch.allclose(want, got, rtol=1e-4, atol=1e-5):
                branches = f" (branches fixed at trace time: {', '.join(fixed)})" if fixed else ""
                raise TracingError(f"the traced graph does not reproduce the model at batch size {len(x)}{branches}")
    finally:
        model.train(was)


# --- what each node is ---------------------------------------------------------------------------

def _is_float(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _carries_float(value: Any) -> bool:
    """A float tensor, or a tuple of them (``unbind``, ``chunk``, a module's outputs)."""
    return _is_float(value) or isinstance(value, (tuple, list)) and any(_is_float(v) for v in value)


def _tensor_inputs(node: fx.Node, values: dict[fx.Node, Any]) -> list[fx.Node]:
    return [n for n in node.all_input_nodes if isinstance(values.get(n), torch.Tensor)]


def _moves_values(node: fx.Node, gm: fx.GraphModule, values: dict[fx.Node, Any]) -> bool:
    """Whether ``node``'s output only moves or picks its input's values (keeps its codes)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), MOVING_MODULES)
    if node.op == "call_function" and node.target in MOVING_FUNCTIONS:
        return True
    if node.op == "call_method" and node.target in MOVING_METHODS:
        return node.target not in ("to", "float") or values.get(node).dtype == values.get(node.args[0]).dtype
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if node.op in ("call_function", "call_method") and is_neutral_arithmetic(name, node.args, node.kwargs):
        return values.get(node).dtype == values.get(_tensor_inputs(node, values)[0]).dtype
    out = values.get(node)  # anything else that returns a view of an input (dropout in eval, identity)
    return isinstance(out, torch.Tensor) and any(
        out.untyped_storage().data_ptr() == values[n].untyped_storage().data_ptr()
        for n in _tensor_inputs(node, values))


def _activation_bounds(node: fx.Node, gm: fx.GraphModule) -> tuple[float, float | None] | None:
    """The output range ``[0, upper]`` of a clipping activation (ReLU, ReLU6, Hardtanh, clamp) that
    starts at 0: the range an unsigned quantizer with zero point 0 can hold exactly."""
    bounds: tuple[Any, Any] | None = None
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, nn.ReLU):
            bounds = (0.0, None)
        elif isinstance(mod, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
            bounds = (mod.min_val, mod.max_val)
    elif node.op in ("call_function", "call_method"):
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        args = list(node.args[1:])
        if name in ("relu", "relu_"):
            bounds = (0.0, None)
        elif name in ("relu6",):
            bounds = (0.0, 6.0)
        elif name in ("hardtanh", "hardtanh_"):
            bounds = (node.kwargs.get("min_val", args[0] if args else -1.0),
                      node.kwargs.get("max_val", args[1] if len(args) > 1 else 1.0))
        elif name in ("clamp", "clip", "clamp_min"):
            bounds = (node.kwargs.get("min", args[0] if args else None),
                      node.kwargs.get("max", args[1] if len(args) > 1 else None))
    if bounds is None or not isinstance(bounds[0], (int, float)) or bounds[0] != 0:
        return None
    if bounds[1] is not None and (not isinstance(bounds[1], (int, float)) or bounds[1] <= bounds[0]):
        return None
    return float(bounds[0]), None if bounds[1] is None else float(bounds[1])


ACTIVATION_NAMES = {"relu": "ReLU", "relu6": "ReLU6", "hardtanh": "Hardtanh", "clamp": "clamp", "clip": "clamp",
                    "clamp_min": "clamp"}


def _activation_name(node: fx.Node) -> str:
    if node.op == "call_module":
        return type(node.graph.owning_module.get_submodule(node.target)).__name__
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return ACTIVATION_NAMES.get(name.rstrip("_"), name)


def op_kind(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    target = PLAIN_OPERATOR.get(node.target, node.target)
    return target if isinstance(target, str) else getattr(target, "__name__", str(target)).strip("_")


# --- the analysis --------------------------------------------------------------------------------

def analyze(model: nn.Module, example: torch.Tensor) -> ModelGraph:
    """Trace ``model`` and find its layers in execution order. Raises TracingError (see ``trace``)."""
    gm, values, leaves, source = trace(model, example)
    graph = gm.graph
    users = {n: list(n.users) for n in graph.nodes}
    layers: dict[fx.Node, Layer] = {}
    data: set[fx.Node] = set()  # nodes that carry values computed from the input (not masks, not shapes)
    absorbed: dict[fx.Node, fx.Node] = {}  # BN / activation node -> the node of the layer it joined
    float_layers: dict[str, str] = {}
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    for node in graph.nodes:
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if _carries_float(values.get(node)) and (node.op == "placeholder" or (mod is not None and any(
                True for _ in mod.parameters())) or (any(n in data for n in node.all_input_nodes)
                                                     and op_kind(node, gm) not in SHAPE_ONLY)):
            data.add(node)
        if node.op not in ("call_module", "call_function", "call_method") or not _is_float(values.get(node)) \
                or node not in data:
            continue
        src = node.all_input_nodes[0] if node.all_input_nodes else None
        owner = absorbed.get(src, src)
        single_user = src is not None and len(users[src]) == 1
        if isinstance(mod, nn.BatchNorm2d) and owner in layers and layers[owner].has_weights \
                and isinstance(_module(gm, owner), nn.Conv2d) and src is owner and single_user and layers[owner].bn is None and calls[owner.target] == 1:
            layers[owner].bn = node
            absorbed[node] = owner
            continue
        bounds = _activation_bounds(node, gm)
        if bounds is not None and owner in layers and single_user and layers[owner].activation is None \
                and (src is owner or absorbed.get(src) is owner):
            layers[owner].activation, layers[owner].bounds = node, bounds
            absorbed[node] = owner
            continue
        if mod is not None and isinstance(mod, WEIGHT_LAYERS) and calls[node.target] == 1 \
                and _computes_like_base(mod, values.get(node.args[0]), values[node]):
            layers[node] = Layer(node.target, type(mod).__name__, node, has_weights=True)
            continue
        if _moves_values(node, gm, values):
            continue  # keeps its input's codes
        if mod is None and any(isinstance(values.get(n), torch.Tensor) and n not in data and n.op != "get_attr"
                               for n in node.all_input_nodes):
            continue  # applies a mask (-inf, or a dtype's minimum): its range is the mask's; it stays float
        layers[node] = Layer("", op_kind(node, gm), node)
        if mod is not None and node.target in leaves:
            continue  # named below with every other module kept whole
        if isinstance(mod, UNSUPPORTED_WEIGHTS + WEIGHT_LAYERS):
            why = (f"QAT Studio has no QAT layer for {type(mod).__name__}" if not isinstance(mod, WEIGHT_LAYERS) else
                   f"{type(mod).__name__} is called more than once" if calls[node.target] > 1 else
                   f"{type(mod).__name__}'s forward computes something other than a plain "
                   f"{'convolution' if isinstance(mod, nn.Conv2d) else 'linear layer'} of its weights")
            float_layers[node.target] = f"its weights stay FP32: {why}"
        elif isinstance(mod, nn.BatchNorm2d):
            float_layers[node.target] = ("BatchNorm2d does not follow a Conv2d that only it reads, so it cannot be "
                                         "folded; it runs in float")
    for name, why in leaves.items():  # also one whose output is no tensor (a ModelOutput): it has no row
        float_layers[name] = f"kept whole, not traced ({why}): the layers inside it stay FP32"
    ordered = list(layers.values())
    _name_ops(ordered, gm, source)
    _mark_output(ordered, graph, gm, values, absorbed)
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    return ModelGraph(gm, ordered, _is_float(values.get(placeholder)), float_layers, leaves)


@torch.no_grad()
def _computes_like_base(mod: nn.Module, x: Any, y: Any) -> bool:
    """Whether a Conv2d / Linear (or a subclass) computed the plain op of its weights on the example,
    which its QAT layer will compute (a subclass may pad, standardize or scale its weights)."""
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        return False
    if isinstance(mod, nn.Conv2d) and (mod.padding_mode != "zeros" or isinstance(mod.padding, str)
                                       and mod.padding != "valid"):
        return False
    if type(mod) in (nn.Conv2d, nn.Linear) and not (mod._forward_hooks or mod._forward_pre_hooks):
        return True  # torch's own class, no hook: its forward is the plain op (not worth a second run)
    if isinstance(mod, nn.Conv2d):
        want = F.conv2d(x, mod.weight, mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)
    else:
        want = F.linear(x, mod.weight, mod.bias)
    return want.shape == y.shape and torch.allclose(want, y, rtol=1e-4, atol=1e-5)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _scope(node: fx.Node) -> str:
    """The module path the node's code belongs to (``layer1.0`` for BasicBlock's ``out += identity``)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _name_ops(layers: list[Layer], gm: fx.GraphModule, source: nn.Module) -> None:
    """Plan names: a module's path; an op's module path plus the op (``layer1.0.add``), or the
    module path alone when the op is the only layer of that module (a model's own ``Add`` module)."""
    taken = {name for name, _ in source.named_modules()} | {name for name, _ in source.named_parameters()}
    per_scope = Counter(_scope(ly.node) for ly in layers if ly.node.op != "call_module")
    seen: Counter = Counter()
    for ly in layers:
        if ly.node.op == "call_module":
            base = ly.node.target
            seen[base] += 1
            ly.name = base if seen[base] == 1 else f"{base}_{seen[base] - 1}"
            continue
        scope = _scope(ly.node)
        op = ly.kind.lower()
        owner = source.get_submodule(scope) if scope else None
        if owner is not None and per_scope[scope] == 1 and not any(True for _ in owner.children()) \
                and not any(True for _ in owner.parameters()) and not any(True for _ in owner.buffers()):
            base = scope  # the op is all this module does (a model's own ``Add``): the module's name
            taken.discard(scope)
        else:
            base = f"{scope}.{op}" if scope else op
        name, k = base, 0
        while name in taken or name == "input":
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        ly.name = name


def _mark_output(layers: list[Layer], graph: fx.Graph, gm: fx.GraphModule, values: dict[fx.Node, Any],
                 absorbed: dict[fx.Node, fx.Node]) -> None:
    """The layer whose output is the model's output (through value-moving ops) keeps float logits."""
    by_node = {ly.node: ly for ly in layers}
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    node = out if isinstance(out, fx.Node) else None
    while node is not None:
        node = absorbed.get(node, node)
        if node in by_node:
            by_node[node].is_output = True
            return
        inputs = _tensor_inputs(node, values)
        node = inputs[0] if len(inputs) == 1 and _moves_values(node, gm, values) else None
