"""The key-holder role: the only secret key, decryption under a policy, an audit log.

State lives on the key holder's own disk (`state_dir`), never in a message: one secret
context per job (file mode 0600), the job's declaration, the budget spent, and the audit log.
A restarted key holder that finds the same directory keeps the same keys.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedhe.crypto.context import KeyRequest, PublicContext, SecretContext, generate_keys
from fedhe.crypto.lanes import min_guard_bits
from fedhe.crypto.params import FRESH_NOISE_BITS
from fedhe.crypto.randomness import secure_random
from fedhe.crypto.tensor import EncryptedTensor, decrypt, digest, load_tensor
from fedhe.errors import FedHEError, PolicyError
from fedhe.keyholder import sealing
from fedhe.keyholder.audit import AuditLog
from fedhe.keyholder.policy import DecryptionPolicy, DecryptionRequest, JobDeclaration

# Noise flooding (Li–Micciancio, EUROCRYPT 2021): a CKKS decryption reveals the ciphertext's
# noise, from which a passive attacker who also holds the ciphertext can solve for the secret
# key. Adding Gaussian noise of standard deviation 2^DEFAULT_FLOODING_BITS (in units of the
# scale) to every released value drowns the encryption noise (≤ 2^FRESH_NOISE_BITS) by 2^5 in
# standard deviation. This is heuristic flooding, not the statistically proven 2^(λ/2) margin,
# which would leave no precision at the scales addition jobs use. None turns it off.
DEFAULT_FLOODING_BITS = FRESH_NOISE_BITS + 5

_JOB_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@dataclass(frozen=True)
class Decryption:
    """What the key holder released, with its audit record."""

    values: np.ndarray
    record: dict[str, Any]


class KeyHolder:
    """Generates keys per job, hands out public contexts, decrypts only what policy allows."""

    def __init__(
        self,
        state_dir: str | Path,
        *,
        min_parties_floor: int = 2,
        flooding_bits: int | None = DEFAULT_FLOODING_BITS,
        declaration_check: Callable[[JobDeclaration], None] | None = None,
        passphrase: bytes | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.policy = DecryptionPolicy(min_parties_floor=min_parties_floor)
        self.flooding_bits = flooding_bits
        self.declaration_check = declaration_check  # e.g. fedhe.tasks.check_declaration
        self._passphrase = passphrase  # seals the secret keys on disk (scrypt + AES-GCM)
        self.audit = AuditLog(self.state_dir / "audit.jsonl")

    # -- jobs and keys -----------------------------------------------------------------------

    def declare_job(self, job: JobDeclaration, keys: KeyRequest = KeyRequest()) -> bytes:  # noqa: B008
        """Register a job and return its public context bytes (b"" for a plaintext twin).

        Declaring the same job again returns the same public context; a different declaration
        under a known job id is refused.
        """
        try:
            _check_job_id(job.job_id)
            self.policy.check_declaration(job)
            if self.declaration_check is not None:
                self.declaration_check(job)
            existing = self._declaration(job.job_id)
            if existing is not None and existing != job:
                raise PolicyError(
                    f"job {job.job_id!r} is already declared with other terms; use a new job id."
                )
        except PolicyError as err:
            self.audit.append(job=job.job_id, event="declare", decision="refused", reason=str(err))
            raise
        started = time.perf_counter()
        if existing is None:
            self._save_job(job, keys)
        public = self.public_context(job.job_id)
        self.audit.append(
            job=job.job_id,
            event="declare",
            task=job.task,
            encrypted=job.encrypted,
            outputs={k: v.budget for k, v in job.outputs.items()},
            min_parties=job.min_parties,
            keygen_s=round(time.perf_counter() - started, 6) if existing is None else 0.0,
            decision="declared",
        )
        return b"" if public is None else public.to_bytes()

    def declaration(self, job_id: str) -> JobDeclaration:
        job = self._declaration(job_id)
        if job is None:
            raise PolicyError(f"job {job_id!r} was never declared to this key holder.")
        return job

    def public_context(self, job_id: str) -> PublicContext | None:
        secret = self._secret_context(job_id)
        return None if secret is None else secret.public()

    # -- decryption ---------------------------------------------------------------------------

    def decrypt(self, request: DecryptionRequest) -> Decryption:
        """Decrypt `request.tensor` if the policy allows; every outcome goes to the audit log.

        A request identical to one already decrypted (the aggregator retrying after a lost
        reply) gets the same released values again, without spending budget: decrypting the
        same ciphertext twice with fresh flooding noise would let the noise be averaged away.
        """
        replay = self._released_path(request)
        if replay is not None and replay.exists():
            values = np.load(replay, allow_pickle=False)
            record = self.audit.append(
                job=request.job_id,
                event="decrypt",
                output=request.output_kind,
                parties=sorted(request.contributors),
                digest=digest(request.tensor),
                decision="replayed",
                shape=list(values.shape),
            )
            return Decryption(values, record)
        base = {
            "job": request.job_id,
            "event": "decrypt",
            "output": request.output_kind,
            "parties": sorted(request.contributors),
            "n_parties": len(set(request.contributors)),
            "digest": digest(request.tensor),
        }
        try:
            job = self._declaration(request.job_id)
            spec = self.policy.check_request(job, request, self._spent(request))
            assert job is not None
            values, sigma = self._open(job, request)
            _check_size(values, spec.size, request.output_kind)
            _check_count(values, spec.count_index, len(request.contributors))
        except FedHEError as err:
            self.audit.append(**base, decision="refused", reason=str(err))
            raise PolicyError(f"decryption refused: {err}") from err
        if replay is not None:
            _write_private(replay, _npy_bytes(values))
        record = self.audit.append(
            **base,
            decision="decrypted",
            shape=list(values.shape),
            flooding_sigma=sigma,
        )
        return Decryption(values, record)

    def _open(self, job: JobDeclaration, request: DecryptionRequest) -> tuple[np.ndarray, float]:
        secret = self._secret_context(job.job_id)
        tensor = load_tensor(request.tensor, secret)
        if isinstance(tensor, EncryptedTensor):
            assert secret is not None
            _check_guard(tensor, len(request.contributors))
            values = decrypt(secret, tensor)
            # Quantized lanes decode by rounding to integers: the release is a function of the
            # plaintext sum alone, so there is no decryption noise to flood.
            sigma = 0.0 if tensor.lanes is not None else self._flooding_sigma(tensor.scale)
            if sigma:
                values = values + secure_random().normal(0.0, sigma, values.shape)
            return values, sigma
        return tensor.values, 0.0

    def _flooding_sigma(self, scale: float) -> float:
        """Noise lives in the coefficient domain: σ is 2^flooding_bits over the ciphertext scale."""
        if self.flooding_bits is None:
            return 0.0
        return math.ldexp(1.0, self.flooding_bits) / scale

    # -- storage ------------------------------------------------------------------------------

    def _released_path(self, request: DecryptionRequest) -> Path | None:
        """Where this exact request's release is kept (None for an unknown or invalid job id)."""
        if not _JOB_ID.match(request.job_id) or self._declaration(request.job_id) is None:
            return None
        key = hashlib.sha256(
            json.dumps([request.output_kind, sorted(request.contributors)]).encode()
            + request.tensor
        ).hexdigest()
        folder = self._job_dir(request.job_id) / "released"
        folder.mkdir(mode=0o700, exist_ok=True)
        return folder / f"{key}.npy"

    def _job_dir(self, job_id: str) -> Path:
        _check_job_id(job_id)
        return self.state_dir / "jobs" / job_id

    def _save_job(self, job: JobDeclaration, keys: KeyRequest) -> None:
        job_dir = self._job_dir(job.job_id)
        job_dir.parent.mkdir(exist_ok=True, mode=0o700)  # jobs/: no parents=True, it sets 0o777
        job_dir.mkdir(exist_ok=True, mode=0o700)
        if job.params is not None:
            secret = generate_keys(job.params, keys)
            data = secret.to_secret_bytes()
            if self._passphrase:
                data = sealing.seal(self._passphrase, data)
            _write_private(job_dir / "secret.ctx", data)
        _write_private(job_dir / "job.json", json.dumps(job.to_dict()).encode())

    def _declaration(self, job_id: str) -> JobDeclaration | None:
        path = self._job_dir(job_id) / "job.json"
        if not path.exists():
            return None
        return JobDeclaration.from_dict(json.loads(path.read_text()))

    def _secret_context(self, job_id: str) -> SecretContext | None:
        path = self._job_dir(job_id) / "secret.ctx"
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        return _load_secret(str(path), stat.st_mtime_ns, stat.st_size, self._passphrase, job_id)

    def _spent(self, request: DecryptionRequest) -> int:
        """Budget spent, counted from the audit log itself so the two cannot disagree."""
        return sum(
            1
            for r in self.audit.entries(request.job_id)
            if r.get("event") == "decrypt"
            and r.get("decision") == "decrypted"
            and r.get("output") == request.output_kind
        )


# One key holder process serves many messages of one job (a KeyHolder per message): parsing the
# secret context (and unsealing it: scrypt) once per file version, not per message, saves
# ~10–100 ms per decryption. The passphrase is part of the key: a wrong one never hits the cache.
@functools.lru_cache(maxsize=4)
def _load_secret(
    path: str, mtime_ns: int, size: int, passphrase: bytes | None, job_id: str
) -> SecretContext:
    data = sealing.unseal(passphrase, Path(path).read_bytes(), f"secret key of job {job_id!r}")
    return SecretContext.from_secret_bytes(data)


def _check_guard(tensor: EncryptedTensor, contributors: int) -> None:
    """Quantized lanes are released without flooding because rounding removes the noise: only
    true when the guard bits exceed the noise of that many contributions (a smaller claimed
    scale would let the rounded values carry noise bits, hence key information)."""
    if tensor.lanes is not None and tensor.lanes.guard_bits < min_guard_bits(contributors):
        raise PolicyError(
            f"quantized lanes with {tensor.lanes.guard_bits} guard bits cannot absorb the noise "
            f"of {contributors} contributions (need {min_guard_bits(contributors)})."
        )


def _check_size(values: np.ndarray, size: int | None, output: str) -> None:
    if size is not None and values.size != size:
        raise PolicyError(
            f"{output!r} was declared with {size} values, this tensor holds {values.size}."
        )


def _check_count(values: np.ndarray, count_index: int, claimed: int) -> None:
    if count_index < 0:
        return
    flat = values.ravel()
    if count_index >= flat.size:
        raise PolicyError(f"count slot {count_index} lies outside a tensor of {flat.size} values.")
    counted = flat[count_index]
    if not abs(counted - claimed) < 0.5:
        raise PolicyError(
            f"the aggregate holds {counted:.3f} contributions, the aggregator claims {claimed}."
        )


def _check_job_id(job_id: str) -> None:
    if not _JOB_ID.match(job_id):
        raise PolicyError(f"job id {job_id!r} must be 1-128 letters, digits, '.', '_' or '-'.")


def _npy_bytes(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
