"""An image folder from disk (torchvision's ImageFolder layout), no code: read, preprocessed as the
model's weights expect, split, and every way it can be wrong named with what to fix."""

from __future__ import annotations

import pytest
import torch

from qat_core import runner
from qat_core.config import DataConfig, from_dict
from qat_core.data import data_fingerprint, image_folder
from qat_core.errors import ConfigError
from tests.conftest import write_image_folder


def folder_config(path, **data) -> DataConfig:
    return DataConfig.model_validate({"dataset": "image-folder", "path": str(path), "image_size": 32} | data)


def test_a_folder_of_class_folders_is_read_and_split_by_class(tmp_path):
    data = image_folder(folder_config(write_image_folder(tmp_path / "digits", classes=8, per_class=20)))
    assert data.classes == [str(c) for c in range(8)] and data.num_classes == 8 and not data.generated
    assert data.train_x.shape == (120, 3, 32, 32) and len(data.test_y) == 40
    assert torch.bincount(data.test_y).tolist() == [5] * 8  # stratified: 25% of each class held out
    # normalised with ImageNet's mean and std: the digits' black background sits near -2
    assert data.train_x.min() < -1.5 and "160 images, 8 classes" in data.description


def test_preprocessing_comes_from_the_weights_metadata_and_is_recorded(tmp_path):
    folder = write_image_folder(tmp_path / "digits", classes=3, per_class=8, size=300)
    config = runner.default_config("torchvision:mobilenet_v3_small",
                                   data={"dataset": "image-folder", "path": str(folder)})
    # torchvision's MobileNet_V3_Small_Weights.IMAGENET1K_V1 transforms: resize 256, crop 224 (300-px images)
    assert (config.data.resize_size, config.data.image_size) == (256, 224)
    assert config.data.mean == pytest.approx((0.485, 0.456, 0.406))
    timm_config = runner.default_config("timm:resnet10t", data={"dataset": "image-folder", "path": str(folder),
                                                                "image_size": 96})
    # timm's resnet10t is evaluated at 176 px with crop_pct 0.875: a 96-px crop keeps that ratio
    assert (timm_config.data.resize_size, timm_config.data.image_size) == (110, 96)


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    folder = write_image_folder(tmp_path / "digits", classes=3, per_class=8, corrupt=1)
    (folder / "0" / "notes.txt").write_text("not an image, and not named like one: ignored")
    data = image_folder(folder_config(folder))
    assert len(data.train_y) + len(data.test_y) == 24 and len(data.skipped) == 3
    assert "3 unreadable file(s) skipped: 0/broken0.jpg (UnidentifiedImageError)" in data.description


def test_max_samples_draws_a_subset_before_decoding(tmp_path):
    folder = write_image_folder(tmp_path / "digits", classes=4, per_class=20)
    data = image_folder(folder_config(folder, max_samples=40))
    assert len(data.train_y) + len(data.test_y) == 40


def test_changed_files_are_another_data_set(tmp_path):
    folder = write_image_folder(tmp_path / "digits", classes=3, per_class=8)
    config = folder_config(folder)
    before = data_fingerprint(config)
    assert len(image_folder(config).train_y) == 18
    (folder / "0" / "0.png").unlink()  # the decoded folder kept in memory must not be reused
    assert data_fingerprint(config) != before and len(image_folder(config).train_y) == 17


@pytest.mark.parametrize(("make", "message"), [
    (lambda root: root.mkdir(), r"has no class folders: put each class's images in a sub-folder named after the "
                                r"class"),
    (lambda root: (root / "cat").mkdir(parents=True) or (root / "dog").mkdir(), r"class folder\(s\) cat, dog hold "
                                                                              r"no image files"),
    (lambda root: write_image_folder(root, classes=1, per_class=4), r"has one class folder \(0\); classification "
                                                                     r"needs at least 2"),
    (lambda root: write_image_folder(root, classes=2, per_class=0, corrupt=2), r"only 0 of 4 image files could be "
                                                                                r"read"),
    (lambda root: None, r"no such folder; give a folder with one sub-folder of images per class"),
    (lambda root: root.write_text("x"), r"is a file; image data is a folder"),
])
def test_folders_that_cannot_be_used_say_what_to_fix(tmp_path, make, message):
    root = tmp_path / "images"
    make(root)
    with pytest.raises(ConfigError, match=message):
        image_folder(folder_config(root))


def test_image_settings_are_checked_in_the_config():
    with pytest.raises(ConfigError, match=r"data.image_size is for dataset image-folder only"):
        from_dict({"data": {"image_size": 64}})
    with pytest.raises(ConfigError, match=r"resize_size 48 is smaller than the 64-pixel crop"):
        from_dict({"data": {"dataset": "image-folder", "path": "x", "image_size": 64, "resize_size": 48}})
    with pytest.raises(ConfigError, match=r"dataset image-folder needs data.path: a folder with one sub-folder"):
        from_dict({"data": {"dataset": "image-folder"}})
