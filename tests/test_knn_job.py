"""The KNN job through the real ServerApp loop and ClientApp handlers (in-process Grid)."""

import json

import numpy as np
import pytest

from fedhe import protocol
from fedhe.aggregator.app import run_job
from fedhe.config import JobConfig
from fedhe.errors import ProtocolError
from fedhe.tasks import knn
from tests.framed import context_in
from tests.inprocess import InProcessGrid, check_logged, kept_answers


def iris_knn(out, **settings) -> JobConfig:
    """A KNN job on iris over 3 parties (min 2) writing to `out`, with `settings` changed."""
    return JobConfig.of(
        **{
            "task": "knn",
            "dataset": "iris",
            "parties": 3,
            "min_parties": 2,
            "out": str(out),
            "plaintext_twin": True,
        }
        | settings
    )


@pytest.fixture(scope="module")
def unmasked() -> list[tuple[np.ndarray, np.ndarray, int]]:
    """What the querier unmasked in `finished`'s jobs, per query batch: the released votes (as
    it read them: the encrypted job's opened, the twin's as sent), its mask ρ and k."""
    return []


@pytest.fixture(scope="module")
def finished(tmp_path_factory, unmasked):
    out = tmp_path_factory.mktemp("knn")
    config = iris_knn(out, parties=4, min_parties=3, drop_party=1, query_batch=16)
    grid = InProcessGrid(config.num_nodes)
    answer = knn.querier_answer

    def recording(released, rho, k, n_classes):
        unmasked.append((np.array(released, dtype=float), np.array(rho), k))
        return answer(released, rho, k, n_classes)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDHE_STATE_ROOT", str(out / "keyholder-state"))
        patch.setattr(knn, "querier_answer", recording)
        run_job(grid, config)
    return grid, json.loads((out / "result.json").read_text()), out


def test_encrypted_predictions_match_the_plaintext_twin(finished):
    grid, result, _ = finished
    encrypted = kept_answers(grid, "predictions", encrypted=True)
    np.testing.assert_array_equal(encrypted, kept_answers(grid, "predictions", encrypted=False))
    assert len(encrypted) == 30
    assert result["encrypted"]["accuracy"] == result["plaintext"]["accuracy"] > 0.85
    assert "predictions" not in result  # the answers stay with the querier


def test_result_reports_latency_and_the_store(finished):
    _, result, out = finished
    per_query = result["knn"]["per_query_s"]
    assert set(per_query) == {"aggregator_compute", "keyholder", "querier", "transfer", "total"}
    assert per_query["total"] >= per_query["aggregator_compute"] > 0
    assert result["knn"]["stored_points"] == 90  # 3 of the 4 parties' 120 training points
    assert result["ckks"]["coeff_mod_bit_sizes"] == list(knn.PARAMS.coeff_mod_bit_sizes)
    assert (out / "knn-store-he" / "manifest.json").exists()


def test_a_party_failing_its_upload_is_left_out(finished):
    _, result, _ = finished
    assert "drops out" in result["parties"]["excluded"]["party-1"]
    store = [c for c in result["parties"]["contributors"] if c["output"] == "knn_store"]
    assert store[0]["parties"] == ["party-0", "party-2", "party-3"]
    ranks = [d for d in result["decryptions"] if d["output"] == knn.RANK_OUTPUT]
    batches = sum(len(b) for b in knn.query_plan(30, 16, knn.queries_per_layout(4)))
    assert len(ranks) == batches and all(d["n_parties"] == 3 for d in ranks)
    assert [d["output"] for d in result["decryptions"]].count(knn.VOTE_OUTPUT) == batches


def test_each_layout_answers_its_budget_then_the_parties_upload_afresh(finished):
    grid, result, _ = finished
    budget = knn.queries_per_layout(4)  # iris: d = 4
    layouts = len(knn.query_plan(30, 16, budget))
    assert result["knn"]["queries_per_layout"] == budget == 4
    assert result["knn"]["layouts"] == layouts == 8
    uploads = [
        protocol.config_of(m.content)["segment"]
        for direction, m in grid.log
        if direction == "sent"
        and m.metadata.message_type == protocol.KNN_UPLOAD
        and protocol.config_of(m.content)["job-id"].endswith("-he")
    ]
    # the excluded party-1 is asked once; the 3 others once per layout, in a fresh order
    assert len(uploads) == 1 + 3 * layouts
    orders = {
        tuple(s["party"] for s in sorted(uploads[i : i + 3], key=lambda s: s["offset"]))
        for i in range(4, len(uploads), 3)
    }
    assert len(orders) > 1  # segment orders differ between layouts (6 orders possible)


def test_no_message_carries_a_secret_key_or_a_clear_vote(finished, unmasked):
    grid, _, _ = finished
    answers: dict[bool, list[dict[str, bytes]]] = {True: [], False: []}  # by "encrypted job"
    for direction, message in grid.log:
        if message.has_error():
            continue
        check_logged(direction, message)
        for value in protocol.payload_of(message.content).values():
            found = context_in(value)
            if found is not None:
                _, raw = found
                assert not raw.is_private() and not raw.has_secret_key()
        if direction == "sent" and message.metadata.message_type == protocol.KNN_ANSWER:
            job_id = protocol.config_of(message.content)["job-id"]
            answers[job_id.endswith("-he")].append(protocol.payload_of(message.content))
    # the encrypted job's votes reach the querier sealed; only the twin's travel in the clear
    assert answers[True] and all(set(p) == {"sealed"} for p in answers[True])
    assert answers[False] and all(set(p) == {"values"} for p in answers[False])
    assert len(unmasked) == len(answers[True]) + len(answers[False])  # every batch's votes
    for payload in answers[False]:  # what travelled in the clear is among the votes checked
        sent = protocol.array_from_bytes(payload["values"])
        assert any(np.array_equal(sent, released) for released, _, _ in unmasked)
    for released, rho, k in unmasked:
        _check_masked(released, rho, k)
    _check_masks_are_uniform(np.concatenate([rho.ravel() for _, rho, _ in unmasked]))


def _check_masked(released: np.ndarray, rho: np.ndarray, k: int) -> None:
    """Every entry of a released vote (one per query and label) is a vote count plus its own
    mask: released − ρ is a count, an integer in [0, k] (CKKS and flooding noise are far below
    0.1 here), everywhere. A count released without its mask, or with another's, breaks it."""
    assert released.shape == rho.shape
    counts = released - rho
    assert np.max(np.abs(counts - np.rint(counts))) < 0.1, counts
    assert np.all((np.rint(counts) >= 0) & (np.rint(counts) <= k)), counts


def _check_masks_are_uniform(rho: np.ndarray) -> None:
    """ρ is uniform in ±VOTE_MASK_BOUND, drawn afresh for each entry. Each check below fails
    for a sound mask with probability at most 2^-60 (the entries number ≥ 60): all of them in
    one half of the range, or all of one sign."""
    bound = knn.VOTE_MASK_BOUND
    assert rho.size >= 60 and np.all(np.abs(rho) <= bound)
    assert np.max(np.abs(rho)) > bound / 2
    assert np.any(rho > 0) and np.any(rho < 0)
    assert len(np.unique(rho)) == rho.size  # never one mask for two entries


def test_a_querier_that_fails_stops_the_job_with_a_clear_error(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ProtocolError("querier lost its masks")

    monkeypatch.setattr(knn, "querier_answer", broken)
    config = iris_knn(tmp_path, plaintext_twin=False)
    with pytest.raises(ProtocolError, match=r"party-0 failed query\.knn_answer"):
        run_job(InProcessGrid(config.num_nodes), config)


def test_too_few_parties_after_upload_stop_the_job(tmp_path):
    config = iris_knn(tmp_path, parties=2, drop_party=1, plaintext_twin=False)
    with pytest.raises(ProtocolError, match="fewer than min_parties=2"):
        run_job(InProcessGrid(config.num_nodes), config)


def test_raw_features_without_standardization(tmp_path):
    config = iris_knn(tmp_path, k=3, standardize=False, query="encrypted", query_batch=30)
    grid = InProcessGrid(config.num_nodes)
    run_job(grid, config)
    result = json.loads((tmp_path / "result.json").read_text())
    np.testing.assert_array_equal(
        kept_answers(grid, "predictions", encrypted=True),
        kept_answers(grid, "predictions", encrypted=False),
    )
    assert result["encrypted"]["accuracy"] > 0.9
    assert result["knn"]["query"] == "encrypted"


def test_a_party_lost_during_the_queries_does_not_matter(tmp_path, monkeypatch):
    from fedhe.aggregator.knn import KNNJob

    config = iris_knn(tmp_path, plaintext_twin=False)
    grid = InProcessGrid(config.num_nodes)
    original = KNNJob._ask_all

    def lose_party_2_then_ask(self, *args):
        grid.unreachable.add(2)  # party-2's node goes silent after its first upload
        return original(self, *args)

    monkeypatch.setattr(KNNJob, "_ask_all", lose_party_2_then_ask)
    run_job(grid, config)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["knn"]["stored_points"] == 120  # the first layout holds its points
    assert result["encrypted"]["accuracy"] > 0.9
    ranks = [d["n_parties"] for d in result["decryptions"] if d["output"] == knn.RANK_OUTPUT]
    # its points answer the first layout's queries; later layouts go on with the other two
    assert ranks[0] == 3 and set(ranks[1:]) == {2}
    assert "knn upload" in result["parties"]["excluded"]["party-2"]


def test_uploads_arrive_in_waves(tmp_path, monkeypatch):
    from fedhe.aggregator import knn as knn_job

    waves = []
    original = knn_job.KNNJob._upload_wave

    def recording(self, wave, *args):
        waves.append(sorted(wave))
        return original(self, wave, *args)

    monkeypatch.setattr(knn_job, "UPLOAD_WAVE", 2)
    monkeypatch.setattr(knn_job.KNNJob, "_upload_wave", recording)
    config = iris_knn(tmp_path, parties=5, min_parties=3, plaintext_twin=False)
    run_job(InProcessGrid(config.num_nodes), config)
    result = json.loads((tmp_path / "result.json").read_text())
    assert [len(w) for w in waves[:3]] == [2, 2, 1]  # the store fills wave by wave
    assert result["knn"]["stored_points"] == 120
    assert result["encrypted"]["accuracy"] > 0.9
