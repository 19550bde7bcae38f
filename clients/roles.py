"""Which role this SuperNode plays, decided once by `query.whoami` and kept in its state."""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, Context

from fedhe import protocol
from fedhe.errors import ProtocolError

_ROLE_RECORD = "fedhe.role"


def resolve_role(context: Context, message_config: dict[str, Any]) -> str:
    """Deployment: `--node-config 'role="keyholder"'`. Simulation: the run names the key
    holder's partition id, every other virtual node is a party."""
    configured = context.node_config.get("role")
    if configured is not None:
        role = str(configured)
        if role not in protocol.ROLES:
            raise ProtocolError(f"node_config role={role!r} is not one of {list(protocol.ROLES)}.")
    else:
        partition = int(context.node_config.get("partition-id", -1))
        keyholder = int(message_config.get("keyholder-partition-id", -2))
        role = protocol.ROLE_KEYHOLDER if partition == keyholder else protocol.ROLE_PARTY
    context.state[_ROLE_RECORD] = ConfigRecord({"role": role})
    return role


def require_role(context: Context, expected: str) -> None:
    record = context.state.get(_ROLE_RECORD)
    role = None if record is None else record["role"]
    if role is None:
        raise ProtocolError(
            "this node has no role yet: the aggregator must send query.whoami first."
        )
    if role != expected:
        raise ProtocolError(f"this node is a {role}; it does not handle {expected} messages.")


def partition_id(context: Context) -> int:
    return int(context.node_config.get("partition-id", -1))
