"""A deployment across separate machines, simulated honestly: every site in its own Linux network
namespace (tests/netns.py) with its own folder, the SuperLink reachable only at its veth address
over TLS with SuperNode authentication, and no site able to reach another.

Layout under the test's folder (each process sees its own folder; the others are hidden from it
by an empty tmpfs, as they would be on another machine):

    coordinator/fed/         the federation (CA, SuperLink certificate, sites' *public* keys)
    coordinator/kits/<name>  the kit the coordinator hands each site (copied into its folder)
    coordinator/runs/<job>   each job's `out` (the ServerApp runs beside the SuperLink)
    sites/<name>/            one site: the key it made itself, its kit, its state, its log

The deployment steps are the small functions below the fixture (keygen at the site, public key
handed to the coordinator, kit handed back, SuperLink, registration, the released app bundle
approved at each site, SuperNodes, `fedhe deploy run`); each runs the `fedhe deploy` command
docs/deploy.md gives, in the namespace of the host that runs it. Slow: about 4-5 minutes.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedhe import deploy
from fedhe.aggregator.app import run_job
from fedhe.config import JobConfig
from tests.inprocess import InProcessGrid
from tests.netns import Network, netns_available

REPO = Path(__file__).resolve().parents[1]
FEDHE = str(Path(sys.executable).parent / "fedhe")
SUPERLINK = "superlink"
PARTIES = ("hospital-a", "hospital-b", "hospital-c")
KEYHOLDER = "keyholder"
SITES = {**{name: "party" for name in PARTIES}, KEYHOLDER: "keyholder"}
FLEET_PORT = 8000  # every host has its own network stack: fixed ports cannot collide
RUNTIME_PORT = 9094  # a SuperNode's local Runtime API (Flower's default), on its loopback
PROBE_PORT = 9095  # a listener on every address of a site, to show the network blocks it
JOB_TIMEOUT_S = 420


class NetnsDeployment:
    """One federation over `Network`: folders, processes and the deployment steps."""

    def __init__(self, net: Network, base: Path) -> None:
        self.net = net
        self.coordinator = base / "coordinator"
        self.sites = {name: base / "sites" / name for name in SITES}
        self.logs = self.coordinator / "logs"
        self.logs.mkdir(parents=True)
        for folder in self.sites.values():  # each exists before any process hides it
            folder.mkdir(parents=True)
        self.fed = self.coordinator / "fed"
        self.app = base / "app"  # the released app bundle's files
        self.env = deploy.environment(deploy.Federation(self.fed, "", 0, {}))  # FLWR_HOME

    def env_of(self, host: str) -> dict[str, str]:
        """The coordinator's environment, or a site's: Flower's home inside its own folder."""
        if host == SUPERLINK:
            return self.env
        return {**self.env, "FLWR_HOME": str(self.sites[host] / "flwr")}

    def hidden_from(self, host: str) -> list[Path]:
        """The folders `host` would not have on its own machine."""
        others = [folder for name, folder in self.sites.items() if name != host]
        return others if host == SUPERLINK else [self.coordinator, *others]

    def start(self, host: str, argv: list[str], log: Path, env: dict[str, str] | None = None):
        return self.net.popen(host, argv, log=log, env=env, hide=self.hidden_from(host))

    def run(self, out: Path, settings: str) -> tuple[dict, float]:
        """A job started with `fedhe deploy run` (`flwr run`) in the SuperLink's namespace:
        its result and wall time (until result.json is written)."""
        started = time.monotonic()
        command = [FEDHE, "deploy", "run", str(self.fed), "--app", str(self.app),
                   "--run-config", f"{settings} out='{out}'"]  # fmt: skip
        done = self.net.run(SUPERLINK, command, env=self.env, timeout_s=JOB_TIMEOUT_S,
                            hide=self.hidden_from(SUPERLINK))  # fmt: skip
        (self.logs / f"run-{out.name}.log").write_text(done.stdout)
        assert done.returncode == 0, f"flwr run failed:\n{done.stdout[-3000:]}"
        deadline = time.monotonic() + 60
        while not (out / "result.json").exists():  # the ServerApp may finish after the stream
            if time.monotonic() > deadline:
                pytest.fail(f"no result.json; logs in {self.logs} and {list(self.sites.values())}")
            time.sleep(0.5)
        return json.loads((out / "result.json").read_text()), time.monotonic() - started


# -- the deployment steps, as docs/deploy.md gives them (switch these when it changes) ----------


def fedhe(running: NetnsDeployment, host: str, *args: str, timeout_s: float = 120) -> str:
    """`fedhe ARGS` run to its end on `host` (its namespace, its view of the disk)."""
    done = running.net.run(host, [FEDHE, *args], env=running.env_of(host), timeout_s=timeout_s,
                           hide=running.hidden_from(host))  # fmt: skip
    assert done.returncode == 0, f"fedhe {' '.join(args)} on {host}:\n{done.stdout[-3000:]}"
    return done.stdout


def coordinator_init(running: NetnsDeployment) -> None:
    """The coordinator: CA and the SuperLink's certificate, whose SAN is its veth address."""
    parties = [arg for name in PARTIES for arg in ("--party", name)]
    fedhe(running, SUPERLINK, "deploy", "init", str(running.fed), *parties,
          "--keyholder", KEYHOLDER, "--host", running.net.addresses[SUPERLINK],
          "--port", str(FLEET_PORT))  # fmt: skip


def site_keygen(running: NetnsDeployment, name: str) -> None:
    """At the site: its SuperNode key, made in its own folder."""
    fedhe(running, name, "deploy", "keygen", str(running.sites[name]), name)


def hand_over_public_key(running: NetnsDeployment, name: str) -> None:
    """The site hands supernode.pub over; the coordinator stores it (`add-key`)."""
    handed = running.coordinator / "handed" / f"{name}.pub"
    handed.parent.mkdir(exist_ok=True)
    shutil.copy(running.sites[name] / deploy.SITE_PUBLIC_KEY, handed)
    fedhe(running, SUPERLINK, "deploy", "add-key", str(running.fed), name, str(handed))


def hand_out_kit(running: NetnsDeployment, name: str) -> None:
    """The coordinator writes the site's kit; each of its files is copied into the site's folder."""
    kit = running.coordinator / "kits" / name
    fedhe(running, SUPERLINK, "deploy", "kit", str(running.fed), name, "--out", str(kit),
          "--site-dir", str(running.sites[name]), "--fedhe", FEDHE)  # fmt: skip
    for path in kit.iterdir():
        shutil.copy2(path, running.sites[name] / path.name)


def start_superlink(running: NetnsDeployment) -> None:
    """`fedhe deploy superlink`: it listens on the federation's host (the SuperLink's veth
    address); Flower's own default, 127.0.0.1, would keep every site out."""
    federation = deploy.Federation.load(running.fed)
    command = deploy.superlink_command(federation)
    assert command[command.index("--host") + 1] == federation.host
    running.start(SUPERLINK, command, running.logs / "superlink.log", running.env)


def register_sites(running: NetnsDeployment) -> None:
    """`fedhe deploy register`: every public key, retried while the SuperLink starts."""
    out = fedhe(running, SUPERLINK, "deploy", "register", str(running.fed), timeout_s=180)
    assert out.count("registered") >= len(SITES), out


def release_app(running: NetnsDeployment) -> None:
    """The app as released: exactly the files `flwr run` ships, frozen (other work may change
    the repository meanwhile), in a folder every host sees, as every site has the release."""
    from fedhe.approval import bundle_files

    bundle_files(REPO, running.app)


def approve_app(running: NetnsDeployment, name: str) -> Path:
    """The site approves the bundle it reviewed: `fedhe deploy approve APP_DIR >> approved`."""
    approved = running.sites[name] / "approved"
    approved.write_text(fedhe(running, name, "deploy", "approve", str(running.app)))
    return approved


def start_site(running: NetnsDeployment, name: str) -> None:
    """`fedhe deploy site` on the site's own folder, in its own namespace."""
    folder = running.sites[name]
    argv = [FEDHE, "deploy", "site", str(folder), "--port", str(RUNTIME_PORT),
            "--approved", str(approve_app(running, name))]  # fmt: skip
    if SITES[name] == KEYHOLDER:
        argv += ["--data-path", str(folder / "state")]
    else:  # its answers (as a job's querier) and released models stay here
        argv += ["--output-dir", str(folder / "out")]
    running.start(name, argv, folder / "supernode.log", running.env_of(name))


@pytest.fixture(scope="module")
def netns_deployment(tmp_path_factory):
    reason = netns_available()
    if reason:
        pytest.skip(f"no network namespaces here: {reason}")
    base = tmp_path_factory.mktemp("netns")
    with Network([SUPERLINK, *SITES], hub=SUPERLINK) as net:
        running = NetnsDeployment(net, base)
        coordinator_init(running)
        for name in SITES:
            site_keygen(running, name)
            hand_over_public_key(running, name)
            hand_out_kit(running, name)
        start_superlink(running)
        register_sites(running)
        release_app(running)
        for name in SITES:
            start_site(running, name)
        yield running


def _simulated(tmp_path: Path, **settings) -> dict:
    out = tmp_path / "simulated"
    config = JobConfig.of(parties=3, min_parties=2, plaintext_twin=False, out=str(out), **settings)
    run_job(InProcessGrid(config.num_nodes), config)
    return json.loads((out / "result.json").read_text())


# -- tests -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sites_reach_the_superlink_port_and_nothing_else(netns_deployment):
    running, net = netns_deployment, netns_deployment.net
    superlink = net.addresses[SUPERLINK]
    deadline = time.monotonic() + 120  # a SuperNode opens its Runtime API once it started
    while not all(f"127.0.0.1:{RUNTIME_PORT}" in net.listening(n) for n in SITES):
        assert time.monotonic() < deadline, {n: net.listening(n) for n in SITES}
        time.sleep(1.0)
    listening = {host: net.listening(host) for host in net.namespaces}
    print("listening:", json.dumps(listening))
    assert listening[SUPERLINK] == [f"{superlink}:{FLEET_PORT}"]  # Fleet, Control, Runtime API
    for name in SITES:  # a SuperNode listens on its own loopback only
        assert listening[name] == [f"127.0.0.1:{RUNTIME_PORT}"], listening[name]
    for name in SITES:
        probe = running.start(name, [sys.executable, "-c", _LISTENER, str(PROBE_PORT)],
                              running.sites[name] / "probe.log", running.env_of(name))  # fmt: skip
        assert probe.poll() is None
    time.sleep(1.0)
    for name in SITES:
        assert net.can_connect(name, superlink, FLEET_PORT)
        assert net.can_connect(SUPERLINK, net.addresses[name], PROBE_PORT)  # the probe is up
    for source in PARTIES:
        for target in (n for n in SITES if n != source):
            address = net.addresses[target]
            assert not net.can_connect(source, address, PROBE_PORT, timeout_s=1), (source, target)
    assert not net.can_connect("hospital-a", net.addresses[KEYHOLDER], RUNTIME_PORT, timeout_s=1)


_LISTENER = (
    "import socket, sys, time\n"
    "s = socket.socket(); s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen()\n"
    "while True:\n"
    "    s.accept()[0].close()\n"
)


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="Flower 1.42 serves its Control API (flwr ls/run/stop, supernode register) on the "
    "Fleet port that sites must reach, with no account authentication (OIDC is Flower's "
    "enterprise edition): a site holding only ca.crt may use it",
)
def test_a_site_cannot_use_the_superlink_control_api(netns_deployment):
    """The attack: hospital-a points `flwr` at the SuperLink's one port with nothing but the
    CA certificate of its kit, and lists the federation's runs (it could start its own)."""
    running, site = netns_deployment, "hospital-a"
    home = running.sites[site] / "attacker-flwr"
    home.mkdir(exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "x"\n\n[superlink.x]\n'
        f'address = "{running.net.addresses[SUPERLINK]}:{FLEET_PORT}"\n'
        f'root-certificates = "{running.sites[site] / "ca.crt"}"\n'
    )
    flwr = str(Path(sys.executable).parent / "flwr")
    done = running.net.run(site, [flwr, "ls", "x"], env={**running.env_of(site),
                           "FLWR_HOME": str(home)}, timeout_s=60,
                           hide=running.hidden_from(site))  # fmt: skip
    assert done.returncode != 0 and "Run ID" not in done.stdout, done.stdout


@pytest.mark.slow
def test_a_site_private_key_exists_in_its_own_folder_only(netns_deployment):
    running = netns_deployment
    keys = {name: (folder / deploy.SITE_KEY).read_bytes() for name, folder in running.sites.items()}
    base = running.coordinator.parent
    for path in (p for p in base.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for name, key in keys.items():
            if key in data:
                assert path == running.sites[name] / deploy.SITE_KEY, f"{name}'s key in {path}"


@pytest.mark.slow
def test_exact_linreg_across_namespaces_equals_the_simulation(netns_deployment, tmp_path):
    running = netns_deployment
    result, wall = running.run(
        running.coordinator / "runs" / "linreg",
        "task='linreg' parties=3 min-parties=2 plaintext-twin=false timeout-s=120",
    )
    simulated = _simulated(tmp_path, task="linreg")
    np.testing.assert_allclose(
        result["coefficients"]["encrypted"],
        simulated["coefficients"]["encrypted"],
        rtol=1e-6,
        atol=1e-6,
    )
    assert result["parties"]["excluded"] == {}
    print(f"netns linreg: {wall:.1f} s wall, {result['round_trips']} round trips")


@pytest.mark.slow
def test_knn_across_namespaces_answers_as_the_simulation(netns_deployment, tmp_path):
    running = netns_deployment
    result, wall = running.run(
        running.coordinator / "runs" / "knn",
        "task='knn' dataset='iris' parties=3 min-parties=2 plaintext-twin=false timeout-s=120 "
        "queries=4",
    )
    simulated = _simulated(tmp_path, task="knn", dataset="iris", queries=4)
    assert result["parties"]["excluded"] == {}
    assert result["knn"]["queries"] == 4
    assert result["knn"]["stored_points"] == simulated["knn"]["stored_points"] == 120
    outputs = [(d["output"], d["decision"]) for d in result["decryptions"]]
    assert outputs == [(d["output"], d["decision"]) for d in simulated["decryptions"]]
    assert result["knn"]["querier"] in PARTIES  # named by its site
    assert "accuracy" not in result["encrypted"]  # the answers stayed at the querier's site
    knn_answers = [*running.sites[KEYHOLDER].parent.rglob("*knn*/predictions.csv"),
                   *(running.coordinator / "runs" / "knn").rglob("predictions.csv")]  # fmt: skip
    (answers,) = knn_answers
    assert answers.is_relative_to(running.sites[result["knn"]["querier"]]), answers
    assert len(answers.read_text().splitlines()) == 1 + 4  # header, one row per query
    assert answers.stat().st_mode & 0o777 == 0o600
    print(f"netns knn: {wall:.1f} s wall, {result['round_trips']} round trips")


def test_processes_run_where_they_should(tmp_path):
    """Fast check of the harness's command line: namespace, private mounts, hidden folders."""
    net = Network(["hub", "site"], hub="hub")
    command = net.command("site", ["true"], hide=[tmp_path / "other site"])
    assert command[:4] == ["ip", "netns", "exec", net.namespaces["site"]]
    assert "--mount" in command and command[-1] == "true"
    assert f"'{tmp_path / 'other site'}'" in command[command.index("-c") + 1]
    assert net.namespaces["site"].startswith("fh-") and net.subnet.startswith("10.233.")
    assert net.bridge_ns.endswith("-br") and net.hub == "hub"
