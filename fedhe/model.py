"""The trained model of a run, loaded from its folder: a scikit-learn-style estimator.

Every run writes `model.json` beside result.json (aggregator/export.py), and `model.pt` for
torch models. `load_model(run_dir)` reads them back::

    model = load_model("runs/linreg")
    model.predict(X)              # X: rows in model.feature_names_in_ order, or a DataFrame
    model.score(X, y)             # accuracy (classifiers) or R² (regressors), as scikit-learn
    model.predict_proba(X)        # classifiers: one column per model.classes_
    model.to_torch()              # torch models: the network; it takes model.features(X)

model.json ("format": "fedhe-model/1"):

- ``task``, ``kind`` (``linear``: linreg; ``logistic``: logreg; ``torch``: aggregate, mlp;
  ``knn``), ``estimator`` (``classifier`` or ``regressor``);
- ``features``: the feature names in the order X takes them (after any schema encoding),
  ``target``, ``classes`` (the original label values; null for regression);
- ``standardizer``: the global mean/std of the features (``y_mean``/``y_std`` for linreg),
  from the job's one secure sum of moments;
- ``impute``: ``{"strategy": "mean", "values": [...]}`` when the run imputed missing cells
  (one value per feature), else null; ``schema``: the schema.json the run used, else null;
- ``linear`` (linear and logistic models, and torch models without a hidden layer):
  ``intercept`` and ``coefficients`` in ORIGINAL feature units (a list per output for a
  softmax model), and ``link`` (identity, logistic or softmax);
- ``architecture`` (torch): ``n_features``, ``n_classes``, ``n_outputs`` (1 for two classes:
  one logit), ``hidden`` widths, ``activation`` and its polynomial ``activation_coefficients``
  (c₀ + c₁x + c₂x²; null for relu); the network takes standardized features;
  ``weights``: ``model.pt``, the torch state_dict (`torch.load(..., weights_only=True)`);
- ``knn``: ``k``, ``standardize``, ``query`` and ``store`` (the kept encrypted store's
  folder, or null: nothing to ask new queries against).

Nothing here imports Flower or the aggregator: a site can score records with only this file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin

from fedhe.data.csvdata import MISSING_TOKENS
from fedhe.errors import DataError, FedHEError

if TYPE_CHECKING:
    import torch

FORMAT = "fedhe-model/1"
MODEL_JSON = "model.json"
MODEL_PT = "model.pt"
PREDICTIONS_CSV = "predictions.csv"
KINDS = ("linear", "logistic", "torch", "knn")
_MISSING_TOKENS = MISSING_TOKENS | {""}  # a CSV's missing-cell spellings, and an empty cell


def load_model(path: str | Path) -> FedHEModel:
    """The model of a run: `path` is the run's folder (holding model.json) or model.json."""
    spec = read_model_json(path)
    estimator = FedHEClassifier if spec["estimator"] == "classifier" else FedHERegressor
    return estimator(str(path))


def read_model_json(path: str | Path) -> dict[str, Any]:
    """model.json of a run folder (or the file itself), checked for its format."""
    file = Path(path)
    if file.is_dir():
        file = file / MODEL_JSON
    if not file.is_file():
        raise FedHEError(
            f"{file}: no model file. A run written before models were exported has none: run "
            "the job again (fedhe simulate ... --out DIR) to get DIR/model.json."
        )
    try:
        spec = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FedHEError(f"{file}: not a JSON model file ({err}).") from err
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise FedHEError(f"{file}: format {found!r} is not {FORMAT!r}; this fedhe cannot read it.")
    if spec.get("kind") not in KINDS:
        raise FedHEError(f"{file}: kind {spec.get('kind')!r} is not one of {list(KINDS)}.")
    spec["_file"] = str(file)
    return spec


class FedHEModel(BaseEstimator):
    """A trained fedhe model, read from its run folder.

    Parameters
    ----------
    path : the run folder (or its model.json).

    Attributes
    ----------
    task_, kind_ : the job that trained it and how it predicts (see the module docstring).
    n_features_in_, feature_names_in_ : what `predict` takes, in that order.
    target_name_ : the label column of the training data.
    coef_, intercept_ : linear models, in original feature units.
    """

    def __init__(self, path: str = "") -> None:
        # Unlike a scikit-learn estimator this one is trained elsewhere (by a federated run):
        # constructing it IS loading it, so that `clone` and `get_params` still work.
        self.path = path
        spec = read_model_json(path)
        self.spec_ = spec
        self.task_ = spec["task"]
        self.kind_ = spec["kind"]
        self.feature_names_in_ = np.asarray(spec["features"], dtype=object)
        self.n_features_in_ = len(spec["features"])
        self.target_name_ = spec.get("target", "")
        linear = spec.get("linear")
        if linear:
            self.intercept_ = np.asarray(linear["intercept"], dtype=float)
            self.coef_ = np.asarray(linear["coefficients"], dtype=float)
        self._weights: dict[str, np.ndarray] | None = None

    @property
    def folder(self) -> Path:
        return Path(self.spec_["_file"]).parent

    def fit(self, X: Any = None, y: Any = None) -> FedHEModel:
        raise FedHEError(
            "a fedhe model is trained by a federated run, not by fit(): run "
            "fedhe.simulate(task, ...) (or `fedhe simulate`) and load its folder."
        )

    # -- inputs ----------------------------------------------------------------------------------

    def features(self, X: Any) -> np.ndarray:
        """What the network (or the standardized linear model) takes: X in the model's
        feature order, encoded and imputed as the run did, then standardized."""
        return self._standardize(self.raw_features(X))

    def raw_features(self, X: Any) -> np.ndarray:
        """X as a float matrix in the model's feature order (columns of a DataFrame matched
        by name, the schema's encoding and the run's imputation applied), not standardized."""
        if isinstance(X, pd.DataFrame):
            return self.frame_features(X)
        return self._checked_array(X)

    def frame_features(
        self, frame: pd.DataFrame, *, source: str = "X", lines: Sequence[int] | None = None
    ) -> np.ndarray:
        """A DataFrame's feature columns by name, as numbers. `source`/`lines`: the file and
        the file line of each row, for errors (default: the frame's index)."""
        encoded = _apply_schema(self.spec_.get("schema"), self.target_name_, frame, source, lines)
        names = list(self.feature_names_in_)
        missing = [name for name in names if name not in encoded.columns]
        if missing:
            raise DataError(
                f"{source}: columns {_few(missing)} are missing; the model takes {_few(names)} "
                f"(matched by name, in any order; the target {self.target_name_!r} may be absent)."
            )
        values = encoded[names]
        where = [f"line {line}" for line in lines] if lines is not None else None
        return self._impute(_numbers(values, source, where), source, where)

    def ignored_columns(self, frame: pd.DataFrame) -> list[str]:
        """Columns of `frame` the model does not read (the target among them)."""
        schema = self.spec_.get("schema") or {}
        known = set(self.feature_names_in_) | set(schema.get("columns", {}))
        return [str(c) for c in frame.columns if c not in known]

    def _checked_array(self, X: Any) -> np.ndarray:
        try:
            array = np.asarray(X, dtype=float)
        except (TypeError, ValueError) as err:
            raise DataError(
                f"X is not numeric ({err}); pass numbers, or a DataFrame with the columns "
                f"{_few(list(self.feature_names_in_))}."
            ) from err
        if array.ndim != 2 or array.shape[1] != self.n_features_in_:
            raise DataError(
                f"X has shape {array.shape}; the model takes (n_samples, {self.n_features_in_}) "
                f"with columns {_few(list(self.feature_names_in_))} (one record: "
                "X.reshape(1, -1))."
            )
        return self._impute(array, "X", None)

    def _impute(self, X: np.ndarray, source: str, where: Sequence[str] | None) -> np.ndarray:
        missing = np.isnan(X)
        if not missing.any():
            return X
        impute = self.spec_.get("impute")
        if not impute:
            row, col = (int(i) for i in np.argwhere(missing)[0])
            at = where[row] if where is not None else f"row {row}"
            raise DataError(
                f"{source}: {at}, column {self.feature_names_in_[col]!r}: missing value. This "
                "model was trained without --impute mean: fill the cell or remove the row."
            )
        means = np.asarray(impute["values"], dtype=float)
        return np.where(missing, means, X)

    def _standardize(self, X: np.ndarray) -> np.ndarray:
        standardizer = self.spec_.get("standardizer")
        if not standardizer:
            return X
        mean = np.asarray(standardizer["mean"], dtype=float)
        std = np.asarray(standardizer["std"], dtype=float)
        return (X - mean) / std

    # -- outputs ---------------------------------------------------------------------------------

    def _scores(self, X: Any) -> np.ndarray:
        """Linear predictor (linear, logistic) or logits (torch), one row per record."""
        if self.kind_ == "torch":
            return _forward(self.weights(), self.spec_["architecture"], self.features(X))
        raw = self.raw_features(X)
        return self.intercept_ + raw @ self.coef_.T

    def weights(self) -> dict[str, np.ndarray]:
        """The torch model's state_dict as numpy arrays (from model.pt)."""
        if self.kind_ != "torch":
            raise FedHEError(f"a {self.kind_} model has no weights file; see coef_/intercept_.")
        if self._weights is None:
            import torch

            file = self.folder / self.spec_["weights"]
            if not file.is_file():
                raise FedHEError(f"{file}: the weights named by {self.spec_['_file']} are gone.")
            state = torch.load(file, map_location="cpu", weights_only=True)
            self._weights = {k: v.numpy() for k, v in state.items()}
        return self._weights

    def to_torch(self) -> torch.nn.Module:
        """The trained network as a torch module (eval mode, float64); its input is
        `features(X)` (standardized), its output logits (one column for two classes)."""
        if self.kind_ != "torch":
            raise FedHEError(
                f"the {self.task_} model is {self.kind_}, not a torch network: use predict(), "
                "or coef_ and intercept_."
            )
        from fedhe.learning import ModelSpec, build_model, set_weights

        module = build_model(ModelSpec.from_dict(self.spec_["architecture"]), seed=0)
        set_weights(module, self.weights())
        return module.eval()

    def _knn_predict(self, X: Any) -> np.ndarray:
        if not self.spec_["knn"].get("store"):
            raise FedHEError(
                f"{self.folder}: a knn model is its parties' encrypted points, and this run did "
                "not keep them: run knn with --keep-store true to score new records later."
            )
        from fedhe import knn_predict  # Flower and the crypto stack: only for a kept store

        answers = np.asarray(knn_predict.predict(self.folder, self.raw_features(X)))
        if self.spec_["estimator"] == "classifier":  # the querier's vote: a class index
            return np.asarray(self.spec_["classes"])[answers.astype(int)]
        return answers


class FedHERegressor(RegressorMixin, FedHEModel):
    """A fedhe regression model (linreg, knn regression): `score` is R²."""

    def predict(self, X: Any) -> np.ndarray:
        if self.kind_ == "knn":
            return self._knn_predict(X)
        return self._scores(X)


class FedHEClassifier(ClassifierMixin, FedHEModel):
    """A fedhe classifier (logreg, aggregate, mlp, knn classification): `score` is accuracy;
    `classes_` holds the original label values."""

    def __init__(self, path: str = "") -> None:
        super().__init__(path)
        self.classes_ = np.asarray(self.spec_["classes"])

    def predict_proba(self, X: Any) -> np.ndarray:
        """One column per `classes_`."""
        if self.kind_ == "knn":
            raise FedHEError("a knn model votes; it gives labels (predict), no probabilities.")
        scores = self._scores(X)
        if scores.ndim == 1 or scores.shape[1] == 1:
            positive = _sigmoid(scores.reshape(-1))
            return np.column_stack([1.0 - positive, positive])
        shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    def predict(self, X: Any) -> np.ndarray:
        if self.kind_ == "knn":
            return self._knn_predict(X)
        scores = self._scores(X)
        if scores.ndim == 1 or scores.shape[1] == 1:  # one logit: class 1 where it is > 0
            index = (scores.reshape(-1) > 0).astype(int)
            if self.kind_ == "logistic":  # logreg's own rule: probability ≥ 0.5
                index = (_sigmoid(scores.reshape(-1)) >= 0.5).astype(int)
        else:
            index = scores.argmax(axis=1)
        return self.classes_[index]


# -- helpers ---------------------------------------------------------------------------------------


def _few(names: Sequence[str], shown: int = 8) -> str:
    """A list of column names, shortened past `shown` of them."""
    if len(names) <= shown:
        return str(list(names))
    head = ", ".join(repr(name) for name in names[: shown - 1])
    return f"[{head}, ...] ({len(names)} in all)"


def _sigmoid(eta: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * eta))


def _forward(
    weights: dict[str, np.ndarray], architecture: dict[str, Any], Z: np.ndarray
) -> np.ndarray:
    """The network of `fedhe.learning.build_model` in numpy: Linear, activation, …, Linear."""
    linear = sorted({int(key.split(".")[0]) for key in weights})
    coefficients = architecture.get("activation_coefficients")
    h = Z
    for position, index in enumerate(linear):
        h = h @ weights[f"{index}.weight"].T + weights[f"{index}.bias"]
        if position < len(linear) - 1:
            if coefficients is None:
                h = np.maximum(h, 0.0)
            else:
                c0, c1, c2 = coefficients
                h = c0 + c1 * h + c2 * h * h
    return h


def _numbers(frame: pd.DataFrame, source: str, where: Sequence[str] | None) -> np.ndarray:
    """The cells of `frame` as floats: NaN where a cell is missing; a cell that is text, or
    infinite, raises naming its row, column and raw value."""
    numbers = frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    raw = frame.to_numpy(dtype=object)
    missing = np.vectorize(_is_missing, otypes=[bool])(raw) if raw.size else np.zeros((0, 0))
    bad = ~np.isfinite(numbers) & ~missing
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        at = where[row] if where is not None else f"row {frame.index[row]!r}"
        text = str(raw[row, col])
        shown = text if len(text) <= 40 else text[:37] + "..."
        problem = "an infinite value" if np.isinf(numbers[row, col]) else "not a number"
        raise DataError(
            f"{source}: {at}, column {frame.columns[col]!r}: {shown!r} is {problem}. Use plain "
            "numbers such as 3 or -1.5e-2 (a categorical column needs the run's schema.json)."
        )
    return np.where(missing, np.nan, numbers)


def _is_missing(cell: object) -> bool:
    if cell is None:
        return True
    if isinstance(cell, float):
        return bool(np.isnan(cell))
    return isinstance(cell, str) and cell.strip().lower() in _MISSING_TOKENS


def _apply_schema(
    schema: dict[str, Any] | None,
    target: str,
    frame: pd.DataFrame,
    source: str,
    lines: Sequence[int] | None,
) -> pd.DataFrame:
    """The frame's feature columns as the run's schema encodes them (categoricals one-hot with
    its vocabularies, by `fedhe.data.schema`, exactly as every site encoded its own file),
    missing cells NaN; the frame unchanged without a schema."""
    if not schema:
        return frame
    from fedhe.data import schema as schemas

    parsed = schemas.parse_schema(schema, origin="the model's schema")
    columns = parsed.features(target)
    missing = [c.name for c in columns if c.name not in frame.columns]
    if missing:
        raise DataError(
            f"{source}: columns {_few(missing)} are missing; the model's schema has "
            f"{_few([c.name for c in columns])} (matched by name, in any order)."
        )
    rows = np.asarray(lines) if lines is not None else np.asarray(frame.index)
    blocks = {}
    for column in columns:
        cells = np.array([_as_text(cell) for cell in frame[column.name]], dtype=object)
        block = schemas.encode_column(Path(source), column, cells, rows, impute=True)
        blocks.update({name: block[:, i] for i, name in enumerate(column.encoded_names)})
    return pd.DataFrame(blocks, index=frame.index)


def _as_text(cell: object) -> str:
    """A cell as the schema compares it: text, stripped; missing as ""."""
    return "" if _is_missing(cell) else str(cell).strip()
