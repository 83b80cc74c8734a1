"""Back-to-back quantizers: timm MobileOne's ``scale_out + 0`` must not get a quantizer of its own, because ONNX
Runtime merges two Q/DQ pairs with nothing between them into one rounding (DoubleQDQPairsRemover) while the run's
evaluation would round twice; and where such a pair is left, the per-layer check sees it and parity names it."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from qat_core import export, graph, train
from qat_core.config import LayerPlan, QuantSpec
from qat_core.prepare import prepare


class Block(nn.Module):
    """MobileOne's train-time block without an identity branch: a 1×1 'scale' conv plus the number 0, then the
    3×3 branch added in place."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv_scale = nn.Sequential(nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out))
        self.conv_kxk = nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity_out = 0
        out = self.conv_scale(x) + identity_out
        out += self.conv_kxk(x)
        return torch.relu(out)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1, self.b2 = Block(3, 8), Block(8, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b2(self.b1(x)).mean((2, 3)))


def _exported(tmp_path, scale_after_conv: float):
    """The stand-in prepared (min/max ranges), calibrated and exported; each layer that reads a conv_scale's output
    gets its scale times ``scale_after_conv`` (as fine-tuning moves scales apart)."""
    torch.manual_seed(0)
    x = torch.randn(64, 3, 16, 16)
    qat = prepare(Net().eval(), LayerPlan(default=QuantSpec(range_method="minmax")), x[:2])
    train.calibrate(qat, [(x, None)], 1)
    qat.eval()
    with torch.no_grad():
        for name in ("b1.add", "b2.add"):
            qat.layer(name).act_quant.scale.mul_(scale_after_conv)
    path = tmp_path / "int8.onnx"
    path.write_bytes(export.int8_onnx(qat, x[:1]))
    with torch.no_grad(), qat.integer_arithmetic():
        ours = qat(x).as_subclass(torch.Tensor).numpy()
    return qat, path, x.numpy(), ours


def _ort(path, **kwargs) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], **kwargs)


def test_an_add_of_zero_keeps_its_input_codes_and_the_deployed_model_is_the_evaluated_one(tmp_path):
    qat, path, x, ours = _exported(tmp_path, 0.6)
    names = [r["name"] for r in qat.layers]
    assert names == ["input", "b1.conv_scale.0", "b1.conv_kxk.0", "b1.add", "b2.conv_scale.0", "b2.conv_kxk.0",
                     "b2.add", "mean", "fc"]  # `+ 0` is no layer; b1.add is the add of both branches
    assert export.merged_quantizers(onnx.load(str(path)), names) == []
    deployed = _ort(path).run(None, {"input": x})[0]
    assert (deployed.argmax(1) == ours.argmax(1)).mean() == 1.0
    np.testing.assert_array_equal(deployed, ours)
    rows = export.compare_codes(qat, path, x)
    assert [r["layer"] for r in rows] == names[:-1] and all(r["differing"] == 0 for r in rows)


def test_back_to_back_quantizers_are_merged_by_onnx_runtime_and_the_per_layer_check_names_them(tmp_path,
                                                                                                monkeypatch):
    """With the fix off (`+ 0` a layer with its own quantizer), the export holds Q→DQ→Q→DQ: ONNX Runtime's merge is
    what differs from the evaluation (without it they are equal), compare_codes sees the difference in the layer
    after the merge, and parity's explanation names the merged layers, not the logits."""
    monkeypatch.setattr(graph, "is_neutral_arithmetic", lambda *args: False)
    qat, path, x, ours = _exported(tmp_path, 0.6)
    names = [r["name"] for r in qat.layers]
    merged = export.merged_quantizers(onnx.load(str(path)), names)
    assert merged == [("b1.conv_scale.0", "b1.add"), ("b2.conv_scale.0", "b2.add")]
    deployed = _ort(path).run(None, {"input": x})[0]
    unmerged = _ort(path, disabled_optimizers=["DoubleQDQPairsRemover"]).run(None, {"input": x})[0]
    np.testing.assert_array_equal(unmerged, ours)  # two roundings, as the evaluation computes
    assert not np.array_equal(deployed, ours)  # the deployed session rounds once

    rows = {r["layer"]: r for r in export.compare_codes(qat, path, x)}
    assert "b1.add" not in rows and "b1.conv_scale.0" not in rows  # reading them would stop the merge
    assert rows["b1.add_1"]["differing"] > 0  # the add fed the merged codes
    first = next(r["layer"] for r in rows.values() if r["differing"])
    assert first == "b1.add_1"
    agree = deployed.argmax(1) == ours.argmax(1)
    why = export.explain_parity({"agreement": float(agree.mean()), "disagreements": int((~agree).sum()),
                                 "layers": list(rows.values()), "first_divergence": first,
                                 "merged_quantizers": merged})
    assert "`b1.conv_scale.0` → `b1.add`" in why and "DoubleQDQPairsRemover" in why and "`b1.add_1`" in why
    assert "logits" not in why and "re-export" not in why


@pytest.mark.parametrize(("expr", "neutral"), [
    ("x + 0", True), ("0 + x", True), ("x - 0", True), ("x * 1", True), ("1.0 * x", True), ("x / 1", True),
    ("x.add(0)", True), ("x + 1", False), ("0 - x", False), ("1 / x", False), ("x * 0", False), ("x + True", False),
])
def test_only_arithmetic_with_its_neutral_number_is_no_layer(expr, neutral):
    class Op(nn.Module):
        def forward(self, x):
            return eval(expr)  # noqa: S307 - the parametrized expression under test

    kinds = [r["kind"] for r in prepare(Op(), LayerPlan(default=QuantSpec()), torch.randn(2, 4)).layers]
    assert (kinds == ["input"]) == neutral
