"""Registration of a job's parties with the key holder, seen from both ends: refusals word for
word, the Merkle path each party checks, and the sealed releases (mutation testing of
fedhe/keyholder/registry.py)."""

import hashlib
import io
import re

import numpy as np
import pytest

from fedhe.crypto.channel import Identity, fingerprint
from fedhe.crypto.mac import MAC_SEED_BYTES, seed_from
from fedhe.errors import ChannelError, PolicyError
from fedhe.keyholder import registry, sealing

JOB = "job-m"


class Site:
    """The key holder and named parties, each with its own identity and MAC seed."""

    def __init__(self, names):
        self.keyholder = Identity.generate()
        self.parties = {name: Identity.generate() for name in names}
        self.seeds = {name: bytes([i + 1]) * MAC_SEED_BYTES for i, name in enumerate(names)}

    def channel(self, name):
        return self.parties[name].channel(self.keyholder.public, JOB)

    def register(self, *, previous=None, identities=None, seeds=None, **kwargs):
        seeds = self.seeds if seeds is None else seeds
        sealed = {
            name: self.channel(name).seal(seed, registry.mac_seed_label(JOB, name))
            for name, seed in seeds.items()
        }
        if identities is None:
            identities = {name: identity.public for name, identity in self.parties.items()}
        return registry.register(self.keyholder, JOB, identities, sealed, None, previous, **kwargs)

    def mac_seed(self, name, envelope, **kwargs):
        return registry.party_mac_seed(
            self.channel(name), JOB, name, envelope, self.seeds[name], **kwargs
        )


def test_payload_keys_are_suffixed_per_group_member():
    assert (registry.suffixed("share", "kh-1"), registry.suffixed("share", "")) == (
        "share/kh-1",
        "share",
    )


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_every_party_derives_the_key_holders_mac_seed_from_its_merkle_path(n):
    site = Site([f"p{i}" for i in range(n)])
    registration, envelopes, refused = site.register()
    assert refused == {} and sorted(envelopes) == sorted(site.parties)
    for name, envelope in envelopes.items():
        assert site.mac_seed(name, envelope, context_fingerprint="") == registration.mac_seed


def test_the_mac_seed_is_the_key_holders_seed_and_a_domain_separated_merkle_root():
    site = Site(["a", "b", "c"])
    registration, _, _ = site.register()

    def leaf(name):
        return hashlib.sha256(b"fedhe-leaf\x00" + name.encode() + b"\x00" + site.seeds[name])

    def parent(left, right):
        return hashlib.sha256(b"fedhe-node\x00" + left + right).digest()

    a, b, c = (leaf(name).digest() for name in "abc")
    root = parent(parent(a, b), parent(c, c))  # an odd node out is paired with itself
    assert registration.mac_seed == seed_from([registration.keyholder_seed, root])


def test_parties_that_cannot_register_are_refused_with_why():
    site = Site(["a", "b", "c", "d"])
    identities = {name: identity.public for name, identity in site.parties.items()}
    identities["b"] = identities["a"]  # one identity claimed by two names
    seeds = {**site.seeds, "c": b"\x01" * (MAC_SEED_BYTES - 1)}
    del seeds["d"]
    registration, envelopes, refused = site.register(identities=identities, seeds=seeds)
    claimed = fingerprint(identities["a"])
    assert refused == {
        "a": f"a's identity {claimed} is claimed twice.",
        "b": f"b's identity {claimed} is claimed twice.",
        "c": f"c's MAC seed has {MAC_SEED_BYTES - 1} bytes.",
        "d": "no sealed seed",
    }
    assert registration.parties == {} and envelopes == {}


def test_a_resumed_registration_keeps_its_mac_seed_and_refuses_other_seeds():
    site = Site(["a", "b"])
    first, _, _ = site.register()
    again, envelopes, _ = site.register(previous=first)
    assert again == first and site.mac_seed("a", envelopes["a"]) == first.mac_seed
    message = (
        "the job registered other parties, identities or seeds before; a resumed job registers "
        "the same ones (declare a new job to start over)."
    )
    with pytest.raises(PolicyError, match=f"^{re.escape(message)}$"):
        site.register(previous=first, seeds={**site.seeds, "b": b"\x09" * MAC_SEED_BYTES})


def test_a_party_refuses_an_envelope_for_another_public_context():
    site = Site(["a", "b"])
    _, envelopes, _ = site.register(context_fingerprint="abcdef0123456789-vouched")
    message = (
        "the key holder vouches for public context abcdef012345…, not the 999999999999… this "
        "party was given: refusing to contribute under a key the key holders did not make."
    )
    with pytest.raises(ChannelError, match=f"^{re.escape(message)}$"):
        site.mac_seed("a", envelopes["a"], context_fingerprint="9999999999999-given")
    assert site.mac_seed("a", envelopes["a"], context_fingerprint="abcdef0123456789-vouched")


def test_a_release_opens_for_its_own_label_only_as_float64_and_never_unpickles():
    site = Site(["a"])
    keyholder_side = site.keyholder.channel(site.parties["a"].public, JOB)
    data = registry.array_bytes([1, 2, 3])
    assert np.load(io.BytesIO(data)).dtype == np.float64
    sealed = keyholder_side.seal(data, registry.release_label(JOB, "sum", 2, "a"))
    opened = registry.open_release(site.channel("a"), JOB, "sum", 2, "a", sealed)
    assert opened.dtype == np.float64 and opened.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ChannelError):
        registry.open_release(site.channel("a"), JOB, "sum", 1, "a", sealed)
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    sealed = keyholder_side.seal(pickled.getvalue(), registry.release_label(JOB, "sum", 2, "a"))
    with pytest.raises(ValueError, match="allow_pickle=False"):
        registry.open_release(site.channel("a"), JOB, "sum", 2, "a", sealed)


def test_a_node_identity_is_made_once_sealed_with_the_passphrase_and_private(tmp_path):
    path = tmp_path / "identity.key"
    made = registry.load_identity(path, b"pass")
    assert path.stat().st_mode & 0o777 == 0o600
    data = path.read_bytes()
    assert data.startswith(sealing.MAGIC)
    assert sealing.unseal(b"pass", data, "identity", binding="identity") == made.private_bytes()
    assert registry.load_identity(path, b"pass").public == made.public
    message = (
        f"identity {path} is passphrase-protected: start the key holder with its passphrase "
        "(node config passphrase-file=…)."
    )
    with pytest.raises(PolicyError, match=f"^{re.escape(message)}$"):
        registry.load_identity(path)
    plain = tmp_path / "plain.key"
    assert registry.load_identity(plain).public == registry.load_identity(plain).public
    assert plain.read_bytes() == registry.load_identity(plain).private_bytes()
