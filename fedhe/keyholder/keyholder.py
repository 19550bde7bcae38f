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
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from fedhe.crypto.channel import Identity, fingerprint
from fedhe.crypto.context import KeyRequest, PublicContext, SecretContext, generate_keys
from fedhe.crypto.lanes import min_guard_bits
from fedhe.crypto.mac import MacKey, Tag, content_digest, mac_label
from fedhe.crypto.params import FRESH_NOISE_BITS
from fedhe.crypto.randomness import secure_random
from fedhe.crypto.tensor import EncryptedTensor, decrypt, digest, load_tensor
from fedhe.errors import ChannelError, FedHEError, PolicyError, TagError
from fedhe.keyholder import registry, sealing
from fedhe.keyholder.audit import AuditLog
from fedhe.keyholder.ledger import DEFAULT_MAX_REFUSALS, Ledger
from fedhe.keyholder.policy import DecryptionPolicy, DecryptionRequest, JobDeclaration

# Noise flooding (Li–Micciancio, EUROCRYPT 2021): a CKKS decryption reveals the ciphertext's
# noise, from which a passive attacker who also holds the ciphertext can solve for the secret
# key. Adding Gaussian noise of standard deviation 2^DEFAULT_FLOODING_BITS (in units of the
# scale) to every released value drowns the encryption noise (≤ 2^FRESH_NOISE_BITS) by 2^5 in
# standard deviation. This is heuristic flooding, not the statistically proven 2^(λ/2) margin,
# which would leave no precision at the scales addition jobs use. None turns it off.
DEFAULT_FLOODING_BITS = FRESH_NOISE_BITS + 5

# Starts with a letter or digit: "." and ".." would name the state folder or its parent.
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class Decryption(NamedTuple):
    """What the key holder released, with its audit record: decrypted values, or (a member
    of a key-holder group) its decryption share as it leaves this holder."""

    values: np.ndarray | None
    record: dict[str, Any]
    artifact: bytes = b""  # what is stored and replayed
    audit: dict[str, Any] = {}  # noqa: RUF012 (a NamedTuple default, never mutated)


class Opener(Protocol):
    """Turns a checked ciphertext into what one key holder releases."""

    suffix: str  # file name suffix of the stored release (one per label and opener)
    # True: one release per label, so a label the ledger lists without its stored release was
    # tampered with or lost (a group member's share may instead be for a new active set).
    single_release: bool
    decision: str  # the audit record's decision
    audit: dict[str, Any]  # what every audit record of this decision adds

    def check_new(self, request: DecryptionRequest, path: Path) -> None: ...

    def open(self, tensor: EncryptedTensor, request: DecryptionRequest) -> Decryption: ...

    def replayed(self, artifact: bytes) -> Decryption: ...


class _SecretKeyOpener:
    """A single key holder: decrypt with the secret key and flood the values."""

    suffix = ".npy"
    single_release = True
    decision = "decrypted"
    audit: dict[str, Any] = {}  # noqa: RUF012

    def __init__(self, keyholder: KeyHolder) -> None:
        self.keyholder = keyholder

    def check_new(self, request: DecryptionRequest, path: Path) -> None:
        return None

    def open(self, tensor: EncryptedTensor, request: DecryptionRequest) -> Decryption:
        secret = self.keyholder._secret_context(request.job_id)
        if secret is None:
            raise PolicyError("this job has no secret key on this key holder.")
        _check_guard(tensor, len(request.contributors))
        values = decrypt(secret, tensor)
        # Quantized lanes decode by rounding to integers: the release is a function of the
        # plaintext sum alone, so there is no decryption noise to flood.
        sigma = 0.0 if tensor.lanes is not None else self.keyholder._flooding_sigma(tensor.scale)
        if sigma:
            # Not mutated: subtracting draws from the same symmetric noise (equivalent mutant).
            values = values + secure_random().normal(0.0, sigma, values.shape)  # pragma: no mutate
        # Equivalent mutant survives here: record None (`_decide` replaces the record).
        return Decryption(values, {}, _npy_bytes(values), {"flooding_sigma": sigma})

    def replayed(self, artifact: bytes) -> Decryption:
        # Equivalent mutants survive here: record None (replaced), allow_pickle None or absent.
        return Decryption(np.load(io.BytesIO(artifact), allow_pickle=False), {}, artifact)


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
        trusted_parties: Collection[bytes] | None = None,
        max_refusals: int = DEFAULT_MAX_REFUSALS,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.policy = DecryptionPolicy(min_parties_floor=min_parties_floor)
        self.flooding_bits = flooding_bits
        self.declaration_check = declaration_check  # e.g. fedhe.tasks.check_declaration
        self._passphrase = passphrase  # seals the secret keys on disk (scrypt + AES-GCM)
        self.audit = AuditLog(self.state_dir / "audit.jsonl")
        # Party identities pinned out of band (deployment); None: trust the job's registration.
        self.trusted_parties = None if trusted_parties is None else frozenset(trusted_parties)
        self.max_refusals = max_refusals
        self._identity: Identity | None = None

    # -- jobs and keys -----------------------------------------------------------------------

    def declare_job(self, job: JobDeclaration, keys: KeyRequest = KeyRequest()) -> bytes:  # noqa: B008
        """Register a job and return its public context bytes (b"" for a plaintext twin).

        Declaring the same job again returns the same public context; a different declaration
        under a known job id is refused.
        """
        existing = self._check_declaration(job)
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

    def _check_declaration(self, job: JobDeclaration) -> JobDeclaration | None:
        """The policy's and the tasks' checks of a declaration (refusals audited); the job's
        earlier declaration, which must be the same, if it was declared before."""
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
        return existing

    def declaration(self, job_id: str) -> JobDeclaration:
        job = self._declaration(job_id)
        if job is None:
            raise PolicyError(f"job {job_id!r} was never declared to this key holder.")
        return job

    def public_context(self, job_id: str) -> PublicContext | None:
        secret = self._secret_context(job_id)
        return None if secret is None else secret.public()

    # -- parties and channels -----------------------------------------------------------------

    @property
    def identity(self) -> Identity:
        """This key holder's long-term X25519 identity (its public half goes to every party)."""
        if self._identity is None:
            self._identity = registry.load_identity(
                self.state_dir / "identity.key", self._passphrase
            )
        return self._identity

    def register_parties(
        self, job_id: str, identities: Mapping[str, bytes], sealed_seeds: Mapping[str, bytes]
    ) -> tuple[dict[str, bytes], dict[str, str]]:
        """Agree on the job's MAC seed with its parties (see `fedhe.keyholder.registry`).

        Returns a sealed envelope per registered party and the parties refused, with why. A job
        registers once; registering again (a resumed job) must bring the same parties,
        identities and seeds, and gets the same MAC seed."""
        try:
            job = self.declaration(job_id)
            if not job.encrypted:
                raise PolicyError(f"job {job_id!r} is a plaintext twin: it has nothing to tag.")
            path = self._job_dir(job_id) / "parties.json"
            previous = registry.Registration.from_json(path.read_bytes()) if path.exists() else None
            public = self.public_context(job_id)
            registration, envelopes, refused = registry.register(
                self.identity,
                job_id,
                identities,
                sealed_seeds,
                self.trusted_parties,
                previous,
                # Equivalent mutants survive here: a twin never gets this far (refused above).
                context_fingerprint=public.fingerprint if public is not None else "",
            )
            if len(registration.parties) < job.min_parties:
                raise PolicyError(
                    f"{len(registration.parties)} parties registered, fewer than the job's "
                    f"min_parties={job.min_parties}; refused: {refused}."
                )
        except FedHEError as err:
            self.audit.append(job=job_id, event="register", decision="refused", reason=str(err))
            raise
        _write_private(self._job_dir(job_id) / "parties.json", registration.to_json())
        self.audit.append(
            job=job_id,
            event="register",
            parties={k: fingerprint(v) for k, v in sorted(registration.parties.items())},
            refused=refused,
            decision="registered",
        )
        return envelopes, refused

    def registration(self, job_id: str) -> registry.Registration:
        path = self._job_dir(job_id) / "parties.json"
        if not path.exists():
            raise PolicyError(f"job {job_id!r} has no registered parties: register them first.")
        return registry.Registration.from_json(path.read_bytes())

    def seal_for(self, job_id: str, party: str, data: bytes, label: str) -> bytes:
        """`data` sealed end to end to `party` (a party registered with this key holder)."""
        public = self._identity_of(job_id, party)
        return self.identity.channel(public, job_id).seal(data, label)

    def seal_release(self, request: DecryptionRequest, party: str, values: np.ndarray) -> bytes:
        """Released values sealed to `party`, labelled with the request's output and round."""
        label = registry.release_label(request.job_id, request.output_kind, request.round, party)
        return self.seal_for(request.job_id, party, registry.array_bytes(values), label)

    def release_to_querier(
        self, request: DecryptionRequest, values: np.ndarray
    ) -> dict[str, bytes]:
        """Answers (KNN votes, MLP logits) go to the job's declared querier only, sealed; a
        plaintext twin (nothing encrypted, simulation only) gets them as they are."""
        job = self.declaration(request.job_id)
        if not job.encrypted:
            return {"values": registry.array_bytes(values)}
        querier = job.meta.get("querier")
        if not isinstance(querier, str) or not querier:
            raise PolicyError(f"job {request.job_id!r} declares no querier for its answers.")
        return {"sealed": self.seal_release(request, querier, values)}

    def release_to_parties(
        self, request: DecryptionRequest, values: np.ndarray
    ) -> dict[str, bytes]:
        """A result for every registered party of the job, each sealed to it."""
        if not self.declaration(request.job_id).encrypted:
            return {"values": registry.array_bytes(values)}
        parties = self.registration(request.job_id).parties
        return {f"sealed/{name}": self.seal_release(request, name, values) for name in parties}

    def _identity_of(self, job_id: str, party: str) -> bytes:
        """A party's identity from this job's registration, else from the job it serves (an
        inference job names its training job as `meta["parent"]`)."""
        for candidate in (job_id, self.declaration(job_id).meta.get("parent")):
            if not isinstance(candidate, str) or not candidate:
                continue  # an equivalent mutant survives: break (the parent comes last)
            path = self._job_dir(candidate) / "parties.json"
            if path.exists():
                parties = registry.Registration.from_json(path.read_bytes()).parties
                if party in parties:
                    return parties[party]
        raise PolicyError(f"{party} is not a registered party of job {job_id!r}.")

    # -- decryption ---------------------------------------------------------------------------

    def decrypt_sum(self, request: DecryptionRequest) -> Decryption:
        """Decrypt a sum for release in the clear, after checking it *is* the sum of the
        contributions the parties tagged (`fedhe.crypto.mac`) for this output and round."""
        return self._decide(request, verify=True)

    def decrypt_unverified(self, request: DecryptionRequest) -> Decryption:
        """Decrypt without a proof of origin. DANGEROUS: the values must never leave in the
        clear to the aggregator (a chosen ciphertext (0, K) decrypts to K·s); callers re-encrypt
        them or seal them end to end to the job's declared recipient."""
        return self._decide(request, verify=False)  # an equivalent mutant survives: None

    def _decide(
        self, request: DecryptionRequest, *, verify: bool, opener: Opener | None = None
    ) -> Decryption:
        """Every outcome goes to the audit log; a refusal counts against the job's refusal
        budget and carries no decrypted value.

        Each (output, round) is released once. The same ciphertext asked again (the aggregator
        retrying after a lost reply, whatever the framing) gets the same values back without
        spending budget: decrypting it again with fresh flooding noise would let the noise be
        averaged away. Another ciphertext under a released label is refused.

        `opener` turns the checked ciphertext into what is released (default: decryption with
        this holder's secret key; a group member makes its decryption share instead)."""
        opener = opener or _SecretKeyOpener(self)
        base = {
            "job": request.job_id,
            "event": "decrypt",
            "output": request.output_kind,
            "round": request.round,
            "parties": sorted(request.contributors),
            "n_parties": len(set(request.contributors)),
            "digest": digest(request.tensor),
            **opener.audit,
        }
        ledger = None
        try:
            _check_job_id(request.job_id)
            job = self.declaration(request.job_id)
            ledger = self._ledger(request.job_id)
            ledger.check_open(request.job_id)
            spec = self.policy.check_request(job, request)
            tensor = load_tensor(request.tensor, self._tensor_context(job))
            if not isinstance(tensor, EncryptedTensor):
                return self._replay_or_open_plain(request, tensor.values, base, ledger)
            content = content_digest(tensor)
            replay = self._replay(request, content, ledger, opener)
            if replay is not None:
                return replay._replace(record=self.audit.append(**base, decision="replayed"))
            # Mutants of these arguments survive the single key holder's tests (its opener
            # ignores them, its suffix is the default); the group members' tests kill them.
            opener.check_new(request, self._release_path(request, opener.suffix))
            if verify:
                self._verify_tags(request, tensor)
            _check_size(tensor.size, spec.size, request.output_kind)
            opened = opener.open(tensor, request)
            if opened.values is not None:
                _check_count(opened.values, spec.count_index, len(request.contributors))
        except FedHEError as err:
            self.audit.append(**base, decision="refused", reason=str(err))
            if ledger is not None and not ledger.stopped:
                ledger.record_refusal(self.max_refusals)
            raise PolicyError(f"decryption refused: {err}") from err
        _write_private(self._release_path(request, opener.suffix), opened.artifact)  # see above
        ledger.record_release(request.output_kind, request.round, content)
        record = self.audit.append(
            **base, decision=opener.decision, shape=list(tensor.shape), **opened.audit
        )
        return opened._replace(record=record)

    def _replay_or_open_plain(
        self, request: DecryptionRequest, values: np.ndarray, base: dict, ledger: Ledger
    ) -> Decryption:
        """A plaintext twin's values: nothing to decrypt, budget and labels as for ciphertexts."""
        content = hashlib.sha256(request.tensor).hexdigest()
        if self._replay(request, content, ledger, None) is None:
            ledger.record_release(request.output_kind, request.round, content)
        return Decryption(values, self.audit.append(**base, decision="plaintext"))

    def _replay(
        self, request: DecryptionRequest, content: str, ledger: Ledger, opener: Opener | None
    ) -> Decryption | None:
        released = ledger.released_digest(request.output_kind, request.round)
        if released is None:
            return None
        if released != content:
            raise PolicyError(
                f"{request.output_kind!r} of round {request.round} was released already, for "
                "another ciphertext."
            )
        if opener is None:
            return None
        path = self._release_path(request, opener.suffix)  # see check_new in `_decide`
        if path.exists():
            try:
                return opener.replayed(path.read_bytes())
            except (ValueError, OSError, FedHEError) as err:
                raise PolicyError(
                    f"the stored release {path} is damaged ({err}): restore it from a backup."
                ) from err
        if opener.single_release:
            # Decrypting again would add fresh flooding noise to the same values: averaging
            # many such releases would strip the noise that hides the secret key.
            raise PolicyError(
                f"{request.output_kind!r} of round {request.round} was released, but its stored "
                f"release {path} is missing: restore it from a backup (a second decryption of "
                "the same values with fresh noise is refused)."
            )
        return None

    def _tensor_context(self, job: JobDeclaration) -> SecretContext | PublicContext | None:
        """What parses the job's ciphertexts here: the secret context (None: a plaintext twin)."""
        return self._secret_context(job.job_id)

    def _verify_tags(self, request: DecryptionRequest, tensor: EncryptedTensor) -> None:
        registration = self.registration(request.job_id)
        tags = []
        for party in sorted(request.contributors):
            public = registration.parties.get(party)
            if public is None:
                raise TagError(f"{party} is not a registered party of job {request.job_id!r}.")
            sealed = request.tags.get(party)
            if sealed is None:
                raise TagError(f"the request carries no tag from {party}.")
            label = registry.tag_label(request.job_id, request.output_kind, request.round, party)
            try:
                opened = self.identity.channel(public, request.job_id).open(sealed, label)
                tags.append(Tag.from_dict(json.loads(opened)))
            except (ChannelError, ValueError) as err:
                raise TagError(f"{party}'s tag does not open for this output and round.") from err
        MacKey(registration.mac_seed).verify(
            tensor, tags, mac_label(request.output_kind, request.round)
        )

    def _flooding_sigma(self, scale: float) -> float:
        """Noise lives in the coefficient domain: σ is 2^flooding_bits over the ciphertext scale."""
        if self.flooding_bits is None:
            return 0.0
        return math.ldexp(1.0, self.flooding_bits) / scale

    # -- storage ------------------------------------------------------------------------------

    def _release_path(self, request: DecryptionRequest, suffix: str = ".npy") -> Path:
        folder = self._job_dir(request.job_id) / "released"
        folder.mkdir(mode=0o700, exist_ok=True)
        return folder / f"{request.output_kind}-{request.round}{suffix}"

    def _ledger(self, job_id: str) -> Ledger:
        return Ledger.load(self._job_dir(job_id) / "ledger.json")

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
                data = sealing.seal(self._passphrase, data, binding=job.job_id)
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
        # Equivalent mutant survives here: size None in the cache key (mtime_ns still changes).
        return _load_secret(str(path), stat.st_mtime_ns, stat.st_size, self._passphrase, job_id)


# One key holder process serves many messages of one job (a KeyHolder per message): parsing the
# secret context (and unsealing it: scrypt) once per file version, not per message, saves
# ~10–100 ms per decryption. The passphrase is part of the key: a wrong one never hits the cache.
@functools.lru_cache(maxsize=4)
def _load_secret(
    path: str, mtime_ns: int, size: int, passphrase: bytes | None, job_id: str
) -> SecretContext:
    what = f"secret key of job {job_id!r} ({path})"
    data = sealing.unseal(passphrase, Path(path).read_bytes(), what, binding=job_id)
    return SecretContext.from_secret_bytes(data, what=what)


def _check_guard(tensor: EncryptedTensor, contributors: int) -> None:
    """Quantized lanes are released without flooding because rounding removes the noise: only
    true when the guard bits exceed the noise of that many contributions (a smaller claimed
    scale would let the rounded values carry noise bits, hence key information)."""
    if tensor.lanes is not None and tensor.lanes.guard_bits < min_guard_bits(contributors):
        raise PolicyError(
            f"quantized lanes with {tensor.lanes.guard_bits} guard bits cannot absorb the noise "
            f"of {contributors} contributions (need {min_guard_bits(contributors)})."
        )


def _check_size(held: int, size: int | None, output: str) -> None:
    if size is not None and held != size:
        raise PolicyError(f"{output!r} was declared with {size} values, this tensor holds {held}.")


def _check_count(values: np.ndarray, count_index: int, claimed: int) -> None:
    """The count slot must hold the number of contributors. The refusal names no value: a
    refusal that quoted the slot would be a free decryption."""
    if count_index < 0:
        return
    flat = values.ravel()
    if count_index >= flat.size or not abs(flat[count_index] - claimed) < 0.5:
        raise PolicyError(
            f"the aggregate's count slot does not hold the {claimed} contributions claimed."
        )


def _check_job_id(job_id: str) -> None:
    if not _JOB_ID.match(job_id):
        raise PolicyError(
            f"job id {job_id!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit."
        )


def _npy_bytes(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)  # pragma: no mutate (floats: no pickle either way)
    return buffer.getvalue()


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
