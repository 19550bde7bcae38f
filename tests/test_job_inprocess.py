"""The real ServerApp job loop and ClientApp handlers, wired by an in-process Grid (no Ray)."""

import json
from dataclasses import replace

import numpy as np
import pytest

from fedhe import protocol
from fedhe.aggregator.app import run_job
from fedhe.config import JobConfig
from fedhe.errors import ProtocolError, SecretKeyLeakError
from tests.framed import context_in
from tests.inprocess import InProcessGrid, check_logged


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = JobConfig(
        parties=4, min_parties=3, rounds=2, out=str(out), drop_party=1, plaintext_twin=True
    )
    grid = InProcessGrid(config.num_nodes)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDHE_STATE_ROOT", str(out / "keyholder-state"))
        run_job(grid, config)
    return grid, json.loads((out / "result.json").read_text()), out


def test_result_matches_the_plaintext_twin(finished):
    _, result, _ = finished
    he, plain = result["encrypted"], result["plaintext"]
    assert he["accuracy"] == pytest.approx(plain["accuracy"], abs=0.01)
    assert he["loss"] == pytest.approx(plain["loss"], abs=1e-3)
    agreement = result["agreement"]
    # Quantized lanes round each party's update to a step; training may amplify that a little.
    assert 0 < agreement["quantization_bound"] < 1e-3
    assert agreement["max_abs_weight_diff"] < 1e-5 + 2 * agreement["quantization_bound"]
    assert he["accuracy"] > 0.85  # breast_cancer is easy: the model really learned


def test_result_json_contract(finished):
    _, result, out = finished
    for key in ("task", "parties", "encrypted", "plaintext", "timings_s", "bytes", "decryptions"):
        assert key in result, key
    assert set(result["timings_s"]) >= {"keygen", "encrypt", "transfer", "compute", "decrypt"}
    assert set(result["bytes"]) >= {
        "aggregator->party",
        "party->aggregator",
        "aggregator->keyholder",
        "keyholder->aggregator",
    }
    # one moments sum + one update sum per round, all decrypted under policy
    assert [d["output"] for d in result["decryptions"]] == [
        "feature_moments",
        "update_sum",
        "update_sum",
    ]
    audit = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert [a for a in audit if a["event"] == "decrypt"] == result["decryptions"]
    from fedhe.keyholder.audit import verify_log

    assert verify_log(out / "audit.jsonl", segment=True).ok
    assert result["audit_head"] == audit[-1]["hash"]


def test_a_dropped_party_is_excluded_and_the_sum_covers_exactly_the_others(finished):
    _, result, _ = finished
    rounds = [c for c in result["parties"]["contributors"] if c["output"] == "update_sum"]
    assert all(c["parties"] == ["party-0", "party-2", "party-3"] for c in rounds)
    assert [d["parties"] for d in result["decryptions"][1:]] == [
        ["party-0", "party-2", "party-3"]
    ] * 2
    assert result["encrypted"]["history"][0]["parties"] == 3
    assert "drops out" in result["encrypted"]["history"][0]["dropped"]["party-1"]


def test_no_message_to_any_role_carries_a_secret_key(finished):
    grid, _, _ = finished
    contexts_seen = 0
    for direction, message in grid.log:
        if message.has_error():
            continue
        check_logged(direction, message)
        for value in protocol.payload_of(message.content).values():
            found = context_in(value)
            if found is not None:
                contexts_seen += 1
                _, raw = found
                assert not raw.is_private() and not raw.has_secret_key()
    # declare reply to the aggregator + setup to each of 4 parties (HE run only)
    assert contexts_seen == 5


def test_packing_a_secret_context_into_a_message_is_refused(secret):
    with pytest.raises(SecretKeyLeakError):
        protocol.content(
            protocol.SETUP, protocol.REQUEST, payload={"public-context": secret.to_secret_bytes()}
        )


def test_job_refuses_to_start_without_a_key_holder(tmp_path):
    config = JobConfig(parties=3, min_parties=2, rounds=1, out=str(tmp_path))
    grid = InProcessGrid(config.num_nodes, node_configs={3: {"role": "party"}})
    grid.contexts[1003].node_config = {"role": "party"}
    with pytest.raises(ProtocolError, match="found 0 key holders"):
        run_job(grid, config.__class__(**{**config.__dict__, "keyholder_partition_id": 99}))


def test_job_stops_when_parties_fall_below_min_parties(tmp_path):
    config = JobConfig(
        parties=3, min_parties=3, rounds=1, out=str(tmp_path), drop_party=0, plaintext_twin=False
    )
    with pytest.raises(ProtocolError, match="fewer than min_parties=3"):
        run_job(InProcessGrid(config.num_nodes), config)


def test_party_refuses_a_key_holder_message(tmp_path):
    grid = InProcessGrid(2)
    from flwr.app import ConfigRecord, Message, RecordDict

    party = 1000
    whoami = Message(
        protocol.content(protocol.WHOAMI, protocol.REQUEST, config={"keyholder-partition-id": 1}),
        dst_node_id=party,
        message_type=protocol.WHOAMI,
    )
    grid.send_and_receive([whoami])
    decrypt = Message(
        RecordDict(  # malformed on purpose: protocol.content would refuse the tensor
            {
                protocol.CONFIG: ConfigRecord(
                    {"job-id": "x", "output": "update_sum", "contributors": ["a"]}
                ),
                protocol.PAYLOAD: ConfigRecord({"tensor": b"x"}),
            }
        ),
        dst_node_id=party,
        message_type=protocol.DECRYPT,
    )
    (reply,) = grid.send_and_receive([decrypt])
    assert reply.has_error() and "is a party" in reply.error.reason
    # refused before any key-holder code ran: the party's node holds no key-holder state
    # (a key holder keeps it under $FEDHE_STATE_ROOT, which conftest points into tmp_path)
    assert not (tmp_path / "keyholder-state").exists()


def _write_csv_federation(directory, n_parties=4, seed=0):
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True).frame.sample(frac=1.0, random_state=seed)
    data.columns = [c.replace(" ", "_") for c in data.columns]
    test, train = data.iloc[:100], data.iloc[100:]
    bounds = np.linspace(0, len(train), n_parties + 1).astype(int)
    for i in range(n_parties):
        train.iloc[bounds[i] : bounds[i + 1]].to_csv(directory / f"party-{i + 1}.csv", index=False)
    test.to_csv(directory / "test.csv", index=False)


def test_csv_federation_with_one_malformed_file_goes_on_without_it(tmp_path, caplog):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _write_csv_federation(data_dir)
    bad = data_dir / "party-3.csv"
    lines = bad.read_text().splitlines()
    lines[5] = lines[5].replace(",", ",oops,", 1).replace(",oops,", ",oops", 1)
    bad.write_text("\n".join(lines) + "\n")
    config = JobConfig(
        parties=4,
        min_parties=3,
        rounds=2,
        out=str(tmp_path / "out"),
        data_dir=str(data_dir),
        target="target",
        plaintext_twin=True,
    )
    run_job(InProcessGrid(config.num_nodes), config)
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    # Named by its file (party index 2 reads party-3.csv), never by its 0-based protocol id.
    assert set(result["parties"]["excluded"]) == {"party-3.csv"}
    assert "line 6" in result["parties"]["excluded"]["party-3.csv"]
    assert result["summary"]["parties"] | {"excluded": {}} == {
        "expected": 4,
        "found": 4,
        "used": 3,
        "excluded": {},
        "missed": {},  # left out at setup: never in a sum, so not one that missed a sum
    }
    he, plain = result["encrypted"], result["plaintext"]
    assert he["accuracy"] > 0.85
    assert he["accuracy"] == pytest.approx(plain["accuracy"], abs=0.01)


def test_missing_data_dir_is_a_clear_error(tmp_path):
    from fedhe.errors import DataError

    config = JobConfig(
        parties=3,
        min_parties=2,
        rounds=1,
        out=str(tmp_path),
        data_dir=str(tmp_path / "nowhere"),
        target="y",
    )
    with pytest.raises(DataError, match="nowhere"):
        run_job(InProcessGrid(config.num_nodes), config)


def test_party_count_must_match_the_csv_files(tmp_path):
    from fedhe.errors import DataError

    _write_csv_federation(tmp_path, n_parties=3)
    config = JobConfig(
        parties=4,
        min_parties=2,
        rounds=1,
        out=str(tmp_path / "o"),
        data_dir=str(tmp_path),
        target="target",
    )
    with pytest.raises(DataError, match="holds 3 party files but the job has 4"):
        run_job(InProcessGrid(config.num_nodes), config)


def test_unreachable_key_holder_stops_the_job_with_a_clear_error(tmp_path):
    config = JobConfig(parties=3, min_parties=2, rounds=1, out=str(tmp_path), timeout_s=1.0)
    grid = InProcessGrid(config.num_nodes, unreachable={config.keyholder_node})
    with pytest.raises(ProtocolError, match="found 0 key holders"):
        run_job(grid, config)


def test_key_holder_lost_after_discovery_stops_the_job(tmp_path):
    config = JobConfig(parties=3, min_parties=2, rounds=1, out=str(tmp_path), timeout_s=1.0)
    grid = InProcessGrid(config.num_nodes)
    send = grid.send_and_receive

    def lose_keyholder_after_whoami(messages, timeout=None):
        if all(m.metadata.message_type != protocol.WHOAMI for m in messages):
            grid.unreachable.add(config.keyholder_node)
        return send(messages, timeout)

    grid.send_and_receive = lose_keyholder_after_whoami
    with pytest.raises(ProtocolError, match=r"refused or failed query\.declare: no reply"):
        run_job(grid, config)


def test_an_unreachable_party_is_left_out_while_min_parties_hold(tmp_path):
    config = JobConfig(parties=4, min_parties=3, rounds=1, out=str(tmp_path), plaintext_twin=False)
    run_job(InProcessGrid(config.num_nodes, unreachable={0}), config)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["encrypted"]["history"][0]["parties"] == 3


def test_a_lost_key_holder_reply_is_retried_and_replayed_not_decrypted_twice(tmp_path):
    config = JobConfig(parties=3, min_parties=2, rounds=2, out=str(tmp_path), plaintext_twin=False)
    grid = InProcessGrid(config.num_nodes, lose_first_reply={protocol.DECRYPT})
    run_job(grid, config)
    result = json.loads((tmp_path / "result.json").read_text())
    decisions = [d["decision"] for d in result["decryptions"]]
    assert decisions == ["decrypted", "replayed", "decrypted", "decrypted"]
    assert result["decryptions"][0]["digest"] == result["decryptions"][1]["digest"]


def test_a_silent_key_holder_is_tried_again_then_the_job_stops(tmp_path):
    config = JobConfig(parties=3, min_parties=2, rounds=1, out=str(tmp_path), keyholder_retries=1)
    grid = InProcessGrid(config.num_nodes)
    send = grid.send_and_receive
    sent = []

    def silent_keyholder(messages, timeout=None):
        if all(m.metadata.message_type != protocol.WHOAMI for m in messages):
            grid.unreachable.add(config.keyholder_node)
        sent.extend(m.metadata.message_type for m in messages)
        return send(messages, timeout)

    grid.send_and_receive = silent_keyholder
    with pytest.raises(ProtocolError, match="no reply"):
        run_job(grid, config)
    assert sent.count(protocol.DECLARE) == 2


def test_sites_read_their_own_csv_in_deployment_mode(tmp_path):
    """The aggregator's folder holds only test.csv; each party reads the file at its
    SuperNode's data-path. Same data, same result as the simulation layout."""
    shared, sites = tmp_path / "shared", tmp_path / "sites"
    shared.mkdir()
    sites.mkdir()
    _write_csv_federation(shared, n_parties=3)
    for i in range(3):
        (shared / f"party-{i + 1}.csv").rename(sites / f"hospital-{i}.csv")
    base = JobConfig(
        parties=3,
        min_parties=2,
        rounds=2,
        data_dir=str(shared),
        target="target",
        plaintext_twin=False,
    )
    node_configs = {
        i: {"partition-id": i, "num-partitions": 4, "data-path": str(sites / f"hospital-{i}.csv")}
        for i in range(3)
    }
    run_job(InProcessGrid(4, node_configs=node_configs), replace(base, out=str(tmp_path / "a")))
    for i in range(3):
        (sites / f"hospital-{i}.csv").rename(shared / f"party-{i + 1}.csv")
    run_job(InProcessGrid(4), replace(base, out=str(tmp_path / "b")))
    deployed = json.loads((tmp_path / "a" / "result.json").read_text())
    simulated = json.loads((tmp_path / "b" / "result.json").read_text())
    assert deployed["encrypted"]["accuracy"] == pytest.approx(
        simulated["encrypted"]["accuracy"], abs=1e-9
    )
    assert deployed["parties"]["excluded"] == {}


@pytest.mark.parametrize(
    ("secret_cell", "traces"),
    [
        ("BMI-31.7-PATIENT-0042", ()),  # refused as it loads: not a number
        ("7.77e15", ("7.77e+15", "e+31")),  # refused as it encrypts: the value, its square
    ],
)
def test_a_sites_bad_cell_never_reaches_the_aggregator(tmp_path, caplog, secret_cell, traces):
    """Error replies are a side channel: a deployed site whose own file holds a bad cell is
    left out, and neither the messages the aggregator receives nor result.json carry the
    cell's value (or its size), its line or its column (the site's own log has them)."""
    shared, sites = tmp_path / "shared", tmp_path / "sites"
    shared.mkdir()
    sites.mkdir()
    _write_csv_federation(shared, n_parties=3)
    for i in range(3):
        (shared / f"party-{i + 1}.csv").rename(sites / f"hospital-{i}.csv")
    rows = (sites / "hospital-1.csv").read_text().splitlines()
    header = rows[0].split(",")
    cells = rows[5].split(",")
    cells[0] = secret_cell
    rows[5] = ",".join(cells)
    (sites / "hospital-1.csv").write_text("\n".join(rows) + "\n")
    config = JobConfig(
        parties=3, min_parties=2, rounds=1, data_dir=str(shared), target="target",
        plaintext_twin=False, out=str(tmp_path / "out"),
    )  # fmt: skip
    node_configs = {
        i: {"partition-id": i, "num-partitions": 4, "data-path": str(sites / f"hospital-{i}.csv")}
        for i in range(3)
    }
    grid = InProcessGrid(4, node_configs=node_configs)
    with caplog.at_level("ERROR", logger="fedhe.party"):
        result_path = run_job(grid, config)
    result = json.loads(result_path.read_text())
    assert set(result["parties"]["excluded"]) == {"party-1"}
    reason = result["parties"]["excluded"]["party-1"]
    assert "stays at the site" in reason and "fedhe check-data" in reason
    received = "".join(
        repr(m.content) if m.has_content() else repr(m.error)
        for direction, m in grid.log
        if direction == "received"
    )
    for leaked in (secret_cell, "line 6", repr(header[0]), str(sites), *traces):
        assert leaked not in received and leaked not in result_path.read_text()
    assert "this site's data cannot take part: " in caplog.text  # the site's log says it all
