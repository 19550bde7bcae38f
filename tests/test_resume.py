"""An aggregator that crashes mid-job resumes from its checkpoint (in-process Grid)."""

import json
from dataclasses import replace

import numpy as np
import pytest

from fedhe import protocol
from fedhe.aggregator.app import run_job
from fedhe.aggregator.fedavg import FedAvgJob
from fedhe.aggregator.knn import KNNJob
from fedhe.config import JobConfig
from fedhe.errors import ProtocolError
from fedhe.tasks import knn
from tests.inprocess import InProcessGrid, kept_answers


class Crash(RuntimeError):
    """The aggregator process dying (anything but a fedhe error)."""


def _crash_when(monkeypatch, cls, method, should_crash):
    original = getattr(cls, method)

    def crashing(self, *args, **kwargs):
        if self.run.encrypted and should_crash(*args):
            raise Crash("aggregator killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, crashing)


def test_fedavg_resumes_after_the_last_finished_round(tmp_path, monkeypatch):
    config = JobConfig(parties=3, min_parties=2, rounds=4, out=str(tmp_path), plaintext_twin=True)
    first = InProcessGrid(config.num_nodes)
    with monkeypatch.context() as patch:
        _crash_when(patch, FedAvgJob, "_train_round", lambda round_number, *_: round_number == 3)
        with pytest.raises(Crash):
            run_job(first, config)
    # The same key holder (same state folder) and parties; a new aggregator process.
    second = InProcessGrid(config.num_nodes, run_id=first.run_id)
    second.contexts = first.contexts  # the parties' and key holder's nodes kept running
    run_job(second, replace(config, resume=True))
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["resumed_after_round"] == 2
    assert [h["round"] for h in result["encrypted"]["history"]] == [1, 2, 3, 4]
    agreement = result["agreement"]
    # Quantized lanes round each party's update to a step; training may amplify that a little.
    assert 0 < agreement["quantization_bound"] < 1e-3
    assert (
        agreement["max_abs_weight_diff"] < 1e-5 + 2 * agreement["quantization_bound"]
    )  # as if never interrupted
    sums = [d for d in result["decryptions"] if d["output"] == "update_sum"]
    assert len(sums) == 4  # rounds 1-2 before the crash, 3-4 after: no round decrypted twice
    moments = [d for d in result["decryptions"] if d["output"] == "feature_moments"]
    assert len(moments) == 1  # taken from the checkpoint, not asked again
    he_rounds = {
        protocol.config_of(m.content)["round"]
        for _, m in second.log
        if m.metadata.message_type == protocol.TRAIN
        and protocol.config_of(m.content).get("job-id", "").endswith("-he")
    }
    assert he_rounds == {3, 4}


def _knn_resumed_after_upload(tmp_path, monkeypatch, **changes):
    """A KNN job that crashes right after its upload, resumed with `changes`: the second grid
    and result.json."""
    config = JobConfig(
        task="knn", dataset="iris", parties=3, min_parties=2, out=str(tmp_path), plaintext_twin=True
    )
    first = InProcessGrid(config.num_nodes)
    with monkeypatch.context() as patch:
        _crash_when(patch, KNNJob, "_ask_all", lambda *_: True)
        with pytest.raises(Crash):
            run_job(first, config)
    second = InProcessGrid(config.num_nodes, run_id=first.run_id)
    second.contexts = first.contexts  # the parties' and key holder's nodes kept running
    run_job(second, config.with_settings(resume=True, **changes))
    return second, json.loads((tmp_path / "result.json").read_text())


def test_knn_resumes_with_its_encrypted_store(tmp_path, monkeypatch):
    second, result = _knn_resumed_after_upload(tmp_path, monkeypatch)
    assert result["store_reused"] is True
    np.testing.assert_array_equal(
        kept_answers(second, "predictions", encrypted=True),
        kept_answers(second, "predictions", encrypted=False),
    )
    he_uploads = [
        m
        for _, m in second.log
        if m.metadata.message_type == protocol.KNN_UPLOAD
        and protocol.config_of(m.content).get("job-id", "").endswith("-he")
    ]
    # the first layout's store is reused; each later layout is a fresh upload (3 parties)
    layouts = len(knn.query_plan(30, 32, knn.queries_per_layout(4)))
    assert len(he_uploads) == 3 * (layouts - 1)


def test_a_store_for_plaintext_queries_is_not_reused_for_encrypted_ones(tmp_path, monkeypatch):
    second, result = _knn_resumed_after_upload(tmp_path, monkeypatch, query="encrypted")
    assert "store_reused" not in result  # features one level short: the parties upload again
    np.testing.assert_array_equal(
        kept_answers(second, "predictions", encrypted=True),
        kept_answers(second, "predictions", encrypted=False),
    )


def test_a_damaged_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint-he.json").write_text("{not json")
    config = JobConfig(parties=3, min_parties=2, rounds=1, out=str(tmp_path), resume=True)
    with pytest.raises(ProtocolError, match="delete it to start the job afresh"):
        run_job(InProcessGrid(config.num_nodes), config)
