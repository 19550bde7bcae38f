"""How many aggregator↔node round trips a job takes: the latency floor of a deployment, where
each costs a message through the SuperLink to every site and back."""

from __future__ import annotations

import json

import pytest

from fedhe import protocol
from fedhe.aggregator import session as session_module
from fedhe.aggregator.app import run_job
from fedhe.config import JobConfig
from tests.inprocess import InProcessGrid


@pytest.fixture
def exchanges(monkeypatch):
    """The message types of every exchange a job makes, in order."""
    seen: list[set[str]] = []
    original = session_module.Session.ask_each

    def spy(self, requests):
        seen.append({r.message_type for r in requests.values()})
        return original(self, requests)

    monkeypatch.setattr(session_module.Session, "ask_each", spy)
    return seen


def _run(tmp_path, **settings) -> dict:
    config = JobConfig.of(plaintext_twin=False, out=str(tmp_path / "run"), **settings)
    run_job(InProcessGrid(config.num_nodes), config)
    return json.loads((tmp_path / "run" / "result.json").read_text())


def test_exact_linreg_declares_with_setup_and_ends_with_model_and_audit_together(
    tmp_path, exchanges
):
    result = _run(tmp_path, task="linreg", parties=3, min_parties=2)
    assert exchanges[-1] == {protocol.FINAL_MODEL, protocol.AUDIT}
    assert protocol.AUDIT not in set().union(*exchanges[:-1])
    # discovery (whoami, not in result.json's count), then declare + setup, register,
    # moments (+ the public context), decrypt, statistics, decrypt, model + audit
    assert exchanges[0] == {protocol.WHOAMI}
    assert exchanges[1] == {protocol.DECLARE, protocol.SETUP}
    assert result["round_trips"] == len(exchanges) - 1 == 7
    assert len(result["model_sent_to"]) == 3
    assert [r["output"] for r in result["decryptions"] if r["decision"] == "decrypted"] == [
        "feature_moments",
        "masked_normal_equations",
    ]


def test_an_mlp_jobs_inference_audit_comes_in_the_same_single_request(tmp_path, exchanges):
    """The jobs an MLP job declares for its inference are audited by the one final request."""
    result = _run(
        tmp_path, task="mlp", parties=3, min_parties=2, rounds=1, queries=2, single_queries=1
    )
    assert sum(protocol.AUDIT in kinds for kinds in exchanges) == 1
    jobs = {record["job"] for record in result["decryptions"]}
    assert len(jobs) >= 2  # the training job and its inference jobs
