"""`fedhe.simulate(task, ...)`, the notebook API: a RunResult with metrics, model and paths."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression

import fedhe
from fedhe import simulation
from fedhe.aggregator.app import run_job
from fedhe.config import ConfigError
from fedhe.data import load_builtin
from fedhe.errors import FedHEError
from tests.inprocess import InProcessGrid


@pytest.fixture
def in_process(monkeypatch):
    """The simulation engine replaced by the in-process Grid (same ServerApp, ClientApps)."""
    configs = []

    def simulate(config, workers=None):
        configs.append(config)
        run_job(InProcessGrid(config.num_nodes), config)
        return Path(config.out) / "result.json"

    monkeypatch.setattr(simulation, "simulate", simulate)
    return configs


def test_simulate_returns_metrics_model_and_paths(in_process, tmp_path):
    run = fedhe.simulate("aggregate", parties=3, min_parties=2, rounds=2, out=tmp_path / "agg")
    config = in_process[0]
    assert config.task == "aggregate" and config.parties == 3 and config.plaintext_twin
    result = json.loads((tmp_path / "agg" / "result.json").read_text())
    assert run.task == "aggregate" and run.out == tmp_path / "agg"
    assert run.metrics["accuracy"] == result["encrypted"]["accuracy"]
    assert "history" not in run.metrics
    assert run.plaintext_metrics["accuracy"] == result["plaintext"]["accuracy"]
    assert run.excluded == {} and run.result == result
    assert {k for k, v in run.paths.items() if v is not None} == {
        "result",
        "audit",
        "model_json",
        "model_pt",
        "predictions",
    }
    _, test = load_builtin("breast_cancer", seed=0)
    assert run.model.score(test.X, test.y) == pytest.approx(run.metrics["accuracy"])
    logits = run.model.to_torch()(torch.as_tensor(run.model.features(test.X)))
    assert tuple(logits.shape) == (test.n_samples, 1)
    assert "RunResult(task='aggregate'" in repr(run) and "result=" not in repr(run)


def test_settings_are_checked_by_name(in_process, tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'parties'"):
        fedhe.simulate("linreg", partys=3, out=tmp_path)
    assert in_process == []


def test_without_out_a_fresh_folder_is_made_and_named(in_process, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    first = fedhe.simulate("linreg", parties=3, min_parties=2, plaintext_twin=False)
    second = fedhe.simulate("linreg", parties=3, min_parties=2, plaintext_twin=False)
    assert first.out != second.out and first.out.parent == second.out.parent
    assert first.out.parent.name == "runs" and first.out.name.startswith("linreg-")
    printed = capsys.readouterr().out
    assert f"writing the run to {first.out}" in printed and str(second.out) in printed
    assert first.plaintext_metrics is None


def test_load_run_reads_a_finished_run_back(in_process, tmp_path):
    fedhe.simulate("linreg", parties=3, min_parties=2, out=tmp_path / "lin")
    run = fedhe.load_run(tmp_path / "lin")
    assert run.model.get_params() == {"path": str(tmp_path / "lin")}
    assert run.paths["model_pt"] is None
    with pytest.raises(FedHEError, match=r"no result\.json"):
        fedhe.load_run(tmp_path)


@pytest.mark.slow
def test_a_notebook_runs_linreg_through_flower_and_gets_sklearns_model(tmp_path):
    """Exactly as in a notebook: import fedhe, run, predict, read a metric."""
    import fedhe as notebook_fedhe

    r = notebook_fedhe.simulate("linreg", parties=3, out=tmp_path / "nb")
    train, test = load_builtin("diabetes", seed=0)
    predicted = r.model.predict(test.X)
    sk = LinearRegression().fit(train.X, train.y)
    np.testing.assert_allclose(predicted, sk.predict(test.X), rtol=1e-6)
    assert r.metrics["r2"] == pytest.approx(sk.score(test.X, test.y), abs=1e-6)
    assert r.paths["model_json"] == tmp_path / "nb" / "model.json"
