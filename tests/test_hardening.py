"""Attacks on fedhe's trust boundaries, each written as the test that it is refused.

Forged contexts (a header that lies about the real SEAL parameters), swapped or replaced key
files in the key holder's state folder, audit reads of every job at once, the simulated key
holder's world-known state folder, and settings smuggled into a SuperNode's node config.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import tenseal as ts
from flwr.app import Context, Message, RecordDict

from fedhe import deploy, protocol
from fedhe.crypto import AGGREGATION_PARAMS, CKKSParams, KeyRequest, PublicContext, generate_keys
from fedhe.crypto.context import CONTEXT_MAGIC, SecretContext
from fedhe.crypto.framing import frame, unframe
from fedhe.errors import (
    ContextMismatchError,
    FedHEError,
    ParameterError,
    PolicyError,
    ProtocolError,
)
from fedhe.keyholder import JobDeclaration, KeyHolder, OutputSpec
from tests.conftest import SMALL_PARAMS
from tests.inprocess import InProcessGrid, assign_roles

# -- 1. contexts whose header lies about the real SEAL parameters --------------------------------


def _raw_context(n: int, bits: list[int], scale_bits: int) -> ts.Context:
    raw = ts.context(ts.SCHEME_TYPE.CKKS, n, coeff_mod_bit_sizes=bits)
    raw.global_scale = 2.0**scale_bits
    return raw


def _forge(raw: ts.Context, claimed: CKKSParams, *, secret: bool = False) -> bytes:
    """`raw` framed as PublicContext.to_bytes / SecretContext.to_secret_bytes frame a context,
    under a header that claims `claimed` (fingerprint included, computed as fedhe does)."""
    body = raw.serialize(
        save_public_key=True,
        save_secret_key=secret,
        save_galois_keys=False,
        save_relin_keys=False,
    )
    header: dict[str, object] = {
        "params": claimed.to_dict(),
        "keys": KeyRequest().to_dict(),
        "context_bytes": len(body),
    }
    if secret:
        header["secret"] = True
    else:
        public_key = raw.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
        digest = hashlib.sha256(json.dumps(claimed.to_dict(), sort_keys=True).encode())
        digest.update(public_key)
        header["fingerprint"] = digest.hexdigest()[:32]
    return frame(CONTEXT_MAGIC, 1, header, body)


@pytest.fixture(scope="module")
def weak_raw() -> ts.Context:
    """N=2048 and a 54-bit modulus (two 27-bit primes: TenSEAL needs a special prime for its
    key switching): far below 128-bit security for what the header below claims."""
    return _raw_context(2048, [27, 27], AGGREGATION_PARAMS.scale_bits)


def test_public_context_with_weak_real_parameters_behind_the_default_header_is_refused(weak_raw):
    public = weak_raw.copy()
    public.make_context_public()
    forged = _forge(public, AGGREGATION_PARAMS)
    with pytest.raises(ParameterError, match="N=2048"):
        PublicContext.from_bytes(forged)


def test_public_context_whose_real_primes_differ_from_its_header_is_refused():
    raw = _raw_context(4096, [40, 40], SMALL_PARAMS.scale_bits)  # within the table, not SMALL
    raw.make_context_public()
    with pytest.raises(ContextMismatchError, match=r"\[40, 40\]"):
        PublicContext.from_bytes(_forge(raw, SMALL_PARAMS))


def test_public_context_whose_real_scale_differs_from_its_header_is_refused():
    raw = _raw_context(4096, list(SMALL_PARAMS.coeff_mod_bit_sizes), 25)
    raw.make_context_public()
    with pytest.raises(ContextMismatchError, match="scale"):
        PublicContext.from_bytes(_forge(raw, SMALL_PARAMS))


def test_an_honest_forgery_of_matching_parameters_still_loads():
    """The check compares real parameters, nothing else: a context framed by hand with its
    true parameters is as good as one from to_bytes."""
    raw = _raw_context(4096, list(SMALL_PARAMS.coeff_mod_bit_sizes), SMALL_PARAMS.scale_bits)
    raw.make_context_public()
    assert PublicContext.from_bytes(_forge(raw, SMALL_PARAMS)).params == SMALL_PARAMS


def test_secret_context_with_weak_real_parameters_is_refused(weak_raw):
    with pytest.raises(ParameterError, match="N=2048"):
        SecretContext.from_secret_bytes(_forge(weak_raw, AGGREGATION_PARAMS, secret=True))


# -- 2. the key holder's secret key files at rest -----------------------------------------------


def _job(job_id: str) -> JobDeclaration:
    return JobDeclaration(job_id, "aggregate", {"update_sum": OutputSpec(1)}, 2, SMALL_PARAMS)


def _secret_file(state: Path, job_id: str) -> Path:
    return state / "jobs" / job_id / "secret.ctx"


def test_a_sealed_key_file_copied_over_another_jobs_is_refused(tmp_path):
    keyholder = KeyHolder(tmp_path, passphrase=b"correct horse")
    keyholder.declare_job(_job("job-a"))
    keyholder.declare_job(_job("job-b"))
    shutil.copyfile(_secret_file(tmp_path, "job-a"), _secret_file(tmp_path, "job-b"))
    restarted = KeyHolder(tmp_path, passphrase=b"correct horse")
    with pytest.raises(PolicyError, match="job-b"):
        restarted.public_context("job-b")
    assert restarted.public_context("job-a") is not None  # job A's own file still opens


def test_an_unsealed_key_file_is_refused_when_a_passphrase_is_set(tmp_path):
    keyholder = KeyHolder(tmp_path, passphrase=b"correct horse")
    keyholder.declare_job(_job("job-b"))
    attacker = generate_keys(SMALL_PARAMS)  # the attacker keeps this secret key
    _secret_file(tmp_path, "job-b").write_bytes(attacker.to_secret_bytes())
    with pytest.raises(PolicyError, match="not sealed"):
        KeyHolder(tmp_path, passphrase=b"correct horse").public_context("job-b")


def test_a_corrupt_key_file_raises_a_fedhe_error(tmp_path):
    keyholder = KeyHolder(tmp_path)
    keyholder.declare_job(_job("job-c"))
    path = _secret_file(tmp_path, "job-c")
    header, body = unframe(
        path.read_bytes(), magic=CONTEXT_MAGIC, version=1, what="context", error=FedHEError
    )
    garbage = bytes(b ^ 0x5A for b in body)  # same length, the header still fits it
    path.write_bytes(frame(CONTEXT_MAGIC, 1, header, garbage))
    with pytest.raises(FedHEError, match="corrupt"):
        KeyHolder(tmp_path).public_context("job-c")
    with pytest.raises(FedHEError):
        SecretContext.from_secret_bytes(frame(CONTEXT_MAGIC, 1, header, garbage))


def test_a_truncated_sealed_key_file_raises_a_fedhe_error(tmp_path):
    KeyHolder(tmp_path, passphrase=b"correct horse").declare_job(_job("job-d"))
    path = _secret_file(tmp_path, "job-d")
    path.write_bytes(path.read_bytes()[:20])  # magic, then part of the salt
    with pytest.raises(PolicyError, match="truncated"):
        KeyHolder(tmp_path, passphrase=b"correct horse").public_context("job-d")


# -- 3. the simulated key holder's state and the audit handler ----------------------------------


def _context(node_config: dict | None = None) -> Context:
    return Context(
        run_id=7,
        node_id=1001,
        node_config=node_config or {"partition-id": 1, "num-partitions": 2},
        state=RecordDict(),
        run_config={},
    )


def test_simulated_key_holder_state_is_private_not_a_world_known_folder(monkeypatch):
    from fedhe.clients.keyholder import STATE_ROOT_ENV, keyholder_for

    monkeypatch.delenv(STATE_ROOT_ENV, raising=False)
    context = _context()
    state_dir = keyholder_for(context).state_dir
    root = state_dir.parent
    assert state_dir.name == "7-1001"
    assert root != Path("/tmp/fedhe-keyholder") and root.name.startswith("fedhe-keyholder-")
    assert stat.S_IMODE(root.stat().st_mode) == 0o700 and root.stat().st_uid == os.getuid()
    # the node's later messages (other Ray workers too) find the same keys
    assert keyholder_for(context).state_dir == state_dir
    # another node of another simulation gets a folder of its own
    assert keyholder_for(_context()).state_dir.parent != root


def test_simulated_key_holder_state_is_removed_when_the_process_exits(tmp_path):
    script = (
        "import os\n"
        "os.environ.pop('FEDHE_STATE_ROOT', None)\n"
        "from flwr.app import Context, RecordDict\n"
        "from fedhe.clients.keyholder import keyholder_for\n"
        "ctx = Context(run_id=1, node_id=2, node_config={'partition-id': 0},\n"
        "              state=RecordDict(), run_config={})\n"
        "print(keyholder_for(ctx).state_dir)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FEDHE_STATE_ROOT"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    state_dir = Path(done.stdout.strip().splitlines()[-1])
    assert state_dir.name == "1-2"
    assert not state_dir.parent.exists()


def test_deployed_key_holder_without_data_path_is_refused(monkeypatch):
    from fedhe.clients.keyholder import STATE_ROOT_ENV, keyholder_for

    monkeypatch.delenv(STATE_ROOT_ENV, raising=False)
    with pytest.raises(ProtocolError, match="data-path"):
        keyholder_for(_context({"role": "keyholder"}))


def _audit(config: dict) -> Message:
    """An AUDIT message to the key holder of an in-process federation whose log holds the
    records of two jobs."""
    from fedhe.clients.keyholder import keyholder_for

    grid = assign_roles(InProcessGrid(2), keyholder=1)
    log = keyholder_for(grid.contexts[1001]).audit
    for job_id in ("job-a", "job-b"):
        log.append(job=job_id, event="declare", decision="declared")
    message = Message(
        protocol.content(protocol.AUDIT, protocol.REQUEST, config=config),
        dst_node_id=1001,
        message_type=protocol.AUDIT,
    )
    (reply,) = grid.send_and_receive([message])
    return reply


@pytest.mark.parametrize("config", [{}, {"job-id": ""}], ids=["absent", "empty"])
def test_an_audit_request_without_a_job_id_is_refused(config):
    reply = _audit(config)
    assert reply.has_error(), "the key holder handed out every job's records"
    assert reply.error.reason.startswith("ProtocolError") and "name its job" in reply.error.reason


def test_an_audit_request_gets_only_its_jobs_records():
    reply = _audit({"job-id": "job-a"})
    entries = json.loads(protocol.config_of(reply.content)["entries"])
    assert entries and {e["job"] for e in entries} == {"job-a"}


# -- 4. settings smuggled into a SuperNode's node config ----------------------------------------


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    folder = tmp_path_factory.mktemp("federation")
    return deploy.init_federation(folder, {"hospital-a": "party", "keyholder": "keyholder"})


def _node_config(federation, name: str, **kwargs) -> dict:
    from flwr.common.config import parse_config_args

    kit = federation.for_site(name, federation.folder / "sites" / name)  # the site's own kit
    command = deploy.site_command(kit, name, port=9094, approved="/site/ok.txt", **kwargs)
    return parse_config_args([command[command.index("--node-config") + 1]])


@pytest.mark.parametrize(
    "site, data_path",
    [
        ("hospital-a", '/data/" role="keyholder'),
        ("keyholder", '/state/" min-parties-floor=1 flooding-bits=-1 x="'),
        ("keyholder", "/state/a\nflooding-bits = -1"),
    ],
    ids=["role", "policy", "newline"],
)
def test_a_data_path_cannot_inject_node_config_settings(federation, site, data_path):
    try:
        parsed = _node_config(federation, site, data_path=data_path)
    except deploy.DeployError:
        return  # refused with a clear error: nothing injected
    assert parsed == {"role": federation.sites[site], "site-name": site, "data-path": data_path}


@pytest.mark.parametrize(
    "data_path",
    [r"C:\temp\new\site.csv", "/srv/site a=b 'quoted'/x.csv", "/srv/données/ü.csv"],
    ids=["backslashes", "spaces-equals-quotes", "unicode"],
)
def test_a_data_path_reaches_the_supernode_unchanged(federation, data_path):
    parsed = _node_config(federation, "keyholder", data_path=data_path, passphrase_file=data_path)
    assert parsed == {
        "role": "keyholder",
        "site-name": "keyholder",
        "data-path": data_path,
        "passphrase-file": data_path,
    }
