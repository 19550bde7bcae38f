"""A real deployment on 127.0.0.1: SuperLink with TLS and SuperNode authentication, three party
SuperNodes and a key-holder SuperNode, jobs started with `flwr run` (processes, not threads).

Slow (a SuperNode polls every few seconds: one round trip takes 3-10 s); every process is
stopped by the fixture, every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.x509 import DNSName, IPAddress, SubjectAlternativeName, load_pem_x509_certificate

from fedhe import deploy
from fedhe.aggregator.app import run_job
from fedhe.approval import approval_line, bundle_files
from fedhe.config import JobConfig
from fedhe.crypto.multiparty import SECRET_MAGIC
from fedhe.deploy_cli import register
from tests.inprocess import InProcessGrid
from tests.test_deploy_kit import (
    assert_site_keys_stayed_home,
    private_keys_in,
    set_up_site,
    site_start,
)

REPO = Path(__file__).resolve().parents[1]
SITES = {
    "hospital-a": "party",
    "hospital-b": "party",
    "hospital-c": "party",
    "keyholder": "keyholder",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_init_writes_a_ca_and_a_server_certificate_and_no_site_key(tmp_path):
    federation = deploy.init_federation(tmp_path / "fed", SITES, host="10.0.0.5", port=9000)
    server = load_pem_x509_certificate((tmp_path / "fed/superlink/server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(SubjectAlternativeName).value
    assert "10.0.0.5" in [str(ip) for ip in san.get_values_for_type(IPAddress)]
    assert "localhost" in san.get_values_for_type(DNSName)
    assert private_keys_in(tmp_path / "fed") == {
        tmp_path / "fed/ca/ca.key",
        tmp_path / "fed/superlink/server.key",
    }  # each site makes its own (`fedhe deploy keygen`, tests/test_deploy_kit.py)
    for name in SITES:
        with pytest.raises(deploy.DeployError, match="fedhe deploy keygen"):
            federation.site_key(name)
    assert (tmp_path / "fed/ca/ca.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "fed/superlink/server.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(deploy.DeployError, match="already holds"):
        deploy.init_federation(tmp_path / "fed", SITES)
    with pytest.raises(deploy.DeployError, match="need parties"):
        deploy.init_federation(tmp_path / "other", {"a": "keyholder"})
    with pytest.raises(deploy.DeployError, match="site name"):
        deploy.init_federation(tmp_path / "other", {"Hospital A": "party"})


class Deployment:
    """Processes of one federation; everything is killed at the end. Set up as documented:
    the coordinator's folder is `folder`; each site makes its key in `<folder>/../sites/<name>`,
    hands over the public half, and gets its kit (written to `../kits/<name>`, copied in)."""

    def __init__(self, folder: Path, sites: dict[str, str] = SITES) -> None:
        self.port = _free_port()
        self.federation = deploy.init_federation(folder, sites, port=self.port)
        self.env = deploy.environment(self.federation)
        self.kits = {name: set_up_site(self.federation, name) for name in sites}
        self.logs = folder / "logs"
        self.logs.mkdir()
        self.processes: dict[str, subprocess.Popen] = {}
        self.site_args: dict[str, dict[str, str]] = {}
        # the sites run REPO's bundle as it is now (a snapshot: REPO may change meanwhile)
        self.app = bundle_files(REPO, folder.parent / "app" / "fedhe")
        self.approved = folder.parent / "approved.txt"
        self.approved.write_text(approval_line(self.app) + "\n")

    def start(self, name: str, command: list[str], env: dict | None = None) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        process = subprocess.Popen(
            command, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.processes[name] = process
        return process

    def start_site(self, name: str, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("approved", str(self.approved))
        return self.start(name, *site_start(self.kits[name], port=_free_port(), **kwargs))

    def run(self, out: Path, settings: str, timeout_s: float = 420) -> dict:
        command = deploy.run_command(self.app, f"{settings} out='{out}'")
        with (self.logs / f"run-{out.name}.log").open("wb") as log:
            subprocess.run(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                           timeout=timeout_s, check=True)  # fmt: skip
        deadline = time.monotonic() + 60
        while not (out / "result.json").exists():  # the ServerApp may finish after the stream
            if time.monotonic() > deadline:
                pytest.fail(f"no result.json; logs in {self.logs}")
            time.sleep(1)
        return json.loads((out / "result.json").read_text())

    def stop(self, name: str) -> None:
        process = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def stop_all(self) -> None:
        for name in list(self.processes):
            self.stop(name)

    def assert_keys_stayed_home(self, root: Path) -> None:
        """After the jobs: no site's private key anywhere under `root` (the coordinator's
        folder, its logs, every other site, every job's output) but in that site's folder."""
        assert_site_keys_stayed_home(root, {name: kit.folder for name, kit in self.kits.items()})


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    folder = tmp_path_factory.mktemp("federation")
    running = Deployment(folder / "fed")
    try:
        running.start("superlink", deploy.superlink_command(running.federation))
        assert register(running.federation, running.env, timeout_s=90) == 0
        running.start_site("keyholder", data_path=str(folder / "keyholder-data"))
        for name in ("hospital-a", "hospital-b", "hospital-c"):
            running.start_site(name)
        yield running
    finally:
        running.stop_all()
    running.assert_keys_stayed_home(tmp_path_factory.getbasetemp())


@pytest.mark.slow
def test_a_tls_deployment_runs_linreg_as_the_simulation_does(deployment, tmp_path):
    started = time.monotonic()
    result = deployment.run(
        tmp_path / "run",
        "task='linreg' parties=3 min-parties=2 plaintext-twin=false timeout-s=120",
    )
    wall = time.monotonic() - started
    simulated_out = tmp_path / "simulated"
    config = JobConfig(task="linreg", parties=3, min_parties=2, plaintext_twin=False,
                       out=str(simulated_out))  # fmt: skip
    run_job(InProcessGrid(config.num_nodes), config)
    simulated = json.loads((simulated_out / "result.json").read_text())
    deployed = np.array(result["coefficients"]["encrypted"])
    expected = np.array(simulated["coefficients"]["encrypted"])
    np.testing.assert_allclose(deployed, expected, rtol=1e-6, atol=1e-6)
    assert result["parties"]["excluded"] == {}
    print(f"deployment linreg: {wall:.0f} s wall, {result['round_trips']} round trips")


@pytest.mark.slow
def test_a_supernode_with_an_unregistered_key_is_refused(deployment, tmp_path):
    rogue = tmp_path / "rogue" / "rogue"
    deploy.write_site_key(rogue)
    command = deploy.site_command(
        deployment.kits["hospital-a"], "hospital-a", port=_free_port(),
        approved=str(deployment.approved),
    )  # fmt: skip
    command[command.index("--auth-supernode-private-key") + 1] = str(rogue)
    process = deployment.start("rogue", command)
    try:
        code = process.wait(timeout=120)
    finally:
        deployment.processes.pop("rogue", None)
    log = (deployment.logs / "rogue.log").read_text()
    assert code != 0
    assert "Exit Code: 305" in log and "Failed to activate SuperNode" in log


@pytest.mark.slow
def test_a_party_that_dies_mid_job_is_left_out(deployment, tmp_path):
    audit = deployment.federation.folder.parent / "keyholder-data" / "keyholder" / "audit.jsonl"
    before = len(audit.read_text().splitlines()) if audit.exists() else 0
    out = tmp_path / "run"
    killer = Killer(
        deployment,
        "hospital-c",
        lambda: _decrypted_since(audit, before),
        "the key holder's first decryption of the job",
    )
    result = deployment.run(
        out,
        "task='linreg' mode='gradient' rounds=2 lr=0.4 batch-size=0 parties=3 min-parties=2 "
        "plaintext-twin=false timeout-s=40 keyholder-retries=0",
    )
    killer.check()
    excluded = result["parties"]["excluded"]
    assert len(excluded) == 1 and "no reply" in next(iter(excluded.values())), excluded
    assert result["parties"]["per_round"] == [2, 2]  # the rounds after its death went on
    assert len(result["parties"]["contributors"][0]["parties"]) == 3  # it was there before
    assert np.isfinite(result["encrypted"]["r2"])


class Killer:
    """Kills `site` from a thread as soon as `ready()` holds, while the job runs. `ready` reads
    files (audit logs, SuperNode logs): the only wait is for the condition itself, under a guard
    that is no speed requirement. `check()`, after the job, fails the test naming what never
    happened."""

    GUARD_S = 900  # longer than any job here may take (`Deployment.run`: 420 s + 60 s)

    def __init__(self, deployment: Deployment, site: str, ready, waits_for: str) -> None:
        self.deployment, self.site, self.ready, self.waits_for = deployment, site, ready, waits_for
        self.killed = threading.Event()
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        deadline = time.monotonic() + self.GUARD_S
        while not self.ready():
            if self._cancelled.wait(0.2) or time.monotonic() > deadline:
                return
        self.deployment.stop(self.site)
        self.killed.set()

    def check(self) -> None:
        self._cancelled.set()
        self._thread.join()
        if not self.killed.is_set():
            pytest.fail(
                f"{self.site} was never killed: the job ended before {self.waits_for} (or it "
                f"did not come within {self.GUARD_S} s); logs in {self.deployment.logs}"
            )


def _audit_since(audit: Path, before: int) -> list[dict]:
    """The audit records after the first `before` (a record being written is left for later)."""
    if not audit.exists():
        return []
    records = []
    for line in audit.read_text().splitlines()[before:]:
        try:
            records.append(json.loads(line))
        except ValueError:
            break
    return records


def _decrypted_since(audit: Path, before: int) -> bool:
    return any(r.get("decision") == "decrypted" for r in _audit_since(audit, before))


GROUP_SITES = {
    "kh-a": "keyholder",
    "kh-b": "keyholder",
    "kh-c": "keyholder",
    "hospital-a": "party",
    "hospital-b": "party",
    "hospital-c": "party",
}


@pytest.fixture(scope="module")
def group_deployment(tmp_path_factory):
    """Three hospitals and a key-holder group of three sites, each with its own state folder
    and passphrase, over TLS with SuperNode authentication."""
    folder = tmp_path_factory.mktemp("group-federation")
    running = Deployment(folder / "fed", GROUP_SITES)
    try:
        running.start("superlink", deploy.superlink_command(running.federation))
        assert register(running.federation, running.env, timeout_s=90) == 0
        for name in ("kh-a", "kh-b", "kh-c"):
            passphrase = folder / f"{name}.pass"
            passphrase.write_text(f"passphrase of {name}")
            passphrase.chmod(0o600)
            running.site_args[name] = {
                "data_path": str(folder / f"{name}-data"),
                "passphrase_file": str(passphrase),
            }
            running.start_site(name, **running.site_args[name])
        for name in ("hospital-a", "hospital-b", "hospital-c"):
            running.start_site(name)
        yield running
    finally:
        running.stop_all()
    running.assert_keys_stayed_home(tmp_path_factory.getbasetemp())


def _kill_after_group_setup(deployment: Deployment, site: str) -> Killer:
    """Kill key holder `site` as soon as it has accepted a new job's public context and its
    SuperNode has sent that reply on (the group's set-up is over; the job's registration and
    decryptions are still to come)."""
    audit = deployment.federation.folder.parent / f"{site}-data" / "keyholder" / "audit.jsonl"
    before = len(audit.read_text().splitlines()) if audit.exists() else 0
    log = deployment.logs / f"{site}.log"
    offset = log.stat().st_size

    def ready() -> bool:
        declared = any(
            r.get("step") == 3 and r.get("decision") == "declared"
            for r in _audit_since(audit, before)
        )
        # the record is written before the reply leaves; a SuperNode handles one message at a
        # time and logs each step, so once every message it took is sent on, so is that reply
        return declared and _all_replies_sent(log.read_bytes()[offset:].decode(errors="replace"))

    return Killer(deployment, site, ready, f"{site} sent its reply to the group's set-up")


def _all_replies_sent(supernode_log: str) -> bool:
    return supernode_log.count("Sent successfully") >= supernode_log.count("Receiving: ")


@pytest.mark.slow
@pytest.mark.deployment
def test_a_key_holder_group_runs_linreg_with_one_holder_killed_after_setup(
    group_deployment, tmp_path
):
    """2-of-3 over TLS: kh-a dies right after set-up; the two others decrypt; the coefficients
    equal the single-key-holder simulation's; no site's state folder holds the key."""
    killer = _kill_after_group_setup(group_deployment, "kh-a")
    result = group_deployment.run(
        tmp_path / "run",
        "task='linreg' parties=3 min-parties=2 plaintext-twin=false timeout-s=40 "
        "keyholders='3' threshold=2 keyholder-retries=0",
    )
    killer.check()
    assert len(result["silent_keyholders"]) == 1
    simulated_out = tmp_path / "simulated"
    config = JobConfig(task="linreg", parties=3, min_parties=2, plaintext_twin=False,
                       out=str(simulated_out))  # fmt: skip
    run_job(InProcessGrid(config.num_nodes), config)
    simulated = json.loads((simulated_out / "result.json").read_text())
    np.testing.assert_allclose(
        result["coefficients"]["encrypted"], simulated["coefficients"]["encrypted"], rtol=1e-6
    )
    folder = group_deployment.federation.folder.parent
    for site in ("kh-a", "kh-b", "kh-c"):
        shares = list((folder / f"{site}-data").rglob("share.key"))
        assert shares and not list((folder / f"{site}-data").rglob("secret.ctx"))
        assert all(not s.read_bytes().startswith(SECRET_MAGIC) for s in shares)  # sealed at rest


@pytest.mark.slow
@pytest.mark.deployment
def test_a_key_holder_group_answers_knn_queries_with_one_holder_down(group_deployment, tmp_path):
    """kh-a (restarted: its state folder kept its identity) dies again after set-up; the KNN
    rankings and votes are combined by a live member."""
    if "kh-a" not in group_deployment.processes:
        group_deployment.start_site("kh-a", **group_deployment.site_args["kh-a"])
    killer = _kill_after_group_setup(group_deployment, "kh-a")
    result = group_deployment.run(
        tmp_path / "knn",
        "task='knn' dataset='iris' parties=3 min-parties=2 plaintext-twin=false timeout-s=40 "
        "keyholders='3' threshold=2 keyholder-retries=0 queries=4",  # one layout (d = 4)
    )
    killer.check()
    (silent,) = result["silent_keyholders"]
    combined = [d for d in result["decryptions"] if d["decision"] == "combined"]
    assert {d["output"] for d in combined} == {"knn_rank", "knn_vote"}
    assert all(d["keyholder"] != silent for d in result["decryptions"])
