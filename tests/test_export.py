"""ONNX export and parity, against real runs and real ONNX Runtime sessions."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from qat_core import cli, runner, train, zoo
from qat_core.config import LayerPlan, QuantSpec
from qat_core.errors import ExportError, StoreError
from qat_core.export import coverage, export_run, int8_onnx, optimized_graph, parity, to_onnx
from qat_core.prepare import prepare
from tests.conftest import quick_config

DIGITS_QUANTIZED = ["conv1.conv", "conv2.conv", "conv3.conv", "gap", "fc"]


@pytest.fixture(scope="module")
def digits_run_w4a8(workspace) -> str:
    return runner.execute(quick_config(weight_bits=4, act_bits=8), workspace)


@pytest.fixture(scope="module")
def exported(workspace, digits_run) -> dict:
    return export_run(workspace, digits_run)


def test_export_writes_both_models_and_every_layer_is_an_integer_kernel(workspace, digits_run, exported):
    for name in ("fp32.onnx", "int8.onnx"):
        assert workspace.artifact(digits_run, name).stat().st_size == exported["files"][name]
    assert exported["integer_layers"] == DIGITS_QUANTIZED
    assert exported["float_layers"] == {}
    assert exported["ops"]["QLinearConv"] == 3 and exported["ops"]["QGemm"] == 1
    assert workspace.read_result(digits_run, "export") == exported
    assert workspace.get(digits_run)["metrics"]["onnx"]["integer_layers"] == len(DIGITS_QUANTIZED)


@pytest.mark.parametrize("run, least", [("digits_run", 1.0), ("digits_run_w4a8", 1.0), ("digits_run_w4a4", 0.995)])
def test_ort_int8_agrees_with_the_simulation(request, workspace, run, least):
    run_id = request.getfixturevalue(run)
    result = parity(workspace, run_id)
    assert result["samples"] == 450
    assert result["agreement"] >= least, result.get("layers")
    assert result["integer_layers"] == DIGITS_QUANTIZED
    assert abs(result["accuracy"] - result["sim_accuracy"]) <= 1 - least + 1e-9
    assert workspace.read_result(run_id, "parity")["agreement"] == result["agreement"]


def test_narrow_weights_keep_their_exact_grid(workspace, digits_run_w4a8):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    export_run(workspace, digits_run_w4a8)
    model = onnx.load(str(workspace.artifact(digits_run_w4a8, "int8.onnx")))
    int8 = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    int8 = [w for w in int8 if w.ndim >= 2]  # weights, not their zero points
    assert len(int8) == 4  # conv1 and fc are 8-bit (the plan keeps the ends at 8), conv2/conv3 4-bit
    narrow = [w for w in int8 if w.min() >= -8 and w.max() <= 7]
    assert len(narrow) >= 2 and all(np.unique(w).size <= 16 for w in narrow)


def test_cli_eval_json(workspace, digits_run, exported, capsys):
    code = cli.main(["--workspace", str(workspace.root), "eval", digits_run, "--backend", "onnxruntime", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert {"accuracy", "agreement", "max_logit_diff", "integer_layers", "float_layers"} <= set(out)
    assert out["agreement"] == 1.0


def test_resnet_convs_and_linear_all_run_as_integer_kernels(tmp_path):
    torch.manual_seed(0)
    model, x = zoo.resnet18(num_classes=10), torch.randn(4, 3, 32, 32)
    qat = prepare(model, LayerPlan(default=QuantSpec(range_method="minmax")), x[:2])
    train.calibrate(qat, [(x, None)], 1)
    path = tmp_path / "resnet.onnx"
    path.write_bytes(int8_onnx(qat.eval(), x[:1]))
    cov = coverage(optimized_graph(path), qat.layers, qat.float_layers)
    weighted = [r["name"] for r in qat.layers if r["has_weights"]]
    assert len(weighted) == 21 and set(weighted) <= set(cov["integer_layers"])
    assert cov["float_layers"] == {}
    assert cov["ops"]["QLinearConv"] == 20 and cov["ops"]["QLinearAdd"] == 8


def test_export_refuses_a_failed_run(workspace):
    run_id = workspace.create_run(quick_config())
    workspace.fail(run_id, "training diverged at step 3")
    with pytest.raises(StoreError, match=r"is failed: training diverged.*only finished runs"):
        export_run(workspace, run_id)


def test_export_refuses_a_run_without_weights(workspace):
    run_id = workspace.create_run(quick_config())
    workspace.finish(run_id)
    with pytest.raises(StoreError, match=r"has no fp32.pt"):
        export_run(workspace, run_id)


def test_corrupt_int8_file_is_reported(workspace, digits_run, exported):
    path = workspace.artifact(digits_run, "int8.onnx")
    good = path.read_bytes()
    try:
        path.write_bytes(b"not an onnx model")
        with pytest.raises(ExportError, match=r"cannot load .*int8.onnx.*damaged.*qat-studio export"):
            parity(workspace, digits_run)
    finally:
        path.write_bytes(good)


class _Spectrum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(x).abs()


def test_an_op_onnx_cannot_express_is_named():
    with pytest.raises(ExportError, match=r"cannot express.*fft"):
        to_onnx(_Spectrum(), torch.randn(1, 8))


def test_per_layer_comparison_lines_up_ort_and_simulation_codes(workspace, digits_run_w4a4):
    from qat_core.export import _layer_divergence

    export_run(workspace, digits_run_w4a4)
    loaded = runner.load(workspace, digits_run_w4a4)
    names = [r["name"] for r in loaded.qat.layers]
    rows = _layer_divergence(loaded.qat, workspace.artifact(digits_run_w4a4, "int8.onnx"),
                             loaded.data.test_x[:32].numpy(), names)
    assert [r["layer"] for r in rows] == ["input", *DIGITS_QUANTIZED[:-1]]  # fc's logits are not quantized
    assert rows[0]["max_code_diff"] == 0  # the input is quantized identically
