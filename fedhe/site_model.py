"""The job's final model at a site: kept as model.json (and model.pt) and, where the site opts
in, scored on its own test rows.

Every party of a job gets the final model in the `fedhe-model/1` format the aggregator writes
(`fedhe.model`), so `fedhe predict` and `fedhe.load_model` work at the site. A site whose node
config names a `test-path` and says `report-metrics` evaluates it there and replies only the
metrics result.json shows: its test rows and predictions never leave it, and the coordinator
needs no test set at all.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from fedhe.data.datasets import Dataset
from fedhe.errors import ProtocolError
from fedhe.model import FORMAT, MODEL_JSON, MODEL_PT
from fedhe.tasks import linreg, logreg
from fedhe.tasks.moments import Standardizer

_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def job_folder(output_dir: Path, job_id: str) -> Path:
    """The job's folder under the site's output folder. The job id comes from the aggregator:
    one that is not a plain name (`../..`, a path) would write outside it, and is refused."""
    if not _PLAIN_NAME.fullmatch(job_id) or ".." in job_id:
        raise ProtocolError(f"job id {job_id!r} is not a plain name: refused as a folder name.")
    return output_dir / job_id


def write_model(folder: Path, spec: dict[str, Any], weights: dict[str, np.ndarray]) -> Path:
    """Write model.json (and model.pt for a torch model) into `folder`, owner-only; return
    model.json's path."""
    if spec.get("format") != FORMAT:
        raise ProtocolError(f"the final model is not in the {FORMAT} format: {spec.get('format')}")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if spec["kind"] == "torch":
        if not weights:
            raise ProtocolError("a torch model came without its weights.")
        import torch

        torch.save(
            {k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()}, folder / MODEL_PT
        )
    path = folder / MODEL_JSON
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return path


def linear_part(spec: dict[str, Any], w_standardized: np.ndarray) -> dict[str, Any]:
    """model.json's "linear" entry from standardized coefficients (encrypted-model mode: the
    site opens them itself), in original feature units as the aggregator writes it."""
    standardizer = Standardizer.from_dict(spec["standardizer"])
    logistic = spec["kind"] == "logistic"
    coefficients = (
        logreg.to_original(w_standardized, standardizer)
        if logistic
        else standardizer.to_original(w_standardized)
    )
    return {
        "link": "logistic" if logistic else "identity",
        "intercept": float(coefficients[0]),
        "coefficients": np.asarray(coefficients[1:]).tolist(),
    }


def evaluate(
    spec: dict[str, Any], weights: dict[str, np.ndarray], test: Dataset
) -> dict[str, float]:
    """The metrics the aggregator reports for this model (accuracy/log_loss/auc, mse/r2, or a
    torch model's accuracy/loss), computed the job's way on `test` (labels as indexes)."""
    standardizer = Standardizer.from_dict(spec["standardizer"])
    X = standardizer.fill_missing(test.X)
    counts = {"n-test": float(test.n_samples)}
    if spec["kind"] in ("linear", "logistic"):
        linear = spec["linear"]
        coefficients = np.asarray([linear["intercept"], *linear["coefficients"]], dtype=float)
        eta = linreg.predict(coefficients, X)
        if spec["kind"] == "logistic":
            return counts | logreg.classification_metrics(test.y, logreg.sigmoid(eta))
        return counts | linreg.regression_metrics(test.y, eta)
    from fedhe.learning import ModelSpec, build_model, set_weights
    from fedhe.learning import evaluate as evaluate_torch

    architecture = spec["architecture"]
    model_spec = ModelSpec.from_dict(
        {k: architecture[k] for k in ("n_features", "n_classes", "hidden", "activation")}
    )
    model = build_model(model_spec, seed=0)
    set_weights(model, weights)
    return counts | evaluate_torch(model, standardizer.features(X), test.y)
