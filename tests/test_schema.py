"""schema.json (column types, categories one-hot encoded alike at every site) and `--impute mean`
(missing cells filled with the secure global means), from the file to a finished job."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LinearRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder

from fedhe.aggregator.app import run_job
from fedhe.config import ConfigError, JobConfig
from fedhe.data import sources
from fedhe.data.schema import load_encoded, load_schema, numeric_schema, parse_schema
from fedhe.data.sources import DataSource, party_data, with_columns
from fedhe.errors import DataError
from fedhe.tasks import moments
from tests.inprocess import InProcessGrid

SEX = ["F", "M"]
SMOKER = ["never", "former", "current"]
SCHEMA = {
    "target": "outcome",
    "columns": {
        "age": {"type": "numeric", "unit": "years"},
        "sex": {"type": "categorical", "categories": SEX},
        "bmi": {"type": "numeric", "unit": "kg/m2"},
        "smoker": {"type": "categorical", "categories": SMOKER},
        "outcome": {"type": "numeric", "unit": "mmol/L"},
    },
}
FEATURES = ["age", "sex", "bmi", "smoker"]


def write_schema(folder: Path, schema: dict | None = None) -> Path:
    path = folder / "schema.json"
    path.write_text(json.dumps(SCHEMA if schema is None else schema))
    return path


def hospital(rng: np.random.Generator, n: int, smokers: list[str]) -> pd.DataFrame:
    """`n` patients; the outcome is linear in age, sex, bmi and smoking, plus noise."""
    frame = pd.DataFrame(
        {
            "age": rng.normal(55, 12, n).round(1),
            "sex": rng.choice(SEX, n),
            "bmi": rng.normal(27, 4, n).round(2),
            "smoker": rng.choice(smokers, n),
        }
    )
    effect = frame["smoker"].map({"never": 0.0, "former": 0.8, "current": 2.1})
    frame["outcome"] = (
        0.04 * frame["age"]
        + 0.9 * (frame["sex"] == "M")
        + 0.12 * frame["bmi"]
        + effect
        + 1.5
        + rng.normal(0, 0.3, n)
    ).round(3)
    return frame


def with_holes(frame: pd.DataFrame, rng: np.random.Generator, share: float) -> pd.DataFrame:
    """`frame` with about `share` of its age and bmi cells missing."""
    frame = frame.copy()
    for column in ("age", "bmi"):
        frame.loc[rng.random(len(frame)) < share, column] = np.nan
    return frame


@pytest.fixture
def hospitals(tmp_path):
    """Three hospitals' files with missing numeric cells; one has no current smokers and writes
    its columns in another order; test.csv has holes too. Returns (folder, parties, test)."""
    rng = np.random.default_rng(17)
    parties = [
        with_holes(hospital(rng, 80, SMOKER), rng, 0.15),
        with_holes(hospital(rng, 60, ["never", "former"]), rng, 0.25),
        with_holes(hospital(rng, 70, SMOKER), rng, 0.05),
    ]
    test = with_holes(hospital(rng, 50, SMOKER), rng, 0.1)
    for number, frame in enumerate(parties, start=1):
        columns = list(frame.columns)[::-1] if number == 2 else list(frame.columns)
        frame[columns].to_csv(tmp_path / f"party-{number}.csv", index=False, na_rep="")
    test.to_csv(tmp_path / "test.csv", index=False, na_rep="NA")
    write_schema(tmp_path)
    return tmp_path, parties, test


def sklearn_pipeline():
    """What the federated job must equal: scikit-learn on the pooled data."""
    steps = [
        ("age", SimpleImputer(strategy="mean"), ["age"]),
        ("sex", OneHotEncoder(categories=[SEX], drop="first"), ["sex"]),
        ("bmi", SimpleImputer(strategy="mean"), ["bmi"]),
        ("smoker", OneHotEncoder(categories=[SMOKER], drop="first"), ["smoker"]),
    ]
    return make_pipeline(ColumnTransformer(steps), LinearRegression())


def source_of(folder: Path, **settings) -> DataSource:
    source = DataSource("", str(folder), "outcome", n_parties=3)
    return with_columns(source, str(folder / "schema.json"), **settings)


# -- the schema file ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ([1, 2], "must be a JSON object"),
        ({"columns": {}}, "'columns' must be a non-empty object"),
        ({"columns": {"age": {"type": "numeric"}}, "colums": {}}, "unknown keys ['colums']"),
        ({"columns": {"age": {"type": "number"}}}, "column 'age': 'type' must be one of"),
        ({"columns": {"age": "numeric"}}, "column 'age' must be an object"),
        ({"columns": {"sex": {"type": "categorical"}}}, "column 'sex': 'categories' must be"),
        (
            {"columns": {"sex": {"type": "categorical", "categories": ["F", "M", "F"]}}},
            "categories ['F'] appear more than once",
        ),
        (
            {"columns": {"sex": {"type": "categorical", "categories": ["F", None]}}},
            "category None must be text or an integer",
        ),
        ({"columns": {"sex": {"type": "categorical", "categories": ["F", "NA"]}}}, "missing"),
        ({"columns": {"age": {"type": "numeric", "categories": ["a"]}}}, "unknown keys"),
        ({"columns": {"age": {"type": "numeric", "unit": 3}}}, "'unit' must be text"),
        ({"target": 3, "columns": {"age": {"type": "numeric"}}}, "'target' must be"),
    ],
)
def test_schema_errors_name_the_key(tmp_path, schema, message):
    path = write_schema(tmp_path, schema)
    with pytest.raises(DataError, match=r"schema\.json") as caught:
        load_schema(path)
    assert message in str(caught.value)


def test_schema_file_not_json_says_where(tmp_path):
    path = tmp_path / "schema.json"
    path.write_text('{"columns": {"age": {"type": "numeric"},}}')
    with pytest.raises(DataError, match=r"not valid JSON at line 1, column \d+"):
        load_schema(path)
    with pytest.raises(DataError, match=r"schema file not found"):
        load_schema(tmp_path / "nothing.json")


def test_schema_round_trips_and_names_the_encoded_features(tmp_path):
    schema = load_schema(write_schema(tmp_path))
    assert parse_schema(schema.to_dict()) == parse_schema(SCHEMA)
    assert schema.feature_names("outcome") == (
        "age",
        "sex=M",
        "bmi",
        "smoker=former",
        "smoker=current",
    )
    assert schema.units() == {"age": "years", "bmi": "kg/m2", "outcome": "mmol/L"}
    assert schema.categorical == ("sex", "smoker")


def test_schema_target_must_agree_with_the_job(tmp_path):
    write_schema(tmp_path)
    with pytest.raises(DataError, match=r"names the target 'outcome'.*--target outcome"):
        with_columns(DataSource("", str(tmp_path), "bmi"), str(tmp_path / "schema.json"))


def test_schema_and_impute_are_for_csv_jobs_only():
    with pytest.raises(ConfigError, match=r"--data-dir"):
        JobConfig.of(task="linreg", impute="mean")
    with pytest.raises(ConfigError, match=r"--data-dir"):
        JobConfig.of(task="linreg", schema="schema.json")
    with pytest.raises(ConfigError, match=r"impute 'median' is not one of"):
        JobConfig.of(task="linreg", data_dir="d", target="y", impute="median")


# -- encoding one file ----------------------------------------------------------------------------


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_one_hot_drops_the_first_category_even_where_a_site_lacks_one(tmp_path):
    schema = parse_schema(SCHEMA)
    path = write_csv(
        tmp_path / "a.csv",
        "outcome,smoker,bmi,sex,age\n1,never,20,M,40\n2,former,21,F,50\n3,former,22,M,60\n",
    )
    data = load_encoded(path, schema, "outcome", impute=False, task="regression")
    assert data.feature_names == ("age", "sex=M", "bmi", "smoker=former", "smoker=current")
    np.testing.assert_array_equal(data.X, [[40, 1, 20, 0, 0], [50, 0, 21, 1, 0], [60, 1, 22, 1, 0]])
    np.testing.assert_array_equal(data.y, [1, 2, 3])
    reference = OneHotEncoder(categories=[SMOKER], drop="first", sparse_output=False)
    np.testing.assert_array_equal(
        data.X[:, 3:], reference.fit_transform(pd.DataFrame({"s": ["never", "former", "former"]}))
    )


def test_unknown_category_names_file_line_column_value_and_the_fix(tmp_path):
    path = write_csv(
        tmp_path / "a.csv", "age,sex,bmi,smoker,outcome\n40,F,20,never,1\n41,m,20,never,2\n"
    )
    with pytest.raises(DataError) as caught:
        load_encoded(path, parse_schema(SCHEMA), "outcome", impute=False)
    message = str(caught.value)
    for part in ("a.csv", "line 3", "'sex'", "'m'", "['F', 'M']", "add it to schema.json"):
        assert part.lower() in message.lower(), part


def test_columns_must_match_the_schema_by_name(tmp_path):
    path = write_csv(tmp_path / "a.csv", "age,gender,bmi,smoker,outcome\n40,F,20,never,1\n")
    with pytest.raises(DataError) as caught:
        load_encoded(path, parse_schema(SCHEMA), "outcome", impute=False)
    message = str(caught.value)
    assert "not in schema.json: ['gender']" in message
    assert "missing from the file: ['sex']" in message


def test_missing_cells_are_an_error_without_impute_and_nan_with_it(tmp_path):
    path = write_csv(
        tmp_path / "a.csv", "age,sex,bmi,smoker,outcome\n,F,20,never,1\n41,NA,20,former,2\n"
    )
    schema = parse_schema(SCHEMA)
    with pytest.raises(DataError, match=r"line 2, column 'age': missing value ''.*--impute mean"):
        load_encoded(path, schema, "outcome", impute=False)
    data = load_encoded(path, schema, "outcome", impute=True)
    assert np.isnan(data.X[0, 0]) and not np.isnan(data.X[0, 1:]).any()
    assert np.isnan(data.X[1, 1]) and data.X[1, 3] == 1  # a missing category: its indicator NaN


def test_a_missing_target_is_never_imputed(tmp_path):
    path = write_csv(tmp_path / "a.csv", "age,sex,bmi,smoker,outcome\n40,F,20,never,\n")
    with pytest.raises(DataError, match=r"line 2, column 'outcome': missing target.*never imputed"):
        load_encoded(path, parse_schema(SCHEMA), "outcome", impute=True)


def test_text_in_a_numeric_column_points_at_the_schema(tmp_path):
    path = write_csv(tmp_path / "a.csv", "age,sex,bmi,smoker,outcome\n40,F,obese,never,1\n")
    with pytest.raises(DataError, match=r"column 'bmi': 'obese' is not a number.*categorical"):
        load_encoded(path, parse_schema(SCHEMA), "outcome", impute=True)


def test_a_categorical_target_classifies_into_its_categories(tmp_path):
    schema = parse_schema(
        {
            "columns": {
                "age": {"type": "numeric"},
                "diagnosis": {"type": "categorical", "categories": ["benign", "malignant"]},
            }
        }
    )
    path = write_csv(tmp_path / "a.csv", "diagnosis,age\nmalignant,40\nmalignant,50\n")
    data = load_encoded(path, schema, "diagnosis", impute=False)
    assert (data.task, data.n_classes, data.y.tolist()) == ("classification", 2, [1, 1])
    with pytest.raises(DataError, match=r"categorical in schema.json; a regression"):
        load_encoded(path, schema, "diagnosis", impute=False, task="regression")


def test_every_site_encodes_alike_whatever_its_column_order(hospitals):
    folder, _, _ = hospitals
    source = source_of(folder, impute="mean")
    shares = [party_data(source, i) for i in range(3)]
    test = sources.test_data(source)
    names = {d.feature_names for d in [*shares, test]}
    assert names == {("age", "sex=M", "bmi", "smoker=former", "smoker=current")}
    assert not shares[1].X[:, 4].any()  # hospital 2 has no current smokers: a zero column
    expected = pd.read_csv(folder / "party-2.csv")["sex"].eq("M").to_numpy()
    np.testing.assert_array_equal(shares[1].X[:, 1], expected)  # read by name, not position
    # the source travels to the parties as JSON: the schema with it
    travelled = DataSource.from_dict(json.loads(json.dumps(source.to_dict())))
    np.testing.assert_array_equal(party_data(travelled, 0).y, shares[0].y)


def test_impute_without_a_schema_reads_every_column_as_numeric(tmp_path):
    for number in (1, 2):
        write_csv(tmp_path / f"party-{number}.csv", "y,a,b\n1,,2\n2,3,\n")
    write_csv(tmp_path / "test.csv", "b,a,y\n1,2,3\n")
    source = with_columns(DataSource("", str(tmp_path), "y", n_parties=2), impute="mean")
    assert party_data(source, 0).feature_names == ("a", "b")
    assert sources.test_data(source).X.tolist() == [[2, 1]]  # matched by name
    header = numeric_schema(["y", "a", "b"], origin="h")
    assert header.feature_names("y") == ("a", "b")


# -- the secure moments with missing cells --------------------------------------------------------


def test_imputed_moments_equal_the_pooled_imputed_data():
    rng = np.random.default_rng(3)
    shares = [rng.normal(2, 3, size=(n, 3)) for n in (20, 35, 9)]
    for share, rate in zip(shares, (0.2, 0.5, 0.0), strict=True):
        share[rng.random(share.shape) < rate] = np.nan
    shares[2][:, 1] = np.nan  # one site never observes column 1
    summed = {"mean": 0.0, "meansq": 0.0, moments.OBSERVED: 0.0}
    for share in shares:  # what the secure sum adds: nᵢ·fieldᵢ, then ÷ Σnᵢ
        for name, value in moments.party_moments(share, observed=True).items():
            summed[name] = summed[name] + len(share) * value
    n = sum(len(s) for s in shares)
    standardizer = moments.Standardizer.from_moments(
        summed["mean"] / n,
        summed["meansq"] / n,
        observed=summed[moments.OBSERVED] / n,
        total_samples=n,
    )
    pooled = np.vstack(shares)
    imputer = SimpleImputer(strategy="mean").fit(pooled)
    np.testing.assert_allclose(standardizer.fill, imputer.statistics_, rtol=1e-12)
    filled = imputer.transform(pooled)
    np.testing.assert_allclose(standardizer.mean, filled.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(standardizer.std, filled.std(axis=0), rtol=1e-10)
    np.testing.assert_allclose(
        standardizer.features(pooled), (filled - filled.mean(0)) / filled.std(0), atol=1e-10
    )
    again = moments.Standardizer.from_dict(json.loads(json.dumps(standardizer.to_dict())))
    np.testing.assert_array_equal(again.fill, standardizer.fill)


def test_a_column_no_party_observed_cannot_be_imputed():
    with pytest.raises(DataError, match=r"column 'bmi' has no observed value at any party"):
        moments.Standardizer.from_moments(
            np.array([1.0, 0.0]),
            np.array([2.0, 0.0]),
            observed=np.array([1.0, 0.0]),
            total_samples=10,
            names=("age", "bmi"),
        )


# -- whole jobs -----------------------------------------------------------------------------------


def run(folder: Path, out: Path, **settings) -> dict:
    out.mkdir()
    config = JobConfig.of(
        parties=3,
        min_parties=3,
        data_dir=str(folder),
        target="outcome",
        schema=str(folder / "schema.json"),
        impute="mean",
        out=str(out),
        **settings,
    )
    run_job(InProcessGrid(config.num_nodes), config)
    return json.loads((out / "result.json").read_text())


def test_exact_linreg_with_schema_and_impute_equals_sklearns_pipeline(hospitals, tmp_path):
    folder, parties, test = hospitals
    result = run(folder, tmp_path / "out", task="linreg", l2=0.0, plaintext_twin=True)
    pooled = pd.concat(parties, ignore_index=True)
    pipeline = sklearn_pipeline().fit(pooled[FEATURES], pooled["outcome"])
    fitted = pipeline[-1]
    reference = np.concatenate([[fitted.intercept_], fitted.coef_])
    coefficients = result["coefficients"]
    assert coefficients["names"] == [
        "intercept",
        "age",
        "sex=M",
        "bmi",
        "smoker=former",
        "smoker=current",
    ]
    for run_name in ("encrypted", "plaintext"):
        got = np.asarray(coefficients[run_name])
        assert np.max(np.abs(got - reference) / np.abs(reference)) <= 1e-6, run_name
    # test predictions: the aggregator fills test.csv's holes with the same global means
    predicted = pipeline.predict(test[FEATURES])
    mse = float(np.mean((predicted - test["outcome"]) ** 2))
    assert result["encrypted"]["mse"] == pytest.approx(mse, rel=1e-6)
    ours = pipeline[0].transform(test[FEATURES]) @ np.asarray(coefficients["encrypted"])[1:]
    np.testing.assert_allclose(ours + coefficients["encrypted"][0], predicted, rtol=1e-6)
    saved = tmp_path / "out" / "predictions.csv"
    if saved.exists():  # the run's own test predictions (aggregator/export.py)
        np.testing.assert_allclose(pd.read_csv(saved)["prediction"], predicted, rtol=1e-6)


def test_without_impute_a_missing_cell_still_excludes_the_party(hospitals, tmp_path):
    folder, _, _ = hospitals
    config = JobConfig.of(
        task="linreg",
        parties=3,
        min_parties=3,
        data_dir=str(folder),
        target="outcome",
        schema=str(folder / "schema.json"),
        out=str(tmp_path / "out"),
    )
    with pytest.raises(DataError, match=r"missing value.*--impute mean"):
        run_job(InProcessGrid(config.num_nodes), config)


def test_logreg_with_a_categorical_target_and_missing_cells_runs_end_to_end(tmp_path):
    rng = np.random.default_rng(4)
    schema = {
        "columns": {
            "age": {"type": "numeric", "unit": "years"},
            "sex": {"type": "categorical", "categories": SEX},
            "marker": {"type": "numeric"},
            "diagnosis": {"type": "categorical", "categories": ["benign", "malignant"]},
        }
    }
    write_schema(tmp_path, schema)

    def site(n: int) -> pd.DataFrame:
        frame = pd.DataFrame(
            {
                "age": rng.normal(55, 10, n).round(1),
                "sex": rng.choice(SEX, n),
                "marker": rng.normal(0, 1, n).round(3),
            }
        )
        score = 2.5 * frame["marker"] + 0.05 * (frame["age"] - 55) + 0.5 * (frame["sex"] == "M")
        frame["diagnosis"] = np.where(score + rng.normal(0, 0.5, n) > 0, "malignant", "benign")
        frame.loc[rng.random(n) < 0.2, "age"] = np.nan
        frame.loc[rng.random(n) < 0.1, "sex"] = np.nan
        return frame

    for number in (1, 2, 3):
        site(70).to_csv(tmp_path / f"party-{number}.csv", index=False, na_rep="")
    site(60).to_csv(tmp_path / "test.csv", index=False, na_rep="")
    (tmp_path / "out").mkdir()
    config = JobConfig.of(
        task="logreg",
        parties=3,
        min_parties=2,
        data_dir=str(tmp_path),
        target="diagnosis",
        schema=str(tmp_path / "schema.json"),
        impute="mean",
        rounds=40,
        plaintext_twin=True,
        out=str(tmp_path / "out"),
    )
    run_job(InProcessGrid(config.num_nodes), config)
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["coefficients"]["names"] == ["intercept", "age", "sex=M", "marker"]
    assert result["parties"]["excluded"] == {}
    assert result["encrypted"]["accuracy"] >= 0.85
    assert result["encrypted"]["accuracy"] == pytest.approx(result["plaintext"]["accuracy"])


def test_knn_on_raw_features_fills_missing_cells_too(tmp_path):
    """KNN without standardization still fills each hole with the global mean (the querier's
    test rows as well), so no NaN reaches the encrypted distances."""
    rng = np.random.default_rng(4)

    def site(n: int) -> pd.DataFrame:
        frame = pd.DataFrame({"a": rng.normal(0, 1, n).round(3), "b": rng.normal(0, 1, n)})
        frame["y"] = (frame["a"] + frame["b"] > 0).astype(int)
        frame.loc[rng.random(n) < 0.2, "a"] = np.nan
        return frame

    for number in (1, 2, 3):
        site(60).to_csv(tmp_path / f"party-{number}.csv", index=False, na_rep="")
    site(20).to_csv(tmp_path / "test.csv", index=False, na_rep="")
    (tmp_path / "out").mkdir()
    config = JobConfig.of(
        task="knn",
        parties=3,
        min_parties=2,
        data_dir=str(tmp_path),
        target="y",
        impute="mean",
        standardize=False,
        out=str(tmp_path / "out"),
    )
    run_job(InProcessGrid(config.num_nodes), config)
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["parties"]["excluded"] == {}
    assert result["encrypted"]["accuracy"] >= 0.8


def test_the_key_holder_sizes_an_imputing_regression_from_its_moments_fields():
    from fedhe.errors import PolicyError
    from fedhe.tasks import aggregate, check_declaration, linreg

    def declaration(layout: aggregate.Layout):
        d = layout.shapes[0][0] - 1  # linreg: the target is the last column
        outputs = {
            moments.OUTPUT: (1, layout),
            linreg.MASKED_OUTPUT: (1, linreg.statistics_layout(d)),
        }
        return aggregate.declare("j", outputs=outputs, min_parties=2, task=linreg.TASK)

    check_declaration(declaration(moments.layout(6)))
    check_declaration(declaration(moments.layout(6, observed=True)))
    forged = aggregate.Layout(("mean", "meansq", "extra"), ((6,),) * 3)
    with pytest.raises(PolicyError, match=r"declares fields \['mean', 'meansq', 'extra'\]"):
        check_declaration(declaration(forged))
