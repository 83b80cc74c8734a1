"""Library layers that are a familiar layer in disguise: timm's ``BatchNormAct2d`` (a BatchNorm2d that also
runs its activation) folds into the convolution before it, and transformers' GPT-2 ``Conv1D`` (a Linear with
its weight transposed) is a weight layer. Each is checked through the export: ONNX Runtime computes, code
for code, what the run's integer arithmetic computes, with our weight codes."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from qat_core import library, summary, train
from qat_core.config import LayerPlan, QuantSpec
from qat_core.export import compare_codes, coverage, int8_onnx, optimized_graph, session, to_onnx
from qat_core.modules import QuantConv2d, QuantLinear
from qat_core.prepare import layer_table, prepare

os.environ.setdefault("HF_HUB_OFFLINE", "1")
library.import_torchvision()  # timm and transformers import it
timm = pytest.importorskip("timm")


def _exported(model: nn.Module, x: torch.Tensor, tmp_path):
    """The calibrated QAT model, its int8.onnx, and ONNX Runtime's and the integer arithmetic's outputs."""
    qat = prepare(model, LayerPlan(), x)
    train.calibrate(qat, [(x, None)], 1)
    qat.eval()
    path = tmp_path / "int8.onnx"
    path.write_bytes(int8_onnx(qat, x[:1]))
    with torch.no_grad(), qat.integer_arithmetic():
        ours = qat(x).as_subclass(torch.Tensor).numpy()
    return qat, path, ours, session(path).run(None, {"input": x.numpy()})[0]


class _NormActNet(nn.Module):
    """Convolutions followed by timm's BatchNormAct2d with a ReLU, a SiLU and no activation."""

    def __init__(self):
        super().__init__()
        from timm.layers import BatchNormAct2d

        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormAct2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), BatchNormAct2d(8, act_layer=nn.SiLU)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 1), BatchNormAct2d(8, apply_act=False)
        self.head = nn.Linear(8, 4)
        for bn in (self.bn1, self.bn2, self.bn3):  # statistics far from the identity: a missed fold shows
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            nn.init.uniform_(bn.weight, 0.5, 1.5)
            nn.init.uniform_(bn.bias, -0.5, 0.5)

    def forward(self, x):
        x = self.bn3(self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x))))))
        return self.head(x.mean((2, 3)))


def test_timm_batchnormact_folds_into_its_conv_and_its_relu_fuses(tmp_path):
    torch.manual_seed(0)
    model, x = _NormActNet().eval(), torch.randn(32, 3, 16, 16)
    rows = {r["name"]: r for r in layer_table(model, x)}
    # before: each BatchNormAct2d was a float "batch_norm" layer of its own, nothing folded
    assert (rows["conv1"]["fused"], rows["conv2"]["fused"], rows["conv3"]["fused"]) == ("BN+ReLU", "BN", "BN")
    assert rows["bn2.act"]["kind"] == "SiLU" and not [r for r in rows.values() if "batch_norm" in r["kind"]]
    qat, path, ours, theirs = _exported(model, x, tmp_path)
    assert sum(1 for m in qat.modules() if isinstance(m, QuantConv2d) and m.bn is not None) == 3
    np.testing.assert_array_equal(ours, theirs)
    assert not [r["layer"] for r in compare_codes(qat, path, x.numpy()) if r["differing"]]
    cov = coverage(optimized_graph(path), qat.layers, qat.float_layers)
    assert {"conv1", "conv2", "conv3", "head"} <= set(cov["integer_layers"])


def test_a_timm_model_built_from_batchnormact_folds_every_bn_and_ort_agrees_code_for_code(tmp_path):
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model, x = timm.create_model("regnetx_002", pretrained=False, num_classes=4).eval(), torch.randn(8, 3, 32, 32)
    norms = sum(isinstance(m, BatchNormAct2d) for m in model.modules())
    qat, path, ours, theirs = _exported(model, x, tmp_path)
    assert norms == 44 and sum(1 for m in qat.modules() if isinstance(m, QuantConv2d) and m.bn is not None) == norms
    np.testing.assert_array_equal(ours, theirs)
    assert not [r["layer"] for r in compare_codes(qat, path, x.numpy()) if r["differing"]]


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0,
                        pad_token_id=0, num_labels=2, use_cache=False)
    return library.HFClassifier(GPT2ForSequenceClassification(config), "text", pad_id=0).eval()


def _weight_codes(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Each Gemm / MatMul / Conv of the int8 graph → its weight's stored integer codes (absent: a float weight)."""
    inits = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    codes = {}
    for node in proto.graph.node:
        if node.op_type in ("Gemm", "MatMul", "Conv") and len(node.input) > 1:
            dq = producer.get(node.input[1])
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
                codes[node.name] = numpy_helper.to_array(inits[dq.input[0]])
            elif node.input[1] in inits:
                codes[node.name] = None
    return codes


def test_gpt2_conv1d_weights_are_quantized_by_the_run_not_by_onnx_runtime(tmp_path):
    torch.manual_seed(0)
    model, x = _gpt2(), torch.randint(1, 50, (16, 12))
    rows = {r["name"]: r for r in layer_table(model, x)}
    proj = [f"model.transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                          "mlp.c_proj")]
    # before: each Conv1D was traced through to an ``addmm`` op with float weights (kind "addmm")
    assert all(rows[p]["kind"] == "Linear" and rows[p]["has_weights"] for p in proj)
    assert rows["model.transformer.h.0.attn.c_attn"]["weight_params"] == 32 * 96
    qat, path, ours, theirs = _exported(model, x, tmp_path)
    assert all(isinstance(qat.layer(p), QuantLinear) for p in proj)
    codes = _weight_codes(onnx.load(str(path)))
    assert codes and all(c is not None and c.dtype in (np.int8, np.uint8) for c in codes.values()), codes
    np.testing.assert_array_equal(ours, theirs)
    assert not [r["layer"] for r in compare_codes(qat, path, x.numpy()) if r["differing"]]
    with torch.no_grad():  # the Linear computes what the Conv1D computed
        torch.testing.assert_close(prepare(model, LayerPlan(default=QuantSpec(weight_bits=None, act_bits=None)), x)(x), model(x))


# --- integer-kernel coverage, counted from ONNX Runtime's graph against the FP32 model's heavy ops --------------

def _coverage_of(model: nn.Module, x: torch.Tensor, tmp_path, plan: LayerPlan | None = None) -> dict:
    qat = prepare(model, plan or LayerPlan(), x)
    train.calibrate(qat, [(x, None)], 1)
    path = tmp_path / "int8.onnx"
    path.write_bytes(int8_onnx(qat.eval(), x[:1]))
    fp32 = onnx.load_from_string(to_onnx(model, x[:1]))
    return coverage(optimized_graph(path), qat.layers, qat.float_layers, fp32)


class _FunctionalWeight(nn.Module):
    """A Linear, then a weight used functionally (as torchvision's swin passes its qkv weight to a function):
    the second product is no layer of ours, yet a heavy op of the FP32 model."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.w = nn.Parameter(torch.randn(4, 16) * 0.1)

    def forward(self, x):  # (B, 16) -> (B, 4)
        return F.linear(torch.relu(self.fc(x)), self.w)


def test_coverage_counts_every_heavy_op_of_the_fp32_model_and_names_the_ones_left_float(tmp_path):
    torch.manual_seed(0)
    model, x = _FunctionalWeight().eval(), torch.randn(32, 16)
    cov = _coverage_of(model, x, tmp_path)
    assert (cov["heavy_ops"], cov["integer_heavy_ops"]) == (2, 1)  # before: "1/1 layers", the F.linear unseen
    assert summary.coverage_text(cov) == "integer-kernel coverage: 1/2 heavy ops (Conv/Gemm/MatMul of the FP32 model)"
    [op] = cov["float_heavy_ops"]
    assert op["layer"] == "linear" and "not quantized" in op["why"]
    assert list(summary.float_parts(cov)) == [f"linear ({op['op']})"]
    off = _coverage_of(model, x, tmp_path, LayerPlan(default=QuantSpec(weight_bits=None, act_bits=None)))
    assert summary.coverage_text(off) == ("integer-kernel coverage: 0/2 heavy ops: nothing runs as an integer kernel, "
                                          "all 2 Conv/Gemm/MatMul ops of the FP32 model stay float")
    assert summary.float_parts(off)["fc"] == "weight bits are off in the plan"


def test_distilbert_is_traced_through_its_inline_relu_and_every_heavy_op_is_an_integer_kernel(tmp_path):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=64,
                              num_labels=2)
    model = library.HFClassifier(DistilBertForSequenceClassification(config), "text", pad_id=0).eval()
    x = torch.randint(1, 50, (16, 12))
    # before: the whole model was kept as one leaf (it calls an nn.ReLU() made in its forward) and, returning a
    # ModelOutput, had no row: "0 layers" and nothing named as float
    assert "model.pre_classifier" in {r["name"] for r in layer_table(model, x)}
    cov = _coverage_of(model, x, tmp_path)
    assert cov["heavy_ops"] == cov["integer_heavy_ops"] == 10 and not cov["float_heavy_ops"]


def test_a_module_kept_whole_is_named_with_its_heavy_ops_left_float(tmp_path):
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            if x.sum() > 0:  # a branch on a value: fx cannot trace it
                return self.fc(x)
            return self.fc(-x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.block, self.head = Untraceable(), nn.Linear(16, 4)

        def forward(self, x):
            return self.head(torch.relu(self.block(x)))

    torch.manual_seed(0)
    cov = _coverage_of(Net().eval(), torch.randn(32, 16), tmp_path)
    assert cov["heavy_ops"] == 2 and cov["integer_heavy_ops"] == 1
    assert summary.float_parts(cov)["block"].startswith("kept whole, not traced")


def test_export_and_the_report_show_the_heavy_op_coverage_from_one_definition(workspace, digits_run, capsys):
    from qat_core import cli, export, report

    assert cli.main(["--workspace", str(workspace.root), "export", digits_run]) == 0
    result = workspace.read_result(digits_run, "export")
    assert result["heavy_ops"] == result["integer_heavy_ops"] > 0  # digits-cnn: every conv and linear integer
    assert summary.coverage_text(result) in capsys.readouterr().out.splitlines()
    parity = export.parity(workspace, digits_run)
    assert summary.coverage_value(parity) == f"{result['heavy_ops']}/{result['heavy_ops']} heavy ops"
    assert summary.coverage_value(parity) in report.report_html(workspace, digits_run).decode("utf-8")


def _windowed_attention(x, qkv_weight, qkv_bias, table: torch.Tensor, index: torch.Tensor):  # (B, T, 8)
    """Attention with a position bias looked up in a table, kept whole by ``torch.fx.wrap`` and given its
    projection's weights, as torchvision's ``shifted_window_attention`` is."""
    q, k, v = F.linear(x, qkv_weight, qkv_bias).chunk(3, dim=-1)
    scores = q @ k.transpose(-2, -1) + table[index].view(x.shape[1], x.shape[1])
    return scores.softmax(dim=-1) @ v


def _first_feature_only(x):  # (B, T, 8): item assignment on a traced value cannot be traced through
    mask = x.new_zeros(x.shape[-1])
    mask[0] = 1.0
    return x * mask


torch.fx.wrap("_windowed_attention")
torch.fx.wrap("_first_feature_only")


class _WindowNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.head = nn.Linear(8, 24), nn.Linear(8, 4)
        self.table = nn.Parameter(torch.randn(9) * 0.1)
        self.register_buffer("index", torch.randint(0, 9, (25,)))

    def forward(self, x):  # (B, 5, 8)
        return self.head(_first_feature_only(_windowed_attention(x, self.qkv.weight, self.qkv.bias, self.table, self.index)).mean(dim=1))


def test_a_library_function_kept_whole_by_fx_wrap_is_traced_through_and_its_products_are_integer(tmp_path):
    torch.manual_seed(0)
    model, x = _WindowNet().eval(), torch.randn(32, 5, 8)
    kinds = [r["kind"] for r in layer_table(model, x)]
    # before: one "_windowed_attention" op, float inside; the projection is the weight layer qkv, called functionally
    assert kinds.count("matmul") == 2 and "qkv" in {r["name"] for r in layer_table(model, x) if r["has_weights"]}
    assert "first_feature_only" in kinds  # its code cannot be traced: it stays one op, and the rest traces
    cov = _coverage_of(model, x, tmp_path)
    assert cov["heavy_ops"] == cov["integer_heavy_ops"] == 4, summary.float_parts(cov)
    qat, path, ours, theirs = _exported(model, x, tmp_path)
    np.testing.assert_array_equal(ours.argmax(1), theirs.argmax(1))
    assert not [r["layer"] for r in compare_codes(qat, path, x.numpy()) if r["differing"]]
