"""Every party keeps the final model at its site; evaluation happens at a site that opts in.

A deployment's coordinator holds no data file: its data folder is empty, the job's shape
comes from the sites' own headers (`aggregator.shape`), and the metrics come from the site
whose node config names a `test-path` and says `report-metrics` (`fedhe.site_model`).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, r2_score

from fedhe import load_model, protocol
from fedhe.aggregator.app import run_job
from fedhe.config import JobConfig
from tests.inprocess import InProcessGrid

N_SITES = 3


def _sites(tmp_path, kind: str, rename: dict[int, str] | None = None):
    """Three hospitals' files, a held-out test file at hospital-0, and an empty coordinator
    folder. `rename`: a site whose file names one column differently."""
    from sklearn.datasets import load_breast_cancer, load_diabetes

    loader = load_diabetes if kind == "regression" else load_breast_cancer
    data = loader(as_frame=True).frame.sample(frac=1.0, random_state=0)
    data.columns = [c.replace(" ", "_") for c in data.columns]
    sites = tmp_path / "sites"
    sites.mkdir()
    test, train = data.iloc[:80], data.iloc[80:]
    bounds = np.linspace(0, len(train), N_SITES + 1).astype(int)
    for i in range(N_SITES):
        part = train.iloc[bounds[i] : bounds[i + 1]]
        if rename and i in rename:
            part = part.rename(columns={part.columns[0]: rename[i]})
        part.to_csv(sites / f"hospital-{i}.csv", index=False)
    test.to_csv(sites / "hospital-0-test.csv", index=False)
    coordinator = tmp_path / "coordinator"
    coordinator.mkdir()
    return sites, coordinator, test


def _node_configs(sites, tmp_path, *, evaluating: bool = True):
    configs = {}
    for i in range(N_SITES):
        config = {
            "partition-id": i,
            "num-partitions": N_SITES + 1,
            "site-name": f"hospital-{i}",
            "data-path": str(sites / f"hospital-{i}.csv"),
            "output-dir": str(tmp_path / f"out-{i}"),
        }
        if i == 0 and evaluating:
            config |= {"test-path": str(sites / "hospital-0-test.csv"), "report-metrics": True}
        configs[i] = config
    return configs


def _config(coordinator, tmp_path, **settings) -> JobConfig:
    return JobConfig.of(
        parties=N_SITES,
        min_parties=2,
        data_dir=str(coordinator),
        target="target",
        plaintext_twin=False,
        out=str(tmp_path / "run"),
        **settings,
    )


def _site_model_dir(tmp_path, site: int, result: dict):
    folders = list((tmp_path / f"out-{site}").iterdir())
    assert len(folders) == 1, folders  # one job, one folder
    assert folders[0].name.startswith(result["task"])
    return folders[0]


@pytest.mark.parametrize(
    ("settings", "kind"),
    [
        ({"task": "linreg", "mode": "exact"}, "regression"),
        ({"task": "aggregate", "rounds": 2}, "classification"),
    ],
    ids=["linreg-exact", "aggregate"],
)
def test_every_site_keeps_the_model_and_the_opted_in_site_evaluates(tmp_path, settings, kind):
    sites, coordinator, test = _sites(tmp_path, kind)
    config = _config(coordinator, tmp_path, **settings)
    grid = InProcessGrid(N_SITES + 1, node_configs=_node_configs(sites, tmp_path))
    result_path = run_job(grid, config)
    result = json.loads(result_path.read_text())
    assert not any(coordinator.iterdir())  # the coordinator never held a data file
    X = test.drop(columns="target")
    central = load_model(tmp_path / "run")
    for site in range(N_SITES):
        at_site = load_model(_site_model_dir(tmp_path, site, result))
        np.testing.assert_array_equal(at_site.predict(X), central.predict(X))
    # The metrics are the opted-in site's, and equal to scoring the model on its file.
    assert result["evaluation"]["by"] == "hospital-0"
    assert result["evaluation"]["test_rows"] == len(test)
    if kind == "regression":
        expected = r2_score(test["target"], central.predict(X))
        assert result["encrypted"]["r2"] == pytest.approx(expected, abs=1e-9)
    else:
        expected = accuracy_score(test["target"], central.predict(X))
        assert result["encrypted"]["accuracy"] == pytest.approx(expected, abs=1e-12)
    # Neither the test rows nor predictions on them reach the coordinator's result.
    assert not (tmp_path / "run" / "predictions.csv").exists()
    text = result_path.read_text()
    for value in test.iloc[:5, 0]:
        assert repr(float(value)) not in text
    replies = [m for direction, m in grid.log if direction == "received" and m.has_content()]
    model_replies = [
        protocol.metrics_of(m.content)
        for m in replies
        if m.metadata.message_type == protocol.FINAL_MODEL
    ]
    assert len(model_replies) == N_SITES
    assert all(set(r) <= {"n-test", "accuracy", "loss", "mse", "r2"} for r in model_replies)


def test_a_site_with_a_different_header_is_left_out_by_name(tmp_path):
    sites, coordinator, _ = _sites(tmp_path, "regression", rename={2: "AGE"})
    config = _config(coordinator, tmp_path, task="linreg", mode="exact")
    grid = InProcessGrid(N_SITES + 1, node_configs=_node_configs(sites, tmp_path))
    result = json.loads(run_job(grid, config).read_text())
    reason = result["parties"]["excluded"]["hospital-2"]
    assert "header differs" in reason and "'AGE'" in reason and "'age'" in reason
    assert result["evaluation"]["by"] == "hospital-0"
    assert not (tmp_path / "out-2").exists()  # it took no part: no model reached it
    assert result["model_sent_to"] == ["hospital-0", "hospital-1"]


def test_without_a_test_site_the_job_runs_and_says_so(tmp_path):
    sites, coordinator, test = _sites(tmp_path, "classification")
    config = _config(coordinator, tmp_path, task="logreg", rounds=3)
    node_configs = _node_configs(sites, tmp_path, evaluating=False)
    result = json.loads(
        run_job(InProcessGrid(N_SITES + 1, node_configs=node_configs), config).read_text()
    )
    assert result["evaluation"]["note"] == "no evaluation (no site opted in with test-path)"
    assert "accuracy" not in result["encrypted"]
    model = load_model(_site_model_dir(tmp_path, 1, result))
    assert model.classes_.tolist() == [0, 1]
    assert model.predict(test.drop(columns="target")).shape == (len(test),)


def test_encrypted_model_mode_sends_the_model_with_its_release(tmp_path):
    """The sealed model's release carries model.json's description: no extra round trip, and
    the sites evaluate a model the aggregator never sees."""
    sites, coordinator, test = _sites(tmp_path, "regression")
    config = _config(coordinator, tmp_path, task="linreg", mode="encrypted-model", rounds=3)
    grid = InProcessGrid(N_SITES + 1, node_configs=_node_configs(sites, tmp_path))
    result = json.loads(run_job(grid, config).read_text())
    assert result["model"]["json"] is None  # none of the sites shares it
    sent = [m.metadata.message_type for direction, m in grid.log if direction == "sent"]
    assert protocol.FINAL_MODEL not in sent
    X = test.drop(columns="target")
    model = load_model(_site_model_dir(tmp_path, 0, result))
    expected = r2_score(test["target"], model.predict(X))
    assert result["encrypted"]["r2"] == pytest.approx(expected, abs=1e-9)
    for site in (1, 2):
        other = load_model(_site_model_dir(tmp_path, site, result))
        np.testing.assert_allclose(other.predict(X), model.predict(X), rtol=1e-6)


def test_header_survey_reports_schema_facts_only(tmp_path):
    """The shape reply holds the header, feature names, task and label values: no row."""
    sites, coordinator, _ = _sites(tmp_path, "classification")
    config = _config(coordinator, tmp_path, task="logreg", rounds=1)
    grid = InProcessGrid(N_SITES + 1, node_configs=_node_configs(sites, tmp_path))
    run_job(grid, config)
    shape_replies = [
        m
        for direction, m in grid.log
        if direction == "received" and m.metadata.message_type == protocol.SHAPE
    ]
    assert len(shape_replies) == N_SITES
    frame = pd.read_csv(sites / "hospital-1.csv")
    for reply in shape_replies:
        info = protocol.config_of(reply.content)
        assert info["columns"] == list(frame.columns)
        assert info["labels"] == [0.0, 1.0]
        assert not protocol.payload_of(reply.content)


def test_deploy_site_passes_its_test_path_in_its_node_config(tmp_path):
    from fedhe import deploy
    from tests.test_deploy_kit import set_up_site

    sites = {"hospital-a": "party", "hospital-b": "party", "keyholder": "keyholder"}
    federation = deploy.init_federation(tmp_path / "fed", sites)
    site = set_up_site(federation, "hospital-a")
    approved = str(tmp_path / "approved.txt")
    command = deploy.site_command(
        site,
        "hospital-a",
        port=9100,
        approved=approved,
        test_path="/srv/a/test.csv",
        report_metrics=True,
    )
    node_config = command[command.index("--node-config") + 1]
    assert 'test-path="/srv/a/test.csv"' in node_config and "report-metrics=true" in node_config
    without = deploy.site_command(site, "hospital-a", port=9100, approved=approved)
    assert "test-path" not in without[without.index("--node-config") + 1]


def test_a_final_model_under_a_crafted_job_id_is_not_written_outside_the_output_folder(tmp_path):
    """Attack: the aggregator names the job `../..` so that model.json lands outside the
    site's output folder (over a file of the site's). The site refuses such a job id."""
    from flwr.app import Message

    from fedhe.data.sources import DataSource
    from tests.inprocess import assign_roles

    out = tmp_path / "site" / "out"
    node = {"partition-id": 0, "num-partitions": 2, "allow-plaintext": True, "output-dir": str(out)}
    grid = InProcessGrid(2, node_configs={0: node})
    assign_roles(grid, keyholder=1)
    source = DataSource("breast_cancer", "", "", 0, 1)
    job_id = "../.."

    def message(kind, config):
        content = protocol.content(kind, protocol.REQUEST, config={"job-id": job_id, **config})
        return Message(content, dst_node_id=1000, message_type=kind)

    setup = {"source": source.to_dict(), "party-index": 0, "n-parties": 1}
    (reply,) = grid.send_and_receive([message(protocol.SETUP, setup)])
    assert reply.has_error() and "not a plain name" in reply.error.reason  # refused at setup
    spec = {"format": "fedhe-model/1", "kind": "linear", "standardizer": None}
    (reply,) = grid.send_and_receive([message(protocol.FINAL_MODEL, {"model": spec})])
    assert reply.has_error()  # no job of that name was ever set up here
    assert not list(tmp_path.rglob("model.json"))


def test_the_survey_does_not_list_a_column_that_is_not_class_labels(tmp_path):
    """Attack (review of issue 16): the aggregator names the target and the task, so it could
    ask a site for "the labels" of any column and read off its distinct values. A column that
    does not look like class labels (whole numbers, few) is refused instead of listed."""
    from fedhe.data.sources import MAX_SURVEY_LABELS, DataSource, site_shape
    from fedhe.errors import DataError

    sites, _, _ = _sites(tmp_path, "classification")
    path = sites / "hospital-1.csv"
    frame = pd.read_csv(path)
    measured = next(c for c in frame.columns if frame[c].nunique() > MAX_SURVEY_LABELS)
    source = DataSource(data_dir=str(tmp_path), target=measured, kind="classification")
    with pytest.raises(DataError, match="does not look like class labels"):
        site_shape(source, str(path))
