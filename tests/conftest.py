"""Shared fixtures: one workspace with small real digits runs, trained once per test session."""

from __future__ import annotations

import pytest

from qat_core import runner
from qat_core.config import RunConfig
from qat_core.store import RunStore


def quick_config(model: str = "digits-cnn", weight_bits: int | None = 8, act_bits: int | None = 8, **finetune):
    """The default config for ``model`` (its FP32 baseline, cached once per session) with a short
    fine-tune: real, but seconds."""
    data = runner.default_config(model, weight_bits, act_bits).to_dict()
    data["finetune"] |= {"epochs": 2, **finetune}
    return RunConfig.model_validate(data)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> RunStore:
    return RunStore(tmp_path_factory.mktemp("workspace"))


@pytest.fixture(scope="session")
def digits_run(workspace) -> str:
    """A finished digits-cnn W8A8 run (its FP32 baseline is cached for other runs)."""
    return runner.execute(quick_config(), workspace)


@pytest.fixture(scope="session")
def digits_run_w4a4(workspace) -> str:
    return runner.execute(quick_config(weight_bits=4, act_bits=4), workspace)


def write_table(path, rows: int | None = None):
    """scikit-learn's breast-cancer table (569 rows, 30 numeric features) as a CSV with a text label
    column "diagnosis": a real table no one on the team made, shipped with scikit-learn."""
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame["diagnosis"] = frame.pop("target").map({0: "malignant", 1: "benign"})
    frame = frame if rows is None else frame.head(rows)
    if str(path).endswith(".parquet"):
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path
