"""Key-holder handlers: declare a job (keys), decrypt under policy, hand out the audit log."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message

from fedhe import protocol
from fedhe.crypto import KeyRequest
from fedhe.errors import ProtocolError
from fedhe.keyholder import DEFAULT_FLOODING_BITS, JobDeclaration
from fedhe.keyholder.group import handle, request_from_message
from fedhe.keyholder.member import GroupMember
from fedhe.tasks import RELEASE_RULES, check_declaration, keyholder_release

STATE_ROOT_ENV = "FEDHE_STATE_ROOT"
_PRIVATE_ROOT_RECORD = "fedhe.keyholder-state"


def keyholder_for(context: Context) -> GroupMember:
    """The key holder keeps its keys and audit log on its own disk, never in a message.

    Deployment: under `data-path` from node_config (a party site that holds a key share: its
    `keyholder-path`). Simulation: a folder per run and node
    below $FEDHE_STATE_ROOT (the `fedhe` CLI points it at a temporary folder it deletes after
    the run) or, under `flwr run`, below a private temporary folder (`_private_state_root`)."""
    data_path = context.node_config.get("data-path")
    share_path = context.node_config.get("keyholder-path")  # a party site holding a key share
    if share_path:
        state_dir = Path(str(share_path))
    elif data_path and context.node_config.get("role") == "party":
        raise ProtocolError(
            "this party site holds a share of the job's key but has no keyholder-path: start "
            "it with --node-config 'keyholder-path=\"/its/key/folder\"' (its data-path is its "
            "CSV file)."
        )
    elif data_path:
        state_dir = Path(str(data_path)) / "keyholder"
    else:
        root = os.environ.get(STATE_ROOT_ENV) or _private_state_root(context)
        state_dir = Path(root) / f"{context.run_id}-{context.node_id}"
    flooding = int(context.node_config.get("flooding-bits", DEFAULT_FLOODING_BITS))
    passphrase_file = context.node_config.get("passphrase-file")
    return GroupMember(
        state_dir,
        rules=RELEASE_RULES,
        min_parties_floor=int(context.node_config.get("min-parties-floor", 2)),
        flooding_bits=None if flooding < 0 else flooding,
        declaration_check=check_declaration,
        passphrase=Path(str(passphrase_file)).read_bytes().strip() if passphrase_file else None,
        trusted_parties=_trusted_parties(context.node_config.get("trusted-parties")),
    )


def _trusted_parties(path: object) -> frozenset[bytes] | None:
    """Party identities pinned out of band: a JSON list of the sites' public keys (hex, as
    `fedhe identity` prints them). None: trust each job's registration."""
    if not path:
        return None
    try:
        pinned = json.loads(Path(str(path)).read_text())
        if not isinstance(pinned, list):
            raise ValueError("expected a JSON list")
        return frozenset(bytes.fromhex(str(key)) for key in pinned)
    except (OSError, ValueError) as err:
        raise ProtocolError(
            f"trusted-parties file {path} does not read as a JSON list of public keys (hex): {err}"
        ) from err


def _private_state_root(context: Context) -> str:
    """A folder only this user can enter (mkdtemp: mode 0700, unguessable name), removed when
    the process that made it exits. Its path stays in the node's state: Flower's simulation
    hands a node's later messages to other Ray workers, which must find the same keys."""
    if "role" in context.node_config:  # a deployed SuperNode: each message is a new process
        raise ProtocolError(
            "this key holder SuperNode has no data-path: its secret keys would vanish after "
            "every message. Start it with --node-config 'data-path=\"/its/state/folder\"' "
            "(fedhe deploy site … --data-path)."
        )
    record = context.state.get(_PRIVATE_ROOT_RECORD)
    if record is not None and Path(str(record["path"])).is_dir():
        return str(record["path"])
    root = tempfile.mkdtemp(prefix="fedhe-keyholder-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    context.state[_PRIVATE_ROOT_RECORD] = ConfigRecord({"path": root})
    return root


def declare(msg: Message, context: Context) -> Message:
    config = protocol.config_of(msg.content)
    job = JobDeclaration.from_dict(config["declaration"])
    keys = KeyRequest.from_dict(config.get("keys", {}))
    started = time.perf_counter()
    keyholder = keyholder_for(context)
    public = keyholder.declare_job(job, keys)
    return Message(
        protocol.content(
            protocol.DECLARE,
            protocol.REPLY,
            payload={"public-context": public, "keyholder-identity": keyholder.identity.public},
            metrics={"keygen-s": time.perf_counter() - started},
        ),
        reply_to=msg,
    )


def register(msg: Message, context: Context) -> Message:
    """Agree on the job's MAC seed with its parties: sealed seeds in, sealed envelopes out."""
    config = protocol.config_of(msg.content)
    payload = protocol.payload_of(msg.content)
    parties = [str(p) for p in config["parties"]]
    envelopes, refused = keyholder_for(context).register_parties(
        str(config["job-id"]),
        {p: payload[f"identity/{p}"] for p in parties if f"identity/{p}" in payload},
        {p: payload[f"mac-seed/{p}"] for p in parties if f"mac-seed/{p}" in payload},
    )
    return Message(
        protocol.content(
            protocol.REGISTER,
            protocol.REPLY,
            config={"refused": refused},
            payload={f"envelope/{p}": e for p, e in envelopes.items()},
        ),
        reply_to=msg,
    )


def decrypt(msg: Message, context: Context) -> Message:
    request = request_from_message(
        protocol.config_of(msg.content), protocol.payload_of(msg.content)
    )
    started = time.perf_counter()
    released = keyholder_release(keyholder_for(context), request)
    if not isinstance(released, dict):
        released = {"values": protocol.array_to_bytes(released)}
    return Message(
        protocol.content(
            protocol.DECRYPT,
            protocol.REPLY,
            payload=released,
            metrics={"decrypt-s": time.perf_counter() - started},
        ),
        reply_to=msg,
    )


def audit(msg: Message, context: Context) -> Message:
    """One job's audit records, then those of the jobs it declared after it (`later-jobs`, e.g.
    an MLP job's inference jobs): the aggregator names them (other jobs are not its business)."""
    job_id = protocol.config_of(msg.content).get("job-id")
    if job_id is None or job_id == "":
        raise ProtocolError(
            "an audit request must name its job: set config 'job-id' to the job whose records "
            "you want (the key holder hands out one job's records at a time)."
        )
    audit = keyholder_for(context).audit
    entries = audit.job_entries(str(job_id))
    for later in _later_jobs(protocol.config_of(msg.content).get("later-jobs", "[]")):
        entries += audit.job_entries(later)
    return Message(
        protocol.content(protocol.AUDIT, protocol.REPLY, config={"entries": json.dumps(entries)}),
        reply_to=msg,
    )


def _later_jobs(value: object) -> list[str]:
    try:
        jobs = json.loads(str(value))
    except ValueError:
        jobs = None
    if not isinstance(jobs, list) or not all(isinstance(j, str) and j for j in jobs):
        raise ProtocolError(
            f"an audit request's 'later-jobs' must be a JSON list of job ids; got {value!r}."
        )
    return jobs


def group_step(msg: Message, context: Context) -> Message:
    """One step of a key-holder group (set-up, decryption share, lead): `fedhe.keyholder.group`."""
    config = protocol.config_of(msg.content)
    started = time.perf_counter()
    reply_config, payload = handle(
        keyholder_for(context),
        str(config["step"]),
        config,
        protocol.payload_of(msg.content),
        release=keyholder_release,
    )
    return Message(
        protocol.content(
            protocol.GROUP,
            protocol.REPLY,
            config={**reply_config, "step": str(config["step"])},
            payload=payload,
            metrics={"keyholder-s": time.perf_counter() - started},
        ),
        reply_to=msg,
    )
