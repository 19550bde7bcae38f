"""In-process parties of one job (tests, benchmarks, notebooks), registered with the key holder
as the real protocol does, without Flower.

`TaggedParties` plays the party side of `fedhe.keyholder.registry` and `clients.trust` in one
process: each party has its own identity, sends the key holder a sealed seed, opens its sealed
envelope and derives the job's MAC seed (`registry.party_mac_seed`). It then builds the
aggregator's `DecryptionRequest` for a sum: the homomorphic sum of the contributions (as
`fedhe.tasks.aggregate.sum_valid` adds them) with each contributor's tag of its own
contribution for (output, round), sealed to the key holder. It also opens, as a party, what the
key holder sealed to it (KNN votes and MLP logits to the querier, the final model to each party).

A plaintext twin (declared without parameters) has nothing to register or tag: its requests
carry no tags and its releases come as `{"values": ...}`.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Mapping

import numpy as np

from fedhe.crypto import PublicContext, Tensor, load_tensor
from fedhe.crypto.channel import Channel, Identity
from fedhe.crypto.mac import MAC_SEED_BYTES, MacKey, mac_label
from fedhe.crypto.tensor import EncryptedTensor
from fedhe.errors import ProtocolError
from fedhe.keyholder import registry
from fedhe.keyholder.keyholder import KeyHolder
from fedhe.keyholder.policy import DecryptionRequest

Contribution = Tensor | bytes


class TaggedParties:
    """Named parties of `job_id`, registered with `keyholder` (when the job is encrypted)."""

    def __init__(self, keyholder: KeyHolder, job_id: str, names: Iterable[str]) -> None:
        self.keyholder = keyholder
        self.job_id = job_id
        self.names: tuple[str, ...] = tuple(names)
        self.identities: dict[str, Identity] = {name: Identity.generate() for name in self.names}
        self.public: PublicContext | None = keyholder.public_context(job_id)
        self.mac_seeds: dict[str, bytes] = {}
        self.refused: dict[str, str] = {}
        if self.public is not None:
            self._register()

    @property
    def encrypted(self) -> bool:
        return self.public is not None

    def channel(self, party: str, job_id: str | None = None) -> Channel:
        """`party`'s end-to-end channel with the key holder for `job_id` (default: this job)."""
        keyholder_public = self.keyholder.identity.public
        return self.identities[party].channel(keyholder_public, job_id or self.job_id)

    def _register(self) -> None:
        """Sealed seeds → `register_parties` → envelopes → each party derives the MAC seed."""
        own = {name: os.urandom(MAC_SEED_BYTES) for name in self.names}
        sealed = {
            name: self.channel(name).seal(own[name], registry.mac_seed_label(self.job_id, name))
            for name in self.names
        }
        identities = {name: identity.public for name, identity in self.identities.items()}
        envelopes, self.refused = self.keyholder.register_parties(self.job_id, identities, sealed)
        for name, envelope in envelopes.items():
            self.mac_seeds[name] = registry.party_mac_seed(
                self.channel(name), self.job_id, name, envelope, own[name]
            )

    # -- the parties' tags and the aggregator's request ----------------------------------------

    def load(self, contribution: Contribution) -> Tensor:
        if isinstance(contribution, bytes):
            return load_tensor(contribution, self.public)
        return contribution

    def tag(self, party: str, output: str, contribution: Contribution, round_: int = 0) -> bytes:
        """`party`'s tag of its contribution for (output, round), sealed to the key holder."""
        tensor = self.load(contribution)
        if not isinstance(tensor, EncryptedTensor):
            raise ProtocolError("only ciphertexts are tagged: a plaintext twin has no MAC key.")
        value = MacKey(self.mac_seeds[party]).tag(tensor, mac_label(output, round_))
        label = registry.tag_label(self.job_id, output, round_, party)
        return self.channel(party).seal(json.dumps(value.to_dict()).encode(), label)

    def tags(
        self, output: str, contributions: Mapping[str, Contribution], round_: int = 0
    ) -> dict[str, bytes]:
        """Every contributor's sealed tag (none for a plaintext twin)."""
        if not self.encrypted:
            return {}
        return {name: self.tag(name, output, data, round_) for name, data in contributions.items()}

    def sum(self, contributions: Mapping[str, Contribution]) -> Tensor:
        """The homomorphic sum, in the aggregator's order (sorted by party)."""
        tensors = [self.load(contributions[name]) for name in sorted(contributions)]
        if not tensors:
            raise ProtocolError("nothing to sum.")
        total = tensors[0]
        for tensor in tensors[1:]:
            total = total + tensor
        return total

    def request(
        self,
        output: str,
        contributions: Mapping[str, Contribution],
        round_: int = 0,
        *,
        total: Contribution | None = None,
        tags: Mapping[str, bytes] | None = None,
    ) -> DecryptionRequest:
        """The aggregator's request for the sum of `contributions` (or `total`, the sum it
        computed itself) as the release of (output, round), with the contributors' tags
        (`tags`: the ones the parties already sent)."""
        if total is None:
            total = self.sum(contributions)
        tensor = total if isinstance(total, bytes) else total.to_bytes()
        return DecryptionRequest(
            self.job_id,
            output,
            tuple(sorted(contributions)),
            tensor,
            round_,
            self.tags(output, contributions, round_) if tags is None else dict(tags),
        )

    # -- what the key holder sealed to a party -------------------------------------------------

    def open(self, job_id: str, output: str, round_: int, party: str, sealed: bytes) -> np.ndarray:
        """As `party`: the values the key holder sealed to it for (output, round) of `job_id`
        (an inference job: the party's identity is registered with the job's parent)."""
        channel = self.channel(party, job_id)
        return registry.open_release(channel, job_id, output, round_, party, sealed)

    def released(
        self,
        release: Mapping[str, bytes],
        output: str,
        round_: int,
        party: str,
        *,
        job_id: str | None = None,
    ) -> np.ndarray:
        """What `party` reads of a key-holder release: sealed to it (`sealed` or
        `sealed/<party>`), or in the clear (`values`, a plaintext twin only)."""
        if "values" in release:
            if self.encrypted:
                raise ProtocolError("an encrypted job released values in the clear.")
            return np.load(io.BytesIO(release["values"]), allow_pickle=False)
        sealed = release.get(f"sealed/{party}", release.get("sealed"))
        if sealed is None:
            raise ProtocolError(f"nothing in the release is sealed to {party}: {sorted(release)}.")
        return self.open(job_id or self.job_id, output, round_, party, sealed)
