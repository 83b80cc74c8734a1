"""Layers found in the traced graph of models no one on the team wrote: torchvision, Hugging Face,
a user's own forward. Each folds its BN, fuses its activations, quantizes its functional ops, exports
at opset 17 and runs as integer kernels in ONNX Runtime — and what does not is named with the reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from qat_core import cli, graph, library, runner, train
from qat_core.config import LayerPlan, RunConfig
from qat_core.export import coverage, int8_onnx, is_heavy, optimized_graph, session
from qat_core.modules import DecomposedMultiheadAttention, QuantConv2d, QuantOutput
from qat_core.prepare import layer_table, prepare
from qat_core.quantizers import quantizers
from tests.plugins import third_party

PLUGIN = "tests.plugins.third_party"


def _prepared(model: nn.Module, x: torch.Tensor):
    qat = prepare(model, LayerPlan(), x)
    train.calibrate(qat, [(x, None)], 1)
    return qat.eval()


def _coverage(qat, x, tmp_path):
    path = tmp_path / "int8.onnx"
    path.write_bytes(int8_onnx(qat, x[:1]))
    return coverage(optimized_graph(path), qat.layers, qat.float_layers), path


@pytest.mark.parametrize("name, least", [("resnet18", 1.0), ("mobilenet_v2", 1.0), ("mobilenet_v3_small", 0.95),
                                         ("efficientnet_b0", 0.95), ("vit", 0.95)])
def test_torchvision_models_fold_fuse_and_run_as_integer_kernels(name, least, tmp_path):
    model = third_party.torchvision_model(name).eval()
    x = third_party.images(n=16)[1][0][0]  # (4, 3, 32, 32)
    qat = _prepared(model, x)
    # every BatchNorm2d that follows a conv is folded into it
    folded = {id(m.bn) for m in qat.modules() if isinstance(m, QuantConv2d) and m.bn is not None}
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(folded) == len(bns) and not [n for n in qat.float_layers if "BatchNorm" in qat.float_layers[n]]
    cov, path = _coverage(qat, x, tmp_path)
    heavy = [r["name"] for r in qat.layers if is_heavy(r)]
    assert len(set(cov["integer_layers"]) & set(heavy)) >= least * len(heavy), cov["float_layers"]
    assert all(why for why in cov["float_layers"].values())  # every exception has its reason
    ort = session(path).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        sim = qat(x).numpy()
    assert np.abs(ort - sim).max() <= 0.05 * np.abs(sim).max() + 1e-6


def test_resnet_blocks_get_readable_names_and_fused_residual_relu():
    rows = {r["name"]: r for r in layer_table(third_party.torchvision_model("resnet18"), torch.randn(2, 3, 32, 32))}
    assert rows["conv1"]["fused"] == "BN+ReLU" and rows["layer1.0.conv2"]["fused"] == "BN"
    assert rows["layer1.0.add"]["kind"] == "add" and rows["layer1.0.add"]["fused"] == "ReLU"  # out += identity; relu
    assert rows["layer2.0.downsample.0"]["fused"] == "BN"
    assert rows["fc"]["is_output"] and sum(r["has_weights"] for r in rows.values()) == 21


def test_relu6_range_stays_inside_the_clip_so_ort_drops_it(tmp_path):
    model = third_party.torchvision_model("mobilenet_v2").eval()
    x = third_party.images(n=16)[1][0][0] * 20  # large inputs: activations run past 6 before the clip
    qat = _prepared(model, x)
    quant = qat.layer("features.0.0").act_quant
    assert quant.bounds == (0.0, 6.0) and float(quant.scale.detach()) * 255 <= 6.0 and float(quant.zero_point.detach()) == 0
    cov, _ = _coverage(qat, x, tmp_path)
    assert "Clip" not in cov["ops"] and "features.0.0" in cov["integer_layers"]


def test_a_users_forward_with_functional_ops_and_bn_outside_sequential(tmp_path):
    model, train_batches, _ = third_party.users_net()
    x = train_batches[0][0][:8]
    rows = {r["name"]: r for r in layer_table(model, x)}
    assert rows["stem"]["fused"] == "BN+ReLU" and rows["a"]["fused"] == "BN+Hardtanh"
    assert rows["b"]["fused"] == "ReLU"  # a tensor method: y.relu()
    assert {"add", "cat", "mean"} <= {r["kind"] for r in rows.values()}
    qat = _prepared(model.eval(), x)
    assert isinstance(qat.layer("add"), QuantOutput) and qat.float_layers == {}
    cov, _ = _coverage(qat, x, tmp_path)
    assert {"stem", "a", "b", "mix", "head", "add"} <= set(cov["integer_layers"]), cov
    assert cov["float_layers"] == {}


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_decomposes_into_the_same_numbers(batch_first):
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 5, 32) if batch_first else torch.randn(5, 3, 32)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    dec = DecomposedMultiheadAttention.from_float(mha)
    for kwargs in ({}, {"key_padding_mask": pad}, {"attn_mask": mask, "need_weights": True}):
        want, want_w = mha(x, x, x, **kwargs)
        got, got_w = dec(x, x, x, **kwargs)
        assert_close(got, want, atol=1e-5, rtol=1e-4)
        if want_w is not None:
            assert_close(got_w, want_w, atol=1e-5, rtol=1e-4)


class _SdpaBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 4)

    def forward(self, x):  # (B, T, 16)
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, 2, T, 8)
        return self.out(y.transpose(1, 2).reshape(x.shape[0], x.shape[1], 16)).mean(1)


def test_sdpa_is_traced_as_quantizable_matmuls_and_softmax(tmp_path):
    model, x = _SdpaBlock().eval(), torch.randn(4, 6, 16)
    rows = layer_table(model, x)
    assert sum(r["kind"] == "matmul" for r in rows) == 2 and any(r["kind"] == "softmax" for r in rows)
    qat = _prepared(model, x)
    # the causal mask's -inf stays out of every quantizer: ranges are finite and the numbers close
    assert all(torch.isfinite(q.scale).all() for q in quantizers(qat))
    with torch.no_grad():
        assert_close(qat(x), model(x), atol=0.05, rtol=0.05)
    cov, _ = _coverage(qat, x, tmp_path)
    matmuls = [r["name"] for r in qat.layers if r["kind"] == "matmul"]
    assert set(matmuls) <= set(cov["integer_layers"]) and cov["ops"].get("QLinearMatMul") == 2


class _ValueBranch(nn.Module):
    """A forward that branches on data: no single graph holds it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.head = _ValueBranch(), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.inner(x) + 1)


def test_an_untraceable_module_is_kept_whole_and_named():
    mg = graph.analyze(_Outer(), torch.randn(2, 8))
    assert set(mg.leaves) == {"inner"} and "kept whole, not traced" in mg.float_layers["inner"]
    assert "symbolically traced variables cannot be used as inputs to control flow" in mg.leaves["inner"]


def test_an_untraceable_forward_falls_back_to_module_hooks_and_says_why():
    rows = layer_table(_ValueBranch(), torch.randn(2, 8))
    assert [r["name"] for r in rows] == ["input", "fc"]
    assert "module hooks" in rows[0]["note"] and "tracing stopped" in rows[0]["note"]
    qat = prepare(_ValueBranch(), LayerPlan(), torch.randn(2, 8))
    assert qat(torch.randn(2, 8)).shape == (2, 4)


def test_hugging_face_bert_trains_exports_and_agrees_through_the_cli(tmp_path, capsys):
    """A tiny BERT through the plugin hook: W8A8 QAT, export at opset 17, ORT parity; every linear and
    both attention matmuls of each layer run as integer kernels."""
    config = RunConfig.model_validate({"model": f"{PLUGIN}:bert", "baseline": {"epochs": 4, "lr": 3e-3},
                                       "finetune": {"epochs": 1, "lr": 1e-4, "calibration_batches": 4}})
    workspace = str(tmp_path / "ws")
    (tmp_path / "bert.yaml").write_text(config.to_yaml())
    assert cli.main(["--workspace", workspace, "train", str(tmp_path / "bert.yaml"), "--quiet"]) == 0
    run_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert cli.main(["--workspace", workspace, "eval", run_id, "--backend", "onnxruntime", "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    loaded = runner.load(runner.RunStore(workspace), run_id)
    heavy = [r["name"] for r in loaded.qat.layers if is_heavy(r)]
    assert len(heavy) == 18  # 6 linears and 2 matmuls a layer, pooler, classifier
    assert set(heavy) <= set(out["integer_layers"]), out["float_layers"]
    assert out["agreement"] >= 0.995 and out["sim_accuracy"] > 0.5
    assert "input" not in out["float_layers"]  # token ids are not a quantized input, and not a float layer


def test_the_fp32_export_of_a_model_with_multihead_attention_decomposes_it_too():
    """nn.MultiheadAttention in eval runs a fused kernel that ONNX cannot express; the FP32 export
    decomposes it into the same numbers, as the QAT model does."""
    from qat_core.errors import ExportError
    from qat_core.export import to_onnx

    vit, x = third_party.torchvision_model("vit").eval(), torch.randn(2, 3, 32, 32)
    with pytest.raises(ExportError, match="_native_multi_head_attention"):
        to_onnx(vit, x)
    with torch.no_grad():
        want = vit(x).numpy()
    graph.decompose_attention(vit)
    import onnxruntime as ort

    sess = ort.InferenceSession(to_onnx(vit, x), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], want, atol=1e-4, rtol=1e-4)


class _ScaledLinear(nn.Linear):
    """A library's Linear subclass whose forward is not a plain linear layer of its weights."""

    def forward(self, x):
        return F.linear(x, self.weight * 2.0, self.bias)


class _PlainLinear(nn.Linear):
    def forward(self, x):  # the same numbers as nn.Linear, written out (as timm's Linear does)
        return F.linear(x, self.weight, self.bias)


class _Subclassed(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain, self.scaled = _PlainLinear(8, 8), _ScaledLinear(8, 4)

    def forward(self, x, mask=None, is_causal=False):  # extra arguments with defaults, as timm's blocks have
        h = self.plain(x)
        return self.scaled(h if mask is None else h * mask)


def test_weight_layer_subclasses_are_quantized_only_when_they_compute_the_plain_op():
    mg = graph.analyze(_Subclassed(), torch.randn(4, 8))
    weights = {ly.name for ly in mg.layers if ly.has_weights}
    assert weights == {"plain"}
    assert "computes something other than a plain linear layer" in mg.float_layers["scaled"]


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "mobilenetv3_small_050", "convnext_atto"])
def test_timm_models_run_every_conv_linear_and_matmul_as_integer_kernels(name, tmp_path):
    library.import_torchvision()  # timm imports it
    timm = pytest.importorskip("timm")
    kwargs = {"img_size": 32} if name.startswith("vit") else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    x = torch.randn(4, 3, 32, 32)
    qat = _prepared(model, x)
    assert not qat.layers[0]["note"]  # traced, not the module-hook fallback
    cov, _ = _coverage(qat, x, tmp_path)
    heavy = [r["name"] for r in qat.layers if is_heavy(r)]
    assert set(heavy) <= set(cov["integer_layers"]), cov["float_layers"]


class _Probing(nn.Module):
    """Library code that probes its input (``hasattr(x, "jax")``), as array-API helpers do."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if hasattr(x, "jax"):
            x = x * 2
        return self.fc(x)


def test_attribute_probes_see_what_eager_code_sees():
    mg = graph.analyze(_Probing(), torch.randn(2, 4))
    assert [n.op for n in mg.module.graph.nodes] == ["placeholder", "call_module", "output"]


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x, y):
        return self.fc(x + y)


def test_a_model_with_two_required_inputs_gets_a_message_that_says_to_wrap_it():
    from qat_core.errors import PluginError

    with pytest.raises(PluginError, match=r"forward needs more than one input \(y\); wrap the model"):
        layer_table(_TwoInputs(), torch.randn(2, 4))


def test_models_in_other_threads_run_while_one_traces():
    """The app's server runs models in several threads (sessions, overlapping reruns) while another traces:
    torch.fx's process-wide patch of nn.Module.__call__ once made those fail ("module is not installed as a
    submodule"), and two traces at once undid each other's patches."""
    import threading

    tv = library.import_torchvision()
    busy = tv.models.mobilenet_v3_small(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    errors: list[str] = []

    def run_eagerly():
        for _ in range(100):
            try:
                with torch.no_grad():
                    busy(x)
            except Exception as err:
                errors.append(repr(err))
                return

    def trace_twice():
        try:
            for _ in range(2):
                graph.analyze(tv.models.resnet18(num_classes=10), x)
        except Exception as err:
            errors.append(repr(err))

    threads = [threading.Thread(target=f) for f in (run_eagerly, trace_twice, trace_twice)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


class _ReadsWeightDevice(nn.Module):
    """timm's EdgeNeXt position encoding: builds a grid on its projection's device and dtype, then projects it."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(2, 4, 1)

    def forward(self, x):
        grid = torch.ones(1, 2, *x.shape[-2:]).to(device=self.proj.weight.device, dtype=self.proj.weight.dtype)
        return x + self.proj(grid)


def test_a_weight_read_for_its_device_does_not_pin_the_swapped_out_layer():
    model, x = _ReadsWeightDevice().eval(), torch.randn(8, 4, 5, 5)
    qat = _prepared(model, x)  # before: "references nonexistent attribute weight" (exit 70 for edgenext)
    assert "proj" in {r["name"] for r in qat.layers if r["has_weights"]}
    assert_close(qat(x), model(x), atol=0.1, rtol=0)  # 8-bit codes of the float model's numbers
