"""Key-holder handlers: declare a job (keys), decrypt under policy, hand out the audit log."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from flwr.app import Context, Message

from fedhe import protocol
from fedhe.crypto import KeyRequest
from fedhe.keyholder import DEFAULT_FLOODING_BITS, DecryptionRequest, JobDeclaration, KeyHolder
from fedhe.tasks import check_declaration, keyholder_release

STATE_ROOT_ENV = "FEDHE_STATE_ROOT"


def keyholder_for(context: Context) -> KeyHolder:
    """The key holder keeps its keys and audit log on its own disk, never in a message.

    Deployment: under `data-path` from node_config. Simulation: a private folder per run and
    node below $FEDHE_STATE_ROOT (the `fedhe` CLI points it at a temporary folder it deletes
    after the run) or the system's temporary folder."""
    data_path = context.node_config.get("data-path")
    if data_path:
        state_dir = Path(str(data_path)) / "keyholder"
    else:
        root = os.environ.get(STATE_ROOT_ENV) or Path(tempfile.gettempdir()) / "fedhe-keyholder"
        state_dir = Path(root) / f"{context.run_id}-{context.node_id}"
    flooding = int(context.node_config.get("flooding-bits", DEFAULT_FLOODING_BITS))
    passphrase_file = context.node_config.get("passphrase-file")
    return KeyHolder(
        state_dir,
        min_parties_floor=int(context.node_config.get("min-parties-floor", 2)),
        flooding_bits=None if flooding < 0 else flooding,
        declaration_check=check_declaration,
        passphrase=Path(str(passphrase_file)).read_bytes().strip() if passphrase_file else None,
    )


def declare(msg: Message, context: Context) -> Message:
    config = protocol.config_of(msg.content)
    job = JobDeclaration.from_dict(config["declaration"])
    keys = KeyRequest.from_dict(config.get("keys", {}))
    started = time.perf_counter()
    public = keyholder_for(context).declare_job(job, keys)
    return Message(
        protocol.content(
            payload={"public-context": public},
            metrics={"keygen-s": time.perf_counter() - started},
        ),
        reply_to=msg,
    )


def decrypt(msg: Message, context: Context) -> Message:
    config = protocol.config_of(msg.content)
    request = DecryptionRequest(
        job_id=str(config["job-id"]),
        output_kind=str(config["output"]),
        contributors=tuple(str(p) for p in config["contributors"]),
        tensor=protocol.payload_of(msg.content)["tensor"],
    )
    started = time.perf_counter()
    released = keyholder_release(keyholder_for(context), request)
    if not isinstance(released, dict):
        released = {"values": protocol.array_to_bytes(released)}
    return Message(
        protocol.content(
            payload=released,
            metrics={"decrypt-s": time.perf_counter() - started},
        ),
        reply_to=msg,
    )


def audit(msg: Message, context: Context) -> Message:
    job_id = protocol.config_of(msg.content).get("job-id")
    entries = keyholder_for(context).audit.entries(job_id)
    return Message(protocol.content(config={"entries": json.dumps(entries)}), reply_to=msg)
