"""Every job in a deployment: sites named by `site-name`, the querier by its site name, its
queries read from its own `query-path` and its answers kept under its own `output-dir`.

The first tests run the real ServerApp and ClientApp in one process with deployment-like node
configs (site names, a query file, an output folder); the slow ones run every job on a real
TLS deployment (SuperLink, 3 hospitals and a key holder as processes) and compare it with the
in-process simulation of the same job.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import Context, RecordDict

from fedhe.aggregator.app import run_job
from fedhe.clients import party
from fedhe.clients.roles import SIMULATION_NODE_CONFIG
from fedhe.config import ConfigError, JobConfig
from fedhe.data.datasets import load_builtin
from fedhe.data.queries import load_queries
from fedhe.data.sources import DataSource
from fedhe.errors import DataError, ProtocolError
from tests.inprocess import InProcessGrid, kept_answers

# Listed out of name order: the aggregator numbers the sites by their names, not by node.
SITE_ORDER = ("hospital-c", "hospital-a", "hospital-b")
QUERIES = 6


def write_queries(path: Path, dataset: str, n: int = QUERIES, *, with_target: bool = True) -> Path:
    """The first `n` rows of `dataset`'s test split as a site's query file (columns shuffled:
    a site's file is matched by column name)."""
    _, test = load_builtin(dataset)
    table = pd.DataFrame(test.X[:n], columns=list(test.feature_names))
    if with_target:
        table[test.target_name] = test.y[:n]
    table = table[list(reversed(table.columns))]
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return path


def sited_grid(tmp_path: Path, querier: str, **extra: object) -> InProcessGrid:
    """3 parties and a key holder whose node configs name their sites; `querier`'s site has a
    query file, an output folder and opts in to report its counts."""
    nodes: dict[int, dict] = {}
    for i, site in enumerate((*SITE_ORDER, "keyholder")):
        nodes[i] = {"partition-id": i, "num-partitions": 4, **SIMULATION_NODE_CONFIG}
        nodes[i]["site-name"] = site
        if site == querier:
            nodes[i] |= {"output-dir": str(tmp_path / "answers"), **extra}
    return InProcessGrid(4, node_configs=nodes)


def iris_knn(out: Path, **settings: object) -> JobConfig:
    return JobConfig.of(
        **{"task": "knn", "dataset": "iris", "parties": 3, "min_parties": 2, "out": str(out),
           "plaintext_twin": False, "queries": QUERIES} | settings,
    )  # fmt: skip


def answers_csv(folder: Path, name: str) -> pd.DataFrame:
    (path,) = folder.glob(f"*/{name}.csv")
    return pd.read_csv(path)


def test_sites_are_numbered_and_named_by_site_name_and_the_querier_asks_from_its_file(
    tmp_path,
):
    query_file = write_queries(tmp_path / "site-b" / "queries.csv", "iris")
    grid = sited_grid(
        tmp_path, "hospital-b", **{"query-path": str(query_file), "report-metrics": True}
    )
    result = json.loads(run_job(grid, iris_knn(tmp_path / "out", querier="hospital-b")).read_text())
    assert result["parties"]["names"] == {
        "party-0": "hospital-a",
        "party-1": "hospital-b",
        "party-2": "hospital-c",
    }
    assert result["knn"]["querier"] == "hospital-b" and result["knn"]["queries"] == QUERIES
    assert result["encrypted"]["accuracy"] > 0.6  # counts from its own labels (it opted in)
    # the same job simulated, its querier by index: party-1, the test split's first rows
    simulated = InProcessGrid(4)
    run_job(simulated, iris_knn(tmp_path / "sim", querier=1))
    expected = kept_answers(simulated, "predictions", encrypted=True, node=1001)
    answers = answers_csv(tmp_path / "answers", "predictions")  # node 2: hospital-b
    np.testing.assert_array_equal(answers["query"], np.arange(QUERIES))
    np.testing.assert_array_equal(answers["prediction"], expected)
    out = (tmp_path / "out").rglob("*")
    assert not any("predictions" in p.name for p in out)


def test_a_querier_without_labels_keeps_its_predictions_and_reports_none(tmp_path):
    query_file = write_queries(tmp_path / "q.csv", "iris", with_target=False)
    grid = sited_grid(
        tmp_path, "hospital-c", **{"query-path": str(query_file), "report-metrics": True}
    )
    result = json.loads(run_job(grid, iris_knn(tmp_path / "out", querier="hospital-c")).read_text())
    assert "accuracy" not in result["encrypted"]
    assert len(answers_csv(tmp_path / "answers", "predictions")) == QUERIES


def test_an_unknown_querier_name_is_refused_naming_the_sites(tmp_path):
    grid = sited_grid(tmp_path, "hospital-a")
    with pytest.raises(ConfigError, match=r"'hospital-z'.*\['hospital-a', 'hospital-b'"):
        run_job(grid, iris_knn(tmp_path / "out", querier="hospital-z"))


def test_two_nodes_with_one_site_name_are_refused(tmp_path):
    grid = sited_grid(tmp_path, "")
    grid.contexts[1001].node_config["site-name"] = "hospital-c"
    with pytest.raises(ProtocolError, match="both say they are site 'hospital-c'"):
        run_job(grid, iris_knn(tmp_path / "out"))


def test_the_querier_setting_takes_an_index_or_a_name():
    assert JobConfig.of(task="knn", querier="2", parties=3).inference.querier == 2
    assert JobConfig.of(task="knn", querier="hospital-b").inference.querier == "hospital-b"
    with pytest.raises(ConfigError, match=r"party index 0\.\.2"):
        JobConfig.of(task="mlp", querier=3, parties=3)
    with pytest.raises(ConfigError, match="party index ≥ 0 or a site name"):
        JobConfig.of(task="knn", querier=" b")


def test_a_deployed_querier_without_a_query_file_is_refused_naming_the_setting(tmp_path):
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"role": "party", "data-path": str(tmp_path / "site.csv")},
        state=RecordDict(),
        run_config={},
    )
    with pytest.raises(ProtocolError, match=r"names no query-path.*--query-path FILE"):
        party._queries(DataSource("iris"), context)


def test_a_query_file_is_read_by_column_name_with_or_without_its_target(tmp_path):
    source = DataSource("iris")
    _, test = load_builtin("iris")
    labelled = load_queries(source, write_queries(tmp_path / "a.csv", "iris"))
    bare = load_queries(source, write_queries(tmp_path / "b.csv", "iris", with_target=False))
    np.testing.assert_array_equal(labelled.X, test.X[:QUERIES])
    np.testing.assert_array_equal(bare.X, test.X[:QUERIES])
    np.testing.assert_array_equal(labelled.y, test.y[:QUERIES])
    assert bare.y is None
    (tmp_path / "c.csv").write_text("sepal length (cm),petal width (cm)\n1,2\n")
    with pytest.raises(DataError, match="missing columns"):
        load_queries(source, tmp_path / "c.csv")


def tiny_mlp(out: Path, **settings: object) -> JobConfig:
    return JobConfig.of(
        **{"task": "mlp", "dataset": "iris", "parties": 3, "min_parties": 2, "out": str(out),
           "plaintext_twin": False, "rounds": 1, "hidden": "8", "queries": QUERIES,
           "single_queries": 1} | settings,
    )  # fmt: skip


def test_an_mlp_querier_infers_on_its_own_rows_and_keeps_the_logits(tmp_path):
    query_file = write_queries(tmp_path / "q.csv", "iris")
    grid = sited_grid(
        tmp_path, "hospital-a", **{"query-path": str(query_file), "report-metrics": True}
    )
    result = json.loads(run_job(grid, tiny_mlp(tmp_path / "out", querier="hospital-a")).read_text())
    assert result["inference"]["querier"] == "hospital-a"
    assert result["inference"]["batched"]["samples"] == QUERIES
    assert result["inference"]["prediction_agreement"] == 1.0
    simulated = InProcessGrid(4)
    run_job(simulated, tiny_mlp(tmp_path / "sim", querier=0))
    expected = kept_answers(simulated, "logits-batched", encrypted=True, node=1000)
    batched = answers_csv(tmp_path / "answers", "logits-batched")
    logits = batched[[f"logit-{j}" for j in range(3)]].to_numpy()
    np.testing.assert_allclose(logits, expected, atol=0.05)
    np.testing.assert_array_equal(batched["prediction"], np.argmax(expected, axis=1))
    assert len(answers_csv(tmp_path / "answers", "logits-single")) == 1


# -- every job on a real deployment ----------------------------------------------------------------

DEPLOYED_QUERIER = "hospital-b"  # party-1: the sites are numbered in the order of their names
MEASURED: dict[str, dict[str, float]] = {}  # job → wall time and round trips, printed at the end


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """SuperLink, key holder and 3 hospitals over TLS with SuperNode authentication, each
    hospital with its own output folder; hospital-b also with its own queries (the first iris
    test rows, labelled) and report-metrics."""
    from fedhe import deploy
    from fedhe.approval import approval_line, bundle_files
    from fedhe.deploy_cli import register
    from tests.test_deploy import REPO, Deployment, _free_port
    from tests.test_deploy_kit import site_start

    folder = tmp_path_factory.mktemp("jobs-federation")
    running = Deployment(folder / "fed")
    running.outputs = {}
    # The bundle of this tree as it is now, approved and run: the tree may change meanwhile.
    running.app = bundle_files(REPO, folder / "app")
    running.approved.write_text(approval_line(running.app) + "\n")
    try:
        running.start("superlink", deploy.superlink_command(running.federation))
        assert register(running.federation, running.env, timeout_s=90) == 0
        running.start_site("keyholder", data_path=str(folder / "keyholder-data"))
        for name in ("hospital-a", "hospital-b", "hospital-c"):
            command, env = site_start(
                running.kits[name], port=_free_port(), approved=str(running.approved)
            )
            running.outputs[name] = running.kits[name].folder / "answers"
            env["FEDHE_OUTPUT_DIR"] = str(running.outputs[name])
            if name == DEPLOYED_QUERIER:
                queries = write_queries(running.kits[name].folder / "queries.csv", "iris")
                env |= {"FEDHE_QUERY_PATH": str(queries), "FEDHE_REPORT_METRICS": "1"}
            running.start(name, command, env)
        yield running
    finally:
        running.stop_all()
        for job, figures in MEASURED.items():
            print(f"deployed {job}: {figures['wall_s']:.0f} s wall, {figures['round_trips']} "
                  "round trips")  # fmt: skip


def run_deployed(sites, out: Path, settings: str, timeout_s: float = 420) -> dict:
    """`fedhe deploy run` of the fixture's bundle (`Deployment.run`, with the app snapshot)."""
    import subprocess

    from fedhe import deploy

    command = deploy.run_command(sites.app, f"{settings} timeout-s=120 out='{out}'")
    with (sites.logs / f"run-{out.parent.name}.log").open("wb") as log:
        subprocess.run(command, env=sites.env, stdout=log, stderr=subprocess.STDOUT,
                       timeout=timeout_s, check=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not (out / "result.json").exists():  # the ServerApp may finish after the stream
        if time.monotonic() > deadline:
            pytest.fail(f"no result.json; logs in {sites.logs}")
        time.sleep(1)
    return json.loads((out / "result.json").read_text())


def deployed_and_simulated(sites, tmp_path, job: str, *, querier: str = "", **settings: object):
    """The job of `settings` (JobConfig's, over 3 parties) in process and on the deployment,
    with every setting the same (a setting left out takes the task's default in process but
    pyproject's on the deployment), `querier` by its site name there and by its index here:
    both result.json, and the in-process grid (its querier's kept answers)."""
    names = ("hospital-a", "hospital-b", "hospital-c")
    config = JobConfig.of(
        parties=3, min_parties=2, plaintext_twin=False, out=str(tmp_path / "sim"),
        **settings | ({"querier": names.index(querier)} if querier else {}),
    )  # fmt: skip
    run_config = config.to_run_config() | ({"querier": querier} if querier else {})
    started = time.monotonic()
    deployed = run_deployed(sites, tmp_path / "deployed", _settings_line(run_config))
    MEASURED[job] = {"wall_s": time.monotonic() - started, "round_trips": deployed["round_trips"]}
    grid = InProcessGrid(config.num_nodes)
    run_job(grid, config)
    expected = json.loads((tmp_path / "sim" / "result.json").read_text())
    assert deployed["parties"]["names"] == {f"party-{i}": name for i, name in enumerate(names)}
    assert deployed["parties"]["excluded"] == {}
    return deployed, expected, grid


def _settings_line(run_config: dict[str, object]) -> str:
    """`key=value …` for `fedhe deploy run --run-config` (where the run's folder and timeout
    are set by `run_deployed`, and the plaintext twin is always off)."""
    line = []
    for key, value in run_config.items():
        if key in ("out", "timeout-s", "plaintext-twin", "message-window"):
            continue
        if isinstance(value, bool):
            line.append(f"{key}={str(value).lower()}")
        elif isinstance(value, str):
            line.append(f"{key}='{value}'")
        else:
            line.append(f"{key}={value}")
    return " ".join(line)


def assert_answers_stayed_at_the_site(out: Path, answers: Path, kind: str) -> None:
    """The querier's answers are at its site only: no file of the aggregator's run folder is
    an answers file of `kind` ("predictions": KNN's; "logits": MLP's, whose run folder has
    predictions.csv, the aggregator's own model on its own test set), or holds its values."""
    table = pd.read_csv(answers)
    values = [repr(float(v)) for v in table.drop(columns="query").to_numpy().ravel()]
    for path in (p for p in out.rglob("*") if p.is_file()):
        assert not path.name.startswith(kind) and path.read_bytes() != answers.read_bytes(), path
        if path.suffix in (".json", ".jsonl", ".csv"):
            text = path.read_text()
            leaked = [v for v in values if len(v) > 6 and v in text]  # long enough to be one
            assert not leaked, (path, leaked)


@pytest.mark.slow
@pytest.mark.deployment
def test_deployed_aggregate_trains_as_the_simulation(sites, tmp_path):
    deployed, expected, _ = deployed_and_simulated(
        sites, tmp_path, "aggregate", task="aggregate", rounds=1
    )
    assert deployed["encrypted"]["accuracy"] == pytest.approx(
        expected["encrypted"]["accuracy"], abs=1e-9
    )


@pytest.mark.slow
@pytest.mark.deployment
@pytest.mark.parametrize("task", ["linreg", "logreg"])
def test_deployed_gradient_regression_fits_as_the_simulation(sites, tmp_path, task):
    deployed, expected, _ = deployed_and_simulated(
        sites, tmp_path, f"{task} gradient", task=task, mode="gradient", rounds=2
    )
    np.testing.assert_allclose(
        deployed["coefficients"]["encrypted"], expected["coefficients"]["encrypted"], atol=1e-4
    )


@pytest.mark.slow
@pytest.mark.deployment
def test_deployed_encrypted_model_linreg_leaves_the_model_at_every_site(sites, tmp_path):
    deployed, _, grid = deployed_and_simulated(
        sites, tmp_path, "linreg encrypted-model", task="linreg", mode="encrypted-model", rounds=2
    )
    assert sorted(deployed["model_released_to"]) == ["party-0", "party-1", "party-2"]
    simulated = _kept_model(grid)
    for name, folder in sites.outputs.items():
        kept = np.load(newest(folder, "linreg-*/model.npy"))
        np.testing.assert_allclose(kept, simulated, atol=1e-4, err_msg=name)


def newest(folder: Path, pattern: str) -> Path:
    """The file of the latest job matching `pattern` (the module's jobs share the sites)."""
    found = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    assert found, f"no {pattern} under {folder}"
    return found[-1]


def _kept_model(grid: InProcessGrid) -> np.ndarray:
    from fedhe import protocol

    for key, record in grid.contexts[1000].state.items():
        if key.startswith("fedhe.output.") and key.endswith(".model"):
            return protocol.array_from_bytes(bytes(record["values"]))
    raise AssertionError("the simulated party kept no model")


@pytest.mark.slow
@pytest.mark.deployment
@pytest.mark.parametrize("query", ["plain", "encrypted"])
def test_deployed_knn_answers_at_the_querier_site(sites, tmp_path, query):
    deployed, expected, grid = deployed_and_simulated(
        sites, tmp_path, f"knn {query}", querier=DEPLOYED_QUERIER,
        task="knn", dataset="iris", query=query, queries=4,
    )  # fmt: skip
    assert deployed["knn"]["querier"] == DEPLOYED_QUERIER
    assert deployed["encrypted"]["accuracy"] == expected["encrypted"]["accuracy"]  # its counts
    folder = sites.outputs[DEPLOYED_QUERIER]
    path = newest(folder, "knn-*/predictions.csv")
    answers = pd.read_csv(path)
    simulated = kept_answers(grid, "predictions", encrypted=True, node=1001)
    np.testing.assert_array_equal(answers["prediction"], simulated)
    assert_answers_stayed_at_the_site(tmp_path / "deployed", path, "predictions")


@pytest.mark.slow
@pytest.mark.deployment
def test_deployed_mlp_trains_and_infers_at_the_querier_site(sites, tmp_path):
    deployed, _, grid = deployed_and_simulated(
        sites, tmp_path, "mlp", querier=DEPLOYED_QUERIER,
        task="mlp", dataset="iris", rounds=1, hidden="8", queries=QUERIES, single_queries=1,
    )  # fmt: skip
    inference = deployed["inference"]
    assert inference["querier"] == DEPLOYED_QUERIER and inference["batched"]["samples"] == QUERIES
    assert inference["prediction_agreement"] == 1.0
    folder = sites.outputs[DEPLOYED_QUERIER]
    path = newest(folder, "mlp-*/logits-batched.csv")
    batched = pd.read_csv(path)
    simulated = kept_answers(grid, "logits-batched", encrypted=True, node=1001)
    logits = batched[[f"logit-{j}" for j in range(simulated.shape[1])]].to_numpy()
    np.testing.assert_allclose(logits, simulated, atol=0.05)
    np.testing.assert_array_equal(batched["prediction"], np.argmax(simulated, axis=1))
    assert len(pd.read_csv(newest(folder, "mlp-*/logits-single.csv"))) == 1
    assert_answers_stayed_at_the_site(tmp_path / "deployed", path, "logits")


def test_a_bad_cell_in_the_query_file_stays_at_the_site(tmp_path):
    """The querier's refusal names no cell, line or column of its query file (its log does)."""
    query_file = write_queries(tmp_path / "q.csv", "iris")
    rows = query_file.read_text().splitlines()
    rows[3] = "PATIENT-0042" + rows[3][rows[3].index(",") :]
    query_file.write_text("\n".join(rows) + "\n")
    grid = sited_grid(tmp_path, "hospital-b", **{"query-path": str(query_file)})
    with pytest.raises(ProtocolError, match="hospital-b is not among the parties left") as err:
        run_job(grid, iris_knn(tmp_path / "out", querier="hospital-b"))
    received = "".join(
        repr(m.content) if m.has_content() else repr(m.error)
        for direction, m in grid.log
        if direction == "received"
    )
    for leaked in ("PATIENT-0042", "line 4", str(query_file)):
        assert leaked not in received and leaked not in str(err.value)
    assert "stays at the site" in received and "left out at setup" in str(err.value)
