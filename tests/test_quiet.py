"""`fedhe simulate` is quiet and honest: no deprecated Flower entry point, no DEBUG, warning or
ANSI noise without -v, a fedhe error ends the run with its one message (no Ray or Flower
traceback), the wall time is measured and printed, and importing the CLI starts nothing
heavy. Two tests start Ray (`slow`); the rest run in process."""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedhe import simulation
from fedhe.config import JobConfig
from fedhe.errors import DataError, FedHEError

NOISE = ("DEPRECATED", "DEBUG", "\x1b[", "Traceback", "FutureWarning", "Manually terminating")


def _fedhe(*args: str, code: str = "") -> subprocess.CompletedProcess[str]:
    """`fedhe ARGS` in a fresh Python, output captured (redirected: no terminal). `code` runs
    first in that process (to break something on purpose)."""
    script = f"{code}\nimport sys\nfrom fedhe.cli import main\nsys.exit(main({list(args)!r}))"
    env = {**os.environ, "PYTHONWARNINGS": "default"}  # a warning would show, not hide
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )


def _noise_in(text: str) -> list[str]:
    return [word for word in NOISE if word in text]


@pytest.mark.slow
def test_a_simulation_prints_no_noise_and_its_measured_wall_time(tmp_path):
    out = tmp_path / "run"
    done = _fedhe("simulate", "linreg", "--parties", "3", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _noise_in(done.stdout + done.stderr) == [], done.stderr[-3000:]
    engine = json.loads((out / "result.json").read_text())["engine"]
    assert engine["workers"] >= 1 and engine["wall_s"] > sum(engine["runs_s"].values()) > 0
    assert set(engine["runs_s"]) == {"encrypted", "plaintext twin"}
    wall = [line for line in done.stdout.splitlines() if line.startswith("wall ")]
    assert len(wall) == 1 and "encrypted" in wall[0] and "start-up" in wall[0], done.stdout


@pytest.mark.slow
def test_a_party_data_error_inside_a_client_app_ends_the_run_with_one_message(tmp_path):
    """The data checks that run before Ray are switched off in the driver, so the bad cell
    surfaces where a deployed site would meet it: in the party's ClientApp (a Ray actor)."""
    data = _csv_folder(tmp_path / "data", bad_party=2)
    skip_checks = "import fedhe.data.checks as checks\nchecks.check_job_data = lambda config: None"
    done = _fedhe(
        "simulate", "linreg", "--data-dir", str(data), "--target", "y", "--parties", "3",
        "--out", str(tmp_path / "run"), code=skip_checks,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("fedhe: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert "party-2.csv" in errors[0] and "line 4" in errors[0] and "'x1'" in errors[0]
    assert _noise_in(done.stdout + done.stderr) == [], done.stderr[-3000:]


def _csv_folder(folder: Path, *, bad_party: int) -> Path:
    """Three parties and a test set of y = 2·x0 − x1 + noise; `bad_party` has an empty cell
    in column x1 on its third data row (line 4 of the file)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("party-1", "party-2", "party-3", "test"):
        x = rng.normal(size=(40, 2))
        y = 2 * x[:, 0] - x[:, 1] + rng.normal(scale=0.1, size=40)
        rows = [f"{a:.6f},{b:.6f},{c:.6f}" for a, b, c in zip(x[:, 0], x[:, 1], y, strict=True)]
        if name == f"party-{bad_party}":
            rows[2] = f"{x[2, 0]:.6f},,{y[2]:.6f}"
        (folder / f"{name}.csv").write_text("x0,x1,y\n" + "\n".join(rows) + "\n")
    return folder


def test_importing_the_cli_starts_no_engine():
    """`fedhe --help`, check-data and predict stay quick: Flower, Ray and torch load only when
    a simulation runs (fedhe.simulation_apps, inside fedhe.simulation.simulate)."""
    probe = "import sys, fedhe.cli; print(sorted({'flwr', 'ray', 'torch'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_a_fedhe_error_wrapped_by_flowers_runtime_comes_out_alone(monkeypatch, tmp_path):
    """Flower's runtime re-raises a ServerApp's exception, or wraps it in a RuntimeError: the
    CLI gets fedhe's own error either way; anything else names -v."""
    # the module, not the function flwr.simulation exports under the same name
    runtime = importlib.import_module("flwr.simulation.run_simulation")

    def failing(error: BaseException):
        def run(**_: object) -> None:
            raise error

        return run

    config = JobConfig.of(task="linreg", parties=3, out=str(tmp_path / "run"))
    wrapped = RuntimeError("An error was encountered. Ending simulation.")
    wrapped.__cause__ = DataError("party-2.csv: line 4, column 'x1': empty cell")
    monkeypatch.setattr(runtime, "_run_simulation", failing(wrapped))
    with pytest.raises(DataError, match=r"party-2\.csv: line 4"):
        simulation.simulate(config)
    monkeypatch.setattr(runtime, "_run_simulation", failing(KeyError("boom")))
    with pytest.raises(FedHEError, match=r"simulation engine failed: KeyError.*-v"):
        simulation.simulate(config)
    with pytest.raises(KeyError):  # -v: the engine's own exception, traceback and all
        simulation.simulate(config, verbose=True)


def test_flower_logs_errors_only_without_colour_unless_verbose():
    flower = logging.getLogger("flwr")
    level, propagate = flower.level, flower.propagate
    try:
        simulation._quiet_flower(verbose=False)
        assert flower.level == logging.ERROR and not flower.propagate
        assert all(not getattr(h, "colored", False) for h in flower.handlers)
        simulation._quiet_flower(verbose=True)
        assert flower.level == logging.DEBUG and not flower.propagate
    finally:
        simulation._quiet_flower(verbose=False)
        flower.setLevel(level)
        flower.propagate = propagate


def test_ray_forwards_worker_output_and_info_logs_only_when_verbose():
    quiet, verbose = simulation._ray_config(2, False), simulation._ray_config(2, True)
    assert quiet["init_args"]["log_to_driver"] is False
    assert quiet["init_args"]["logging_level"] == logging.WARNING
    assert verbose["init_args"]["log_to_driver"] is True
    assert quiet["init_args"]["num_cpus"] == 2 and not quiet["init_args"]["include_dashboard"]
    assert quiet["client_resources"] == {"num_cpus": 1, "num_gpus": 0.0}


def test_the_wall_time_line_says_what_the_runs_took_of_it():
    result = {"engine": {"wall_s": 14.2, "workers": 2, "runs_s": {"encrypted": 2.0}}}
    line = simulation.wall_time_line(result)
    wall_s = float(line.split()[1])
    assert wall_s >= 14.2  # this process's age, at least the engine's own wall time
    assert "encrypted 2.0 s" in line and f"start-up and shut-down {wall_s - 2.0:.1f} s" in line
    assert simulation.wall_time_line({}) == ""


def test_each_party_warms_training_up_before_it_times_any(monkeypatch, tmp_path):
    """The first torch training in a process costs seconds of lazy set-up: a party pays it
    before its timer starts, so the encrypted run (first) and its twin are timed alike, and
    result.json says what the timings leave out."""
    from fedhe.aggregator.app import run_job
    from fedhe.clients import party
    from tests.inprocess import InProcessGrid

    calls: list[str] = []
    train = party.local_train
    monkeypatch.setattr(party, "warm_up_training", lambda: calls.append("warm-up"))
    monkeypatch.setattr(
        party, "local_train", lambda *a, **k: calls.append("train") or train(*a, **k)
    )
    config = JobConfig.of(
        task="aggregate",
        parties=2,
        min_parties=2,
        rounds=1,
        plaintext_twin=True,
        out=str(tmp_path / "run"),
    )
    result = json.loads(run_job(InProcessGrid(config.num_nodes), config).read_text())
    assert calls == ["warm-up", "train"] * 4  # 2 parties, the encrypted run and its twin
    assert "warm-up" in result["timings_note"]
