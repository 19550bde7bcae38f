"""`fedhe predict RUN --data FILE`: new records scored with a run's model, through the CLI
(in-process runs, no Ray), with the schema's encoding and the run's imputation applied."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder

from fedhe import knn_predict
from fedhe.aggregator.app import run_job
from fedhe.cli import main
from fedhe.clients.roles import SIMULATION_NODE_CONFIG
from fedhe.config import JobConfig
from fedhe.data import load_builtin
from fedhe.model import load_model
from tests.inprocess import InProcessGrid, kept_answers


def _run(out, **settings):
    config = JobConfig.of(parties=3, min_parties=2, out=str(out), **settings)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDHE_STATE_ROOT", str(out / "keyholder-state"))
        run_job(InProcessGrid(config.num_nodes), config)
    return json.loads((out / "result.json").read_text())


def _records(dataset: str, *, target: bool, folder) -> tuple:
    """The built-in test set as a CSV a site would hold: columns in another order, a record
    id the model does not know, and the target only when asked."""
    _, test = load_builtin(dataset, seed=0)
    frame = pd.DataFrame(test.X, columns=test.feature_names)
    if target:
        frame[test.target_name] = test.y
    frame = frame[list(reversed(frame.columns))]
    frame.insert(0, "record_id", [f"r{i}" for i in range(len(frame))])
    path = folder / f"{dataset}-records.csv"
    frame.to_csv(path, index=False)
    return path, frame, test


@pytest.fixture(scope="module")
def logreg_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("logreg")
    return out, _run(out, task="logreg", rounds=20)


def test_predict_reproduces_the_runs_own_predictions(logreg_run, tmp_path, capsys):
    out, result = logreg_run
    data, _, _ = _records("breast_cancer", target=True, folder=tmp_path)
    written = tmp_path / "scored.csv"
    assert main(["predict", str(out), "--data", str(data), "--out", str(written)]) == 0
    scored, own = pd.read_csv(written), pd.read_csv(out / "predictions.csv")
    assert list(scored.columns) == ["row", "line", "prediction", "proba_0", "proba_1"]
    assert list(scored["line"]) == list(range(2, len(own) + 2))
    np.testing.assert_array_equal(scored["prediction"], own["prediction"])
    np.testing.assert_allclose(scored[["proba_0", "proba_1"]], own[["proba_0", "proba_1"]])
    summary = capsys.readouterr().out.strip()
    assert summary.count("\n") == 0
    assert f"{len(own)} records of {data}" in summary and str(written) in summary
    assert "ignored columns ['record_id']" in summary
    assert f"accuracy against 'malignant_or_benign': {result['encrypted']['accuracy']:.4f}" in (
        summary
    )


def test_predict_unlabelled_records_writes_beside_the_model(tmp_path, capsys):
    out = tmp_path / "run"
    result = _run(out, task="linreg")
    data, _, _ = _records("diabetes", target=False, folder=tmp_path)
    assert main(["predict", str(out), "--data", str(data)]) == 0
    scored = pd.read_csv(out / "predictions-diabetes-records.csv")
    own = pd.read_csv(out / "predictions.csv")
    np.testing.assert_allclose(scored["prediction"], own["prediction"], rtol=1e-12)
    assert "R²" not in capsys.readouterr().out  # no target in the file: nothing to score
    (tmp_path / "labelled").mkdir()
    labelled, _, _ = _records("diabetes", target=True, folder=tmp_path / "labelled")
    assert (
        main(["predict", str(out), "--data", str(labelled), "--out", str(tmp_path / "x.csv")]) == 0
    )
    assert f"R² against 'progression': {result['encrypted']['r2']:.4f}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ("abc", "'abc' is not a number"),
        ("", "missing value. This model was trained without --impute mean"),
        ("inf", "'inf' is an infinite value"),
    ],
)
def test_a_bad_cell_gives_one_clear_error(logreg_run, tmp_path, capsys, cell, message):
    out, _ = logreg_run
    _, frame, _ = _records("breast_cancer", target=False, folder=tmp_path)
    frame = frame.astype(object)
    frame.loc[4, "mean area"] = cell
    data = tmp_path / "bad.csv"
    frame.to_csv(data, index=False)
    written = tmp_path / "never.csv"
    assert main(["predict", str(out), "--data", str(data), "--out", str(written)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0, error  # one line, no traceback
    assert error.startswith(f"fedhe: error: {data}: line 6, column 'mean area': ")
    assert message in error
    assert not written.exists()


def test_a_missing_column_or_a_folder_without_model_is_named(logreg_run, tmp_path, capsys):
    out, _ = logreg_run
    _, frame, _ = _records("breast_cancer", target=False, folder=tmp_path)
    data = tmp_path / "short.csv"
    frame.drop(columns=["worst area"]).to_csv(data, index=False)
    assert main(["predict", str(out), "--data", str(data)]) == 2
    assert "columns ['worst area'] are missing" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), "--data", str(data)]) == 2
    assert "no model file" in capsys.readouterr().err


# -- schema.json and --impute mean -----------------------------------------------------------------

SEX, SMOKER = ["F", "M"], ["never", "former", "current"]
SCHEMA = {
    "columns": {
        "age": {"type": "numeric", "unit": "years"},
        "sex": {"type": "categorical", "categories": SEX},
        "bmi": {"type": "numeric", "unit": "kg/m2"},
        "smoker": {"type": "categorical", "categories": SMOKER},
        "outcome": {"type": "numeric"},
    }
}


def _patients(rng, n: int) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "age": rng.normal(55, 12, n).round(1),
            "sex": rng.choice(SEX, n),
            "bmi": rng.normal(27, 4, n).round(2),
            "smoker": rng.choice(SMOKER, n),
        }
    )
    effect = frame["smoker"].map({"never": 0.0, "former": 0.8, "current": 2.1})
    noise = rng.normal(0, 0.3, n)
    frame["outcome"] = (0.04 * frame["age"] + 0.9 * (frame["sex"] == "M") + effect + noise).round(3)
    for column in ("age", "bmi", "sex"):
        frame.loc[rng.random(n) < 0.1, column] = np.nan
    return frame


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory):
    """Three hospitals with text categories and holes; the run's linreg model and the
    scikit-learn pipeline fitted on the pooled files."""
    folder = tmp_path_factory.mktemp("hospitals")
    rng = np.random.default_rng(8)
    parties = [_patients(rng, n) for n in (70, 50, 60)]
    for number, frame in enumerate(parties, start=1):
        frame.to_csv(folder / f"party-{number}.csv", index=False, na_rep="")
    _patients(rng, 40).to_csv(folder / "test.csv", index=False, na_rep="NA")
    (folder / "schema.json").write_text(json.dumps(SCHEMA))
    out = folder / "run"
    settings = {"data_dir": str(folder), "target": "outcome", "impute": "mean", "l2": 0.0}
    _run(out, task="linreg", schema=str(folder / "schema.json"), **settings)
    pooled = pd.concat(parties, ignore_index=True)
    # A missing category: its indicator missing, then filled with the indicator's pooled mean.
    male = FunctionTransformer(lambda f: np.where(f.isna(), np.nan, f == "M").astype(float))
    steps = [
        ("age", SimpleImputer(strategy="mean"), ["age"]),
        ("sex", make_pipeline(male, SimpleImputer(strategy="mean")), ["sex"]),
        ("bmi", SimpleImputer(strategy="mean"), ["bmi"]),
        ("smoker", OneHotEncoder(categories=[SMOKER], drop="first"), ["smoker"]),
    ]
    return folder, out, pooled, steps


def test_the_model_carries_the_schema_and_the_imputation_means(hospitals):
    _, out, pooled, _ = hospitals
    spec = json.loads((out / "model.json").read_text())
    assert spec["schema"] == SCHEMA
    assert spec["features"] == ["age", "sex=M", "bmi", "smoker=former", "smoker=current"]
    means = dict(zip(spec["features"], spec["impute"]["values"], strict=True))
    assert means["age"] == pytest.approx(pooled["age"].mean(), rel=1e-9)
    assert means["bmi"] == pytest.approx(pooled["bmi"].mean(), rel=1e-9)
    # a missing category fills each indicator with its pooled mean (the share of "M")
    observed = pooled["sex"].dropna()
    assert means["sex=M"] == pytest.approx((observed == "M").mean(), rel=1e-9)


def test_predict_applies_the_schema_and_imputes_like_the_run(hospitals, tmp_path, capsys):
    """Raw records (text categories, NA cells, columns in another order, no target) scored
    by `fedhe predict` give the run's own test predictions."""
    folder, out, _, _ = hospitals
    test = pd.read_csv(folder / "test.csv", dtype=str, keep_default_na=False)
    raw = test.drop(columns=["outcome"])[["smoker", "bmi", "sex", "age"]]
    data = tmp_path / "new-patients.csv"
    raw.to_csv(data, index=False)
    assert main(["predict", str(out), "--data", str(data), "--out", str(tmp_path / "p.csv")]) == 0
    scored = pd.read_csv(tmp_path / "p.csv")
    own = pd.read_csv(out / "predictions.csv")
    np.testing.assert_allclose(scored["prediction"], own["prediction"], rtol=1e-12)
    assert "NA" in set(test["age"]) | set(test["bmi"])  # holes really were imputed
    raw.loc[3, "smoker"] = "sometimes"
    raw.to_csv(data, index=False)
    assert main(["predict", str(out), "--data", str(data)]) == 2
    error = capsys.readouterr().err
    assert f"{data}: row at line 5, column 'smoker': 'sometimes' is not one of" in error


def test_the_schema_model_predicts_what_sklearn_fitted_on_the_pooled_files_does(hospitals):
    """New raw records (holes, text categories) through the loaded model and through
    scikit-learn's imputers + OneHotEncoder + LinearRegression fitted on the pooled files."""
    _, out, pooled, steps = hospitals
    pipeline = make_pipeline(ColumnTransformer(steps), LinearRegression())
    pipeline.fit(pooled.drop(columns=["outcome"]), pooled["outcome"])
    fresh = _patients(np.random.default_rng(99), 30).drop(columns=["outcome"])
    assert fresh.isna().any().any()
    expected = pipeline.predict(fresh)
    np.testing.assert_allclose(load_model(out).predict(fresh), expected, rtol=1e-6)


def test_predict_scores_a_kept_knn_store(tmp_path, capsys):
    out = tmp_path / "knn"
    config = JobConfig.of(
        task="knn", dataset="iris", parties=3, min_parties=2, out=str(out),
        plaintext_twin=False, query_batch=16, keep_store=True,
    )  # fmt: skip
    nodes = {
        i: {
            "partition-id": i,
            "num-partitions": config.num_nodes,
            **SIMULATION_NODE_CONFIG,
            "identity-path": str(knn_predict.identity_path(out, i)),
        }
        for i in range(config.num_nodes)
    }
    grid = InProcessGrid(config.num_nodes, node_configs=nodes)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDHE_STATE_ROOT", str(knn_predict.keyholder_root(out)))
        run_job(grid, config)
    knn_predict.keep_only_the_querier(out)
    data, _, _ = _records("iris", target=True, folder=tmp_path)
    asked = tmp_path / "asked.csv"
    pd.read_csv(data).head(8).to_csv(asked, index=False)
    assert main(["predict", str(out), "--data", str(asked), "--out", str(tmp_path / "k.csv")]) == 0
    scored = pd.read_csv(tmp_path / "k.csv")
    answered = kept_answers(grid, "predictions", encrypted=True)[:8]
    np.testing.assert_array_equal(scored["prediction"], answered)
    assert list(scored.columns) == ["row", "line", "prediction"]
    assert "accuracy against 'species'" in capsys.readouterr().out
