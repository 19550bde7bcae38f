"""Flower's simulation engine running one job: the parties, the key holder(s) and the aggregator
as simulated SuperNodes and a ServerApp on this machine.

Which Flower entry point, and why. `flwr.simulation.run_simulation` is deprecated in Flower 1.42
(it logs DEPRECATED twice). Its supported replacement, `flwr run` against a local SuperLink with
`--simulation`, starts that SuperLink, which starts a `flwr-simulation` process, which loads the
app from a FAB and calls `flwr.simulation.run_simulation._run_simulation` — the simulation
runtime itself. fedhe calls that same runtime function directly: the path Flower's own runtime
takes, minus a SuperLink process, a FAB round trip and a second Python start (seconds each),
and with the app objects at hand (`flwr run` could not hand the simulated nodes their
`allow-plaintext` node config, so it runs no plaintext twin). It is a private name: flwr is held
to 1.42.x in pyproject, and `tests/test_quiet.py` runs it end to end.

Start-up. Most of a small job's wall time is start-up: Python imports torch, scikit-learn,
TenSEAL and Flower (~4 s in this process, the same again in every Ray actor), Ray starts
(~5 s), and exiting Python collects its millions of objects (~1.5 s). The apps handed to the
runtime load on first use (`fedhe.simulation_apps`): the ServerApp imports in the runtime's
thread for it while the main thread starts Ray and the actors; this process never imports the
ClientApp; each actor imports it and warms torch's training up on the first message, node
discovery, before any job's clock starts. The demo (`fedhe simulate aggregate --parties 5
--rounds 3`, 2 cores) went from ~33 s to ~22 s wall this way.

Output. Without `verbose`, Flower logs errors only, without colours, Ray forwards no actor
output (a node's refusal reaches the aggregator as its error reply, which the aggregator logs)
and its FutureWarning about accelerator variables is muted; with `verbose`, both speak. A
fedhe error in the ServerApp comes out as itself (Flower's runtime may wrap it); any other
failure becomes one FedHEError that says to run with -v. `engine` in result.json holds the
measured wall time and what the runs took of it (`wall_time_line`).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedhe.config import ConfigError, JobConfig
from fedhe.errors import FedHEError

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

__all__ = ["simulate", "simulation_client_app", "wall_time_line"]


def simulate(config: JobConfig, workers: int | None = None, *, verbose: bool = False) -> Path:
    """Run `config` in Flower's simulation engine: `parties` SuperNodes plus the key holder,
    on `workers` Ray actors (default: one per CPU core, at most one per node). `verbose`: let
    Flower and Ray log (otherwise only errors, and fedhe's own lines). Returns result.json."""
    started = time.perf_counter()
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be ≥ 1, got {workers}.")
    if config.data_dir:  # built-in datasets need no check (and no pandas import here)
        from fedhe.data.checks import check_job_data

        check_job_data(config)  # every data problem at once, before Ray or Flower start
    workers = workers or min(os.cpu_count() or 1, config.num_nodes)
    # At exit, Python's last collection walks the millions of objects torch, Flower and
    # scikit-learn made (~1.5 s of a 20 s demo); frozen first, they are left to the OS.
    atexit.register(gc.freeze)
    kept_out = _kept_out(config)
    try:
        with _keyholder_state(kept_out):
            try:
                _run_engine(config, workers, verbose, kept_out=kept_out)
            finally:
                _stop_ray()
    finally:
        if kept_out:  # also after a failed run: no secret key outlives a job that kept no store
            from fedhe import knn_predict

            knn_predict.keep_only_the_querier(kept_out)
    result = Path(config.out) / "result.json"
    if not result.exists():
        raise FedHEError(
            f"the simulation ended without writing {result}; run again with -v for Flower's "
            "and Ray's logs."
        )
    _record_engine(result, workers, wall_s=time.perf_counter() - started)
    return result


def _kept_out(config: JobConfig) -> str | None:
    """The run folder where a knn job keeps its store and keys (`--keep-store`), else None."""
    if config.task != "knn":
        return None
    from fedhe import knn_predict

    return config.out if knn_predict.keeps_state(config) else None


@contextlib.contextmanager
def _keyholder_state(kept_out: str | None) -> Iterator[None]:
    """The simulated key holder keeps its secret keys in a folder that is gone after the run
    (or, with --keep-store, under the run folder). Set before Ray starts: its workers inherit
    this process's environment when they start."""
    from fedhe.clients.keyholder import STATE_ROOT_ENV

    with tempfile.TemporaryDirectory(prefix="fedhe-sim-") as temporary:
        root = temporary
        if kept_out:
            from fedhe import knn_predict

            root = str(knn_predict.keyholder_root(kept_out))
        previous = os.environ.get(STATE_ROOT_ENV)
        os.environ[STATE_ROOT_ENV] = root
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(STATE_ROOT_ENV, None)
            else:
                os.environ[STATE_ROOT_ENV] = previous


def _stop_ray() -> None:
    """Shut Ray down if Flower's backend did not (it does when it got as far as running)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _run_engine(config: JobConfig, workers: int, verbose: bool, kept_out: str | None) -> None:
    """Flower's simulation runtime (what `flwr-simulation` runs) on this job's apps. The apps
    load on first use: the ServerApp in the runtime's thread for it while the runtime starts
    Ray and its actors, the ClientApp in each actor (`fedhe.simulation_apps`)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # As Flower's flwr-simulation does: no `uv run` runtime-env hook in the Ray workers.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # A simulation on a hospital's machine reports nothing to Flower's telemetry service unless
    # the user turned it on (FLWR_TELEMETRY_ENABLED=1).
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from fedhe.simulation_apps import ClientAppOnFirstUse, ServerAppOnFirstUse

    _quiet_flower(verbose)
    try:
        with warnings.catch_warnings():
            if not verbose:  # "In future versions of Ray, Ray will no longer override …"
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")
            _run_simulation(
                num_supernodes=config.num_nodes,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                server_app=ServerAppOnFirstUse(config),
                client_app=ClientAppOnFirstUse(kept_out),
                backend_name="ray",
                backend_config=_ray_config(workers, verbose),
                verbose_logging=verbose,
            )
    except FedHEError:
        raise
    except Exception as err:
        cause = _fedhe_cause(err)
        if cause is not None:  # the ServerApp's own error, wrapped by the runtime
            raise cause from None
        if verbose:
            raise
        raise FedHEError(
            f"the simulation engine failed: {type(err).__name__}: {err}. Run again with -v "
            "for Flower's and Ray's logs."
        ) from err


def _ray_config(workers: int, verbose: bool) -> dict[str, Any]:
    """Flower's Ray backend: one CPU per ClientApp actor, `workers` of them; without
    `verbose`, Ray logs warnings only and forwards nothing the actors print (a node's refusal
    reaches the aggregator as its error reply, and the aggregator logs it)."""
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": workers,
            "num_gpus": 0,
            "include_dashboard": False,
            "log_to_driver": verbose,
            "logging_level": logging.INFO if verbose else logging.WARNING,
        },
    }


def _fedhe_cause(err: BaseException) -> FedHEError | None:
    """The FedHEError behind `err` in its chain of causes, if any."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, FedHEError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _quiet_flower(verbose: bool) -> None:
    """Flower's logger (configured when flwr is imported): errors only and no colour codes
    unless `verbose`; never also through the root logger (each line once)."""
    from flwr.supercore.logger import update_console_handler

    flower = logging.getLogger("flwr")
    flower.propagate = False
    if verbose:
        update_console_handler(level=logging.DEBUG, colored=sys.stderr.isatty())
        flower.setLevel(logging.DEBUG)
    else:
        update_console_handler(level=logging.ERROR, colored=False)
        flower.setLevel(logging.ERROR)


def _record_engine(result: Path, workers: int, *, wall_s: float) -> None:
    """Add the measured wall time and what it went to under `engine` in result.json."""
    data = json.loads(result.read_text())
    runs_s = _runs_s(data)
    data["engine"] = {
        "runtime": "Flower simulation runtime on Ray (as flwr-simulation runs it)",
        "workers": workers,
        "wall_s": round(wall_s, 3),
        "runs_s": {name: round(seconds, 3) for name, seconds in runs_s.items()},
        # data checks, imports, Ray and its actors starting, node discovery, shutting down
        "overhead_s": round(max(0.0, wall_s - sum(runs_s.values())), 3),
    }
    result.write_text(json.dumps(data, indent=2))


def _runs_s(data: dict[str, Any]) -> dict[str, float]:
    """The jobs' own measured totals: the encrypted run and, if it ran, the plaintext twin."""
    runs = {"encrypted": float(data.get("timings_s", {}).get("total", 0.0))}
    if data.get("plaintext_timings_s"):
        runs["plaintext twin"] = float(data["plaintext_timings_s"].get("total", 0.0))
    return runs


def wall_time_line(result: dict[str, Any]) -> str:
    """One line for the end of `fedhe simulate`: this process's wall time so far (measured:
    the command's, not only the engine's) and what of it the runs took."""
    engine = result.get("engine")
    if not engine:
        return ""
    wall_s = max(_process_age_s(), engine["wall_s"])
    runs_s = engine["runs_s"]
    runs = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in runs_s.items())
    rest_s = max(0.0, wall_s - sum(runs_s.values()))
    return (
        f"wall {wall_s:.1f} s: {runs}; start-up and shut-down {rest_s:.1f} s (Python imports, "
        f"Ray and its {engine['workers']} actors, node discovery)"
    )


def _process_age_s() -> float:
    """Seconds since this process started (Linux's /proc), or 0.0 where that is unknown."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime_s - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


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
