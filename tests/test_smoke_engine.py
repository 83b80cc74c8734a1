from qat_core import runner


def test_digits_runs_finish(workspace, digits_run, digits_run_w4a4):
    for run_id in (digits_run, digits_run_w4a4):
        record = workspace.get(run_id)
        assert record["status"] == "done", record["error"]
        assert record["metrics"]["qat"]["accuracy"] > 0.95
    loaded = runner.load(workspace, digits_run)
    assert loaded.qat.layers[0]["name"] == "input"
