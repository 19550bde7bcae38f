"""The job's shape when the coordinator holds no data: the sites' own headers and labels.

In a deployment each hospital reads its own file (its node config's `data-path`), and the
coordinator's data folder may be empty: no party file, no test.csv. The key holder's
declaration fixes every output's size before any party is set up, so the shape (feature
columns, task, class labels) is asked of the sites first, in one round trip that carries
schema-level facts only (`fedhe.data.sources.site_shape`), never a row. The header most sites
share is the job's; a site whose header differs is left out, by name, with the columns it
lacks or adds. The class labels are the union of the sites' labels.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedhe import protocol
from fedhe.aggregator.session import Session
from fedhe.data.datasets import Dataset
from fedhe.data.sources import DataSource
from fedhe.errors import DataError


@dataclass(frozen=True)
class Survey:
    """The job's data description with the agreed header and labels, its shape as a test set
    without rows, and the sites left out (protocol id → why)."""

    source: DataSource
    shape: Dataset
    excluded: dict[str, str]
    round_trips: int = 1


def survey_sites(
    session: Session,
    parties: Mapping[str, int],
    source: DataSource,
    job_id: str,
    names: Mapping[str, str] | None = None,
) -> Survey:
    """Ask every party its file's shape; agree on the job's (see the module's docstring)."""
    names = names or {}
    content = protocol.content(
        protocol.SHAPE,
        protocol.REQUEST,
        config={"job-id": job_id, "source": source.to_dict()},
    )
    exchange = session.ask(dict(parties), protocol.SHAPE, content, role="party")
    replies = {
        name: {**protocol.config_of(reply), **protocol.metrics_of(reply)}
        for name, reply in exchange.replies.items()
    }
    if not replies:
        raise DataError(
            "no site described its data, so the job has no shape: the coordinator's data "
            f"folder {source.data_dir} holds no files and every site failed: "
            f"{ {names.get(p, p): why for p, why in exchange.failures.items()} }"
        )
    excluded = dict(exchange.failures)
    headers = {name: tuple(info["columns"]) for name, info in replies.items()}
    reference = Counter(headers.values()).most_common(1)[0][0]  # ties: the first site's
    for name, header in headers.items():
        if header != reference:
            excluded[name] = _header_difference(header, reference)
    agreed = [name for name in replies if name not in excluded]
    return _agreed(source, reference, [replies[name] for name in agreed], excluded)


def _header_difference(header: tuple[str, ...], reference: tuple[str, ...]) -> str:
    missing = [c for c in reference if c not in header]
    extra = [c for c in header if c not in reference]
    what = []
    what += [f"lacks {missing}"] if missing else []
    what += [f"adds {extra}"] if extra else []
    what = what or ["has the same columns in another order"]
    return (
        f"its header differs from the other sites' ({', '.join(what)}); every site's file "
        f"needs the columns {list(reference)}: fix that site's file (fedhe check-data)."
    )


def _agreed(
    source: DataSource,
    header: tuple[str, ...],
    replies: list[dict[str, Any]],
    excluded: dict[str, str],
) -> Survey:
    first = replies[0]
    task = str(first["task"])
    if any(str(info["task"]) != task for info in replies):
        raise DataError(
            f"the sites' target column {source.target!r} looks like classification at some "
            "and regression at others: give the job a schema (--schema) that types it."
        )
    labels = sorted({float(v) for info in replies for v in info.get("labels", [])})
    if task == "classification":
        source = replace(source, kind=task, classes=tuple(labels))
    else:
        source = replace(source, kind=task, classes=())
    source = replace(source, columns=header)
    features = tuple(str(f) for f in first["features"])
    shape = Dataset(
        X=np.zeros((0, len(features))),
        y=np.zeros(0, dtype=np.int64 if task == "classification" else np.float64),
        feature_names=features,
        target_name=source.target,
        task=task,
        n_classes=len(labels) if task == "classification" else 0,
    )
    return Survey(source, shape, excluded)
