"""What a job keeps on the aggregator's disk so that it can resume after a crash.

One checkpoint per run kind (HE, plaintext twin) under the output folder: the job id (so the
key holder recognizes the job, its keys and its spent budget), the global standardization, the
last finished round, the model and the history so far. Written atomically after every round:
a crash leaves the previous checkpoint whole. Ciphertexts are not in it: a KNN store is saved
beside it (`knn-store-*`), encrypted, and reloads only under the same key pair.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedhe.errors import ProtocolError

VERSION = 1


@dataclass
class Checkpoint:
    job_id: str
    round: int = 0
    standardizer: dict[str, Any] = field(default_factory=dict)
    total_samples: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    contributors: list[dict[str, Any]] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in asdict(self).items() if k != "weights"}
        arrays = path.with_suffix(".tmp.npz")
        np.savez(arrays, **self.weights)
        os.replace(arrays, path.with_suffix(".npz"))
        record = path.with_suffix(".tmp")
        record.write_text(json.dumps({"version": VERSION, **state}, default=float))
        os.replace(record, path.with_suffix(".json"))

    @classmethod
    def load(cls, path: Path) -> Checkpoint | None:
        record = path.with_suffix(".json")
        if not record.exists():
            return None
        try:
            state = json.loads(record.read_text())
            if state.pop("version", None) != VERSION:
                raise ValueError(f"version {state.get('version')!r}, expected {VERSION}")
            with np.load(path.with_suffix(".npz"), allow_pickle=False) as arrays:
                weights = {name: arrays[name] for name in arrays.files}
            return cls(**state, weights=weights)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ProtocolError(
                f"checkpoint {record} cannot be read ({err}); delete it to start the job afresh."
            ) from err


def checkpoint_path(out: str | Path, encrypted: bool) -> Path:
    return Path(out) / f"checkpoint-{'he' if encrypted else 'plain'}"
