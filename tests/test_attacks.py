"""Attacks a deviating aggregator would try against the key holder, written as tests.

Each test plays the aggregator with only what that role holds (public context, the parties'
ciphertexts, sealed tags it relays) and checks the key holder gives it nothing to work with.
"""

from __future__ import annotations

import io
import json
import os
import struct

import numpy as np
import pytest
import tenseal as ts

from fedhe.crypto import (
    MODEL_PARAMS,
    EncryptedTensor,
    PublicContext,
    _seal,
    _tenseal_proto,
    decrypt,
    encrypt,
    load_tensor,
)
from fedhe.crypto.channel import Identity
from fedhe.crypto.mac import MacKey, mac_label
from fedhe.errors import ChannelError, FedHEError, PolicyError
from fedhe.keyholder import DecryptionRequest, JobDeclaration, KeyHolder, OutputSpec, registry
from fedhe.tasks import encrypted_model, keyholder_release, knn, mlp
from tests.conftest import SMALL_PARAMS

PARTIES = ("party-0", "party-1", "party-2")
K = 2**30  # the attacker's multiplier: decrypting (0, K) gives K·s


class Federation:
    """A key holder with one declared job and three registered parties (real protocol)."""

    def __init__(
        self, tmp_path, outputs: dict[str, OutputSpec], task="aggregate", meta=None, params=None
    ):
        self.keyholder = KeyHolder(tmp_path / "kh")
        self.job_id = "job-1"
        params = params or SMALL_PARAMS
        job = JobDeclaration(self.job_id, task, outputs, 2, params, meta or {})
        self.public = PublicContext.from_bytes(self.keyholder.declare_job(job))
        self.secret = self.keyholder._secret_context(self.job_id)  # the test's oracle only
        self.identities = {name: Identity.generate() for name in PARTIES}
        kh = self.keyholder.identity.public
        seeds = {name: os.urandom(32) for name in PARTIES}
        sealed = {
            name: self.identities[name]
            .channel(kh, self.job_id)
            .seal(seeds[name], registry.mac_seed_label(self.job_id, name))
            for name in PARTIES
        }
        envelopes, refused = self.keyholder.register_parties(
            self.job_id, {n: i.public for n, i in self.identities.items()}, sealed
        )
        assert not refused
        self.mac_seeds = {
            name: registry.party_mac_seed(
                self.channel(name), self.job_id, name, envelopes[name], seeds[name]
            )
            for name in PARTIES
        }

    def channel(self, name: str):
        return self.identities[name].channel(self.keyholder.identity.public, self.job_id)

    def contribute(self, name: str, values, output="update_sum", round_=0):
        """A party's ciphertext and its sealed tag, as the aggregator receives them."""
        tensor = encrypt(self.public, np.asarray(values, dtype=float))
        tag = MacKey(self.mac_seeds[name]).tag(tensor, mac_label(output, round_))
        sealed = self.channel(name).seal(
            json.dumps(tag.to_dict()).encode(),
            registry.tag_label(self.job_id, output, round_, name),
        )
        return tensor, sealed

    def request(self, tensor, tags, output="update_sum", round_=0, parties=PARTIES):
        data = tensor if isinstance(tensor, bytes) else tensor.to_bytes()
        return DecryptionRequest(self.job_id, output, tuple(parties), data, round_, tags)


def crafted(like: EncryptedTensor, multiplier: int = K) -> EncryptedTensor:
    """The ciphertext (0, multiplier) at the level and scale of `like`: it decrypts to
    multiplier·s, the secret key."""
    chunks = []
    for chunk in like.chunks:
        residues, primes = _seal.residues(chunk, like.context.raw)
        (ct,) = chunk.ciphertext()
        c1 = np.stack([np.full(residues.shape[2], multiplier % q, np.uint64) for q in primes])
        data = np.stack([np.zeros_like(c1), c1])
        chunks.append(_vector_from_residues(like, ct, data))
    return EncryptedTensor(chunks, like.shape, like.context, like.packing, like.lanes)


def _vector_from_residues(like: EncryptedTensor, ct, data: np.ndarray) -> ts.CKKSVector:
    """SEAL's own serialization (uncompressed) of a ciphertext with these residues."""
    size, n_primes, degree = data.shape
    major, minor = _seal._save(ct)[3:5]  # the SEAL version this TenSEAL writes
    members = struct.pack("<4QB3QdQ", *ct.parms_id(), 1, size, degree, n_primes, ct.scale, 1)
    array = data.astype("<u8").tobytes()
    dyn = struct.pack("<HBBBBHQ", 0xA15E, 16, major, minor, 0, 0, 16 + 8 + len(array))
    dyn += struct.pack("<Q", data.size) + array
    body = members + dyn
    blob = struct.pack("<HBBBBHQ", 0xA15E, 16, major, minor, 0, 0, 16 + len(body)) + body
    return ts.ckks_vector_from(
        like.context.raw, _tenseal_proto.vector_proto(like.chunks[0].size(), blob, ct.scale)
    )


def _honest_round(fed: Federation, output="update_sum", round_=0):
    updates = {name: np.arange(4.0) + i for i, name in enumerate(PARTIES)}
    parts = {name: fed.contribute(name, updates[name], output, round_) for name in PARTIES}
    total = parts[PARTIES[0]][0] + parts[PARTIES[1]][0] + parts[PARTIES[2]][0]
    return updates, {n: p[0] for n, p in parts.items()}, {n: p[1] for n, p in parts.items()}, total


@pytest.fixture
def sums(tmp_path):
    return Federation(tmp_path, {"update_sum": OutputSpec(3)})


def test_the_crafted_ciphertext_really_carries_the_secret_key(sums):
    """Sanity of the attack itself: (0, K) decrypts to K·s(ζ)/Δ, far above any flooding."""
    _, tensors, _, _ = _honest_round(sums)
    attack = load_tensor(crafted(tensors[PARTIES[0]]).to_bytes(), sums.public)
    key_material = decrypt(sums.secret, attack)
    smaller = decrypt(sums.secret, crafted(tensors[PARTIES[0]], K // 2))
    np.testing.assert_allclose(key_material, 2 * smaller, rtol=1e-3, atol=1e-3)
    assert np.max(np.abs(key_material)) > 1e-3  # 2^30·s(ζ)/2^32: ~1 per slot


def test_key_recovery_by_one_crafted_sum_is_refused(sums):
    _, _, tags, total = _honest_round(sums)
    attack = crafted(total)
    with pytest.raises(PolicyError, match="not the sum"):
        keyholder_release(sums.keyholder, sums.request(attack, tags))
    # the honest sum with the same tags still goes through: the MAC made the difference
    released = keyholder_release(sums.keyholder, sums.request(total, tags))
    np.testing.assert_allclose(released, np.arange(4.0) * 3 + 3, atol=1e-3)


def test_crafted_ciphertext_added_to_an_honest_sum_is_refused(sums):
    _, _, tags, total = _honest_round(sums)
    with pytest.raises(PolicyError, match="not the sum"):
        keyholder_release(sums.keyholder, sums.request(total + crafted(total, 1), tags))


def test_two_sums_that_differ_by_one_party_are_never_both_released(sums):
    """Attack 3A: Σ{0,1,2} and Σ{1,2} would give party 0's update exactly."""
    _, tensors, tags, total = _honest_round(sums)
    keyholder_release(sums.keyholder, sums.request(total, tags))
    pair = tensors["party-1"] + tensors["party-2"]
    pair_tags = {n: tags[n] for n in ("party-1", "party-2")}
    for round_ in (0, 1, 2):  # same round: released already; later rounds: tags are round 0's
        with pytest.raises(PolicyError):
            keyholder_release(
                sums.keyholder,
                sums.request(pair, pair_tags, round_=round_, parties=("party-1", "party-2")),
            )


def test_a_tag_cannot_be_relabelled_to_another_party_or_round(sums):
    _, _, tags, total = _honest_round(sums)
    swapped = {"party-0": tags["party-1"], "party-1": tags["party-0"], "party-2": tags["party-2"]}
    with pytest.raises(PolicyError, match="does not open"):
        keyholder_release(sums.keyholder, sums.request(total, swapped))
    with pytest.raises(PolicyError, match="does not open"):
        keyholder_release(sums.keyholder, sums.request(total, tags, round_=1))


def test_an_unregistered_contributor_cannot_be_claimed(sums):
    _, _, tags, total = _honest_round(sums)
    fake = {**tags, "party-9": tags["party-0"]}
    with pytest.raises(PolicyError, match="not a registered party"):
        keyholder_release(sums.keyholder, sums.request(total, fake, parties=(*PARTIES, "party-9")))


def test_replay_in_another_framing_gives_the_same_values_not_fresh_noise(sums):
    _, _, tags, total = _honest_round(sums)
    first = keyholder_release(sums.keyholder, sums.request(total, tags))
    reframed = load_tensor(total.to_bytes(), sums.public)  # same residues, new frame
    again = keyholder_release(sums.keyholder, sums.request(reframed.to_bytes(), tags))
    np.testing.assert_array_equal(first, again)
    assert sums.keyholder.audit.entries(sums.job_id)[-1]["decision"] == "replayed"


def test_refusals_quote_no_decrypted_value_and_a_prober_is_stopped(tmp_path):
    """Attack 3D: a refused request once echoed the count slot (a free decryption)."""
    fed = Federation(tmp_path, {"update_sum": OutputSpec(3, count_index=3, size=4)})
    # every party encrypts 3.16 in the count slot: the sum holds 9.48, not 3
    parts = {n: fed.contribute(n, [0.5, 0.25, 1.0, 3.16]) for n in PARTIES}
    total = parts["party-0"][0] + parts["party-1"][0] + parts["party-2"][0]
    tags = {n: p[1] for n, p in parts.items()}
    with pytest.raises(PolicyError) as refused:
        keyholder_release(fed.keyholder, fed.request(total, tags))
    reasons = [e.get("reason", "") for e in fed.keyholder.audit.entries(fed.job_id)]
    text = str(refused.value) + json.dumps(reasons)
    for shown in ("9.48", "9.5", "3.16", "1.5", "0.75"):
        assert shown not in text
    for round_ in (1, 2):  # two more refusals stop the job for good
        with pytest.raises(PolicyError):
            keyholder_release(fed.keyholder, fed.request(total, tags, round_=round_))
    _, _, good_tags, good_total = _honest_round(fed, round_=2)
    with pytest.raises(PolicyError, match="stopped"):
        keyholder_release(fed.keyholder, fed.request(good_total, good_tags, round_=2))


def _assert_nothing_in_the_clear(payload: dict[str, bytes], public: PublicContext) -> None:
    """The aggregator's view of a release: ciphertexts of the job, or sealed bytes."""
    for key, data in payload.items():
        try:
            load_tensor(data, public)
            continue
        except Exception:
            pass
        assert key == "sealed" or key.startswith("sealed/"), key
        with pytest.raises(ValueError):
            np.load(io.BytesIO(data), allow_pickle=False)


@pytest.mark.parametrize(
    "output, task, meta",
    [
        (knn.RANK_OUTPUT, knn.TASK, {"k": 1, "querier": "party-0"}),
        (knn.VOTE_OUTPUT, knn.TASK, {"k": 1, "querier": "party-0"}),
        (mlp.OUTPUT, mlp.INFERENCE_TASK, {"querier": "party-0"}),
        (encrypted_model.REFRESH_OUTPUT, "linreg", {}),
        (encrypted_model.MODEL_OUTPUT, "linreg", {}),
    ],
    ids=["selection", "vote", "logits", "refresh", "model"],
)
def test_key_recovery_through_every_other_output_gets_the_aggregator_nothing(
    tmp_path, output, task, meta
):
    """Attacks 3B/3C and their kin: unverified outputs leave as ciphertexts or sealed to their
    recipient; the aggregator, which chose the ciphertext, reads nothing."""
    params = knn.PARAMS if task == knn.TASK else MODEL_PARAMS
    fed = Federation(tmp_path, {output: OutputSpec(2)}, task=task, meta=meta, params=params)
    shape = (1, 1, params.slots) if task == knn.TASK else (4,)
    honest = encrypt(fed.public, np.zeros(shape))
    attack = crafted(honest, K if output != encrypted_model.REFRESH_OUTPUT else 2**10)
    try:
        payload = keyholder_release(fed.keyholder, fed.request(attack, {}, output=output))
    except PolicyError:
        return  # refused: nothing released
    _assert_nothing_in_the_clear(payload, fed.public)
    if "sealed" in payload:  # only the declared querier opens it
        with pytest.raises(ChannelError):
            registry.open_release(
                fed.channel("party-1"), fed.job_id, output, 0, "party-0", payload["sealed"]
            )


def test_job_ids_that_name_folders_are_refused(tmp_path):
    keyholder = KeyHolder(tmp_path / "kh")
    for job_id in (".", "..", "../x", "-x"):
        job = JobDeclaration(job_id, "aggregate", {"update_sum": OutputSpec(1)}, 2, SMALL_PARAMS)
        with pytest.raises(PolicyError, match="job id"):
            keyholder.declare_job(job)


def test_a_pinned_party_identity_cannot_be_swapped_at_registration(tmp_path):
    """The aggregator relays registration: without pins it could stand in for a party (and
    learn r). A key holder with pinned identities refuses the swapped one."""
    honest = {name: Identity.generate() for name in PARTIES}
    keyholder = KeyHolder(tmp_path / "kh", trusted_parties=[i.public for i in honest.values()])
    job = JobDeclaration("job-1", "aggregate", {"update_sum": OutputSpec(1)}, 2, SMALL_PARAMS)
    keyholder.declare_job(job)
    sent = dict(honest, **{"party-2": Identity.generate()})  # the aggregator's own key
    sealed = {
        name: identity.channel(keyholder.identity.public, "job-1").seal(
            os.urandom(32), registry.mac_seed_label("job-1", name)
        )
        for name, identity in sent.items()
    }
    envelopes, refused = keyholder.register_parties(
        "job-1", {n: i.public for n, i in sent.items()}, sealed
    )
    assert set(envelopes) == {"party-0", "party-1"} and "not among the pinned" in refused["party-2"]


def test_a_party_refuses_a_key_holder_other_than_the_pinned_one():
    from flwr.app import Context, RecordDict

    from fedhe.clients import trust
    from fedhe.crypto.channel import fingerprint

    genuine, impostor = Identity.generate(), Identity.generate()
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"keyholder-fingerprint": fingerprint(genuine.public)},
        state=RecordDict(),
        run_config={},
    )
    with pytest.raises(ChannelError, match="pinned"):
        trust.join(context, "job-1", "party-0", {"": impostor.public})
    assert "mac-seed" in trust.join(context, "job-1", "party-0", {"": genuine.public})


def test_a_party_never_trains_twice_on_one_model_for_two_rounds(tmp_path):
    """Attack 3A from the party's side: the aggregator resends the same global model in a later
    round so that two rounds' updates differ only by sampling. A retry of the same round is
    fine (the key holder releases one sum per round whatever the party tags)."""
    from flwr.app import Context, RecordDict

    from fedhe.clients import trust
    from fedhe.errors import ProtocolError

    fed = Federation(tmp_path, {"update_sum": OutputSpec(3)})
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    trust.join(context, fed.job_id, "party-0", {"": fed.keyholder.identity.public})
    model = {"w": np.arange(3.0)}
    trust.check_new_model(context, fed.job_id, model, mac_label("update_sum", 0))
    trust.check_new_model(context, fed.job_id, model, mac_label("update_sum", 0))  # a retry
    with pytest.raises(ProtocolError, match="already used"):
        trust.check_new_model(
            context, fed.job_id, {"w": np.arange(3.0)}, mac_label("update_sum", 1)
        )
    trust.check_new_model(
        context, fed.job_id, {"w": np.arange(3.0) + 1e-9}, mac_label("update_sum", 1)
    )


def test_a_party_refuses_a_job_that_would_have_it_send_plaintext():
    """Attack 2: a setup without a public context is the plaintext twin; a node whose own
    config does not allow plaintext (every deployed site) refuses it."""
    from flwr.app import Message

    from fedhe import protocol
    from fedhe.data.sources import DataSource
    from tests.inprocess import InProcessGrid, assign_roles

    grid = InProcessGrid(2, node_configs={0: {"partition-id": 0, "num-partitions": 2}})
    assign_roles(grid, keyholder=1)
    source = DataSource("breast_cancer", "", "", 0, 1)
    setup = Message(
        protocol.content(
            protocol.SETUP,
            protocol.REQUEST,
            config={"job-id": "twin", "source": source.to_dict(), "party-index": 0, "n-parties": 1},
        ),
        dst_node_id=1000,
        message_type=protocol.SETUP,
    )
    (reply,) = grid.send_and_receive([setup])
    assert reply.has_error() and "in the clear" in reply.error.reason


def test_pins_come_from_fedhe_identity_and_a_trusted_parties_file(tmp_path, capsys):
    from flwr.app import Context, RecordDict

    from fedhe.cli import main
    from fedhe.clients.keyholder import keyholder_for

    assert main(["identity", str(tmp_path / "site.key")]) == 0
    shown = json.loads(capsys.readouterr().out)
    (tmp_path / "parties.json").write_text(json.dumps([shown["public-key"]]))
    context = Context(
        run_id=1,
        node_id=1,
        node_config={
            "role": "keyholder",
            "data-path": str(tmp_path / "kh"),
            "trusted-parties": str(tmp_path / "parties.json"),
        },
        state=RecordDict(),
        run_config={},
    )
    site = registry.load_identity(tmp_path / "site.key")
    assert keyholder_for(context).trusted_parties == {site.public}
    (tmp_path / "parties.json").write_text('{"party-0": "zz"}')
    with pytest.raises(FedHEError, match="JSON list"):
        keyholder_for(context)


def test_a_party_without_an_end_to_end_link_is_excluded_and_the_job_goes_on(tmp_path, monkeypatch):
    from fedhe.aggregator.app import run_job
    from fedhe.clients import trust
    from fedhe.config import JobConfig
    from tests.inprocess import InProcessGrid

    join = trust.join

    def broken_for_party_1(context, job_id, party, keyholders, **kwargs):
        return {} if party == "party-1" else join(context, job_id, party, keyholders, **kwargs)

    monkeypatch.setattr(trust, "join", broken_for_party_1)
    config = JobConfig(parties=3, min_parties=2, rounds=1, out=str(tmp_path))
    run_job(InProcessGrid(config.num_nodes), config)
    result = json.loads((tmp_path / "result.json").read_text())
    assert "end-to-end link" in result["parties"]["excluded"]["party-1"]
    assert [d["parties"] for d in result["decryptions"]][-1] == ["party-0", "party-2"]
