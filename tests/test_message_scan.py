"""Every message of real in-process jobs of each task, scanned for what crossed a role boundary.

The key holder never receives one party's ciphertext (in its hands that is the party's data);
no party sends data in the clear (only a plaintext KNN query, which the querier chose); every
decrypted value that reaches the aggregator is a sum the key holder verified (or the
coefficients it solved from one), and every other release is a ciphertext or sealed to its
recipient. And every message passes the full check (`fedhe.protocol.check_message`): its
schema, and no secret-key material in any serialization in any of its bytes.
"""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest

from fedhe import protocol
from fedhe.aggregator.app import run_job
from fedhe.config import JobConfig
from fedhe.crypto import PublicContext, load_tensor
from fedhe.crypto.mac import content_digest
from fedhe.errors import FedHEError
from fedhe.tasks import aggregate, linreg, moments
from tests.inprocess import InProcessGrid, check_logged

PARTIES = 3
KEYHOLDER_NODE = 1000 + PARTIES  # the last node
SUMS_IN_THE_CLEAR = {
    moments.OUTPUT,
    aggregate.OUTPUT,
    linreg.GRADIENT_OUTPUT,
    linreg.MASKED_OUTPUT,  # released as the coefficients it solves for, after verification
}
JOBS = {
    "aggregate": {"rounds": 2},
    "linreg-exact": {"task": "linreg"},
    "linreg-gradient": {"task": "linreg", "mode": "gradient", "batch_size": 0, "rounds": 2},
    "linreg-encrypted-model": {"task": "linreg", "mode": "encrypted-model", "rounds": 3},
    "logreg": {"task": "logreg", "batch_size": 0, "rounds": 2},
    "knn-plain": {"task": "knn", "dataset": "iris", "query_batch": 32},
    "knn-encrypted": {"task": "knn", "dataset": "iris", "query": "encrypted", "query_batch": 32},
    "mlp": {"task": "mlp", "rounds": 2, "single_queries": 1},
}
# Party payloads that are neither a ciphertext of the job nor sealed: public identities (and,
# below, a querier's plaintext KNN queries and the final model a share-model node hands back).
PUBLIC_KEYS = {"identity"}
SEALED_KEYS = {"tag", "mac-seed"}


@pytest.fixture(scope="module", params=sorted(JOBS))
def finished(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    settings = {"parties": PARTIES, "min_parties": 2, "out": str(out), **JOBS[request.param]}
    config = JobConfig.of(**settings, plaintext_twin=False)
    grid = InProcessGrid(config.num_nodes)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDHE_STATE_ROOT", str(out / "state"))
        run_job(grid, config)
    return grid, json.loads((out / "result.json").read_text()), request.param


def _contexts(grid) -> list[PublicContext]:
    return [
        PublicContext.from_bytes(protocol.payload_of(message.content)["public-context"])
        for direction, message in grid.log
        if direction == "received" and message.metadata.message_type == protocol.DECLARE
    ]


def _ciphertext(data: bytes, contexts: list[PublicContext]):
    for context in contexts:
        try:
            return load_tensor(data, context)
        except FedHEError:
            continue
    return None


def _from_parties(grid):
    for direction, message in grid.log:
        if direction != "received" or message.metadata.src_node_id == KEYHOLDER_NODE:
            continue
        if message.has_error() or message.metadata.message_type == protocol.WHOAMI:
            continue
        yield message


def test_every_message_passes_the_full_check(finished):
    """The check `protocol.content` builds every message under and every receiver runs."""
    grid, _, _ = finished
    checked = Counter()
    for direction, message in grid.log:
        if message.has_error():
            continue
        check_logged(direction, message)
        checked[direction, message.metadata.message_type] += 1
    kinds = {kind for _, kind in checked}
    assert {protocol.DECLARE, protocol.SETUP, protocol.DECRYPT} <= kinds
    assert all(checked["sent", k] and checked["received", k] for k in kinds)


def test_the_key_holder_never_receives_a_single_partys_ciphertext(finished):
    grid, _, _ = finished
    contexts = _contexts(grid)
    contributions = set()
    for message in _from_parties(grid):
        for data in protocol.payload_of(message.content).values():
            tensor = _ciphertext(data, contexts)
            if tensor is not None:
                contributions.add(content_digest(tensor))
    assert contributions
    for direction, message in grid.log:
        if direction != "sent" or message.metadata.dst_node_id != KEYHOLDER_NODE:
            continue
        for key, data in protocol.payload_of(message.content).items():
            if key == "tensor":
                tensor = _ciphertext(data, contexts)
                assert tensor is not None and content_digest(tensor) not in contributions
            else:  # sealed tags and seeds, public identities: nothing else
                assert key.split("/")[0] in {"tag", "identity", "mac-seed"}, key


def test_parties_send_no_plaintext_data(finished):
    grid, _, job = finished
    contexts = _contexts(grid)
    for message in _from_parties(grid):
        assert protocol.WEIGHTS not in message.content
        kind = message.metadata.message_type
        for key, data in protocol.payload_of(message.content).items():
            if _ciphertext(data, contexts) is not None:
                continue
            if job == "knn-plain" and (kind, key) == (protocol.KNN_QUERY, "queries"):
                continue  # the querier's own choice: plain queries
            if (kind, key) == (protocol.MODEL_RELEASE, "model"):
                continue  # the final model, shared by a node whose config says share-model
            assert key in PUBLIC_KEYS | SEALED_KEYS, (kind, key)
            if key in SEALED_KEYS:
                with pytest.raises((ValueError, EOFError)):
                    np.load(io.BytesIO(data), allow_pickle=False)


def test_decrypted_values_reach_the_aggregator_only_as_verified_sums(finished):
    grid, result, _ = finished
    contexts = _contexts(grid)
    output = None  # the in-process grid logs each request right before its reply
    for direction, message in grid.log:
        if message.metadata.message_type != protocol.DECRYPT:
            continue
        if direction == "sent":
            output = protocol.config_of(message.content)["output"]
            continue
        payload = protocol.payload_of(message.content)
        if output in SUMS_IN_THE_CLEAR:
            assert set(payload) == {"values"}
            continue
        for key, data in payload.items():
            if key == "sealed" or key.startswith("sealed/"):
                continue
            assert _ciphertext(data, contexts) is not None, (output, key)
    decisions = {e["decision"] for e in result["decryptions"]}
    assert decisions == {"decrypted"}
