"""The trained model of a run, written beside result.json: model.json, model.pt, predictions.csv.

model.json's format is documented in `fedhe.model` (which loads it). What it holds is what the
aggregator already holds after a job: the declared, released outputs (the global moments, the
model); no party's data or statistics. predictions.csv holds the run's own predictions on the
aggregator's test set, computed here the job's way, so that `fedhe predict` can be checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedhe.aggregator.job import JobRun
from fedhe.config import JobConfig
from fedhe.data.datasets import Dataset
from fedhe.data.sources import DataSource, schema_of
from fedhe.model import FORMAT, MODEL_JSON, MODEL_PT, PREDICTIONS_CSV
from fedhe.tasks import linreg, logreg, mlp
from fedhe.tasks.moments import Standardizer

_KINDS = {"linreg": "linear", "logreg": "logistic", "aggregate": "torch", "mlp": "torch"}


def export_model(
    config: JobConfig, run: JobRun, source: DataSource, test: Dataset
) -> dict[str, Any]:
    """Write the encrypted run's model into `config.out`; return result.json's "model" entry
    (the files written, relative to the run folder, and the architecture)."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = model_kind(config)
    if kind != "knn" and not run.weights:
        return {"json": None, "withheld": "the model stayed with the parties (none shared it)"}
    spec = model_spec(config, run, source, test)
    entry: dict[str, Any] = {"json": MODEL_JSON, "weights": None, "predictions": None}
    if kind == "torch":
        _save_state_dict(run.weights, out / MODEL_PT)
        entry.update(weights=MODEL_PT, architecture=spec["architecture"])
    # A KNN job's answers stay with its querier; a deployment's test rows stay at their site.
    if kind != "knn" and test.n_samples:
        _predictions(spec, run, test).to_csv(out / PREDICTIONS_CSV, index=False)
        entry["predictions"] = PREDICTIONS_CSV
    (out / MODEL_JSON).write_text(json.dumps(spec, indent=2) + "\n")
    return entry


def model_kind(config: JobConfig) -> str:
    """model.json's "kind" of the job's task."""
    return "knn" if config.task == "knn" else _KINDS[config.task]


def model_spec(config: JobConfig, run: JobRun, source: DataSource, test: Dataset) -> dict[str, Any]:
    """model.json's content for `run` (what every party of the job also receives): `test` gives
    the job's shape only (its rows may be none). A linear model without coefficients here
    (encrypted-model mode) has no "linear" entry: the sites fill it from what they open."""
    kind = model_kind(config)
    spec = _common(config, run, source, test, kind)
    if kind == "torch":
        spec.update(_torch_part(run))
    elif kind == "knn":
        spec["knn"] = _knn_part(config)
    elif "coefficients" in run.weights:
        spec["linear"] = _linear_part(run.weights["coefficients"], kind)
    return spec


def _common(
    config: JobConfig, run: JobRun, source: DataSource, test: Dataset, kind: str
) -> dict[str, Any]:
    classification = test.task == "classification"
    return {
        "format": FORMAT,
        "task": config.task,
        "kind": kind,
        "estimator": "classifier" if classification else "regressor",
        "features": list(test.feature_names),
        "target": test.target_name,
        "classes": _classes(source, test) if classification else None,
        "standardizer": run.model.get("standardizer"),
        "impute": _imputation(source, run),
        "schema": source.schema or None,
        "trained": {
            "job_id": run.job_id,
            "dataset": config.data_dir or config.dataset_name,
            "rounds": config.rounds,
            "parties": config.parties,
            "mode": config.regression_mode or None,
        },
    }


def _imputation(source: DataSource, run: JobRun) -> dict[str, Any] | None:
    """What a missing feature cell became: the secure global means (the standardizer's fill)."""
    fill = (run.model.get("standardizer") or {}).get("fill")
    return {"strategy": "mean", "values": fill} if source.imputes and fill is not None else None


def _classes(source: DataSource, test: Dataset) -> list[Any]:
    """The original label values, in the order of the model's outputs (a categorical target's
    categories, a CSV job's labels as its files write them; a built-in dataset's 0..k-1)."""
    categories = schema_of(source).target_categories(source.target) if source.schema else ()
    if categories:
        return list(categories)
    if source.classes:
        return [int(c) if float(c).is_integer() else c for c in source.classes]
    return list(range(test.n_classes))


def _linear_part(coefficients: np.ndarray, kind: str) -> dict[str, Any]:
    return {
        "link": "identity" if kind == "linear" else "logistic",
        "intercept": float(coefficients[0]),
        "coefficients": coefficients[1:].tolist(),
    }


def _torch_part(run: JobRun) -> dict[str, Any]:
    spec = run.model["spec"]
    n_outputs = 1 if spec["n_classes"] == 2 else spec["n_classes"]
    activation = spec["activation"]
    coefficients = None if activation == "relu" else list(mlp.activation(activation).coefficients)
    part: dict[str, Any] = {
        "architecture": {
            **spec,
            "n_outputs": n_outputs,
            "layers": [spec["n_features"], *spec["hidden"], n_outputs],
            "activation_coefficients": coefficients,
            "input": "standardized features: (x - standardizer.mean) / standardizer.std",
        },
        "weights": MODEL_PT,
    }
    if not spec["hidden"]:  # logistic/softmax regression: also as coefficients in original units
        part["linear"] = _softmax_in_original_units(run)
    return part


def _softmax_in_original_units(run: JobRun) -> dict[str, Any]:
    """W·((x − m)/s) + b = (W/s)·x + (b − (W/s)·m)."""
    standardizer = Standardizer.from_dict(run.model["standardizer"])
    weight, bias = run.weights["0.weight"], run.weights["0.bias"]
    coefficients = weight / standardizer.std
    intercept = bias - coefficients @ standardizer.mean
    if weight.shape[0] == 1:
        return {
            "link": "logistic",
            "intercept": float(intercept[0]),
            "coefficients": coefficients[0].tolist(),
        }
    return {
        "link": "softmax",
        "intercept": intercept.tolist(),
        "coefficients": coefficients.tolist(),
    }


def _knn_part(config: JobConfig) -> dict[str, Any]:
    """A KNN model is its parties' encrypted points: `store` names the folder the run kept
    them in (`--keep-store true`; fedhe.knn_predict answers against it), null when it did not."""
    from fedhe.aggregator.knn import KEPT_FOLDER

    return {
        "k": config.knn.k,
        "standardize": config.knn.standardize,
        "query": config.knn.query,
        "store": KEPT_FOLDER if config.knn.keep_store else None,
    }


def _save_state_dict(weights: dict[str, np.ndarray], path: Path) -> None:
    import torch

    torch.save({k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()}, path)


def _predictions(spec: dict[str, Any], run: JobRun, test: Dataset) -> pd.DataFrame:
    """The run's predictions on its test set, the way the job itself evaluated the model."""
    frame = pd.DataFrame({"row": np.arange(test.n_samples)})
    standardizer = Standardizer.from_dict(run.model["standardizer"])
    X = standardizer.fill_missing(test.X)
    if spec["kind"] == "linear":
        frame["prediction"] = linreg.predict(run.weights["coefficients"], X)
        return frame
    if spec["kind"] == "logistic":
        positive = logreg.sigmoid(linreg.predict(run.weights["coefficients"], X))
        probability = np.column_stack([1.0 - positive, positive])
        index = (positive >= 0.5).astype(int)
    else:
        probability, index = _torch_outputs(run, standardizer.features(test.X))
    classes = spec["classes"]
    frame["prediction"] = [classes[i] for i in index]
    for position, label in enumerate(classes):
        frame[f"proba_{label}"] = probability[:, position]
    return frame


def _torch_outputs(run: JobRun, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    from fedhe.learning import ModelSpec, build_model, set_weights

    model = build_model(ModelSpec.from_dict(run.model["spec"]), seed=0)
    set_weights(model, run.weights)
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(features, dtype=torch.float64))
    if logits.shape[1] == 1:
        positive = torch.sigmoid(logits[:, 0]).numpy()
        return np.column_stack([1.0 - positive, positive]), (logits[:, 0] > 0).long().numpy()
    return torch.softmax(logits, dim=1).numpy(), logits.argmax(1).numpy()
