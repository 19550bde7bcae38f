"""Every run leaves its model in hand: model.json (+ model.pt), predictions.csv, loadable by
`fedhe.model.load_model` as a scikit-learn-style estimator (in-process jobs, no Ray)."""

import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone, is_classifier, is_regressor

from fedhe.aggregator.app import run_job
from fedhe.config import JobConfig
from fedhe.data import load_builtin
from fedhe.errors import DataError, FedHEError
from fedhe.learning import ModelSpec, build_model, set_weights
from fedhe.model import FORMAT, load_model
from tests.inprocess import InProcessGrid

RUNS = {
    "linreg": {"task": "linreg"},
    "logreg": {"task": "logreg", "rounds": 20},
    "aggregate": {"task": "aggregate", "rounds": 2},
    "aggregate-hidden": {"task": "aggregate", "rounds": 2, "dataset": "iris", "hidden": "8"},
    "mlp": {"task": "mlp", "rounds": 2, "queries": 16, "single_queries": 0},
}


def _run(out, settings):
    config = JobConfig.of(parties=3, min_parties=2, out=str(out), **settings)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDHE_STATE_ROOT", str(out / "keyholder-state"))
        run_job(InProcessGrid(config.num_nodes), config)
    return config


@pytest.fixture(scope="module", params=list(RUNS))
def finished(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    config = _run(out, RUNS[request.param])
    _, test = load_builtin(config.dataset_name, seed=0)
    return request.param, out, json.loads((out / "result.json").read_text()), test


def test_model_json_is_documented_and_named_in_result_json(finished):
    name, out, result, test = finished
    spec = json.loads((out / "model.json").read_text())
    assert spec["format"] == FORMAT
    assert spec["task"] == result["task"]
    assert spec["features"] == list(test.feature_names)
    assert spec["target"] == test.target_name
    assert len(spec["standardizer"]["mean"]) == test.n_features
    assert result["model"]["json"] == "model.json"
    assert result["model"]["predictions"] == "predictions.csv"
    if spec["kind"] == "torch":
        assert result["model"]["weights"] == "model.pt" and (out / "model.pt").is_file()
        # result.json now says what was trained (its config's `hidden` is '' by default)
        architecture = result["model"]["architecture"]
        assert architecture == spec["architecture"]
        assert architecture["layers"][0] == test.n_features
        assert architecture["layers"][-1] == (1 if test.n_classes == 2 else test.n_classes)
    else:
        assert result["model"]["weights"] is None and not (out / "model.pt").exists()
    if name == "mlp":
        assert spec["architecture"]["hidden"] == [32]
        assert spec["architecture"]["activation_coefficients"] == [0.0, 0.0, 1.0]


def test_loaded_model_reproduces_the_runs_predictions_and_metric(finished):
    _, out, result, test = finished
    model = load_model(out)
    saved = pd.read_csv(out / "predictions.csv")
    assert list(saved["row"]) == list(range(test.n_samples))
    if is_classifier(model):
        np.testing.assert_array_equal(model.predict(test.X), saved["prediction"])
        proba = model.predict_proba(test.X)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0)
        for position, label in enumerate(model.classes_):
            np.testing.assert_allclose(proba[:, position], saved[f"proba_{label}"], atol=1e-12)
        assert model.score(test.X, test.y) == pytest.approx(result["encrypted"]["accuracy"])
    else:
        np.testing.assert_allclose(model.predict(test.X), saved["prediction"], rtol=1e-12)
        assert model.score(test.X, test.y) == pytest.approx(result["encrypted"]["r2"], abs=1e-9)


def test_linear_coefficients_are_in_original_units(finished):
    name, out, result, test = finished
    model = load_model(out)
    if name in ("linreg", "logreg"):
        encrypted = result["coefficients"]["encrypted"]
        assert model.intercept_ == pytest.approx(encrypted[0], rel=1e-12)
        np.testing.assert_allclose(model.coef_, encrypted[1:], rtol=1e-12)
    elif name == "aggregate":  # a logistic model trained by HE-FedAvg, as coefficients too
        logits = model.to_torch()(torch.as_tensor(model.features(test.X))).detach().numpy()
        np.testing.assert_allclose(model.intercept_ + test.X @ model.coef_, logits[:, 0])
    else:
        assert not hasattr(model, "coef_")


def test_model_pt_gives_the_runs_own_logits(finished):
    """The run's model, rebuilt from its resume checkpoint (written during training), and the
    module `to_torch()` loads from model.pt give the same logits."""
    _, out, _, test = finished
    model = load_model(out)
    if model.kind_ != "torch":
        with pytest.raises(FedHEError, match="not a torch network"):
            model.to_torch()
        return
    with np.load(out / "checkpoint-he.npz") as checkpoint:
        weights = {k: checkpoint[k] for k in checkpoint.files}
    reference = build_model(ModelSpec.from_dict(model.spec_["architecture"]), seed=1)
    set_weights(reference, weights)
    inputs = torch.as_tensor(model.features(test.X))
    with torch.no_grad():
        expected = reference.eval()(inputs)
        got = model.to_torch()(inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    state = torch.load(out / "model.pt", weights_only=True)
    assert state.keys() == model.to_torch().state_dict().keys()


def test_sklearn_conventions(finished):
    _, out, _, test = finished
    model = load_model(out)
    assert model.n_features_in_ == test.n_features
    assert list(model.feature_names_in_) == list(test.feature_names)
    assert model.get_params() == {"path": str(out)}
    copy = clone(model)
    assert type(copy) is type(model) and copy.get_params() == model.get_params()
    if model.spec_["estimator"] == "classifier":
        assert is_classifier(model)
        assert list(model.classes_) == list(range(test.n_classes))
    else:
        assert is_regressor(model)
    with pytest.raises(FedHEError, match="trained by a federated run"):
        model.fit(test.X, test.y)


def test_a_dataframe_is_matched_by_column_name(finished):
    _, out, _, test = finished
    model = load_model(out)
    frame = pd.DataFrame(test.X, columns=test.feature_names)
    shuffled = frame[list(reversed(frame.columns))].assign(record_id=range(len(frame)))
    if is_classifier(model):
        np.testing.assert_array_equal(model.predict(shuffled), model.predict(test.X))
    else:  # the same numbers, summed in another memory layout
        np.testing.assert_allclose(model.predict(shuffled), model.predict(test.X), rtol=1e-12)
    assert model.ignored_columns(shuffled) == ["record_id"]
    with pytest.raises(DataError, match=r"columns \[.*\] are missing"):
        model.predict(frame.drop(columns=[test.feature_names[0]]))


def test_bad_inputs_say_what_to_give(finished):
    _, out, _, test = finished
    model = load_model(out)
    with pytest.raises(DataError, match=r"shape \(3,\); the model takes \(n_samples, "):
        model.predict(test.X[0, :3])
    holes = test.X[:4].copy()
    holes[2, 1] = np.nan
    column = re.escape(repr(test.feature_names[1]))
    with pytest.raises(DataError, match=rf"row 2, column {column}: missing value"):
        model.predict(holes)
    text = pd.DataFrame(test.X[:3], columns=test.feature_names).astype(object)
    text.iloc[1, 0] = "abc"
    with pytest.raises(DataError, match=r"row 1, column .*'abc' is not a number"):
        model.predict(text)


def test_a_model_that_stayed_with_the_parties_is_not_written(tmp_path):
    config = JobConfig.of(
        task="linreg", mode="encrypted-model", rounds=2, parties=3, min_parties=2,
        out=str(tmp_path),
    )  # fmt: skip
    grid = InProcessGrid(config.num_nodes)
    for index in range(config.parties):
        grid.contexts[1000 + index].node_config["share-model"] = False
    run_job(grid, config)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["model"]["json"] is None and "withheld" in result["model"]
    assert not (tmp_path / "model.json").exists()
    with pytest.raises(FedHEError, match="no model file"):
        load_model(tmp_path)


def test_knn_model_says_how_to_keep_its_store(tmp_path):
    _run(tmp_path, {"task": "knn", "dataset": "iris", "queries": 4})
    spec = json.loads((tmp_path / "model.json").read_text())
    assert spec["kind"] == "knn" and spec["knn"]["k"] == 5 and spec["knn"]["store"] is None
    # the global moments it measured distances with (a declared output), as every task records
    assert len(spec["standardizer"]["mean"]) == 4 and len(spec["standardizer"]["std"]) == 4
    assert not (tmp_path / "predictions.csv").exists()  # the querier's answers stay with it
    model = load_model(tmp_path)
    _, test = load_builtin("iris", seed=0)
    with pytest.raises(FedHEError, match="--keep-store true"):
        model.predict(test.X[:2])


def test_importing_fedhe_stays_light():
    code = (
        "import sys, fedhe; heavy = {'torch', 'flwr', 'ray', 'tenseal', 'sklearn'};"
        "print(sorted(heavy & set(sys.modules)), callable(fedhe.simulate))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split() == ["[]", "True"], done.stderr
