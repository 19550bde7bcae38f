"""fedhe from Python (a notebook, a script): run a job, get its metrics and its model back.

    >>> import fedhe
    >>> run = fedhe.simulate("linreg", parties=3, out="runs/linreg")   # doctest: +SKIP
    >>> run.metrics["r2"]                                               # doctest: +SKIP
    0.33...
    >>> run.model.predict(X_new)         # a scikit-learn-style estimator  # doctest: +SKIP
    >>> run.paths["model_json"]                                          # doctest: +SKIP
    PosixPath('runs/linreg/model.json')

Settings are `fedhe simulate`'s options by field name (``data_dir=``, ``target=``,
``rounds=``, ``hidden="32,16"``, …; `fedhe.config.JobConfig.of` checks them). The same job as
`fedhe simulate TASK`: Flower's simulation engine, the plaintext twin unless
``plaintext_twin=False``. `load_run(folder)` reads a finished run back.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedhe.model import MODEL_JSON, MODEL_PT, PREDICTIONS_CSV, FedHEModel, load_model

RUNS_ROOT = Path("runs")


@dataclass(frozen=True)
class RunResult:
    """What a run left: its final metrics, its model and the files it wrote.

    Attributes
    ----------
    task : the job's task.
    out : the run's folder.
    metrics : the encrypted run's final metrics (accuracy, r2, …: result.json's "encrypted").
    plaintext_metrics : the plaintext twin's, or None when it did not run.
    excluded : the parties left out, with the reason.
    model : the trained model (`fedhe.model`: predict, predict_proba, score; `.to_torch()` for
        torch models), or None when the run kept none (an encrypted model that stayed with
        the parties).
    paths : result, audit, model_json, model_pt, predictions: the files written (None: absent).
    result : result.json, whole.
    """

    task: str
    out: Path
    metrics: dict[str, float]
    plaintext_metrics: dict[str, float] | None
    excluded: dict[str, str]
    model: FedHEModel | None
    paths: dict[str, Path | None] = field(repr=False)
    result: dict[str, Any] = field(repr=False)


def simulate(
    task: str = "aggregate",
    *,
    out: str | os.PathLike | None = None,
    workers: int | None = None,
    **settings: Any,
) -> RunResult:
    """Run `task` in Flower's simulation engine and return its RunResult.

    Parameters
    ----------
    task : aggregate, linreg, logreg, knn or mlp.
    out : the run's folder; default a fresh ``runs/<task>-<date>-<time>`` (printed).
    workers : Ray actors running the nodes (default: one per CPU core).
    **settings : `fedhe simulate`'s options by field name, e.g. ``parties=3``,
        ``data_dir="data/"``, ``target="y"``, ``plaintext_twin=False``.

    Raises
    ------
    fedhe.errors.FedHEError : a setting, the data or the job failed (the message says which).
    """
    from fedhe.config import JobConfig
    from fedhe.simulation import simulate as run_simulation

    if out is None:
        out = _fresh_folder(task)
        print(f"fedhe: writing the run to {out} (pass out=... to choose)")
    settings = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in settings.items()}
    settings.setdefault("plaintext_twin", True)
    config = JobConfig.of(task=task, out=os.fspath(out), **settings)
    result_path = run_simulation(config, workers=workers)
    return load_run(result_path.parent)


def load_run(out: str | os.PathLike) -> RunResult:
    """A finished run, read back from its folder (result.json and the model files)."""
    import json

    from fedhe.errors import FedHEError

    folder = Path(out)
    result_file = folder / "result.json"
    if not result_file.is_file():
        raise FedHEError(f"{folder}: no result.json; is this a run's --out folder?")
    result = json.loads(result_file.read_text())
    plaintext = result.get("plaintext")
    return RunResult(
        task=result["task"],
        out=folder,
        metrics=_final(result["encrypted"]),
        plaintext_metrics=_final(plaintext) if plaintext else None,
        excluded=dict(result.get("parties", {}).get("excluded", {})),
        model=load_model(folder) if (folder / MODEL_JSON).is_file() else None,
        paths=_paths(folder),
        result=result,
    )


def _final(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


def _paths(folder: Path) -> dict[str, Path | None]:
    names = {
        "result": "result.json",
        "audit": "audit.jsonl",
        "model_json": MODEL_JSON,
        "model_pt": MODEL_PT,
        "predictions": PREDICTIONS_CSV,
    }
    return {
        key: (folder / name if (folder / name).is_file() else None) for key, name in names.items()
    }


def _fresh_folder(task: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = RUNS_ROOT / f"{task}-{stamp}"
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = RUNS_ROOT / f"{task}-{stamp}-{suffix}"
    folder.mkdir(parents=True)  # taken: the next run of this second gets another
    return folder
