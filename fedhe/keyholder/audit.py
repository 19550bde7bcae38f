"""Append-only, hash-chained audit log of every declaration, decryption and refusal.

One JSON object per line. Each record carries ``prev`` (the previous record's hash; 64 zeros for
the first) and ``hash`` = sha256 of its own canonical JSON without ``hash``. Editing, deleting,
inserting or reordering a line breaks the chain from that line on; `verify_log` says where.
The chain is tamper-evident, not tamper-proof: whoever can rewrite the whole file can rebuild
it, so a consortium should copy the latest hash elsewhere (result.json carries it per job).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedhe.errors import ProtocolError

GENESIS = "0" * 64


class AuditLog:
    """The key holder's log: time, job, event, output kind, shape, parties, digest, decision."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, **entry: Any) -> dict[str, Any]:
        record = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            **entry,
            "prev": self._last_hash(),
        }
        record["hash"] = record_hash(record)
        line = json.dumps(record, sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return record

    def entries(self, job_id: str | None = None) -> list[dict[str, Any]]:
        """Every record (the key holder's own view), or job `job_id`'s records."""
        records = self._records()
        return records if job_id is None else [r for r in records if r.get("job") == job_id]

    def job_entries(self, job_id: str) -> list[dict[str, Any]]:
        """One job's records, for whoever asks about that job: a missing id is refused, never
        read as "every job"."""
        if not isinstance(job_id, str) or not job_id:
            raise ProtocolError(
                f"audit records are read one job at a time; got job id {job_id!r}: name the job."
            )
        return self.entries(job_id)

    def _records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open() as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def _last_hash(self) -> str:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return GENESIS
        # no mutate: equivalent mutants (another start offset, step size, stop count, read
        # size or split finds the same last line); tests/test_mutation_audit.py pins the rest.
        with self.path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)  # pragma: no mutate
            position = handle.tell()
            chunk = b""
            while position > 0 and chunk.count(b"\n") < 2:  # pragma: no mutate
                step = min(4096, position)  # pragma: no mutate
                position -= step
                handle.seek(position)
                chunk = handle.read(step) + chunk  # pragma: no mutate
        last = chunk.rstrip(b"\n").rsplit(b"\n", 1)[-1]  # pragma: no mutate
        return str(json.loads(last)["hash"])


def record_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Verification:
    ok: bool
    records: int
    problem: str = ""
    last_hash: str = GENESIS


def verify_log(path: str | Path, *, segment: bool = False) -> Verification:
    """Walk the chain; the first broken link (line number as an editor shows it) is reported.

    With `segment`, the file is an excerpt (one job's records, as a run's audit.jsonl): other
    jobs' records may sit between them in the key holder's log, so only each record's own hash
    is checked; the full chain is checked on the key holder's log.
    """
    previous, count = GENESIS, 0
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        return Verification(False, 0, f"cannot read {path}: {err}")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            return Verification(False, count, f"line {number} is not JSON: {err}", previous)
        if not isinstance(record, dict):
            return Verification(False, count, f"line {number} is not a record", previous)
        if not segment and record.get("prev") != previous:
            return Verification(
                False,
                count,
                f"line {number} does not follow line {number - 1}: a record was removed, "
                "inserted or reordered",
                previous,
            )
        if record.get("hash") != record_hash(record):
            return Verification(
                False, count, f"line {number} was modified after it was written", previous
            )
        previous, count = record["hash"], count + 1
    return Verification(True, count, "", previous)
