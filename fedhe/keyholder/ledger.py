"""What a job has released and refused, kept by the key holder beside the job's keys.

One small JSON file per job, rewritten atomically after each decision: budget accounting reads
it instead of the whole audit log. The audit log stays the record of every decision; the ledger
is the state the policy needs: which (output, round) labels were released and from which
ciphertext (by content digest), how many requests were refused, and whether the job is stopped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedhe.errors import PolicyError

# Refused requests a job may make before the key holder stops it for good: an honest
# aggregator is refused at most after a fault or two; a probing one runs out fast.
DEFAULT_MAX_REFUSALS = 3


@dataclass
class Ledger:
    path: Path
    released: dict[str, dict[str, str]] = field(default_factory=dict)  # output → round → digest
    refusals: int = 0
    stopped: bool = False

    @classmethod
    def load(cls, path: Path) -> Ledger:
        if not path.exists():
            return cls(path)
        data: dict[str, Any] = json.loads(path.read_text())
        return cls(
            path,
            {k: dict(v) for k, v in data.get("released", {}).items()},
            int(data.get("refusals", 0)),
            bool(data.get("stopped", False)),  # equivalent mutants survive: None or no default
        )

    def spent(self, output: str) -> int:
        return len(self.released.get(output, {}))

    def released_digest(self, output: str, round_: int) -> str | None:
        return self.released.get(output, {}).get(str(round_))

    def check_open(self, job_id: str) -> None:
        if self.stopped:
            raise PolicyError(
                f"job {job_id!r} was stopped after {self.refusals} refused requests; "
                "declare a new job."
            )

    def record_release(self, output: str, round_: int, digest: str) -> None:
        self.released.setdefault(output, {})[str(round_)] = digest
        self._save()

    def record_refusal(self, max_refusals: int) -> None:
        self.refusals += 1
        if self.refusals >= max_refusals:
            self.stopped = True
        self._save()

    def _save(self) -> None:
        data = {"released": self.released, "refusals": self.refusals, "stopped": self.stopped}
        tmp = self.path.with_suffix(".tmp")  # pragma: no mutate (any temporary name is equivalent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(data).encode())
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
