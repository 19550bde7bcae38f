"""A member of a key-holder group: K holders, any T of them decrypt, none holds the key.

Multiparty CKKS (Mouchet, Troncoso-Pastoriza, Bossuat, Hubaux, PETS 2021) with a Shamir
threshold (Mouchet, Bertrand, Hubaux, J. Cryptology 2023); the ring protocols live in
`fedhe.crypto.multiparty`, this module runs them between holders through the aggregator.

Set-up (per job, every member online: N-of-N, then thresholdized):
  1. each member checks the declaration like a single key holder, draws its own secret s_i and
     returns its public-key share, its relinearization round-1 share and rotation-key shares
     (what the job's key request needs), a Shamir share of s_i sealed to each other member,
     and to each other member, sealed, a digest of its shares (so the aggregator cannot
     substitute a member's share: a forged round-1 share would be a chosen input to round 2);
  2. each member checks every share against its author's digest, combines them itself,
     answers relinearization round 2, and replaces s_i by the sum of the Shamir shares dealt
     to it: from here on it holds only a point of the threshold sharing;
  3. the aggregator assembles the public context; each member accepts it only if its public
     key is the one the member combined itself (its fingerprint).
Without a relinearization key the context is complete after step 1 and rides on step 2.

Decryption: the aggregator picks T live members (the active set). A member applies the same
policy as a single key holder (declared output, budget, contributors, the parties' tags,
which each member checks against its own MAC key) and returns a decryption share with its own
smudging noise. Shares are plaintext-equivalent (a share of an unverified (0, K) is K·s_i plus
noise): only shares of a verified sum that the job releases in the clear go to the aggregator
(`ReleaseRules.clear`); every other share goes sealed to one member of the active set, the
lead, which combines them and runs the output's key-holder step as a single key holder would
(solve, rank, seal the answer to its recipient, refresh). One refusal stops the decryption; a
silent member is replaced while T members answer.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedhe.crypto import multiparty
from fedhe.crypto.channel import check_public_key
from fedhe.crypto.context import KeyRequest, PublicContext
from fedhe.crypto.tensor import EncryptedTensor
from fedhe.errors import ChannelError, PolicyError
from fedhe.keyholder import sealing
from fedhe.keyholder.keyholder import (
    Decryption,
    KeyHolder,
    _npy_bytes,
    _write_private,
)
from fedhe.keyholder.policy import DecryptionRequest, JobDeclaration

# A member makes shares of one (output, round) for at most this many active sets: a second
# set after a member fell silent. Each new share carries fresh smudging noise, so averaging
# the decryptions of two sets lowers the smudging by at most √2 (half a bit).
MAX_ACTIVE_SETS = 2
_MEMBER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

Payload = dict[str, bytes]
Reply = tuple[dict[str, Any], Payload]
# What a member's step releases: values (in the clear, to the aggregator) or message payload.
Release = np.ndarray | dict[str, bytes]
ReleaseStep = Callable[[Any, DecryptionRequest], Release]


@dataclass(frozen=True)
class GroupSpec:
    """The members (in Shamir point order: point = index + 1), the threshold, and each
    member's long-term public identity (the end-to-end channel between members)."""

    members: tuple[str, ...]
    threshold: int
    identities: Mapping[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(set(self.members)) != len(self.members) or len(self.members) < 2:
            raise PolicyError(f"a key-holder group needs ≥ 2 distinct members: {self.members}.")
        bad = [m for m in self.members if not _MEMBER.match(m)]
        if bad:
            raise PolicyError(f"member names {bad} must be letters, digits, '.', '_' or '-'.")
        if not 1 <= self.threshold <= len(self.members):
            raise PolicyError(
                f"threshold {self.threshold} must be between 1 and the {len(self.members)} members."
            )
        if set(self.identities) != set(self.members):
            raise PolicyError("a key-holder group needs the identity of every member.")
        for identity in self.identities.values():
            check_public_key(identity)

    def point(self, member: str) -> int:
        if member not in self.members:
            raise PolicyError(f"{member!r} is not a member of this key-holder group.")
        return self.members.index(member) + 1

    def points(self, active: Sequence[str]) -> tuple[int, ...]:
        return tuple(self.point(m) for m in active)

    def check_active(self, active: Sequence[str]) -> None:
        if len(set(active)) != len(active) or len(active) != self.threshold:
            raise PolicyError(
                f"an active set names {self.threshold} distinct members, not {list(active)}."
            )
        for member in active:
            self.point(member)

    def to_dict(self) -> dict[str, Any]:
        return {
            "members": list(self.members),
            "threshold": self.threshold,
            "identities": {k: v.hex() for k, v in self.identities.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GroupSpec:
        try:
            return cls(
                tuple(str(m) for m in data["members"]),
                int(data["threshold"]),
                {str(k): bytes.fromhex(str(v)) for k, v in data["identities"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise PolicyError(f"malformed key-holder group {data!r}: {err!r}") from err


@dataclass(frozen=True)
class ReleaseRules:
    """Which outputs a member may share in the clear (verified sums the job releases to the
    aggregator) and which it verifies against the parties' tags before sharing at all (the
    ones whose key-holder step decrypts a verified sum). Nothing by default: every share goes
    sealed to the lead, and the lead's step decides."""

    clear: frozenset[str] = frozenset()
    verified: frozenset[str] = frozenset()
    # Outputs whose masks every party knows (a party that holds a share must not lead them).
    party_masked: frozenset[str] = frozenset()


def crs_seed(job_id: str, members: Sequence[str]) -> bytes:
    """The common reference string of a job's keys: a hash nobody picks beyond the job id."""
    return hashlib.sha256(
        b"fedhe-crs\x00" + job_id.encode() + b"\x00" + json.dumps(list(members)).encode()
    ).digest()


def share_label(request: DecryptionRequest, member: str, active: Sequence[str]) -> str:
    members = "+".join(sorted(active))  # one active set, in whatever order it is named
    return f"share/{request.job_id}/{request.output_kind}/{request.round}/{member}/{members}"


def _deal_label(job_id: str, sender: str, receiver: str) -> str:
    return f"deal/{job_id}/{sender}/{receiver}"


def _attest_label(job_id: str, sender: str, receiver: str) -> str:
    return f"attest/{job_id}/{sender}/{receiver}"


# The set-up shares a member checks and combines itself: the public key (its fingerprint is
# what every member and party accepts) and relinearization round 1 (round 2's input: a chosen
# one would make round 2 a function of s_i the aggregator picked). Rotation-key shares go to
# the aggregator only: a wrong rotation key spoils the aggregator's own results, nothing more.
CHECKED_SHARES = ("pk-share", "relin-1")


def round1_digest(payload: Mapping[str, bytes]) -> bytes:
    digest = hashlib.sha256(b"fedhe-setup-1")
    for key in CHECKED_SHARES:
        digest.update(key.encode() + b"\x00" + hashlib.sha256(payload.get(key, b"")).digest())
    return digest.digest()


class GroupMember(KeyHolder):
    """One key holder of a group: holds a share of each group job's key, never the key.

    It also serves jobs declared to it alone (K = 1), as `KeyHolder`."""

    def __init__(
        self, state_dir: str | Path, *, rules: ReleaseRules = ReleaseRules(), **kwargs: Any
    ) -> None:
        super().__init__(state_dir, **kwargs)
        self.rules = rules
        self.smudging_bits = multiparty.DEFAULT_SMUDGING_BITS

    # -- set-up ----------------------------------------------------------------------------------

    def begin_setup(
        self, job: JobDeclaration, keys: KeyRequest, group: GroupSpec, name: str
    ) -> Payload:
        """Step 1: this member's shares of the job's keys, deals and digests for the others."""
        existing = self._check_declaration(job)
        if existing is not None:
            public = self._public_bytes(job.job_id)
            if public is None:
                raise PolicyError(
                    f"the set-up of group job {job.job_id!r} was interrupted; declare the job "
                    "again under a new id."
                )
            return {"public-context": public}
        if job.params is None:
            raise PolicyError("a plaintext twin has no keys to share: declare it to one holder.")
        if group.identities.get(name) != self.identity.public:
            raise PolicyError(f"the group names another identity for {name!r} than this holder's.")
        job_dir = self._job_dir(job.job_id)
        job_dir.parent.mkdir(exist_ok=True, mode=0o700)
        job_dir.mkdir(exist_ok=True, mode=0o700)
        _write_private(job_dir / "job.json", json.dumps(job.to_dict()).encode())
        _write_private(
            job_dir / "group.json",
            json.dumps({"group": group.to_dict(), "name": name, "keys": keys.to_dict()}).encode(),
        )
        secret = multiparty.SecretShare.generate(job.params)
        seed = crs_seed(job.job_id, group.members)
        out: Payload = {"pk-share": multiparty.public_key_share(secret, seed)}
        if keys.relin:
            out["relin-1"], ephemeral = multiparty.relin_round1(secret, seed)
            self._save_secret(job.job_id, "ephemeral.key", ephemeral)
        elements = multiparty.galois_elements_for(job.params, keys)
        if elements:
            out["rotations"] = multiparty.rotation_share(secret, elements, seed)
        self._save_secret(job.job_id, "additive.key", secret.to_bytes())
        deals = multiparty.deal(secret, group.threshold, list(range(1, len(group.members) + 1)))
        round1 = round1_digest(out)
        _write_private(job_dir / "round1.sha256", round1)  # its own shares, checked in step 2
        for member in group.members:
            dealt = deals[group.point(member)]
            if member == name:
                self._save_secret(job.job_id, "own-deal.key", dealt)
                continue
            channel = self.identity.channel(group.identities[member], job.job_id)
            out[f"deal/{member}"] = channel.seal(dealt, _deal_label(job.job_id, name, member))
            out[f"attest/{member}"] = channel.seal(round1, _attest_label(job.job_id, name, member))
        self.audit.append(
            job=job.job_id,
            event="group-setup",
            step=1,
            member=name,
            members=list(group.members),
            threshold=group.threshold,
            decision="shared",
        )
        return out

    def continue_setup(self, job_id: str, payload: Mapping[str, bytes]) -> Payload:
        """Step 2: check the others' shares, combine them, answer relinearization round 2 and
        keep only this member's point of the threshold sharing."""
        job, group, name, keys = self._group_job(job_id)
        if (self._job_dir(job_id) / "share.key").exists():
            raise PolicyError(f"group job {job_id!r} has done set-up step 2 here already.")
        try:
            round1 = self._checked_round1(job_id, group, name, payload)
            seed = crs_seed(job_id, group.members)
            public_key = multiparty.combine_public_key(
                job.params, [round1[m]["pk-share"] for m in group.members], seed
            )
            fingerprint = multiparty.collective_public_context(
                job.params, KeyRequest(), public_key
            ).fingerprint
            additive = self._load_share(job, "additive.key")
            out: Payload = {}
            if keys.relin:
                combined = multiparty.combine_relin_round1(
                    job.params, [round1[m]["relin-1"] for m in group.members]
                )
                ephemeral = self._read_secret(job_id, "ephemeral.key")
                out["relin-2"] = multiparty.relin_round2(additive, ephemeral, combined)
            dealt = [self._read_secret(job_id, "own-deal.key")]
            for member in group.members:
                if member == name:
                    continue
                channel = self.identity.channel(group.identities[member], job_id)
                dealt.append(
                    channel.open(payload[f"deal/{member}"], _deal_label(job_id, member, name))
                )
        except (ChannelError, KeyError) as err:
            self.audit.append(
                job=job_id, event="group-setup", step=2, decision="refused", reason=repr(err)
            )
            raise PolicyError(f"group set-up step 2 refused: {err!r}") from err
        threshold_share = multiparty.combine_dealt(job.params, group.point(name), dealt)
        self._save_secret(job_id, "share.key", threshold_share.to_bytes())
        for temporary in ("additive.key", "ephemeral.key", "own-deal.key"):
            (self._job_dir(job_id) / temporary).unlink(missing_ok=True)
        _write_private(self._job_dir(job_id) / "fingerprint", fingerprint.encode())
        self.audit.append(
            job=job_id,
            event="group-setup",
            step=2,
            member=name,
            fingerprint=fingerprint,
            decision="thresholdized",
        )
        if "public-context" in payload:
            self.finish_setup(job_id, payload["public-context"])
        return out

    def finish_setup(self, job_id: str, public_context: bytes) -> None:
        """Step 3: accept the job's public context if its key is the one this member combined."""
        path = self._job_dir(job_id) / "fingerprint"
        if not path.exists():
            raise PolicyError(f"group job {job_id!r} has not finished set-up step 2 here.")
        context = PublicContext.from_bytes(public_context)
        expected = path.read_text()
        if context.fingerprint != expected:
            self.audit.append(
                job=job_id,
                event="group-setup",
                step=3,
                decision="refused",
                reason="public key differs",
            )
            raise PolicyError(
                f"the public context's key {context.fingerprint[:12]}… is not the one this "
                f"member combined from the members' shares ({expected[:12]}…)."
            )
        _write_private(self._job_dir(job_id) / "public.ctx", public_context)
        self.audit.append(
            job=job_id, event="group-setup", step=3, fingerprint=expected, decision="declared"
        )

    def _checked_round1(
        self, job_id: str, group: GroupSpec, name: str, payload: Mapping[str, bytes]
    ) -> dict[str, Payload]:
        shares: dict[str, Payload] = {}
        for member in group.members:
            mine = {
                key: payload[f"{key}/{member}"]
                for key in CHECKED_SHARES
                if f"{key}/{member}" in payload
            }
            if member == name:  # its own, as it made them
                attested = (self._job_dir(job_id) / "round1.sha256").read_bytes()
            else:
                channel = self.identity.channel(group.identities[member], job_id)
                attested = channel.open(
                    payload[f"attest/{member}"], _attest_label(job_id, member, name)
                )
            if attested != round1_digest(mine):
                raise ChannelError(f"{member}'s set-up shares differ from what it attested.")
            shares[member] = mine
        return shares

    # -- decryption -------------------------------------------------------------------------------

    def share(
        self, request: DecryptionRequest, active: Sequence[str], lead: str | None
    ) -> Decryption:
        """This member's decryption share for the active set: in the clear (`lead` None, only
        for an output the rules release in the clear) or sealed to `lead`."""
        clear = lead is None
        verify = clear or request.output_kind in self.rules.verified
        opener = _ShareOpener(self, request.job_id, tuple(active), lead)
        return self._decide(request, verify=verify, opener=opener)

    def lead(
        self,
        request: DecryptionRequest,
        active: Sequence[str],
        sealed: Mapping[str, bytes],
        step: ReleaseStep,
    ) -> Release:
        """Combine the others' sealed shares with this member's own and run the output's
        key-holder step on the values, as a single key holder would."""
        return step(_LeadView(self, tuple(active), dict(sealed)), request)

    # -- state ---------------------------------------------------------------------------------

    def group(self, job_id: str) -> tuple[GroupSpec, str] | None:
        path = self._job_dir(job_id) / "group.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return GroupSpec.from_dict(data["group"]), str(data["name"])

    def public_context(self, job_id: str) -> PublicContext | None:
        path = self._job_dir(job_id) / "public.ctx"
        if path.exists():
            stat = path.stat()
            return _load_public(str(path), stat.st_mtime_ns, stat.st_size)
        if self.group(job_id) is not None:
            raise PolicyError(f"group job {job_id!r} has not finished its set-up here.")
        return super().public_context(job_id)

    def _public_bytes(self, job_id: str) -> bytes | None:
        path = self._job_dir(job_id) / "public.ctx"
        return path.read_bytes() if path.exists() else None

    def _tensor_context(self, job: JobDeclaration) -> Any:
        if self.group(job.job_id) is not None:
            return self.public_context(job.job_id)
        return super()._tensor_context(job)

    def _group_job(self, job_id: str) -> tuple[JobDeclaration, GroupSpec, str, KeyRequest]:
        found = self.group(job_id)
        if found is None:
            raise PolicyError(f"job {job_id!r} is not a key-holder group job on this holder.")
        data = json.loads((self._job_dir(job_id) / "group.json").read_text())
        return self.declaration(job_id), *found, KeyRequest.from_dict(data["keys"])

    def _share_of(self, job_id: str) -> multiparty.SecretShare:
        job = self.declaration(job_id)
        if not (self._job_dir(job_id) / "share.key").exists():
            raise PolicyError(f"group job {job_id!r} holds no threshold share here yet.")
        return self._load_share(job, "share.key")

    def _load_share(self, job: JobDeclaration, name: str) -> multiparty.SecretShare:
        return multiparty.SecretShare.from_bytes(job.params, self._read_secret(job.job_id, name))

    def _save_secret(self, job_id: str, name: str, data: bytes) -> None:
        if self._passphrase:
            data = sealing.seal(self._passphrase, data, binding=f"{job_id}/{name}")
        _write_private(self._job_dir(job_id) / name, data)

    def _read_secret(self, job_id: str, name: str) -> bytes:
        path = self._job_dir(job_id) / name
        return sealing.unseal(
            self._passphrase,
            path.read_bytes(),
            f"{name} of job {job_id!r} ({path})",
            binding=f"{job_id}/{name}",
        )


@functools.lru_cache(maxsize=4)
def _load_public(path: str, mtime_ns: int, size: int) -> PublicContext:
    return PublicContext.from_bytes(Path(path).read_bytes())


class _ShareOpener:
    """A member's decryption share, in the clear or sealed to the lead."""

    single_release = False  # a new active set makes a new release
    decision = "shared"

    def __init__(
        self, member: GroupMember, job_id: str, active: tuple[str, ...], lead: str | None
    ) -> None:
        self.member = member
        self.active = active
        self.lead = lead
        self.suffix = f"-{'+'.join(sorted(active))}-{lead or 'clear'}.share"
        self.audit = {"active": list(active), "to": lead or "aggregator"}

    def check_new(self, request: DecryptionRequest, path: Path) -> None:
        group, name = _group_of(self.member, request.job_id)
        group.check_active(self.active)
        if name not in self.active:
            raise PolicyError(f"{name} is not in the active set {list(self.active)}.")
        if self.lead is None and request.output_kind not in self.member.rules.clear:
            raise PolicyError(
                f"{request.output_kind!r} is not released in the clear: its shares go sealed "
                "to a lead member of the active set."
            )
        if self.lead is not None and (self.lead not in self.active or self.lead == name):
            raise PolicyError(f"the lead {self.lead!r} must be another member of the active set.")
        _check_active_sets(path, request)

    def open(self, tensor: EncryptedTensor, request: DecryptionRequest) -> Decryption:
        group, name = _group_of(self.member, request.job_id)
        share = multiparty.decryption_share(
            self.member._share_of(request.job_id),
            tensor,
            active_points=group.points(self.active),
            smudging_sigma=2.0**self.member.smudging_bits,
        )
        if self.lead is not None:
            channel = self.member.identity.channel(group.identities[self.lead], request.job_id)
            share = channel.seal(share, share_label(request, name, self.active))
        return Decryption(None, {}, share, {"smudging_bits": self.member.smudging_bits})

    def replayed(self, artifact: bytes) -> Decryption:
        return Decryption(None, {}, artifact)


class _CombineOpener:
    """The lead: its own share plus the others' sealed ones, combined to values."""

    single_release = False  # a new active set makes a new release
    decision = "combined"

    def __init__(
        self, member: GroupMember, active: tuple[str, ...], sealed: dict[str, bytes]
    ) -> None:
        self.member = member
        self.active = active
        self.sealed = sealed
        self.suffix = f"-{'+'.join(sorted(active))}-lead.npy"
        self.audit = {"active": list(active), "to": "lead"}

    def check_new(self, request: DecryptionRequest, path: Path) -> None:
        group, name = _group_of(self.member, request.job_id)
        group.check_active(self.active)
        if name not in self.active:
            raise PolicyError(f"{name} is not in the active set {list(self.active)}.")
        missing = sorted(set(self.active) - {name} - set(self.sealed))
        if missing:
            raise PolicyError(f"the lead has no decryption share from {missing}.")
        job = self.member.declaration(request.job_id)
        if name == job.meta.get("querier"):
            raise PolicyError(
                f"{name} asks this job's queries: it may not combine (it would read the masked "
                "answers to its own queries); lead with another member."
            )
        if request.output_kind in self.member.rules.party_masked and _is_party(
            self.member, request.job_id, name
        ):
            raise PolicyError(
                f"{name} is a party of the job and knows the masks of {request.output_kind!r}: "
                "lead with a member that is not."
            )
        _check_active_sets(path, request)

    def open(self, tensor: EncryptedTensor, request: DecryptionRequest) -> Decryption:
        group, name = _group_of(self.member, request.job_id)
        shares = [
            multiparty.decryption_share(
                self.member._share_of(request.job_id),
                tensor,
                active_points=group.points(self.active),
                smudging_sigma=2.0**self.member.smudging_bits,
            )
        ]
        for member in self.active:
            if member == name:
                continue
            channel = self.member.identity.channel(group.identities[member], request.job_id)
            try:
                shares.append(
                    channel.open(self.sealed[member], share_label(request, member, self.active))
                )
            except ChannelError as err:
                raise PolicyError(f"{member}'s sealed share does not open: {err}") from err
        values = multiparty.combine_decryption(tensor, shares)
        return Decryption(
            values, {}, _npy_bytes(values), {"smudging_bits": self.member.smudging_bits}
        )

    def replayed(self, artifact: bytes) -> Decryption:
        return Decryption(np.load(io.BytesIO(artifact), allow_pickle=False), {}, artifact)


def _group_of(member: GroupMember, job_id: str) -> tuple[GroupSpec, str]:
    found = member.group(job_id)
    if found is None:
        raise PolicyError(f"job {job_id!r} is not a key-holder group job on this holder.")
    return found


def _is_party(member: GroupMember, job_id: str, name: str) -> bool:
    try:
        return name in member.registration(job_id).parties
    except PolicyError:
        return False


def _check_active_sets(path: Path, request: DecryptionRequest) -> None:
    made = list(path.parent.glob(f"{request.output_kind}-{request.round}-*"))
    if len(made) >= MAX_ACTIVE_SETS:
        raise PolicyError(
            f"{request.output_kind!r} of round {request.round} was shared for "
            f"{len(made)} active sets already; a member shares one label at most "
            f"{MAX_ACTIVE_SETS} times."
        )


class _LeadView:
    """What the output's key-holder step sees on the lead: the lead itself, except that a
    decryption combines the active set's shares."""

    def __init__(self, member: GroupMember, active: tuple[str, ...], sealed: dict[str, bytes]):
        self._member = member
        self._active = active
        self._sealed = sealed

    def decrypt_sum(self, request: DecryptionRequest) -> Decryption:
        opener = _CombineOpener(self._member, self._active, self._sealed)
        return self._member._decide(request, verify=True, opener=opener)

    def decrypt_unverified(self, request: DecryptionRequest) -> Decryption:
        opener = _CombineOpener(self._member, self._active, self._sealed)
        return self._member._decide(request, verify=False, opener=opener)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._member, name)
