"""The ServerApp: discover roles, run the job encrypted and (optionally) in the clear, report.

`flwr run .` loads `app` (settings from the run_config in pyproject.toml); the `fedhe` CLI
builds one with `build_server_app(config)`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedhe.aggregator.checkpoint import Checkpoint, checkpoint_path
from fedhe.aggregator.export import export_model
from fedhe.aggregator.fedavg import FedAvgJob
from fedhe.aggregator.job import Job, JobRun, party_names
from fedhe.aggregator.knn import KNNJob
from fedhe.aggregator.mlp import MLPJob
from fedhe.aggregator.plots import accuracy_per_round
from fedhe.aggregator.regression import RegressionJob
from fedhe.aggregator.report import build_result, write_run
from fedhe.aggregator.roles import discover, wait_for_nodes
from fedhe.aggregator.session import Session, quicken_reply_pulls
from fedhe.aggregator.shape import survey_sites
from fedhe.config import JobConfig
from fedhe.data.sources import (
    DataSource,
    coordinator_test_file,
    count_party_files,
    csv_classes,
    pin_columns,
    site_data_only,
    test_data,
    with_columns,
)
from fedhe.errors import DataError

log = logging.getLogger("fedhe.aggregator")


def run_job(grid: Grid, config: JobConfig, *, window: int | None = None) -> Path:
    """Run `config`'s job on the nodes of `grid`; write result.json and audit.jsonl. `window`:
    messages in flight per exchange (None: the config's message-window; see Session)."""
    window = window or config.message_window or None
    session = Session(grid, config.timeout_s, window)
    nodes = wait_for_nodes(session, config.num_nodes, timeout_s=min(config.timeout_s, 120))
    federation = discover(
        session,
        nodes,
        keyholder_partition_id=config.keyholder_node,
        min_parties=config.min_parties,
        keyholders=config.keyholder_count,
        parties_hold_keys=config.parties_hold_keys,
    )
    source = _data_source(config, len(federation.parties))
    test = test_data(source) if coordinator_test_file(source) else None
    survey = None
    if test is None and site_data_only(source):  # the shape comes from the sites themselves
        names = party_names(source, list(federation.parties), federation.sites)
        survey = survey_sites(
            session, federation.parties, source, f"{config.task}-{grid.run.run_id}", names
        )
        source, test = survey.source, survey.shape
    if test is None:
        raise DataError(f"{config.data_dir} has no test.csv to evaluate the model on.")
    runs: list[JobRun] = []
    for encrypted in (True, False) if config.plaintext_twin else (True,):
        job_id = _job_id(config, grid.run.run_id, encrypted)
        job_class = _JOBS.get(config.task, RegressionJob)
        job = job_class(
            Session(grid, config.timeout_s, window),
            federation,
            config,
            source,
            test,
            encrypted=encrypted,
            job_id=job_id,
        )
        if survey is not None:
            job.adopt_survey(survey.excluded, survey.round_trips if encrypted else 0)
        runs.append(job.execute())
    he, twin = runs[0], (runs[1] if len(runs) > 1 else None)
    result = build_result(config, he, twin, test.feature_names)
    result["model"] = export_model(config, he, source, test)
    path = write_run(config.out, result, he.audit)
    if config.task in ("aggregate", "mlp"):
        accuracy_per_round(result, path.parent / "accuracy.png")
    log.info("result written to %s", path)
    return path


def _job_id(config: JobConfig, run_id: int, encrypted: bool) -> str:
    """A fresh id per run, or the interrupted job's own id when resuming (the key holder then
    recognizes it: same keys, budget already spent)."""
    if config.resume:
        checkpoint = Checkpoint.load(checkpoint_path(config.out, encrypted))
        if checkpoint is not None:
            log.info("resuming %s after round %d", checkpoint.job_id, checkpoint.round)
            return checkpoint.job_id
    return f"{config.task}-{run_id}-{'he' if encrypted else 'plain'}"


_JOBS: dict[str, type[Job]] = {"aggregate": FedAvgJob, "knn": KNNJob, "mlp": MLPJob}


def _data_source(config: JobConfig, n_parties: int) -> DataSource:
    source = DataSource(
        config.dataset_name,
        config.data_dir,
        config.target,
        config.seed,
        n_parties,
        alpha=config.alpha,
    )
    if not source.from_csv:
        return source
    source = with_columns(source, config.schema, config.impute)  # schema.json, --impute
    files = count_party_files(source)
    if files != config.parties:
        raise DataError(
            f"{config.data_dir} holds {files} party files but the job has {config.parties} "
            "parties: pass --parties to match, one party-<N>.csv per party."
        )
    if not coordinator_test_file(source):  # the sites' survey sets the classes (or the task)
        kind = {"linreg": "regression", "knn": ""}.get(config.task, "classification")
        return replace(source, kind=kind)
    if site_data_only(source):  # the sites check their files against test.csv's header
        source = pin_columns(source)
    if config.task == "knn":
        test = test_data(source)  # a KNN job on CSV files takes the task its target suggests
        if test is not None and test.task == "regression":
            return replace(source, kind="regression")
    if config.task == "linreg":
        return replace(source, kind="regression")
    return replace(source, kind="classification", classes=csv_classes(source))


def build_server_app(config: JobConfig | None = None, *, window: int | None = None) -> ServerApp:
    """A ServerApp running `config`, or the run_config Flower passes when `config` is None;
    `window` as in `run_job`."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        quicken_reply_pulls(grid)
        run_job(grid, config or JobConfig.from_run_config(context.run_config), window=window)

    return server_app


app = build_server_app()
