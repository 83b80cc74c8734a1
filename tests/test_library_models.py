"""Architectures by name, no code: ``torchvision:NAME`` and ``timm:NAME`` are built for the data's
classes, refused by name when unknown, and a checkpoint that does not fit names the keys."""

from __future__ import annotations

import sys

import pytest
import torch

from qat_core import library, runner, zoo
from qat_core.config import DataConfig
from qat_core.errors import ConfigError, PluginError

IMAGES = DataConfig(dataset="generated-images")


@pytest.mark.parametrize("model_id", ["torchvision:mobilenet_v3_small", "timm:resnet10t"])
def test_a_library_model_is_built_for_the_datas_classes(model_id):
    model, data = zoo.build(model_id, IMAGES)
    with torch.no_grad():
        assert model.eval()(data.example(2)).shape == (2, data.num_classes)
    assert not zoo.is_plugin(model_id) and library.library_of(model_id) == model_id.partition(":")[0]


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
    monkeypatch.setitem(sys.modules, "timm", None)  # what Python does for a package that is not installed
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


def _tiny_folder(tmp_path):
    from tests.conftest import write_image_folder

    folder = write_image_folder(tmp_path / "digits", classes=3, per_class=12)
    return DataConfig(dataset="image-folder", path=str(folder), image_size=32)


def test_a_checkpoint_for_another_number_of_classes_gets_a_new_head(tmp_path):
    """ImageNet-style weights (1000 classes) on 3 classes: the body loads, the head is started afresh,
    its row in the plan table says so, and the FP32 baseline trains it."""
    data_cfg = _tiny_folder(tmp_path)
    imagenet = library.import_torchvision().models.mobilenet_v3_small(num_classes=1000)
    path = tmp_path / "imagenet.pt"
    torch.save(imagenet.state_dict(), path)
    model, data = zoo.build("torchvision:mobilenet_v3_small", data_cfg, checkpoint=str(path))
    assert library.new_head(model) == "classifier.3" and model.classifier[3].out_features == 3
    torch.testing.assert_close(model.features[0][0].weight, imagenet.features[0][0].weight)
    from qat_core.prepare import layer_table

    rows = {r["name"]: r for r in layer_table(model, data.example())}
    assert rows["classifier.3"]["note"] == "new head for 3 classes (the weights had 1000), trained with the FP32 baseline"

    from qat_core.store import RunStore

    config = runner.default_config("torchvision:mobilenet_v3_small", data=data_cfg.model_dump(), checkpoint=str(path))
    config = config.model_copy(update={"baseline": config.baseline.model_copy(update={"epochs": 1, "batch_size": 9})})
    steps = []
    _, _, metrics = runner.baseline(config, RunStore(tmp_path / "ws"), lambda e: steps.append(e))
    assert steps and "accuracy" in metrics  # trained, not merely evaluated


def _cache_weights(tmp_path, monkeypatch, name="mobilenet_v3_small", filename="mobilenet_v3_small-047dcff4.pth"):
    """torchvision's cache holding ``name``'s ImageNet weights (random ones, with the real file name)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    model = library.import_torchvision().models.get_model(name, num_classes=1000)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(model.state_dict(), cache / filename)
    return model


def test_pretrained_weights_by_name_come_from_the_cache_only(tmp_path, monkeypatch):
    data_cfg = _tiny_folder(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"torchvision's mobilenet_v3_small weights IMAGENET1K_V1 are not in the local "
                                          r"cache \(.*empty/hub/checkpoints/mobilenet_v3_small-047dcff4\.pth\), and QAT "
                                          r"Studio downloads nothing"):
        zoo.build("torchvision:mobilenet_v3_small", data_cfg, weights="DEFAULT")
    cached = _cache_weights(tmp_path, monkeypatch)
    model, _ = zoo.build("torchvision:mobilenet_v3_small", data_cfg, weights="IMAGENET1K_V1")
    torch.testing.assert_close(model.features[0][0].weight, cached.features[0][0].weight)
    assert library.new_head(model) == "classifier.3" and model.classifier[3].out_features == 3


def test_timm_weights_missing_from_the_cache_are_a_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match=r"timm's timm/resnet10t\.c3_in1k weights are not in the local cache"):
        zoo.build("timm:resnet10t", _tiny_folder(tmp_path), weights="DEFAULT")


@pytest.mark.parametrize(("model_id", "settings", "message"), [
    ("torchvision:mobilenet_v3_small", {"weights": "IMAGENET9K"}, r"torchvision's mobilenet_v3_small has no weights "
                                                                   r"'IMAGENET9K'; it has IMAGENET1K_V1, DEFAULT"),
    ("digits-cnn", {"weights": "DEFAULT"}, r"weights 'DEFAULT' name a library's pretrained weights .* digits-cnn "
                                           r"takes a checkpoint file instead"),
])
def test_weights_that_cannot_be_had_say_why(tmp_path, model_id, settings, message):
    with pytest.raises(ConfigError, match=message):
        zoo.build(model_id, _tiny_folder(tmp_path) if ":" in model_id else DataConfig(), **settings)


def test_weights_and_a_checkpoint_together_are_refused():
    from qat_core.config import from_dict

    with pytest.raises(ConfigError, match=r"give weights .* or checkpoint .*, not both"):
        from_dict({"model": "torchvision:resnet18", "weights": "DEFAULT", "checkpoint": "x.pt"})


def test_a_fixed_size_model_on_smaller_images_is_told_the_size_it_takes(tmp_path):
    with pytest.raises(ConfigError, match=r"timm:deit_tiny_patch16_224 takes 224×224 images only: set "
                                          r"data.image_size: 224 \(qat-studio config init … --image-size 224\)"):
        zoo.build("timm:deit_tiny_patch16_224", _tiny_folder(tmp_path))  # 32 px (before: "use generated images")
