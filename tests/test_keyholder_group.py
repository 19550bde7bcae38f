"""A key-holder group (3 holders, any 2 decrypt) through the real ServerApp loop and ClientApp
handlers (in-process Grid): every job, a member down, a refusal, attacks on the shares."""

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression

from fedhe import protocol
from fedhe.aggregator.app import run_job
from fedhe.config import ConfigError, JobConfig
from fedhe.crypto import (
    AGGREGATION_PARAMS,
    KeyRequest,
    PublicContext,
    _ring,
    _seal,
    encrypt,
    generate_keys,
    load_tensor,
    multiparty,
)
from fedhe.crypto.context import CONTEXT_MAGIC
from fedhe.data import load_builtin
from fedhe.errors import ChannelError, PolicyError, ProtocolError, ShareError
from fedhe.keyholder import DecryptionRequest, JobDeclaration
from fedhe.keyholder.group import KeyHolderGroup, LocalTransport
from fedhe.keyholder.inprocess import TaggedParties
from fedhe.keyholder.member import GroupMember, GroupSpec
from fedhe.tasks import (
    RELEASE_RULES,
    aggregate,
    keyholder_release,
    knn,
    linreg,
    moments,
)
from fedhe.tasks import aggregate as aggregate_module
from tests.conftest import SMALL_PARAMS
from tests.inprocess import InProcessGrid, check_logged, kept_answers
from tests.test_attacks import crafted

GROUP = {"keyholders": "3", "threshold": 2}
PARTIES = 3
KEYHOLDER_NODES = {1000 + PARTIES + i: f"keyholder-{i}" for i in range(3)}


def _run(out: Path, *, grid_hook=None, **settings) -> tuple[InProcessGrid, dict]:
    config = JobConfig.of(
        **(
            {"parties": PARTIES, "min_parties": 2, "out": str(out), "plaintext_twin": True}
            | GROUP
            | settings
        )
    )
    grid = InProcessGrid(config.num_nodes)
    if grid_hook is not None:
        grid_hook(grid)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDHE_STATE_ROOT", str(out / "keyholder-state"))
        run_job(grid, config)
    return grid, json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def fedavg(tmp_path_factory):
    out = tmp_path_factory.mktemp("group-fedavg")
    grid, result = _run(out, rounds=2)
    return grid, result, out


def test_fedavg_with_a_group_matches_its_twin(fedavg):
    _, result, _ = fedavg
    he, plain = result["encrypted"], result["plaintext"]
    assert result["keyholders"] == {"members": list(KEYHOLDER_NODES.values()), "threshold": 2}
    assert he["accuracy"] == pytest.approx(plain["accuracy"], abs=0.01)
    assert he["accuracy"] > 0.85
    assert result["update_packing"] == aggregate.COMPLEX  # lanes cannot absorb smudging


def test_each_member_audits_its_own_share_of_every_sum(fedavg):
    _, result, _ = fedavg
    shared = [d for d in result["decryptions"] if d["decision"] == "shared"]
    by_output: dict[tuple[str, int], list[str]] = {}
    for record in shared:
        by_output.setdefault((record["output"], record["round"]), []).append(record["keyholder"])
        assert record["to"] == "aggregator" and len(record["active"]) == 2
    # feature moments + 2 update sums, each shared by the 2 members of the active set
    assert len(by_output) == 3
    assert all(sorted(m) == ["keyholder-0", "keyholder-1"] for m in by_output.values())


def _state_files(out: Path) -> list[Path]:
    return [p for p in (out / "keyholder-state").rglob("*") if p.is_file()]


def test_no_message_or_state_file_holds_the_secret_key(fedavg):
    """Rebuild s from two members' threshold shares (only a test can: no process does), check
    that it is the key (any two members give the same s, and it decrypts the job's last sum),
    then scan every message and every file of every node for it, prime by prime."""
    grid, _, out = fedavg
    shares = sorted(p for p in _state_files(out) if p.name == "share.key")
    assert len(shares) == 3  # one per member, nothing else holds key material
    assert not [p for p in _state_files(out) if p.name in {"additive.key", "own-deal.key"}]
    job = JobDeclaration.from_dict(json.loads((shares[0].parent / "job.json").read_text()))
    loaded = [multiparty.SecretShare.from_bytes(job.params, p.read_bytes()) for p in shares]
    secret = _reconstruct(loaded[:2])
    assert np.array_equal(secret, _reconstruct(loaded[1:]))
    assert _decrypts_the_last_sum(grid, job.job_id, secret)
    rows = [secret[i].tobytes() for i in range(secret.shape[0])]
    for direction, message in grid.log:
        if message.has_error():
            continue
        check_logged(direction, message)
        for record in message.content.config_records.values():
            for value in record.values():
                if isinstance(value, bytes):
                    assert not any(row in value for row in rows)
    for path in _state_files(out):
        data = path.read_bytes()
        assert not any(row in data for row in rows), path


def _reconstruct(shares: list) -> np.ndarray:
    """Σ λ_i·f(i) over the shares' points: the key at 0 (NTT form, key level)."""
    ring = _ring.ring(shares[0].params)
    points = [s.point for s in shares]
    return ring.sum(s.secret(points) for s in shares)


def _decrypts_the_last_sum(grid: InProcessGrid, job_id: str, secret: np.ndarray) -> bool:
    """c0 + c1·s of the last sum shared with the aggregator equals what the members' two
    shares of it combine to, within the smudging: `secret` is the job's key."""
    from fedhe.crypto import PublicContext, load_tensor

    context = tensor_bytes = None
    shares: list[bytes] = []
    for direction, message in grid.log:
        if message.has_error():
            continue
        payload = protocol.payload_of(message.content) if "payload" in message.content else {}
        config = protocol.config_of(message.content) if "config" in message.content else {}
        if payload.get("public-context", b"").startswith(CONTEXT_MAGIC):
            context = PublicContext.from_bytes(payload["public-context"])
        is_share_request = direction == "sent" and config.get("step") == "share"
        if is_share_request and config["job-id"] == job_id and tensor_bytes != payload["tensor"]:
            tensor_bytes, shares = payload["tensor"], []
        if direction == "received" and "share" in payload:
            shares.append(payload["share"])
    tensor = load_tensor(tensor_bytes, context)
    combined = multiparty.combine_decryption(tensor, shares[-2:])
    ring = _ring.ring(context.params)
    slots = []
    for chunk in tensor.chunks:
        ciphertext, _ = _seal.residues(chunk, context.raw)
        level = ciphertext.shape[1]
        plain = ring.add(ciphertext[0], ring.mul(ciphertext[1], secret[:level]))
        slots.append(ring.decode(plain, chunk.ciphertext()[0].scale)[: chunk.size()])
    mine = multiparty.values_from_slots(tensor, slots)
    bound = 8 * multiparty.smudging_deviation(context.params, tensor.scale, 2)
    return bool(np.max(np.abs(mine - combined)) < bound)


def test_group_linreg_matches_sklearn(tmp_path):
    _, result = _run(tmp_path, task="linreg")
    train, _ = load_builtin("diabetes", seed=0)
    sk = LinearRegression().fit(train.X, train.y)
    reference = np.concatenate([[sk.intercept_], sk.coef_])
    got = np.asarray(result["coefficients"]["encrypted"])
    assert np.max(np.abs(got - reference) / np.abs(reference)) <= 1e-6
    # the masked normal equations went to the lead sealed; the moments came here in shares
    combined = [d for d in result["decryptions"] if d["decision"] == "combined"]
    assert [d["output"] for d in combined] == [linreg.MASKED_OUTPUT]
    clear = {d["output"] for d in result["decryptions"] if d.get("to") == "aggregator"}
    assert clear == {moments.OUTPUT}


@pytest.mark.parametrize(
    "settings",
    [
        {"task": "linreg", "mode": "gradient", "rounds": 3},
        {"task": "linreg", "mode": "encrypted-model", "rounds": 3},
        {"task": "logreg", "mode": "gradient", "rounds": 3},
        {"task": "mlp", "rounds": 2, "single_queries": 1},
    ],
    ids=["linreg-gradient", "linreg-encrypted-model", "logreg", "mlp"],
)
def test_every_job_runs_with_a_group_and_agrees_with_its_twin(tmp_path, settings):
    _, result = _run(tmp_path, **settings)
    he, plain = result["encrypted"], result["plaintext"]
    for metric in ("accuracy", "r2"):
        if metric in plain:
            assert he[metric] == pytest.approx(plain[metric], abs=0.02), metric


@pytest.mark.parametrize("query", ["plain", "encrypted"])
def test_group_knn_answers_like_its_twin(tmp_path, query):
    grid, result = _run(
        tmp_path, task="knn", dataset="iris", query=query, query_batch=16, parties=3
    )
    he = kept_answers(grid, "predictions", encrypted=True)
    twin = kept_answers(grid, "predictions", encrypted=False)
    assert np.array_equal(he, twin)
    # ranking and votes were combined by a lead member, never shared with the aggregator
    for record in result["decryptions"]:
        if record["output"] in (knn.RANK_OUTPUT, knn.VOTE_OUTPUT):
            assert record.get("to") in ("lead", None) or record["to"].startswith("keyholder-")


def _fail_after_setup(grid: InProcessGrid, silent: set[int]) -> None:
    """`silent` nodes answer until the group's set-up is done, then never again."""
    send = grid.send_and_receive

    def hook(messages, timeout=None):
        for message in messages:
            config = protocol.config_of(message.content) if "config" in message.content else {}
            if message.metadata.message_type == protocol.REGISTER:
                grid.unreachable |= {n - 1000 for n in silent}
                grid.unreachable -= {message.metadata.dst_node_id - 1000}
                del config
        return send(messages, timeout)

    grid.send_and_receive = hook


def test_a_member_down_after_setup_leaves_the_job_running(tmp_path):
    # keyholder-0 answers its set-up and registration, then goes silent
    def hook(grid):
        send = grid.send_and_receive

        def lose_member_0(messages, timeout=None):
            for message in messages:
                if message.metadata.message_type == protocol.MOMENTS:
                    grid.unreachable.add(PARTIES)  # keyholder-0 is node index PARTIES
            return send(messages, timeout)

        grid.send_and_receive = lose_member_0

    config = {"rounds": 1, "plaintext_twin": False, "timeout_s": 5.0}
    _, result = _run(tmp_path, grid_hook=hook, **config)
    assert result["silent_keyholders"] == ["keyholder-0"]
    members = {d["keyholder"] for d in result["decryptions"] if d["decision"] == "shared"}
    assert members == {"keyholder-1", "keyholder-2"}


def test_a_member_down_before_registration_is_left_out_of_the_mac_keys(tmp_path):
    """keyholder-2 dies right after set-up: the parties register with the two others only,
    tag for them only, and the two decrypt every sum."""

    def hook(grid):
        send = grid.send_and_receive

        def lose_member_2(messages, timeout=None):
            if any(m.metadata.message_type == protocol.REGISTER for m in messages):
                grid.unreachable.add(PARTIES + 2)
            return send(messages, timeout)

        grid.send_and_receive = lose_member_2

    _, result = _run(tmp_path, grid_hook=hook, rounds=1, plaintext_twin=False, timeout_s=3.0)
    assert result["silent_keyholders"] == ["keyholder-2"]
    shared = {d["keyholder"] for d in result["decryptions"] if d["decision"] == "shared"}
    assert shared == {"keyholder-0", "keyholder-1"}


def test_fewer_than_threshold_members_stop_the_job_naming_them(tmp_path):
    def hook(grid):
        send = grid.send_and_receive

        def lose_two(messages, timeout=None):
            for message in messages:
                if message.metadata.message_type == protocol.MOMENTS:
                    grid.unreachable |= {PARTIES, PARTIES + 1}
            return send(messages, timeout)

        grid.send_and_receive = lose_two

    with pytest.raises(ProtocolError, match=r"fewer than the threshold 2.*keyholder-0"):
        _run(tmp_path, grid_hook=hook, rounds=1, plaintext_twin=False, timeout_s=5.0)


def test_one_refusal_blocks_the_decryption_and_lands_in_that_members_audit(tmp_path):
    """A deviating aggregator swaps one contributor's tag in keyholder-1's share request:
    keyholder-1 refuses, nothing is decrypted, and its own audit log says why."""

    def hook(grid):
        send = grid.send_and_receive

        def tamper(messages, timeout=None):
            for message in messages:
                config = protocol.config_of(message.content) if "config" in message.content else {}
                if (
                    config.get("step") == "share"
                    and message.metadata.dst_node_id == 1000 + PARTIES + 1
                ):
                    payload = message.content.config_records[protocol.PAYLOAD]
                    tags = sorted(k for k in payload if k.startswith("tag/"))
                    payload[tags[0]] = payload[tags[1]]
            return send(messages, timeout)

        grid.send_and_receive = tamper

    with pytest.raises(ProtocolError, match=r"refused by keyholder-1"):
        _run(tmp_path, grid_hook=hook, rounds=1, plaintext_twin=False)
    audits = sorted((tmp_path / "keyholder-state").rglob("audit.jsonl"))
    records = [json.loads(line) for path in audits for line in path.read_text().splitlines()]
    refused = [r for r in records if r.get("decision") == "refused"]
    assert refused and all("tag" in r["reason"] for r in refused)


def test_threshold_one_is_refused_for_a_group():
    with pytest.raises(ConfigError, match="threshold 1"):
        JobConfig(keyholders=3, threshold=1)


# -- attacks by a deviating aggregator, on in-process members (`LocalTransport`) ---------------


class Group:
    """Three members (2-of-3) of an aggregate job over three registered parties."""

    def __init__(self, tmp_path: Path, size: int = 3) -> None:
        self.job_id = "group-job"
        members = {
            f"keyholder-{i}": GroupMember(tmp_path / f"kh{i}", rules=RELEASE_RULES)
            for i in range(size)
        }
        self.members = members
        self.transport = LocalTransport(members, keyholder_release)
        spec = GroupSpec(tuple(members), 2, {m: kh.identity.public for m, kh in members.items()})
        self.group = KeyHolderGroup(spec, self.transport)
        job = aggregate_module.declare(
            self.job_id,
            outputs={aggregate.OUTPUT: (3, 4)},
            min_parties=2,
            params=SMALL_PARAMS,
        )
        self.public = PublicContext.from_bytes(self.group.declare(job, KeyRequest()))
        self.parties = {
            m: TaggedParties(kh, self.job_id, PARTIES_NAMES) for m, kh in members.items()
        }

    def honest_sum(self, round_: int = 0):
        values = {name: np.arange(4.0) + i for i, name in enumerate(PARTIES_NAMES)}
        tensors = {name: encrypt(self.public, v) for name, v in values.items()}
        total = tensors["party-0"] + tensors["party-1"] + tensors["party-2"]
        tags = {
            m: parties.tags(aggregate.OUTPUT, tensors, round_)
            for m, parties in self.parties.items()
        }
        request = DecryptionRequest(
            self.job_id, aggregate.OUTPUT, PARTIES_NAMES, total.to_bytes(), round_
        )
        return values, total, request, tags


PARTIES_NAMES = ("party-0", "party-1", "party-2")


@pytest.fixture
def group(tmp_path):
    return Group(tmp_path)


def test_a_verified_sum_decrypts_with_any_two_members_and_not_with_one(group):
    values, total, request, tags = group.honest_sum()
    got = group.group.decrypt(request, tags, clear=True)
    expected = sum(values.values())
    bound = 8 * multiparty.smudging_deviation(SMALL_PARAMS, total.scale, 2)
    assert np.max(np.abs(got - expected)) < bound
    # one member's share alone does not combine (below the threshold it would be noise)
    share = group.members["keyholder-0"].share(
        replace(request, tags=tags["keyholder-0"]), ["keyholder-0", "keyholder-1"], None
    )
    tensor = load_tensor(request.tensor, group.public)
    with pytest.raises(ShareError, match="active set"):
        multiparty.combine_decryption(tensor, [share.artifact])


def test_a_crafted_ciphertext_gets_no_share_from_any_member(group):
    """(0, K) dressed as the sum, with the honest tags: every member checks its own MAC key
    and refuses; nothing leaves, the refusal is in the member's audit log."""
    _, total, request, tags = group.honest_sum()
    attack = crafted(total)
    forged = DecryptionRequest(
        group.job_id, aggregate.OUTPUT, PARTIES_NAMES, attack.to_bytes(), request.round
    )
    with pytest.raises(PolicyError, match=r"refused by keyholder-0.*keyholder-1"):
        group.group.decrypt(forged, tags, clear=True)
    for name in ("keyholder-0", "keyholder-1"):
        last = group.members[name].audit.entries(group.job_id)[-1]
        assert last["decision"] == "refused" and "tag" in last["reason"].lower()


def test_no_member_shares_an_unverified_output_in_the_clear(group):
    """A share of anything the members cannot verify is K·s_i + noise for a crafted input:
    asked for one in the clear (as if the output were a verified sum), a member refuses."""
    _, total, _, _ = group.honest_sum()
    attack = DecryptionRequest(
        group.job_id, knn.RANK_OUTPUT, PARTIES_NAMES, crafted(total).to_bytes()
    )
    with pytest.raises(PolicyError, match=r"not released in the clear|not declared|knn_rank"):
        group.members["keyholder-0"].share(attack, ["keyholder-0", "keyholder-1"], None)


def test_shares_go_only_to_a_lead_inside_the_active_set(group):
    _, _, request, _ = group.honest_sum()
    member = group.members["keyholder-1"]
    for lead in ("aggregator", "keyholder-2", "keyholder-1"):
        with pytest.raises(PolicyError, match="lead"):
            member.share(request, ["keyholder-0", "keyholder-1"], lead)


def test_a_member_shares_one_label_for_at_most_two_active_sets(tmp_path):
    """Fresh smudging per active set: averaging many sets' decryptions would wear it down.
    (2-of-4: keyholder-0 belongs to three 2-sets.)"""
    group = Group(tmp_path, size=4)
    member = group.members["keyholder-0"]
    _, _, request, tags = group.honest_sum()
    own = replace(request, tags=tags["keyholder-0"])
    first = member.share(own, ["keyholder-0", "keyholder-1"], None).artifact
    # a retry, in any order, is the same share (no fresh noise to average)
    assert member.share(own, ["keyholder-1", "keyholder-0"], None).artifact == first
    member.share(own, ["keyholder-0", "keyholder-2"], None)
    with pytest.raises(PolicyError, match="active sets"):
        member.share(own, ["keyholder-0", "keyholder-3"], None)


@pytest.mark.parametrize(
    "swapped", ["pk-share/keyholder-1", "relin-1/keyholder-1", "relin-1/keyholder-0"]
)
def test_a_substituted_setup_share_is_refused(tmp_path, swapped):
    """The aggregator swaps a member's share in what it relays to keyholder-0: a public-key
    share of its own (a rogue key it could decrypt with), or a relinearization round-1 share
    (round 2 would then answer a function of s_i the aggregator chose), even keyholder-0's own.
    keyholder-0 checks every share against the digest its author sealed to it (its own against
    what it made) and refuses the set-up."""
    members = {
        f"keyholder-{i}": GroupMember(tmp_path / f"kh{i}", rules=RELEASE_RULES) for i in range(3)
    }
    honest = LocalTransport(members, keyholder_release)

    def transport(step, messages):
        if step == "setup-2":
            config, payload = messages["keyholder-0"]
            donor = "keyholder-2"  # a well-formed share of the same kind, not the right one
            forged = {**payload, swapped: payload[swapped.split("/")[0] + "/" + donor]}
            messages = {**messages, "keyholder-0": (config, forged)}
        return honest(step, messages)

    spec = GroupSpec(tuple(members), 2, {m: kh.identity.public for m, kh in members.items()})
    job = aggregate_module.declare(
        "job-x", outputs={aggregate.OUTPUT: (1, 4)}, min_parties=2, params=SMALL_PARAMS
    )
    with pytest.raises(ProtocolError, match=r"keyholder-0.*differ from what it attested"):
        KeyHolderGroup(spec, transport).declare(job, KeyRequest(relin=True))
    assert not (tmp_path / "kh0" / "jobs" / "job-x" / "share.key").exists()


def test_set_up_step_two_runs_once(group):
    with pytest.raises(PolicyError, match="already"):
        group.members["keyholder-1"].continue_setup(group.job_id, {})


def test_a_public_context_under_another_key_is_refused(group, tmp_path):
    """After set-up, a member accepts only the context whose key it combined itself."""
    other = generate_keys(SMALL_PARAMS).public().to_bytes()
    with pytest.raises(PolicyError, match="not the one this member combined"):
        group.members["keyholder-2"].finish_setup(group.job_id, other)


# -- every party holds a share: no key holder apart from the parties ----------------------------

PARTIES_HOLD = {"keyholders": "parties", "threshold": 2}


@pytest.mark.parametrize(
    "settings",
    [
        {"task": "aggregate", "rounds": 2},
        {"task": "logreg", "mode": "gradient", "rounds": 3},
        {"task": "knn", "dataset": "iris", "query_batch": 16},
        {"task": "knn", "dataset": "iris", "query": "encrypted", "query_batch": 16},
    ],
    ids=["fedavg", "logreg", "knn-plain", "knn-encrypted"],
)
def test_jobs_run_with_the_parties_holding_the_key(tmp_path, settings):
    grid, result = _run(tmp_path, **(PARTIES_HOLD | settings))
    assert len(grid.contexts) == PARTIES  # no key-holder node at all
    assert result["keyholders"]["members"] == ["party-0", "party-1", "party-2"]
    he, plain = result["encrypted"], result["plaintext"]
    assert he["accuracy"] == pytest.approx(plain["accuracy"], abs=0.02)
    combined = [d for d in result["decryptions"] if d["decision"] == "combined"]
    # the querier (party-0) never combines: it would read the masked answers to its queries
    assert all(d["keyholder"] != "party-0" for d in combined)
    if settings["task"] == "knn":
        assert combined and np.array_equal(
            kept_answers(grid, "predictions", encrypted=True),
            kept_answers(grid, "predictions", encrypted=False),
        )


def test_exact_linreg_is_refused_when_the_parties_hold_the_key():
    """Every party knows the masks R, S of the normal equations: a party combining them would
    read the global XᵀX."""
    with pytest.raises(ConfigError, match="masks R, S"):
        JobConfig(task="linreg", **PARTIES_HOLD)


# -- every message of group jobs, scanned -----------------------------------------------------

SETUP_KEYS = {"pk-share", "relin-1", "attest", "deal", "public-context"}
PARTY_LINK_KEYS = {"tag", "identity", "mac-seed"}


@pytest.fixture(scope="module", params=["linreg", "knn-encrypted", "mlp"])
def scanned(request, tmp_path_factory):
    settings = {
        "linreg": {"task": "linreg"},
        "knn-encrypted": {
            "task": "knn",
            "dataset": "iris",
            "query": "encrypted",
            "query_batch": 16,
        },
        "mlp": {"task": "mlp", "rounds": 1, "single_queries": 1},
    }[request.param]
    grid, result = _run(tmp_path_factory.mktemp(request.param), plaintext_twin=False, **settings)
    return grid, result


def _exchanges(grid, message_type):
    """(request, reply) pairs of one message type, as the in-process grid logged them."""
    pending = {}
    for direction, message in grid.log:
        if message.metadata.message_type != message_type:
            continue
        if direction == "sent":
            pending[message.metadata.message_id] = message
        elif message.metadata.reply_to_message_id in pending:
            yield pending.pop(message.metadata.reply_to_message_id), message


def test_members_receive_no_party_ciphertext_and_release_only_what_the_rules_allow(scanned):
    grid, _ = scanned
    contributions = set()
    for direction, message in grid.log:
        if not message.has_error():
            check_logged(direction, message)
        if direction == "received" and message.metadata.src_node_id not in KEYHOLDER_NODES:
            if message.has_error() or "payload" not in message.content:
                continue
            for data in protocol.payload_of(message.content).values():
                contributions.add(data)
    assert contributions
    shares = 0
    for sent, reply in _exchanges(grid, protocol.GROUP):
        config, payload = protocol.config_of(sent.content), protocol.payload_of(sent.content)
        for key, data in payload.items():
            base = key.split("/")[0]
            assert base in SETUP_KEYS | {"tensor", "tag", "share"}, key
            assert data not in contributions or base == "tag", key  # sums only, never one party's
        if reply.has_error() or config["step"] != "share":
            continue
        share = protocol.payload_of(reply.content)["share"]
        shares += 1
        in_clear = share.startswith(multiparty.DECRYPTION_MAGIC)
        # a share in the clear only for a verified sum released to the aggregator; the rest
        # sealed to the lead: nothing the aggregator can read
        assert in_clear == (config["output"] in RELEASE_RULES.clear and not config["lead"])
    assert shares
    for sent, _ in _exchanges(grid, protocol.REGISTER):
        assert sent.metadata.dst_node_id in KEYHOLDER_NODES
        for key in protocol.payload_of(sent.content):
            assert key.split("/")[0] in PARTY_LINK_KEYS, key


def test_a_lead_releases_values_only_as_solved_coefficients(scanned):
    grid, _ = scanned
    for sent, reply in _exchanges(grid, protocol.GROUP):
        config = protocol.config_of(sent.content)
        if config["step"] != "lead" or reply.has_error():
            continue
        released = protocol.payload_of(reply.content)
        if config["output"] == linreg.MASKED_OUTPUT:
            assert set(released) == {"values"}  # z = S⁻¹w, which only the aggregator unmasks
            continue
        for key, data in released.items():  # fresh ciphertexts or sealed bytes, nothing else
            assert not data.startswith(multiparty.DECRYPTION_MAGIC), key
            with pytest.raises((ValueError, EOFError)):
                np.load(io.BytesIO(data), allow_pickle=False)


@pytest.mark.parametrize("swapped_in", [protocol.SETUP, protocol.MOMENTS])
@pytest.mark.parametrize("keyholders", ["1", "3"])
def test_parties_refuse_a_public_context_the_key_holders_did_not_make(
    tmp_path, keyholders, swapped_in
):
    """A deviating aggregator hands the parties a public context of its own (it holds the
    secret key), at setup or with the moments (where one key holder's context travels): every
    key holder's sealed MAC-key envelope names the job's real context, and a party keeps one
    context per job, so each party refuses before it encrypts anything, and the job stops."""
    rogue = generate_keys(AGGREGATION_PARAMS).public().to_bytes()

    def hook(grid):
        send = grid.send_and_receive

        def swap(messages, timeout=None):
            for message in messages:
                if message.metadata.message_type == swapped_in:
                    payload = message.content.config_records[protocol.PAYLOAD]
                    payload["public-context"] = rogue
            return send(messages, timeout)

        grid.send_and_receive = swap

    settings = {"keyholders": keyholders, "threshold": 0 if keyholders == "1" else 2}
    grids = []
    with pytest.raises(ProtocolError, match=r"vouches for public context|switch keys"):
        _run(tmp_path, grid_hook=lambda g: (grids.append(g), hook(g)), rounds=1,
             plaintext_twin=False, **settings)  # fmt: skip
    (grid,) = grids
    replies = [m for d, m in grid.log if d == "received" and not m.has_error()]
    assert not [m for m in replies if m.metadata.message_type == protocol.MOMENTS]


def test_queries_limits_what_the_querier_asks(tmp_path):
    """`queries`: the querier's first N test rows only (one KNN layout here: d = 4)."""
    grid, result = _run(tmp_path, task="knn", dataset="iris", queries=4, plaintext_twin=False)
    assert result["knn"]["layouts"] == 1 and result["knn"]["queries"] == 4
    assert len(kept_answers(grid, "predictions", encrypted=True)) == 4


def test_a_party_pins_every_member_of_a_group():
    """`keyholder-fingerprint` lists the members' fingerprints: one impostor among the members
    the aggregator names and the party refuses the job."""
    from flwr.app import Context, RecordDict

    from fedhe.clients import trust
    from fedhe.crypto.channel import Identity, fingerprint

    members = {f"keyholder-{i}": Identity.generate() for i in range(3)}
    pins = ",".join(fingerprint(m.public) for m in members.values())
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"keyholder-fingerprint": pins},
        state=RecordDict(),
        run_config={},
    )
    genuine = {name: m.public for name, m in members.items()}
    link = trust.join(context, "job-1", "party-0", genuine)
    assert {k for k in link if k.startswith("mac-seed/")} == {f"mac-seed/{m}" for m in members}
    forged = {**genuine, "keyholder-2": Identity.generate().public}
    with pytest.raises(ChannelError, match="keyholder-2 is not pinned"):
        trust.join(context, "job-2", "party-0", forged)
