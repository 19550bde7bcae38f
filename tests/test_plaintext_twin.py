"""The plaintext twin (the same job again in the clear) never runs on real parties' data.

It is off by default, `fedhe simulate` turns it on for its simulated nodes, a deployment cannot
turn it on, and a party sends plaintext only when its own node config says `allow-plaintext`.
"""

import importlib
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.common.config import fuse_dicts, parse_config_args

from fedhe import deploy, protocol
from fedhe.aggregator.app import run_job
from fedhe.aggregator.job import JobRun
from fedhe.aggregator.report import build_result
from fedhe.cli import main, simulate
from fedhe.clients.roles import (
    ALLOW_PLAINTEXT,
    SIMULATION_NODE_CONFIG,
    WithNodeConfig,
    allows_plaintext,
)
from fedhe.config import JobConfig
from fedhe.errors import FedHEError
from fedhe.simulation import simulation_client_app
from tests.inprocess import InProcessGrid

ROOT = Path(__file__).resolve().parent.parent


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def _flwr_app_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


# -- defaults ----------------------------------------------------------------------------------


def test_a_job_runs_no_twin_unless_asked():
    assert JobConfig().plaintext_twin is False
    assert JobConfig.from_run_config({}).plaintext_twin is False


def test_flwr_run_config_keeps_the_twin_off():
    assert _flwr_app_config()["plaintext-twin"] is False
    assert JobConfig.from_run_config(_flwr_app_config()).plaintext_twin is False


@pytest.mark.parametrize(("flags", "twin"), [([], True), (["--encrypted-only"], False)])
def test_fedhe_simulate_runs_the_twin_unless_encrypted_only(tmp_path, monkeypatch, flags, twin):
    seen: list[JobConfig] = []

    def fake_simulate(config: JobConfig, workers: int | None = None, verbose: bool = False) -> Path:
        seen.append(config)
        raise FedHEError("stopped before Flower starts")

    monkeypatch.setattr("fedhe.cli.simulate", fake_simulate)
    assert main(["simulate", "aggregate", "--out", str(tmp_path), *flags]) == 2
    assert [c.plaintext_twin for c in seen] == [twin]


# -- node config: allow-plaintext --------------------------------------------------------------


@pytest.mark.parametrize(
    ("node_config", "allowed"),
    [
        ({}, False),
        ({"partition-id": 0, "num-partitions": 6}, False),  # what Flower's simulation sets
        ({"role": "party", "data-path": "/data/a.csv"}, False),  # what a deployed site sets
        ({ALLOW_PLAINTEXT: False}, False),
        ({ALLOW_PLAINTEXT: "false"}, False),
        ({ALLOW_PLAINTEXT: 1}, False),
        ({ALLOW_PLAINTEXT: "yes"}, False),
        ({ALLOW_PLAINTEXT: True}, True),
        ({ALLOW_PLAINTEXT: "true"}, True),
    ],
)
def test_allows_plaintext_only_when_the_node_config_says_so(node_config, allowed):
    assert allows_plaintext(_context(node_config)) is allowed


def test_simulated_nodes_get_allow_plaintext(monkeypatch):
    seen: list[dict] = []
    monkeypatch.setattr(
        "fedhe.clients.app.app", lambda message, context: seen.append(dict(context.node_config))
    )
    context = _context({"partition-id": 2, "num-partitions": 6})
    simulation_client_app()(None, context)
    assert seen == [{"partition-id": 2, "num-partitions": 6, **SIMULATION_NODE_CONFIG}]
    assert allows_plaintext(context)


def test_fedhe_simulate_hands_flower_the_simulated_nodes_app(tmp_path, monkeypatch):
    apps = []
    runtime = importlib.import_module("flwr.simulation.run_simulation")  # the module
    monkeypatch.setattr(runtime, "_run_simulation", lambda **kw: apps.append(kw["client_app"]))
    with pytest.raises(FedHEError, match="without writing"):
        simulate(JobConfig(out=str(tmp_path), plaintext_twin=True), workers=1)
    assert len(apps) == 1 and isinstance(apps[0].app(), WithNodeConfig)  # built in each actor
    assert apps[0].app().extra == SIMULATION_NODE_CONFIG


def test_the_in_process_grid_simulates_nodes_that_allow_plaintext():
    grid = InProcessGrid(3)
    assert all(allows_plaintext(context) for context in grid.contexts.values())


# -- deployment --------------------------------------------------------------------------------


@pytest.fixture
def federation(tmp_path) -> deploy.Federation:
    sites = {"hospital-a": "party", "hospital-b": "party", "keyholder": deploy.KEYHOLDER}
    return deploy.init_federation(tmp_path / "fed", sites)


def _site_command(federation: deploy.Federation, name: str, **kwargs) -> list[str]:
    """What site `name` runs from its own kit (the coordinator's folder holds no site key)."""
    kit = federation.for_site(name, federation.folder.parent / name)
    return deploy.site_command(kit, name, approved="/site/approved.txt", **kwargs)


def test_deploy_site_never_writes_allow_plaintext(federation):
    commands = [
        _site_command(federation, "hospital-a", port=9101),
        _site_command(federation, "hospital-b", port=9102, data_path="/data/b.csv"),
        _site_command(
            federation, "keyholder", port=9100, data_path="/kh", passphrase_file="/kh/pass"
        ),
    ]
    for command in commands:
        node_config = parse_config_args([command[command.index("--node-config") + 1]])
        assert ALLOW_PLAINTEXT not in node_config, command
        assert not allows_plaintext(_context(node_config))


def test_deploy_site_refuses_a_path_that_would_smuggle_in_settings(federation):
    with pytest.raises(deploy.DeployError, match="data-path"):
        _site_command(
            federation, "hospital-a", port=9101, data_path='/a.csv" allow-plaintext=true x="'
        )


@pytest.mark.parametrize(
    "run_config", ["", "task='linreg' parties=2 min-parties=2", "plaintext-twin=false rounds=2"]
)
def test_a_deployed_run_forces_the_twin_off(run_config):
    command = deploy.run_command(".", run_config)
    assert command[-2:] == ["--run-config", "plaintext-twin=false"]
    overrides = [command[i + 1] for i, arg in enumerate(command) if arg == "--run-config"]
    assert overrides == deploy.deployment_run_config(run_config)
    # What `flwr run` hands the ServerApp: the app's defaults, then the overrides in order.
    fused = fuse_dicts(_flwr_app_config(), parse_config_args(overrides))
    assert JobConfig.from_run_config(fused).plaintext_twin is False
    # `flwr run .` simulations await 16 replies at a time; a deployment sends every message.
    assert JobConfig.from_run_config(_flwr_app_config()).message_window == 16
    assert JobConfig.from_run_config(fused).message_window == 0


@pytest.mark.parametrize(
    "run_config",
    [
        "plaintext-twin=true",
        "task='linreg' plaintext-twin=true parties=2",
        "plaintext-twin='true'",
        "plaintext-twin=1",
        "plaintext_twin=true",
        "plaintext-twin='perhaps'",
    ],
)
def test_a_deployed_run_refuses_to_turn_the_twin_on(run_config):
    with pytest.raises(deploy.DeployError, match="never runs the plaintext twin"):
        deploy.run_command(".", run_config)


@pytest.mark.parametrize(
    "run_config", ["task='knn' keep-store=true", "task='knn' keep_store=1", "keep-store='yes'"]
)
def test_a_deployed_run_refuses_to_keep_a_knn_store(run_config):
    """A kept store keeps the key holder's secret key beside it: simulation only."""
    with pytest.raises(deploy.DeployError, match="for simulations only"):
        deploy.run_command(".", run_config)
    deploy.deployment_run_config("task='knn' keep-store=false")  # the default passes


def test_a_deployed_run_refuses_a_toml_file_it_cannot_check():
    with pytest.raises(deploy.DeployError, match="not a TOML file"):
        deploy.deployment_run_config("job.toml")


def test_fedhe_deploy_run_stops_before_flwr_run(federation, monkeypatch, capsys):
    def no_flwr_run(*args, **kwargs):
        raise AssertionError("flwr run must not start")

    monkeypatch.setattr("fedhe.deploy_cli.subprocess.call", no_flwr_run)
    code = main(["deploy", "run", str(federation.folder), "--run-config", "plaintext-twin=true"])
    assert code == 2
    assert "never runs the plaintext twin" in capsys.readouterr().err


def test_result_json_without_a_twin_holds_no_clear_run():
    he = JobRun(
        job_id="job-he",
        encrypted=True,
        history=[{"round": 1, "parties": 2, "r2": 0.4}],
        weights={"coefficients": np.array([1.0, 2.0])},
    )
    result = build_result(JobConfig(task="linreg", parties=2, min_parties=2), he, None, ("x",))
    assert result["plaintext"] is None and result["coefficients"]["plaintext"] is None
    assert not {"agreement", "plaintext_timings_s", "plaintext_bytes"} & set(result)
    assert result["config"]["plaintext-twin"] is False


def test_a_deployed_job_sends_every_party_a_public_context(tmp_path, monkeypatch):
    """The deployment's run config on bare nodes (no allow-plaintext): one encrypted run, and
    result.json has no twin."""
    monkeypatch.setenv("FEDHE_STATE_ROOT", str(tmp_path / "keyholder-state"))
    run_config = f"task='linreg' parties=3 min-parties=2 out='{tmp_path / 'out'}'"
    overrides = parse_config_args(deploy.deployment_run_config(run_config))
    config = JobConfig.from_run_config(fuse_dicts(_flwr_app_config(), overrides))
    bare = {i: {"partition-id": i, "num-partitions": 4} for i in range(4)}
    grid = InProcessGrid(config.num_nodes, node_configs=bare)
    run_job(grid, config)
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["plaintext"] is None and result["coefficients"]["plaintext"] is None
    assert not {"agreement", "plaintext_timings_s", "plaintext_bytes"} & set(result)
    sent = [m for d, m in grid.log if d == "sent"]
    setups = [m for m in sent if m.metadata.message_type == protocol.SETUP]
    moments = [m for m in sent if m.metadata.message_type == protocol.MOMENTS]
    assert len(setups) == len(moments) == 3
    # one key holder: the context rides on the moments, the parties' first contribution
    assert all(protocol.config_of(m.content).get("context-follows") for m in setups)
    assert all(protocol.payload_of(m.content).get("public-context") for m in moments)


def _bare_linreg(tmp_path, monkeypatch) -> tuple[JobConfig, InProcessGrid]:
    """A deployed-like linreg: nodes whose config does not allow the plaintext twin."""
    monkeypatch.setenv("FEDHE_STATE_ROOT", str(tmp_path / "keyholder-state"))
    config = JobConfig(task="linreg", parties=3, min_parties=2, plaintext_twin=False,
                       out=str(tmp_path / "out"))  # fmt: skip
    bare = {i: {"partition-id": i, "num-partitions": 4} for i in range(4)}
    return config, InProcessGrid(config.num_nodes, node_configs=bare)


def _contributions(grid: InProcessGrid) -> list:
    replies = [m for d, m in grid.log if d == "received" and not m.has_error()]
    return [m for m in replies if "contribution" in protocol.payload_of(m.content)]


def test_a_party_told_the_context_follows_never_contributes_without_it(tmp_path, monkeypatch):
    """Attack: an aggregator sets the parties up with `context-follows` and then asks for the
    moments without ever sending the context. A party whose config does not allow the twin
    refuses: no contribution of any kind leaves it (before the fix it sent its moments in the
    clear)."""
    from fedhe.aggregator.job import Job

    monkeypatch.setattr(Job, "_context_if_it_follows", lambda self: {})
    config, grid = _bare_linreg(tmp_path, monkeypatch)
    with pytest.raises(FedHEError, match="min_parties"):
        run_job(grid, config)
    refusals = [
        m.error.reason
        for d, m in grid.log
        if d == "received" and m.has_error() and m.metadata.message_type == protocol.MOMENTS
    ]
    assert len(refusals) == 3 and all("in the clear" in r for r in refusals)
    assert _contributions(grid) == []


def test_a_party_refuses_a_second_public_context_within_a_job(tmp_path, monkeypatch):
    """Attack: after a job's context came with the moments, the aggregator sends another one
    (a key pair of its own, say) with a later moments message: refused, before any data is
    read or encrypted under it."""
    from flwr.app import Message

    from fedhe.clients import party
    from fedhe.crypto import AGGREGATION_PARAMS, generate_keys

    config, grid = _bare_linreg(tmp_path, monkeypatch)
    run_job(grid, config)
    sent = [m for d, m in grid.log if d == "sent" and m.metadata.message_type == protocol.MOMENTS]
    node = sent[0].metadata.dst_node_id
    other = generate_keys(AGGREGATION_PARAMS).public().to_bytes()
    replay = Message(
        protocol.content(
            protocol.MOMENTS,
            protocol.REQUEST,
            config=protocol.config_of(sent[0].content),
            payload={"public-context": other},
        ),
        dst_node_id=node,
        message_type=protocol.MOMENTS,
    )
    with pytest.raises(FedHEError, match="switch keys"):
        party.feature_moments(replay, grid.contexts[node])


def test_a_second_setup_cannot_swap_the_jobs_context(tmp_path, monkeypatch):
    """Attack (review of issue 16): after the job's moments, the aggregator sends setup again,
    the real key holder's identity with a context of its own; `trust.join` reads that as a
    resumed job and keeps the MAC seed, so the party's next contribution would be encrypted
    under the aggregator's key with a valid tag. Refused: a job keeps one context."""
    from flwr.app import Message

    from fedhe.clients import party
    from fedhe.crypto import AGGREGATION_PARAMS, generate_keys

    config, grid = _bare_linreg(tmp_path, monkeypatch)
    run_job(grid, config)
    setup = next(
        m for d, m in grid.log if d == "sent" and m.metadata.message_type == protocol.SETUP
    )
    node = setup.metadata.dst_node_id
    payload = dict(protocol.payload_of(setup.content))
    payload["public-context"] = generate_keys(AGGREGATION_PARAMS).public().to_bytes()
    replay = Message(
        protocol.content(
            protocol.SETUP, protocol.REQUEST, config=protocol.config_of(setup.content),
            payload=payload,
        ),
        dst_node_id=node,
        message_type=protocol.SETUP,
    )  # fmt: skip
    with pytest.raises(FedHEError, match="switch keys"):
        party.setup(replay, grid.contexts[node])


def test_a_job_id_that_is_not_a_plain_name_is_refused_at_setup(tmp_path, monkeypatch):
    """A job id becomes a folder under the site's output folder: `../..` would write outside."""
    from flwr.app import Message

    from fedhe.clients import party

    config, grid = _bare_linreg(tmp_path, monkeypatch)
    run_job(grid, config)
    setup = next(
        m for d, m in grid.log if d == "sent" and m.metadata.message_type == protocol.SETUP
    )
    node = setup.metadata.dst_node_id
    crafted = {**protocol.config_of(setup.content), "job-id": "../../outside"}
    replay = Message(
        protocol.content(protocol.SETUP, protocol.REQUEST, config=crafted,
                         payload=dict(protocol.payload_of(setup.content))),
        dst_node_id=node,
        message_type=protocol.SETUP,
    )  # fmt: skip
    with pytest.raises(FedHEError, match="not a plain name"):
        party.setup(replay, grid.contexts[node])
