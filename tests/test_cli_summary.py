"""What `fedhe simulate` says: per-task help and defaults, the summary of whom a run used and
why it left any party out, --strict, and parties named by their files."""

import json
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest

from fedhe.aggregator.app import run_job
from fedhe.aggregator.job import party_names
from fedhe.cli import EXIT_EXCLUDED, _strict_status, _summary_lines, main
from fedhe.config import JobConfig
from fedhe.data.checks import check_job_data
from fedhe.data.sources import DataSource
from fedhe.errors import FedHEError
from tests.inprocess import InProcessGrid

ROOT = Path(__file__).resolve().parent.parent


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stopped:
        main(["simulate", *argv, "--help"])
    assert stopped.value.code == 0
    return capsys.readouterr().out


# -- per-task help and defaults ----------------------------------------------------------------


def test_knn_help_lists_only_what_knn_reads(capsys):
    text = _help(capsys, "knn")
    assert "--k K" in text and "--query-batch" in text and "--querier" in text
    for other in ("--lr", "--batch-size", "--hidden", "--mode", "--l2", "--rounds"):
        assert other not in text, other


def test_logreg_help_shows_logreg_defaults(capsys):
    text = " ".join(_help(capsys, "logreg").split())  # argparse wraps lines
    assert "training rounds (default: 100; encrypted-model mode: 20)" in text
    assert "(default: 4.0; encrypted-model mode: 0.5)" in text
    assert "(default: 0.0022; encrypted-model mode: 0.0)" in text
    assert "--k K" not in text and "--hidden" not in text


def test_the_tasks_overview_still_groups_every_setting(capsys):
    text = _help(capsys)
    assert "knn settings (task knn only): --k," in text
    for task in ("aggregate", "linreg", "logreg", "knn", "mlp"):
        assert re.search(rf"^ +{task}\s", text, re.MULTILINE), task


def test_logreg_defaults_come_from_its_row_of_task_defaults():
    logreg = JobConfig.of(task="logreg")
    assert logreg.rounds == 100 and logreg.training.lr == 4.0
    assert logreg.training.batch_size == 0 and logreg.regression.l2 == 0.0022
    given = JobConfig.of(task="logreg", rounds=7, lr=2.0)
    assert (given.rounds, given.training.lr, given.training.batch_size) == (7, 2.0, 0)
    in_encrypted_model = JobConfig.of(task="logreg", mode="encrypted-model")
    assert (in_encrypted_model.rounds, in_encrypted_model.training.lr) == (20, 0.5)
    assert in_encrypted_model.training.batch_size == 32  # what its lr was tested with
    assert JobConfig.of(task="aggregate").settings() == JobConfig().settings()
    assert JobConfig.of(task="linreg").settings() == JobConfig(task="linreg").settings()


def test_flwr_runs_pyproject_settings_as_written():
    """`flwr run` hands every key of [tool.flwr.app.config]: no task default replaces them."""
    app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    config = JobConfig.from_run_config({**app, "task": "logreg"})
    assert config.rounds == app["rounds"] and config.training.lr == app["lr"]


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], (100, 4.0, 0)),
        (["--mode", "encrypted-model"], (20, 0.5, 32)),
        (["--lr", "2", "--rounds", "9"], (9, 2.0, 0)),
    ],
)
def test_the_cli_passes_only_the_options_given(monkeypatch, flags, expected):
    seen: list[JobConfig] = []

    def fake_simulate(config: JobConfig, **engine: object) -> Path:
        seen.append(config)
        raise FedHEError("stopped before Flower starts")

    monkeypatch.setattr("fedhe.cli.simulate", fake_simulate)
    assert main(["simulate", "logreg", *flags]) == 2
    assert [(c.rounds, c.training.lr, c.training.batch_size) for c in seen] == [expected]


# -- the summary, --strict and party names -----------------------------------------------------


def _csv_federation(folder: Path, files: list[str]) -> None:
    rng = np.random.default_rng(0)
    for name in [*files, "test.csv"]:
        X = rng.normal(size=(40, 2))
        y = X @ np.array([1.5, -2.0]) + 0.3 + rng.normal(scale=0.1, size=40)
        rows = [f"{a:.6f},{b:.6f},{t:.6f}" for (a, b), t in zip(X, y, strict=True)]
        (folder / name).write_text("a,b,target\n" + "\n".join(rows) + "\n")


@pytest.fixture
def in_process(monkeypatch):
    """`fedhe simulate` on the in-process grid (no Ray): the real data checks first, as the
    engine makes them, then the real job and the real result.json."""

    def simulate(config: JobConfig, **engine: object) -> Path:
        check_job_data(config)
        return run_job(InProcessGrid(config.num_nodes), config)

    monkeypatch.setattr("fedhe.cli.simulate", simulate)


def _drop_second_party(tmp_path: Path, *extra: str) -> list[str]:
    data = tmp_path / "data"
    data.mkdir()
    _csv_federation(data, ["party-1.csv", "party-2.csv", "party-3.csv"])
    (tmp_path / "out").mkdir()
    return [
        "simulate", "linreg", "--mode", "gradient", "--rounds", "2", "--parties", "3",
        "--min-parties", "2", "--data-dir", str(data), "--target", "target",
        "--drop-party", "1", "--encrypted-only", "--out", str(tmp_path / "out"), *extra,
    ]  # fmt: skip


def test_the_summary_names_the_left_out_party_by_its_file(tmp_path, capsys, in_process):
    assert main(_drop_second_party(tmp_path)) == 0
    out = capsys.readouterr().out
    assert f"data      {tmp_path / 'data'} (target target; 2 features)" in out
    assert "job       linreg, gradient mode, 2 rounds" in out
    assert "parties   2 of 3 used (3 answered, 1 left out; min-parties 2)" in out
    assert "left out party-2.csv: gradient round 1: " in out and "drops out" in out
    assert "keys      one key holder" in out
    assert "time: run total, set-up to report" in out and "plaintext twin" not in out
    assert "\x1b[" not in out  # no ANSI codes when stdout is no terminal
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert set(result["parties"]["excluded"]) == {"party-2.csv"}  # party index 1
    assert [h["dropped"] for h in result["encrypted"]["history"]] == [
        {"party-2.csv": "ProtocolError: this party drops out (simulated fault: drop-party=1)."}
    ] * 2
    assert result["parties"]["names"] == {
        "party-0": "party-1.csv",
        "party-1": "party-2.csv",
        "party-2": "party-3.csv",
    }
    assert result["summary"]["parties"]["used"] == 2


def test_strict_exits_3_when_a_party_was_left_out(tmp_path, capsys, in_process):
    assert main(_drop_second_party(tmp_path, "--strict")) == EXIT_EXCLUDED
    err = capsys.readouterr().err
    assert "--strict: the run used 2 of 3 parties (left out: party-2.csv;" in err


def test_strict_counts_parties_that_never_answered(tmp_path, capsys):
    summary = {
        "data": "breast_cancer",
        "task": "aggregate",
        "mode": None,
        "rounds": 3,
        "packing": "quantized",
        "parties": {"expected": 5, "found": 4, "used": 4, "excluded": {}},
        "keyholders": {"count": 3, "threshold": 2, "parties_hold_keys": False},
    }
    result = {"summary": summary, "parties": {"min_parties": 3}}
    lines = _summary_lines(result)
    assert "job       aggregate, 3 rounds, quantized packing" in lines
    assert "  never answered: 1 party node(s)" in lines
    assert lines[-1] == "keys      3 key holders; any 2 decrypt together"
    path = tmp_path / "result.json"
    path.write_text(json.dumps(result))
    assert _strict_status(path) == EXIT_EXCLUDED
    assert "never answered: 1" in capsys.readouterr().err
    summary["parties"]["found"] = 5
    path.write_text(json.dumps(result))
    assert _strict_status(path) == 0


def test_parties_are_named_by_their_files_in_file_order(tmp_path):
    _csv_federation(tmp_path, ["party-1.csv", "party-3.csv", "party-10.csv"])
    source = DataSource(data_dir=str(tmp_path), target="target")
    names = party_names(source, ["party-0", "party-1", "party-2"])
    assert names == {"party-0": "party-1.csv", "party-1": "party-3.csv", "party-2": "party-10.csv"}
    # Built-in data: the protocol id, whose index is the one --drop-party takes and the
    # key holder's audit records show.
    assert party_names(DataSource(), ["party-0", "party-1"]) == {
        "party-0": "party-0",
        "party-1": "party-1",
    }


def _spoil_a_cell(data: Path, name: str) -> None:
    """Empties the first feature cell of data row 3 (file line 4) of `name`."""
    lines = (data / name).read_text().splitlines()
    lines[3] = "," + lines[3].split(",", 1)[1]
    (data / name).write_text("\n".join(lines) + "\n")


def test_a_party_with_a_bad_cell_is_left_out_said_up_front_and_in_the_summary(
    tmp_path, capsys, caplog, in_process
):
    args = _drop_second_party(tmp_path)
    args[args.index("--drop-party") + 1] = "-1"  # no simulated fault: the bad cell is the fault
    _spoil_a_cell(tmp_path / "data", "party-3.csv")
    with caplog.at_level("WARNING", logger="fedhe.data"):
        assert main(args) == 0
    said = [r.getMessage() for r in caplog.records if r.name == "fedhe.data"]
    assert any(
        "party-3.csv: line 4, column 'a'" in m and "goes on without party-3.csv" in m for m in said
    )
    out = capsys.readouterr().out
    assert "parties   2 of 3 used" in out and "left out party-3.csv: " in out
    assert main([*args, "--strict"]) == EXIT_EXCLUDED  # --strict turns the exclusion into a failure


def test_a_bad_cell_that_would_leave_too_few_parties_stops_the_run_before_it_starts(
    tmp_path, capsys, monkeypatch
):
    def no_engine(*args, **kwargs):
        raise AssertionError("the engine must not start")

    monkeypatch.setattr("fedhe.simulation._run_engine", no_engine)
    args = _drop_second_party(tmp_path)
    args[args.index("--min-parties") + 1] = "3"
    _spoil_a_cell(tmp_path / "data", "party-3.csv")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot run this job" in err and "party-3.csv: line 4, column 'a'" in err
