"""The aggregator's side of a key-holder group, and each step a member answers.

`KeyHolderGroup` runs the set-up and threshold decryption of `fedhe.keyholder.member` over a
`Transport`: Flower messages (`aggregator/job.py`, one `query.group` message type) or
in-process members (`LocalTransport`: tests, benchmarks). `handle` is the member's side of
every step, the same for both. The aggregator holds no secret: it relays sealed deals and
digests, combines public shares into keys, and combines decryption shares only of verified
sums the job releases to it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from fedhe.crypto import multiparty
from fedhe.crypto.context import KeyRequest, PublicContext
from fedhe.crypto.tensor import load_tensor
from fedhe.errors import FedHEError, PolicyError, ProtocolError
from fedhe.keyholder.keyholder import _npy_bytes
from fedhe.keyholder.member import (
    CHECKED_SHARES,
    GroupMember,
    GroupSpec,
    ReleaseStep,
    Reply,
    _group_of,
    crs_seed,
)
from fedhe.keyholder.policy import DecryptionRequest, JobDeclaration

# -- the aggregator's side -------------------------------------------------------------------------


class Transport(Protocol):
    """Sends one step's message to each named member; returns the replies and, per member
    that did not answer, why ("no reply …" when it is silent, else its refusal)."""

    def __call__(
        self, step: str, messages: Mapping[str, Reply]
    ) -> tuple[dict[str, Reply], dict[str, str]]: ...


class KeyHolderGroup:
    """The aggregator's view of a key-holder group: runs set-up and threshold decryption over
    a `Transport` (in-process members, or Flower messages). Holds no secret."""

    def __init__(self, spec: GroupSpec, transport: Transport) -> None:
        self.spec = spec
        self.transport = transport
        self.silent: set[str] = set()
        self.contexts: dict[str, PublicContext] = {}  # job id → its collective public context

    # -- set-up --------------------------------------------------------------------------------

    def declare(self, job: JobDeclaration, keys: KeyRequest) -> bytes:
        """Run the set-up with every member; the job's public context."""
        spec = self.spec
        config = {
            "declaration": job.to_dict(),
            "keys": keys.to_dict(),
            "group": spec.to_dict(),
        }
        replies = self._all("setup-1", {m: ({**config, "name": m}, {}) for m in spec.members})
        if all("public-context" in r[1] for r in replies.values()):  # declared before
            public = {r[1]["public-context"] for r in replies.values()}
            if len(public) != 1:
                raise ProtocolError("the members hold different public contexts for this job.")
            return self._accept(job.job_id, public.pop())
        seed = crs_seed(job.job_id, spec.members)
        params = job.params
        public_key = multiparty.combine_public_key(
            params, [replies[m][1]["pk-share"] for m in spec.members], seed
        )
        rotations = None
        elements = multiparty.galois_elements_for(params, keys)
        if elements:
            rotations = multiparty.combine_rotations(
                params, [replies[m][1]["rotations"] for m in spec.members], elements, seed
            )
        round1 = {
            f"{key}/{m}": replies[m][1][key]
            for m in spec.members
            for key in CHECKED_SHARES
            if key in replies[m][1]
        }
        messages: dict[str, Reply] = {}
        for member in spec.members:
            payload = dict(round1)
            for other in spec.members:
                if other != member:
                    payload[f"deal/{other}"] = replies[other][1][f"deal/{member}"]
                    payload[f"attest/{other}"] = replies[other][1][f"attest/{member}"]
            messages[member] = ({"job-id": job.job_id}, payload)
        if not keys.relin:
            public = multiparty.collective_public_context(
                params, keys, public_key, None, rotations
            ).to_bytes()
            for member in spec.members:
                messages[member][1]["public-context"] = public
            self._all("setup-2", messages)
            return self._accept(job.job_id, public)
        replies2 = self._all("setup-2", messages)
        combined1 = multiparty.combine_relin_round1(
            params, [replies[m][1]["relin-1"] for m in spec.members]
        )
        relin = multiparty.combine_relin(
            params, [replies2[m][1]["relin-2"] for m in spec.members], combined1
        )
        public = multiparty.collective_public_context(
            params, keys, public_key, relin, rotations
        ).to_bytes()
        self._all(
            "setup-3",
            {m: ({"job-id": job.job_id}, {"public-context": public}) for m in spec.members},
        )
        return self._accept(job.job_id, public)

    def _accept(self, job_id: str, public: bytes) -> bytes:
        self.contexts[job_id] = PublicContext.from_bytes(public)
        return public

    def _all(self, step: str, messages: Mapping[str, Reply]) -> dict[str, Reply]:
        """Set-up is N-of-N: every member must answer."""
        replies, failures = self.transport(step, messages)
        if failures:
            raise ProtocolError(
                f"key-holder group set-up ({step}) needs every member: "
                + "; ".join(f"{m}: {r}" for m, r in sorted(failures.items()))
            )
        return replies

    # -- decryption ----------------------------------------------------------------------------

    def decrypt(
        self,
        request: DecryptionRequest,
        tags: Mapping[str, Mapping[str, bytes]],
        *,
        clear: bool,
        avoid_lead: Collection[str] = (),
    ) -> Reply | np.ndarray:
        """Threshold decryption of `request` (its `tags` per member: each member checks its
        own). `clear`: a verified sum whose shares come to this aggregator, combined here to
        values; otherwise the lead's reply (config, payload) of the output's step. The lead is
        never one of `avoid_lead` (the querier: it must not read masked answers)."""
        while True:
            active = self._active_set(() if clear else avoid_lead)
            if clear:
                replies = self._ask_shares(request, tags, active, None)
                if replies is None:
                    continue
                context = self.contexts.get(request.job_id)
                if context is None:
                    raise ProtocolError(f"job {request.job_id!r} was not set up by this group.")
                tensor = load_tensor(request.tensor, context)
                shares = [replies[m][1]["share"] for m in active]
                return multiparty.combine_decryption(tensor, shares)
            lead, others = active[0], active[1:]
            replies = self._ask_shares(request, tags, active, lead)
            if replies is None:
                continue
            config, payload = _request_message(request, tags.get(lead, {}), active, None)
            payload.update({f"share/{m}": replies[m][1]["share"] for m in others})
            answered, failures = self.transport("lead", {lead: (config, payload)})
            if lead in answered:
                return answered[lead]
            self._note_failures(failures)

    def _active_set(self, avoid_lead: Collection[str]) -> tuple[str, ...]:
        """T live members; the first one (the lead, where there is one) not in `avoid_lead`."""
        alive = [m for m in self.spec.members if m not in self.silent]
        if len(alive) < self.spec.threshold:
            raise ProtocolError(
                f"only {len(alive)} key holders answer, fewer than the threshold "
                f"{self.spec.threshold}: silent {sorted(self.silent)}. Nothing was decrypted."
            )
        leads = [m for m in alive if m not in avoid_lead]
        if not leads:
            raise ProtocolError(f"no live key holder may lead: all of {alive} are excluded.")
        rest = [m for m in alive if m != leads[0]]
        return (leads[0], *rest[: self.spec.threshold - 1])

    def _ask_shares(
        self,
        request: DecryptionRequest,
        tags: Mapping[str, Mapping[str, bytes]],
        active: tuple[str, ...],
        lead: str | None,
    ) -> dict[str, Reply] | None:
        askees = [m for m in active if m != lead]
        replies, failures = self.transport(
            "share",
            {m: _request_message(request, tags.get(m, {}), active, lead) for m in askees},
        )
        if failures:
            self._note_failures(failures)
            return None
        return replies

    def _note_failures(self, failures: Mapping[str, str]) -> None:
        """A refusal stops the decryption (naming who refused); silence marks the member
        silent so that the next active set leaves it out."""
        refused = {m: r for m, r in failures.items() if not r.startswith("no reply")}
        if refused:
            raise PolicyError(
                "decryption refused by "
                + "; ".join(f"{m}: {r}" for m, r in sorted(refused.items()))
                + ". Nothing was decrypted."
            )
        self.silent |= set(failures)


def _request_message(
    request: DecryptionRequest,
    tags: Mapping[str, bytes],
    active: Sequence[str],
    lead: str | None,
) -> Reply:
    config = {
        "job-id": request.job_id,
        "output": request.output_kind,
        "round": request.round,
        "contributors": sorted(request.contributors),
        "active": list(active),
        "lead": lead or "",
    }
    payload = {"tensor": request.tensor, **{f"tag/{k}": v for k, v in tags.items()}}
    return config, payload


def request_from_message(
    config: Mapping[str, Any], payload: Mapping[str, bytes]
) -> DecryptionRequest:
    return DecryptionRequest(
        job_id=str(config["job-id"]),
        output_kind=str(config["output"]),
        contributors=tuple(str(p) for p in config["contributors"]),
        tensor=payload["tensor"],
        round=int(config.get("round", 0)),
        tags={k.removeprefix("tag/"): v for k, v in payload.items() if k.startswith("tag/")},
    )


# -- the member's side of each step (the same for in-process members and Flower nodes) ------------


def handle(
    member: GroupMember,
    step: str,
    config: Mapping[str, Any],
    payload: Mapping[str, bytes],
    *,
    release: ReleaseStep,
) -> Reply:
    """Run one group step on `member`; `release` runs an output's key-holder step (the lead)."""
    if step == "setup-1":
        job = JobDeclaration.from_dict(config["declaration"])
        keys = KeyRequest.from_dict(config.get("keys", {}))
        spec = GroupSpec.from_dict(config["group"])
        return {}, member.begin_setup(job, keys, spec, str(config["name"]))
    if step == "setup-2":
        return {}, member.continue_setup(str(config["job-id"]), payload)
    if step == "setup-3":
        member.finish_setup(str(config["job-id"]), payload["public-context"])
        return {}, {}
    request = request_from_message(config, payload)
    active = [str(m) for m in config["active"]]
    if step == "share":
        lead = str(config.get("lead") or "") or None
        return {}, {"share": member.share(request, active, lead).artifact}
    if step == "lead":
        sealed = {k.removeprefix("share/"): v for k, v in payload.items() if k.startswith("share/")}
        released = member.lead(request, active, sealed, release)
        if not isinstance(released, dict):
            released = {"values": _npy_bytes(np.asarray(released))}
        return {"sealed-by": _group_of(member, request.job_id)[1]}, released
    raise ProtocolError(f"unknown key-holder group step {step!r}.")


class LocalTransport:
    """In-process members (tests, benchmarks); `silent` members never answer."""

    def __init__(self, members: Mapping[str, GroupMember], release: ReleaseStep) -> None:
        self.members = dict(members)
        self.release = release
        self.silent: set[str] = set()
        self.log: list[tuple[str, str, Reply]] = []

    def __call__(
        self, step: str, messages: Mapping[str, Reply]
    ) -> tuple[dict[str, Reply], dict[str, str]]:
        replies: dict[str, Reply] = {}
        failures: dict[str, str] = {}
        for name, (config, payload) in messages.items():
            self.log.append(("sent", name, (dict(config), dict(payload))))
            if name in self.silent:
                failures[name] = "no reply (member down)"
                continue
            try:
                reply = handle(self.members[name], step, config, payload, release=self.release)
            except FedHEError as err:
                failures[name] = f"{type(err).__name__}: {err}"
                continue
            self.log.append(("received", name, reply))
            replies[name] = reply
        return replies, failures
