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
from qat_core.store import RunStore
from tests.conftest import quick_config

DIGITS_QUANTIZED = ["conv1.conv", "conv2.conv", "conv3.conv", "gap", "fc"]


@pytest.fixture(scope="module")
def digits_run_w4a8(workspace) -> str:
    """A real but short W4A8 fine-tune (the FP32 baseline is the shared digits run's, cached)."""
    return runner.execute(quick_config(weight_bits=4, act_bits=8, max_steps=40), workspace)


@pytest.fixture(scope="module")
def exported(workspace, digits_run) -> dict:
    return export_run(workspace, digits_run)


@pytest.fixture(scope="module")
def exported_w4a8(workspace, digits_run_w4a8) -> dict:
    return export_run(workspace, digits_run_w4a8)


def test_export_writes_both_models_and_every_layer_is_an_integer_kernel(workspace, digits_run, exported):
    for name in ("fp32.onnx", "int8.onnx"):
        assert workspace.artifact(digits_run, name).stat().st_size == exported["files"][name]
    assert exported["integer_layers"] == DIGITS_QUANTIZED
    assert exported["float_layers"] == {}
    assert exported["ops"]["QLinearConv"] == 3 and exported["ops"]["QGemm"] == 1
    assert workspace.read_result(digits_run, "export") == exported
    assert workspace.get(digits_run)["metrics"]["onnx"]["integer_layers"] == len(DIGITS_QUANTIZED)


@pytest.mark.parametrize("run", ["digits_run", "digits_run_w4a8", "digits_run_w4a4"])
def test_ort_int8_predicts_what_the_run_reported(request, workspace, run):
    run_id = request.getfixturevalue(run)
    result = parity(workspace, run_id)  # exports the run first when its ONNX files are missing
    assert result["samples"] == 450
    assert result["agreement"] == 1.0, result["explanation"]
    assert result["integer_layers"] == DIGITS_QUANTIZED
    assert result["accuracy"] == result["sim_accuracy"] == workspace.get(run_id)["metrics"]["qat"]["accuracy"]
    assert abs(result["fake_quant_accuracy"] - result["accuracy"]) < 0.01  # the float simulation, rounding aside
    assert workspace.read_result(run_id, "parity")["agreement"] == result["agreement"]


def test_narrow_weights_keep_their_exact_grid(workspace, digits_run_w4a8, exported_w4a8):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(workspace.artifact(digits_run_w4a8, "int8.onnx")))
    # int8 codes; on a CPU without VNNI stored as uint8 with 128 added (see qat_core.cpu)
    stored = [numpy_helper.to_array(t) for t in model.graph.initializer
              if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)]
    int8 = [w.astype(np.int16) - (128 if w.dtype == np.uint8 else 0) for w in stored if w.ndim >= 2]  # not zero points
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


def test_reshapes_computed_from_x_shape_become_constants_that_keep_any_batch(tmp_path):
    """The head split's ``reshape(b, n, heads, dk)`` and QuantLinear's 3-D → 2-D reshapes export with
    constant targets (-1 for the batch): no Shape chain is left, and the models still run at any batch."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model, x = zoo.TransformerClassifier(features=8, d=16, heads=2, ffn=32, depth=1).eval(), torch.randn(3, 6, 8)
    qat = prepare(model, LayerPlan(default=QuantSpec(range_method="minmax")), x[:2])
    train.calibrate(qat, [(x, None)], 1)
    for name, data, ref in (("fp32", to_onnx(model, x[:1]), model), ("int8", int8_onnx(qat.eval(), x[:1]), qat)):
        graph = onnx.load_from_string(data).graph
        assert not [n.op_type for n in graph.node if n.op_type in ("Shape", "Gather", "Concat")], name
        assert all(n.input[1] in {t.name for t in graph.initializer} for n in graph.node if n.op_type == "Reshape")
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        for batch in (1, 3):
            out = sess.run(None, {"input": x[:batch].numpy()})[0]
            with torch.no_grad():
                expected = ref(x[:batch]).numpy()
            assert out.shape == expected.shape
            np.testing.assert_allclose(out, expected, atol=1e-4 if name == "fp32" else 0.02)


def test_export_refuses_a_failed_run(workspace):
    run_id = workspace.create_run(quick_config())
    workspace.fail(run_id, "training diverged at step 3")
    with pytest.raises(StoreError, match=r"is failed: training diverged.*only finished runs"):
        export_run(workspace, run_id)


def test_export_refuses_a_run_without_weights(tmp_path):
    store = RunStore(tmp_path)  # its own workspace: a "done" run with no files would confuse other tests
    run_id = store.create_run(quick_config())
    store.finish(run_id)
    with pytest.raises(StoreError, match=r"has no fp32.pt"):
        export_run(store, run_id)


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


class _EmptyCache(nn.Module):
    """Concatenates a 1-D empty buffer to a 3-D input (torch skips it; the exporter cannot), then computes more."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(0))

    def forward(self, x):
        return torch.cat([self.cache, x], 1).softmax(-1)


class _Blocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(_EmptyCache())

    def forward(self, x):
        return self.blocks(x)


def test_an_exporter_assertion_names_the_op_and_the_module_it_stopped_at():
    """The exporter's own message ("All tensors must have the same rank") names no op, and the graph it prints
    ends with the model's last op; the error names the op being converted and the module that calls it."""
    with pytest.raises(ExportError, match=r"cannot express aten::cat in blocks\.0: All tensors must have the same"):
        to_onnx(_Blocks(), torch.randn(1, 4, 3))


def test_parity_names_the_first_layer_where_ort_and_the_simulation_diverge(workspace, digits_run_w4a8,
                                                                          exported_w4a8):
    """A stale int8.onnx whose conv2 activation scale is not the run's (1000× too coarse: ORT rounds every
    conv2 code to 0, so predictions must change): ORT's codes match the simulation's up to conv1 and
    part ways at conv2, and parity() says so through its report."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    path = workspace.artifact(digits_run_w4a8, "int8.onnx")
    good = path.read_bytes()
    model = onnx.load_from_string(good)
    q = next(n for n in model.graph.node if n.name == "/net/conv2~conv/act_quant/QuantizeLinear")
    scale = next(t for t in model.graph.initializer if t.name == q.input[1])  # shared with its DequantizeLinear
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(1000), scale.name))
    try:
        path.write_bytes(model.SerializeToString())
        result = parity(workspace, digits_run_w4a8)
    finally:
        path.write_bytes(good)
    assert result["agreement"] < 1.0 and result["disagreements"] > 0
    rows = {r["layer"]: r for r in result["layers"]}
    assert list(rows) == ["input", *DIGITS_QUANTIZED[:-1]]  # in execution order; fc's logits are not quantized
    assert rows["input"]["max_code_diff"] == 0  # quantized identically
    assert rows["conv1.conv"]["max_code_diff"] <= 1  # float sums in another order: a rounding step at most
    assert rows["conv2.conv"]["max_code_diff"] > 1 and rows["conv2.conv"]["mismatch"] > 0.1
    assert result["first_divergence"] == "conv2.conv"
    assert workspace.read_result(digits_run_w4a8, "parity")["first_divergence"] == "conv2.conv"
    assert parity(workspace, digits_run_w4a8)["agreement"] == 1.0  # the run's own file again


def test_on_a_cpu_without_vnni_only_weights_that_could_saturate_are_stored_as_uint8(workspace, digits_run,
                                                                                   monkeypatch):
    """8-bit weights beyond ±64 go to ONNX Runtime's exact uint8×uint8 kernels; 7-bit ones (reduce range)
    and 4-bit ones stay int8, for its fast uint8×int8 kernels, which they cannot saturate."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from qat_core import cpu

    monkeypatch.setattr(cpu, "int8_weights_saturate", lambda: True)
    loaded = runner.load(workspace, digits_run)
    for bits, stored in ((8, onnx.TensorProto.UINT8), (7, onnx.TensorProto.INT8), (4, onnx.TensorProto.INT8)):
        plan = LayerPlan(default=QuantSpec(weight_bits=bits, act_bits=8))
        qat = prepare(loaded.fp32, plan, loaded.data.example())
        train.calibrate(qat, loaded.data.train_loader(64), 2)
        model = onnx.load_from_string(int8_onnx(qat.eval(), loaded.data.example(1)))
        weights = [t for t in model.graph.initializer if t.name.endswith("weight_quant/QuantizeLinear_output_0")]
        assert len(weights) == 4 and {t.data_type for t in weights} == {stored}, bits
        codes = [numpy_helper.to_array(t).astype(np.int16) - (128 if t.data_type == onnx.TensorProto.UINT8 else 0)
                 for t in weights]
        largest = max(int(np.abs(c).max()) for c in codes)
        assert largest > 64 if bits == 8 else largest <= 2 ** (bits - 1)
