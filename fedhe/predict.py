"""`fedhe predict RUN_DIR --data FILE.csv`: score new records with a run's trained model.

The file has a header and one record per row; columns are matched by name with the model's
features (any order; the run's schema.json encoding applied), other columns are ignored. A
target column, if present, is not used to predict; it gives a score line (accuracy or R²).
Writes one row per record: `row` (0-based data row), `line` (its line in FILE), `prediction`
and, for classifiers, one `proba_<class>` column per class.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedhe.errors import FedHEError

if TYPE_CHECKING:  # `fedhe` builds this command's parser on every call: keep it light
    import pandas as pd

    from fedhe.model import FedHEModel


def add_predict_command(commands: argparse._SubParsersAction) -> None:
    predict = commands.add_parser(
        "predict",
        help="score new records (a CSV file) with the model a run wrote",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument("run", help="the run's output folder (holding model.json)")
    predict.add_argument("--data", required=True, help="CSV file of records to score")
    predict.add_argument(
        "--out",
        default="",
        help="where to write the predictions (default: RUN/predictions-<FILE name>.csv)",
    )


def main(args: argparse.Namespace) -> int:
    try:
        summary = predict_file(args.run, args.data, args.out or None)
    except FedHEError as err:
        print(f"fedhe: error: {err}", file=sys.stderr)
        return 2
    print(summary)
    return 0


def predict_file(run: str | Path, data: str | Path, out: str | Path | None = None) -> str:
    """Score `data` with the model of `run`, write the predictions to `out`; return the
    one-line summary."""
    import numpy as np
    import pandas as pd

    from fedhe.data import csvdata
    from fedhe.model import FedHEClassifier, load_model

    model = load_model(run)
    data = Path(data)
    header, body, lines = csvdata.read_table(data)
    frame = pd.DataFrame(body.to_numpy(dtype=object), columns=list(header))
    X = model.frame_features(frame, source=str(data), lines=lines)
    table = pd.DataFrame({"row": np.arange(len(lines)), "line": lines})
    table["prediction"] = model.predict(X)
    if isinstance(model, FedHEClassifier) and model.kind_ != "knn":
        probability = model.predict_proba(X)
        for position, label in enumerate(model.classes_):
            table[f"proba_{label}"] = probability[:, position]
    target = Path(out) if out else Path(run) / f"predictions-{data.stem}.csv"
    target.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(target, index=False)
    return _summary(model, frame, table, data, run, target)


def _summary(
    model: FedHEModel, frame: pd.DataFrame, table: pd.DataFrame, data: Path, run, target
) -> str:
    line = (
        f"fedhe predict: {len(table)} records of {data} scored by the {model.task_} model of "
        f"{run} → {target}"
    )
    ignored = [c for c in model.ignored_columns(frame) if c != model.target_name_]
    if ignored:
        line += f"; ignored columns {ignored}"
    if model.target_name_ in frame.columns:
        line += f"; {_score(model, frame, table)}"
    return line


def _score(model: FedHEModel, frame: pd.DataFrame, table: pd.DataFrame) -> str:
    """Accuracy or R² against the file's own target column (where every cell is filled)."""
    import numpy as np
    import pandas as pd

    truth = frame[model.target_name_]
    predicted = table["prediction"]
    if model.spec_["estimator"] == "classifier":
        labels = [str(c) for c in model.classes_]
        as_label = truth.map(lambda t: _label(t, labels))
        accuracy = float(np.mean(as_label.to_numpy() == predicted.astype(str).to_numpy()))
        return f"accuracy against {model.target_name_!r}: {accuracy:.4f}"
    values = pd.to_numeric(truth, errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(values).all():
        return f"no R² ({model.target_name_!r} has empty or non-numeric cells)"
    residual = np.sum((values - predicted.to_numpy(dtype=float)) ** 2)
    r2 = 1.0 - residual / np.sum((values - values.mean()) ** 2)
    return f"R² against {model.target_name_!r}: {r2:.4f}"


def _label(cell: object, labels: list[str]) -> str:
    """A target cell as a class label's text ("1.0" reads as the label "1")."""
    text = str(cell).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() and str(int(number)) in labels else text
