"""What the key holder agrees to decrypt: declared outputs, enough parties, a budget per job."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedhe.config import ConfigError
from fedhe.crypto.params import CKKSParams
from fedhe.errors import PolicyError, ProtocolError


@dataclass(frozen=True)
class OutputSpec:
    """One kind of output a job may decrypt, at most `budget` times.

    `count_index` names the flat position of a slot in which every contributor encrypted 1:
    the key holder then releases the output only if that slot decrypts to the number of
    contributors the aggregator claims (-1: the output has no such slot).
    """

    budget: int
    count_index: int = -1
    size: int | None = None  # flat size of the tensor; None: any


@dataclass(frozen=True)
class JobDeclaration:
    """A job as declared to the key holder before any of its ciphertexts exist."""

    job_id: str
    task: str
    outputs: dict[str, OutputSpec]
    min_parties: int
    params: CKKSParams | None  # None: the plaintext twin of a job, nothing is encrypted
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def encrypted(self) -> bool:
        return self.params is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "task": self.task,
            "outputs": {
                k: {"budget": v.budget, "count_index": v.count_index, "size": v.size}
                for k, v in self.outputs.items()
            },
            "min_parties": self.min_parties,
            "params": None if self.params is None else self.params.to_dict(),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobDeclaration:
        try:
            return cls(
                job_id=str(data["job_id"]),
                task=str(data["task"]),
                outputs={
                    str(k): OutputSpec(
                        int(v["budget"]),
                        int(v.get("count_index", -1)),
                        None if v.get("size") is None else int(v["size"]),
                    )
                    for k, v in data["outputs"].items()
                },
                min_parties=int(data["min_parties"]),
                params=None if data.get("params") is None else CKKSParams.from_dict(data["params"]),
                meta=dict(data.get("meta", {})),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ProtocolError(f"malformed job declaration: {err!r}") from err


@dataclass(frozen=True)
class DecryptionRequest:
    """The aggregator's ask: decrypt `tensor` (bytes) as `output_kind` of `job_id`, the
    release of `round` (0 ≤ round < the output's budget; each round is released once), with
    each contributor's sealed tag when the output is a sum released in the clear."""

    job_id: str
    output_kind: str
    contributors: tuple[str, ...]
    tensor: bytes
    round: int = 0
    tags: Mapping[str, bytes] = field(default_factory=dict)


class DecryptionPolicy:
    """Checks requests against declarations; the key holder's own floor bounds every job."""

    def __init__(self, *, min_parties_floor: int = 2) -> None:
        if min_parties_floor < 1:
            raise ConfigError(
                f"min_parties_floor must be ≥ 1, got {min_parties_floor}: a key holder releases "
                "nothing below one party; start it with a floor of 1 or more (default 2)."
            )
        self.min_parties_floor = min_parties_floor

    def check_declaration(self, job: JobDeclaration) -> None:
        if job.min_parties < self.min_parties_floor:
            raise PolicyError(
                f"job {job.job_id!r} declares min_parties={job.min_parties}, below this key "
                f"holder's floor of {self.min_parties_floor}; declare at least that many."
            )
        if not job.outputs:
            raise PolicyError(f"job {job.job_id!r} declares no output: nothing may be decrypted.")
        bad = {k: v.budget for k, v in job.outputs.items() if v.budget < 1}
        if bad:
            raise PolicyError(f"job {job.job_id!r} declares outputs without budget: {bad}.")

    def check_request(self, job: JobDeclaration, request: DecryptionRequest) -> OutputSpec:
        """Return the output's spec, or raise PolicyError saying why the request is refused.

        The budget is a range of round labels: the release of round r needs 0 ≤ r < budget, and
        each (output, round) is released once (the key holder's ledger)."""
        spec = job.outputs.get(request.output_kind)
        if spec is None:
            raise PolicyError(
                f"job {job.job_id!r} did not declare output {request.output_kind!r} "
                f"(declared: {sorted(job.outputs)})."
            )
        distinct = len(set(request.contributors))
        if distinct != len(request.contributors):
            raise PolicyError(f"contributor list repeats parties: {list(request.contributors)}.")
        if distinct < job.min_parties:
            raise PolicyError(
                f"{request.output_kind!r} covers {distinct} parties, fewer than the job's "
                f"min_parties={job.min_parties}."
            )
        if not 0 <= request.round < spec.budget:
            raise PolicyError(
                f"round {request.round} of {request.output_kind!r} is outside its budget of "
                f"{spec.budget} releases (rounds 0-{spec.budget - 1})."
            )
        return spec
