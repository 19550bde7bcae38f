"""The MLP job through the real ServerApp loop and ClientApp handlers (in-process Grid)."""

import json

import pytest

from fedhe import protocol
from fedhe.aggregator.app import run_job
from fedhe.config import JobConfig
from fedhe.errors import ParameterError
from fedhe.tasks import mlp
from tests.framed import context_in
from tests.inprocess import InProcessGrid, check_logged


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlp")
    config = JobConfig.of(
        task="mlp",
        parties=4,
        min_parties=3,
        rounds=4,
        out=str(out),
        single_queries=2,
        plaintext_twin=True,
    )
    grid = InProcessGrid(config.num_nodes)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDHE_STATE_ROOT", str(out / "keyholder-state"))
        run_job(grid, config)
    return grid, json.loads((out / "result.json").read_text()), out


def test_he_training_matches_the_plaintext_twin(finished):
    _, result, _ = finished
    he, plain = result["encrypted"], result["plaintext"]
    assert abs(he["accuracy"] - plain["accuracy"]) <= 0.01
    assert [h["accuracy"] for h in he["history"]] == pytest.approx(
        [h["accuracy"] for h in plain["history"]], abs=0.01
    )
    assert he["accuracy"] > 0.8  # digits, 4 rounds: the model learned
    assert result["central"]["accuracy"] > 0.8


def test_encrypted_inference_matches_plaintext_inference_of_the_same_weights(finished):
    _, result, out = finished
    inference = result["inference"]
    assert abs(inference["encrypted_accuracy"] - inference["plaintext_accuracy"]) <= 0.01
    assert inference["prediction_agreement"] >= 0.99
    assert inference["max_abs_logit_error"] < 0.05
    assert inference["single"]["samples"] == 2
    assert inference["single"]["max_abs_logit_error"] < 0.05
    assert inference["batched"]["samples"] == 360
    assert inference["ckks"]["poly_modulus_degree"] == 8192
    assert (out / "accuracy.png").stat().st_size > 1000


def test_logits_are_decrypted_under_the_inference_job_only(finished):
    _, result, _ = finished
    logits = [d for d in result["decryptions"] if d["output"] == mlp.OUTPUT]
    assert len(logits) == 3  # one batch (360 ≤ 4096 samples) + 2 single samples
    assert all(d["job"].endswith("-inference") for d in logits)


def test_the_querier_gets_the_public_key_only(finished):
    grid, _, _ = finished
    seen = 0
    for direction, message in grid.log:
        if message.has_error():
            continue
        check_logged(direction, message)
        for key, value in protocol.payload_of(message.content).items():
            found = context_in(value)
            if found is None:
                continue
            header, raw = found
            assert not raw.is_private() and not raw.has_secret_key(), key
            if message.metadata.message_type == protocol.MLP_QUERY:
                seen += 1
                assert not raw.has_relin_keys() and header["keys"]["rotations"] == []
    assert seen == 3


def test_a_network_too_deep_is_refused_before_anything_is_encrypted(tmp_path):
    config = JobConfig.of(
        task="mlp",
        parties=3,
        min_parties=2,
        rounds=1,
        hidden=",".join(["2"] * 13),
        out=str(tmp_path),
        plaintext_twin=False,
    )
    grid = InProcessGrid(config.num_nodes)
    with pytest.raises(ParameterError, match="does not fit any 128-bit"):
        run_job(grid, config)
    assert not any(m.metadata.message_type == protocol.MLP_QUERY for _, m in grid.log)
