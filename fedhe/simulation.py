"""Flower's simulation engine running one job: the parties, the key holder(s) and the aggregator
as simulated SuperNodes and a ServerApp on this machine."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from fedhe.config import ConfigError, JobConfig
from fedhe.errors import FedHEError

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

__all__ = ["simulate", "simulation_client_app"]


def simulate(config: JobConfig, workers: int | None = None) -> Path:
    """Run `config` in Flower's simulation engine: `parties` SuperNodes plus the key holder,
    on `workers` Ray actors (default: one per CPU core, at most one per node)."""
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be ≥ 1, got {workers}.")
    from fedhe.data.checks import check_job_data

    check_job_data(config)  # every data problem at once, before Ray or Flower start
    workers = workers or min(os.cpu_count() or 1, config.num_nodes)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation

    from fedhe import knn_predict
    from fedhe.aggregator.app import build_server_app
    from fedhe.aggregator.session import SIMULATION_WINDOW
    from fedhe.clients.keyholder import STATE_ROOT_ENV

    kept = knn_predict.keeps_state(config)  # --keep-store: keys kept for `fedhe predict`
    # The simulated key holder's secret keys live in a folder that is gone after the run.
    with tempfile.TemporaryDirectory(prefix="fedhe-sim-") as state_root:
        if kept:
            state_root = str(knn_predict.keyholder_root(config.out))
        previous = os.environ.get(STATE_ROOT_ENV)
        os.environ[STATE_ROOT_ENV] = state_root
        try:
            run_simulation(
                server_app=build_server_app(config, window=SIMULATION_WINDOW),
                client_app=simulation_client_app(config.out if kept else None),
                num_supernodes=config.num_nodes,
                backend_config={
                    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                    "init_args": {
                        "num_cpus": max(1, workers),
                        "include_dashboard": False,
                    },
                },
            )
        finally:
            if previous is None:
                os.environ.pop(STATE_ROOT_ENV, None)
            else:
                os.environ[STATE_ROOT_ENV] = previous
    if kept:
        knn_predict.keep_only_the_querier(config.out)
    result = Path(config.out) / "result.json"
    if not result.exists():
        raise FedHEError(f"the simulation ended without writing {result}; see the log above.")
    return result


def simulation_client_app(kept_out: str | None = None) -> ClientApp:
    """fedhe's ClientApp on simulated nodes: each node's config gets `allow-plaintext`, so its
    parties may run the plaintext twin (Flower's simulation engine sets no node config of its
    own; a deployed site never has it). `kept_out`: each node keeps its identity there
    (`--keep-store`, fedhe.knn_predict)."""
    from fedhe.clients.app import app
    from fedhe.clients.roles import SIMULATION_NODE_CONFIG, WithNodeConfig

    wrapped = WithNodeConfig(app, SIMULATION_NODE_CONFIG)
    if kept_out is None:
        return wrapped
    from fedhe.knn_predict import WithKeptIdentities

    return WithKeptIdentities(wrapped, kept_out)
