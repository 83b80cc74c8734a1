"""Architectures by name, no code: ``torchvision:NAME`` and ``timm:NAME`` are built for the data's
classes, refused by name when unknown, and a checkpoint that does not fit names the keys."""

from __future__ import annotations

import pytest
import torch

from qat_core import runner, zoo
from qat_core.config import DataConfig
from qat_core.errors import ConfigError, PluginError

IMAGES = DataConfig(dataset="generated-images")


@pytest.mark.parametrize("model_id", ["torchvision:mobilenet_v3_small", "timm:resnet10t"])
def test_a_library_model_is_built_for_the_datas_classes(model_id):
    model, data = zoo.build(model_id, IMAGES)
    with torch.no_grad():
        assert model.eval()(data.example(2)).shape == (2, data.num_classes)
    assert not zoo.is_plugin(model_id) and zoo.library_of(model_id) == model_id.partition(":")[0]


def test_config_init_gives_a_library_model_image_data():
    config = runner.default_config("torchvision:mobilenet_v3_small")
    assert config.data.dataset == "generated-images" and config.baseline.max_steps == zoo.VISION_BASELINE["max_steps"]


@pytest.mark.parametrize(("model_id", "message"), [
    ("torchvision:mobilenet_v3_smal", r"torchvision has no classification model 'mobilenet_v3_smal'; did you mean "
                                      r"mobilenet_v3_small"),
    ("torchvision:fasterrcnn_resnet50_fpn", r"no classification model"),  # a detector, not a classifier
    ("timm:no_such_net", r"timm has no classification model 'no_such_net'"),
])
def test_unknown_names_are_refused_with_close_matches(model_id, message):
    with pytest.raises(ConfigError, match=message):
        zoo.build(model_id, IMAGES)


def test_a_model_and_data_that_do_not_fit_are_named_before_training():
    with pytest.raises(ConfigError, match=r"torchvision:resnet18 cannot run on digits inputs of shape \(1, 8, 8\).*"
                                          r"data.dataset: generated-images"):
        zoo.build("torchvision:resnet18", DataConfig())


def test_a_missing_library_names_the_extra_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm":
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ConfigError, match=r"timm:NAME need the timm package; install it with pip install -e "
                                          r"\"\.\[vision\]\""):
        zoo.build("timm:resnet10t", IMAGES)


def test_a_checkpoint_for_another_architecture_names_the_keys(tmp_path):
    model, data = zoo.build("torchvision:mobilenet_v3_small", IMAGES)
    other, _ = zoo.build("torchvision:resnet18", IMAGES)
    path = tmp_path / "resnet18.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(PluginError, match=r"does not fit the model \(is it for another architecture.*\): missing "
                                          r"features\.0\.0\.weight, .* in all\); unexpected conv1\.weight"):
        zoo.load_checkpoint(model, path)
    torch.save(model.state_dict(), path)  # its own weights load
    zoo.load_checkpoint(model, path)
