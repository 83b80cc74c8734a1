"""Zoo models and data, the plugin hook, and safe checkpoint loading."""

import pickle
import sys
from pathlib import Path

import pytest
import torch

from qat_core import zoo
from qat_core.config import DataConfig
from qat_core.data import digits
from qat_core.errors import ConfigError, PluginError
from tests.conftest import write_table

sys.path.insert(0, str(Path(__file__).parent / "plugins"))


def test_digits_split_is_real_and_reproducible():
    data = digits(DataConfig())
    assert data.train_x.shape == (1347, 1, 8, 8) and len(data.test_y) == 450
    assert not data.generated
    again = digits(DataConfig())
    assert torch.equal(data.test_x, again.test_x)
    other = digits(DataConfig(split_seed=1))
    assert not torch.equal(data.test_x, other.test_x)


@pytest.mark.parametrize("model_id", list(zoo.MODELS))
def test_every_zoo_model_runs_on_its_data(model_id, tmp_path):
    entry = zoo.MODELS[model_id]
    table = {"dataset": "table", "path": str(write_table(tmp_path / "t.csv")), "label_column": "diagnosis"}
    data = entry.data(DataConfig.model_validate(table) if entry.dataset == "table" else DataConfig())
    model = entry.model(data).eval()
    with torch.no_grad():
        assert model(data.example(1)).shape == (1, data.num_classes)
    assert data.generated == entry.dataset.startswith("generated")


def test_unknown_model_lists_the_zoo():
    with pytest.raises(ConfigError, match="not in the zoo .*digits-cnn"):
        zoo.build("vgg16", DataConfig())


def test_plugin_returns_model_and_loaders():
    model, data = zoo.build("tiny_plugin:make", DataConfig())
    assert data.num_classes == 10
    assert sum(len(y) for _, y in data.test_loader()) == 100


@pytest.mark.parametrize("path,expected", [
    ("tests.no_such_module:make", "cannot import plugin module 'tests.no_such_module'"),
    ("tiny_plugin:absent", "has no callable 'absent'"),
    ("tiny_plugin:broken", "raised RuntimeError: no data here"),
    ("tiny_plugin", "not a plugin path .package.module:factory."),
    (".relative:make", "must look like 'package.module:factory'"),
])
def test_bad_plugins_say_what_is_wrong(path, expected):
    with pytest.raises((PluginError, ConfigError), match=expected):
        zoo.build(path, DataConfig())


def test_checkpoint_round_trip_and_bad_files(tmp_path):
    model = zoo.mlp()
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    fresh = zoo.mlp()
    zoo.load_checkpoint(fresh, good)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(good.read_bytes()[:100])
    with pytest.raises(PluginError, match="cannot be read as a weights-only"):
        zoo.load_checkpoint(fresh, corrupt)

    pickled = tmp_path / "object.pt"
    with pickled.open("wb") as f:
        pickle.dump(PluginError("any python object"), f)  # weights_only refuses to unpickle objects
    with pytest.raises(PluginError, match="weights-only"):
        zoo.load_checkpoint(fresh, pickled)

    wrong = tmp_path / "wrong.pt"
    torch.save(zoo.digits_cnn().state_dict(), wrong)
    with pytest.raises(PluginError, match="does not fit the model"):
        zoo.load_checkpoint(fresh, wrong)

    with pytest.raises(PluginError, match="does not exist"):
        zoo.load_checkpoint(fresh, tmp_path / "missing.pt")


def test_a_bare_library_name_suggests_its_library_ids():
    with pytest.raises(ConfigError, match=r"did you mean torchvision:mobilenet_v3_small\?"):
        zoo.build("mobilenet_v3_small", DataConfig())
    with pytest.raises(ConfigError) as refused:
        zoo.build("no_such_net", DataConfig())
    assert "did you mean" not in str(refused.value)
