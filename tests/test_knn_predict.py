"""Later KNN queries against a kept encrypted store (`--keep-store true`, fedhe.knn_predict).

The jobs run in process (real ServerApp loop and ClientApp handlers, no Ray), with the node
identities and the key holder's state where `fedhe simulate --keep-store true` puts them.
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from fedhe import knn_predict
from fedhe.aggregator.app import _data_source, run_job
from fedhe.clients.roles import SIMULATION_NODE_CONFIG, WithNodeConfig
from fedhe.config import ConfigError, JobConfig
from fedhe.data import sources
from fedhe.errors import FedHEError, PolicyError, ProtocolError
from fedhe.simulation import simulation_client_app
from fedhe.tasks import knn
from tests.inprocess import InProcessGrid, kept_answers

TEST_QUERIES = 30  # iris: 150 rows, a fifth of them the querier's test set


def run_knn(out: Path, *, keep_store: bool = False, **settings) -> InProcessGrid:
    """An encrypted iris KNN job over 3 parties, its state where `fedhe simulate` puts it:
    with keep_store, node identities and the key holder's state under the run folder; without,
    identities in the nodes' state and the key holder's in a folder of its own."""
    config = JobConfig.of(
        **{"task": "knn", "dataset": "iris", "parties": 3, "min_parties": 2, "out": str(out),
           "plaintext_twin": False, "query_batch": 16, "keep_store": keep_store} | settings,
    )  # fmt: skip
    nodes = {
        i: {"partition-id": i, "num-partitions": config.num_nodes, **SIMULATION_NODE_CONFIG}
        for i in range(config.num_nodes)
    }
    state_root = out.parent / f"{out.name}-keyholder-state"
    if keep_store:
        for i, node in nodes.items():
            node["identity-path"] = str(knn_predict.identity_path(out, i))
        state_root = knn_predict.keyholder_root(out)
    grid = InProcessGrid(config.num_nodes, node_configs=nodes)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDHE_STATE_ROOT", str(state_root))
        run_job(grid, config)
    if keep_store:
        knn_predict.keep_only_the_querier(out)
    return grid


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
    """A kept run, and an untouched copy of it (the tests that ask copy it first)."""
    out = tmp_path_factory.mktemp("kept")
    grid = run_knn(out, keep_store=True)
    pristine = tmp_path_factory.mktemp("pristine") / "run"
    shutil.copytree(out, pristine)
    return grid, out, pristine


def _source():
    return _data_source(JobConfig.of(task="knn", dataset="iris", parties=3), 3)


def _test_set():
    """The querier's test set, rows in the order it asked them (what `test_data` gives it)."""
    return sources.test_data(_source())


def _training_rows() -> np.ndarray:
    return np.vstack([sources.party_data(_source(), i).X for i in range(3)])


def _test_rows() -> np.ndarray:
    return _test_set().X


def _fresh_copy(pristine: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    return run


def _audit(run: Path) -> list[dict]:
    (state,) = [p for p in (run / "knn-kept" / "keyholder").iterdir() if p.is_dir()]
    return [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]


def test_predict_gives_the_jobs_own_answers_through_the_key_holders_policy(kept, tmp_path):
    grid, _, pristine = kept
    run = _fresh_copy(pristine, tmp_path)
    X = _test_rows()
    assert len(X) == TEST_QUERIES
    before = len(_audit(run))

    predicted = knn_predict.predict(run, X)

    np.testing.assert_array_equal(predicted, kept_answers(grid, "predictions", encrypted=True))
    assert np.mean(predicted == _test_set().y) > 0.85
    new = _audit(run)[before:]
    rounds = {(e["output"], e["round"]) for e in new if e["decision"] == "decrypted"}
    manifest = json.loads((run / "knn-kept" / "manifest.json").read_text())
    first = manifest["first_round"]
    batches = len(rounds) // 2
    assert batches >= TEST_QUERIES / knn.queries_per_layout(4)  # ≤ 4 queries per layout
    assert rounds == {
        (kind, r)
        for kind in (knn.RANK_OUTPUT, knn.VOTE_OUTPUT)
        for r in range(first, first + batches)
    }
    assert not [e for e in new if e["decision"] != "decrypted"]


def test_a_regression_store_answers_the_mean_target_in_original_units(tmp_path):
    out = tmp_path / "diabetes"
    grid = run_knn(out, keep_store=True, dataset="diabetes", queries=8)  # d = 10: one layout
    config = JobConfig.of(task="knn", dataset="diabetes", parties=3)
    test = sources.test_data(_data_source(config, 3))
    predicted = knn_predict.predict(out, test.X[:8])
    job = kept_answers(grid, "predictions", encrypted=True)
    assert len(predicted) == 8 and np.ptp(predicted) > 50  # diabetes targets span ~25-346
    np.testing.assert_allclose(predicted, job, atol=0.05)  # the same k neighbours, CKKS noise


def test_the_declared_later_queries_are_all_it_answers(kept, tmp_path):
    _, _, pristine = kept
    run = _fresh_copy(pristine, tmp_path)
    X = _test_rows()
    knn_predict.predict(run, X[:20])
    with pytest.raises(PolicyError, match=r"answers 10 more queries, not 11.*--keep-store true"):
        knn_predict.predict(run, X[:11])
    assert len(knn_predict.predict(run, X[20:])) == 10
    with pytest.raises(PolicyError, match="answers 0 more queries"):
        knn_predict.predict(run, X[:1])
    described = knn_predict.describe(run)
    assert (described["queries_left"], described["queries_declared"]) == (0, TEST_QUERIES)
    assert described["answers"] == "3 classes" and len(described["features"]) == 4


def test_the_job_declares_the_later_queries_with_its_own(kept, tmp_path):
    _, out, _ = kept
    plain = tmp_path / "plain"
    run_knn(plain)
    budgets = {}
    for name, run in (("kept", out), ("plain", plain)):
        (declared,) = [
            json.loads(line)
            for line in (run / "audit.jsonl").read_text().splitlines()
            if json.loads(line).get("event") == "declare"
        ]
        budgets[name] = declared["outputs"][knn.RANK_OUTPUT]
    batches = sum(len(b) for b in knn.query_plan(TEST_QUERIES, 16, knn.queries_per_layout(4)))
    assert budgets == {"plain": batches, "kept": batches + TEST_QUERIES}
    # without the flag nothing is kept, and predict says which flag keeps it
    assert not (plain / "knn-kept").exists()
    with pytest.raises(FedHEError, match="--keep-store true"):
        knn_predict.predict(plain, _test_rows())


def test_the_kept_folder_holds_no_plaintext_training_point(kept):
    _, out, _ = kept
    manifest = json.loads((out / "knn-kept" / "manifest.json").read_text())
    standardizer = knn_predict.KeptStore.open(out).standardizer
    train = _training_rows()
    assert len(train) == 120
    needles = set()
    for row in np.vstack([train, standardizer.features(train)]):
        needles.add(np.asarray(row, dtype=np.float64).tobytes())  # a whole row, as numpy has it
        needles.add(np.asarray(row, dtype=np.float32).tobytes())
    for value in standardizer.features(train).ravel():
        needles.add(repr(float(value)).encode())  # a standardized value in text (17 digits)
    files = [p for p in (out / "knn-kept").rglob("*") if p.is_file()]
    assert len(files) > 10 and manifest["layouts"]
    for path in files:
        content = path.read_bytes()
        found = [n for n in needles if n in content]
        assert not found, f"{path} holds a training point: {found[:2]}"


def test_the_kept_keys_stay_private(kept):
    _, out, _ = kept
    folder = out / "knn-kept"
    for name in ("keyholder", "identities"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o700
    identities = list((folder / "identities").glob("*.key"))
    assert len(identities) == 1  # the querier's: the others' were removed after the run
    assert stat.S_IMODE(identities[0].stat().st_mode) == 0o600
    secrets = list((folder / "keyholder").rglob("secret.ctx"))
    assert secrets and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in secrets)
    for path in folder.rglob("*"):  # the store, its context and manifest too: owner only
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path


def test_a_changed_store_file_is_refused_before_anything_is_decrypted(kept, tmp_path):
    _, _, pristine = kept
    run = _fresh_copy(pristine, tmp_path)
    points = sorted((run / "knn-kept" / "layout-0").glob("points-*.fhet"))[0]
    data = bytearray(points.read_bytes())
    data[len(data) // 2] ^= 0x01
    points.write_bytes(bytes(data))
    before = _audit(run)
    ledger = sorted((run / "knn-kept" / "keyholder").rglob("ledger.json"))[0].read_bytes()

    with pytest.raises(ProtocolError, match=r"was changed since.*points-0\.fhet.*nothing was"):
        knn_predict.predict(run, _test_rows()[:2])

    assert _audit(run) == before  # the key holder was never asked
    assert sorted((run / "knn-kept" / "keyholder").rglob("ledger.json"))[0].read_bytes() == ledger
    assert not (run / "knn-kept" / "predict-state.json").exists()


def test_rows_of_the_wrong_shape_or_with_gaps_are_refused(kept):
    _, out, _ = kept
    with pytest.raises(FedHEError, match=r"model's 4 features, got shape \(2, 3\)"):
        knn_predict.predict(out, np.zeros((2, 3)))
    rows = np.ones((2, 4))
    rows[1, 2] = np.nan
    with pytest.raises(FedHEError, match=r"row 1, column 2 to predict \(from 0\) holds nan"):
        knn_predict.predict(out, rows)


def test_keep_store_needs_one_key_holder():
    with pytest.raises(ConfigError, match=r"keep-store.*--keyholders 1"):
        JobConfig.of(task="knn", parties=4, keyholders="3", threshold=2, keep_store=True)


def test_only_a_kept_simulation_gives_its_nodes_identity_files(tmp_path):
    from flwr.app import Context, RecordDict

    assert isinstance(simulation_client_app(), WithNodeConfig)
    assert isinstance(simulation_client_app(str(tmp_path)), knn_predict.WithKeptIdentities)
    seen = {}
    app = knn_predict.WithKeptIdentities(
        lambda _, context: seen.update(context.node_config), tmp_path
    )
    node = Context(
        run_id=1, node_id=7, node_config={"partition-id": 2}, state=RecordDict(), run_config={}
    )
    app(None, node)
    folder = tmp_path / "knn-kept" / "identities"
    assert seen == {"partition-id": 2, "identity-path": str(folder / "node-2.key")}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_failed_keep_store_run_leaves_no_key_behind(tmp_path, monkeypatch):
    """The key holder's state and the node identities go under the run folder as the run
    starts; a run that fails before the store is kept must not leave them there."""
    from fedhe import simulation

    out = tmp_path / "run"

    def engine_that_fails_midway(config, workers, verbose, kept_out):
        secret = knn_predict.keyholder_root(kept_out) / "job" / "secret.ctx"
        secret.parent.mkdir(parents=True)
        secret.write_bytes(b"the job's secret key")
        knn_predict.identity_path(kept_out, 0).write_bytes(b"a node's identity")
        raise FedHEError("the job stopped")

    monkeypatch.setattr(simulation, "_run_engine", engine_that_fails_midway)
    config = JobConfig.of(task="knn", dataset="iris", parties=3, out=str(out), keep_store=True)
    with pytest.raises(FedHEError, match="the job stopped"):
        simulation.simulate(config)
    assert not (out / "knn-kept").exists()
