"""Every message of real in-process jobs, scanned for what crossed a role boundary.

The key holder never receives one party's ciphertext (in its hands that is the party's data);
no party sends data in the clear; every decrypted value that reaches the aggregator is a sum
the key holder verified, and every other release is a ciphertext or sealed to its recipient.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from fedhe import protocol
from fedhe.aggregator.app import run_job
from fedhe.config import JobConfig
from fedhe.crypto import PublicContext, load_tensor
from fedhe.crypto.mac import content_digest
from fedhe.errors import FedHEError
from fedhe.tasks import aggregate, linreg, moments
from tests.inprocess import InProcessGrid

KEYHOLDER_NODE = 1000 + 3  # the last of parties + 1 nodes
SUMS_IN_THE_CLEAR = {moments.OUTPUT, aggregate.OUTPUT, linreg.GRADIENT_OUTPUT}


def _run(tmp_path, **settings):
    config = JobConfig(
        **{"parties": 3, "min_parties": 2, "rounds": 2, "out": str(tmp_path), **settings},
        plaintext_twin=False,
    )
    grid = InProcessGrid(config.num_nodes)
    run_job(grid, config)
    return grid, json.loads((tmp_path / "result.json").read_text())


def _public(grid) -> PublicContext:
    for direction, message in grid.log:
        if direction == "received" and message.metadata.message_type == protocol.DECLARE:
            return PublicContext.from_bytes(protocol.payload_of(message.content)["public-context"])
    raise AssertionError("no declaration")


@pytest.fixture(scope="module", params=["aggregate", "linreg-gradient"])
def finished(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDHE_STATE_ROOT", str(out / "state"))
        if request.param == "aggregate":
            return _run(out)
        return _run(out, task="linreg", mode="gradient", batch_size=0, rounds=3)


def test_the_key_holder_never_receives_a_single_partys_ciphertext(finished):
    grid, _ = finished
    public = _public(grid)
    contributions = set()
    for direction, message in grid.log:
        if direction == "received" and not message.has_error():
            data = protocol.payload_of(message.content).get("contribution")
            if data:
                contributions.add(content_digest(load_tensor(data, public)))
    assert contributions
    sums = 0
    for direction, message in grid.log:
        if direction != "sent" or message.metadata.dst_node_id != KEYHOLDER_NODE:
            continue
        for key, data in protocol.payload_of(message.content).items():
            if key == "tensor":
                sums += 1
                assert content_digest(load_tensor(data, public)) not in contributions
            else:  # sealed tags and seeds, public identities: nothing else
                assert key.split("/")[0] in {"tag", "identity", "mac-seed"}, key
    assert sums >= 2


def test_parties_send_no_plaintext_data(finished):
    grid, _ = finished
    public = _public(grid)
    for direction, message in grid.log:
        if direction != "received" or message.metadata.src_node_id == KEYHOLDER_NODE:
            continue
        if message.has_error() or message.metadata.message_type == protocol.WHOAMI:
            continue
        assert protocol.WEIGHTS not in message.content
        for key, data in protocol.payload_of(message.content).items():
            if key == "contribution":
                load_tensor(data, public)  # a ciphertext of the job, or it raises
            else:
                assert key in {"tag", "identity", "mac-seed"}, key
                with pytest.raises((ValueError, FedHEError)):
                    np.load(io.BytesIO(data), allow_pickle=False)


def test_decrypted_values_reach_the_aggregator_only_as_verified_sums(finished):
    grid, _ = finished
    output = None  # the in-process grid logs each request right before its reply
    for direction, message in grid.log:
        if message.metadata.message_type != protocol.DECRYPT:
            continue
        if direction == "sent":
            output = protocol.config_of(message.content)["output"]
            continue
        assert output in SUMS_IN_THE_CLEAR
        assert set(protocol.payload_of(message.content)) == {"values"}
    audit = finished[1]["decryptions"]
    assert audit and all(e["decision"] == "decrypted" for e in audit)
