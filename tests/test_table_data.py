"""A table from disk, no code: a CSV (or Parquet) file with a label column → the zoo's table MLP →
W8A8 QAT → int8 ONNX that runs every layer on integer kernels and predicts what the run reported.
Bad tables are messages that say what to fix."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from qat_core import cli
from qat_core.config import DataConfig, from_dict
from qat_core.data import table
from qat_core.errors import ConfigError
from tests.conftest import write_table


def table_config(path, **data) -> DataConfig:
    return DataConfig.model_validate({"dataset": "table", "path": str(path), "label_column": "diagnosis"} | data)


def test_a_csv_table_trains_quantizes_and_runs_as_int8_from_the_cli(tmp_path, capsys):
    csv = write_table(tmp_path / "cancer.csv")
    ws = str(tmp_path / "ws")
    assert cli.main(["config", "init", "--model", "table-mlp", "--data", str(csv), "--label-column", "diagnosis"]) == 0
    config = tmp_path / "run.yaml"
    config.write_text(capsys.readouterr().out)
    assert yaml.safe_load(config.read_text())["data"].items() >= {"dataset": "table", "path": str(csv)}.items()
    assert cli.main(["--workspace", ws, "train", str(config), "--quiet"]) == 0
    run_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert cli.main(["--workspace", ws, "eval", run_id, "--json"]) == 0
    parity = json.loads(capsys.readouterr().out)
    assert parity["float_layers"] == {} and len(parity["integer_layers"]) == 3  # 100% integer kernels
    assert parity["agreement"] == 1.0 and parity["accuracy"] > 0.9  # 569 real rows, 2 classes
    assert cli.main(["--workspace", ws, "show", run_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["qat"]["accuracy"] == parity["accuracy"]


def test_parquet_reads_as_the_csv_does(tmp_path):
    from_csv = table(table_config(write_table(tmp_path / "t.csv")))
    from_parquet = table(table_config(write_table(tmp_path / "t.parquet")))
    assert from_csv.num_classes == from_parquet.num_classes == 2
    assert from_csv.train_x.shape == from_parquet.train_x.shape == (427, 30)
    assert (from_csv.train_x - from_parquet.train_x).abs().max() < 1e-4


def test_a_sample_cap_and_rows_with_missing_values(tmp_path):
    csv = write_table(tmp_path / "t.csv")
    frame = pd.read_csv(csv)
    frame.loc[:9, "mean radius"] = None
    frame.to_csv(csv, index=False)
    data = table(table_config(csv))
    assert len(data.train_y) + len(data.test_y) == 559 and "10 row(s) with a missing value skipped" in data.description
    capped = table(table_config(csv, max_samples=100))
    assert len(capped.train_y) + len(capped.test_y) == 100
    assert abs(float(capped.train_x.mean())) < 0.05  # standardised on the training split


@pytest.mark.parametrize(("change", "message"), [
    (lambda f: f.drop(columns=["diagnosis"]), r"has no label column 'diagnosis'; its columns are mean radius, .*"
                                              r"Set data.label_column"),
    (lambda f: f.assign(site=["a"] * len(f)), r"feature columns must be numbers; site is not"),
    (lambda f: f[["diagnosis"]], r"has only the label column"),
    (lambda f: f.assign(diagnosis="benign"), r"has 1 class\(es\) in its complete rows; classification needs at least 2"),
    (lambda f: pd.concat([f[f.diagnosis == "malignant"].head(2), f[f.diagnosis == "benign"].head(1)]),
     r"3 rows are too few to hold out a test split"),
])
def test_bad_tables_say_what_to_fix(tmp_path, change, message):
    csv = write_table(tmp_path / "t.csv")
    change(pd.read_csv(csv)).to_csv(csv, index=False)
    with pytest.raises(ConfigError, match=message):
        table(table_config(csv))


def test_unreadable_and_missing_files_say_what_to_fix(tmp_path):
    with pytest.raises(ConfigError, match=r"no such file; give a CSV table with a label column"):
        table(table_config(tmp_path / "nope.csv"))
    binary = tmp_path / "t.parquet"
    binary.write_bytes(b"\x00\x01 not parquet")
    with pytest.raises(ConfigError, match=r"cannot be read as a Parquet table"):
        table(table_config(binary))
    with pytest.raises(ConfigError, match=r"dataset table needs data.path"):
        from_dict({"model": "table-mlp", "data": {"dataset": "table"}})
    with pytest.raises(ConfigError, match=r"data.path is for datasets table, image-folder, text-table; dataset digits is built in"):
        from_dict({"data": {"path": "x.csv"}})
