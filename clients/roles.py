"""Which role this SuperNode plays, decided once by `query.whoami` and kept in its state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedhe import protocol
from fedhe.errors import ProtocolError

_ROLE_RECORD = "fedhe.role"
_KEY_SHARE_RECORD = "fedhe.key-share"
# node_config key: this node may send its data in the clear (the plaintext twin). Simulated
# nodes set it (`fedhe simulate`); `fedhe deploy site` never writes it.
ALLOW_PLAINTEXT = "allow-plaintext"
# What a simulated site opts into, each set by its own node config (a deployment chooses per
# site): the querier reports counts about its answers (accuracy, errors); a party hands the
# encrypted-model job's final model back to the aggregator.
REPORT_METRICS = "report-metrics"
SHARE_MODEL = "share-model"
# A party site that holds a share of the key when a job has the parties hold it
# (`--keyholders parties`); simulated nodes always may.
HOLD_KEY_SHARE = "hold-key-share"
# The name a deployed site goes by (`fedhe deploy site` sets it): the aggregator orders and names
# the parties by it in everything a user reads; simulated nodes have none.
SITE_NAME = "site-name"
# A deployed querier's own queries (a CSV of the job's feature columns, the target optional).
QUERY_PATH = "query-path"
# A site's own test set (a CSV with the target): with report-metrics, the site evaluates the
# job's final model on it and reports the metrics only (`fedhe.site_model`).
TEST_PATH = "test-path"
SIMULATION_NODE_CONFIG = {ALLOW_PLAINTEXT: True, REPORT_METRICS: True, SHARE_MODEL: True}


def resolve_role(context: Context, message_config: dict[str, Any]) -> str:
    """Deployment: `--node-config 'role="keyholder"'`. Simulation: the run names the first key
    holder's partition id and how many key holders follow it; every other virtual node is a
    party."""
    configured = context.node_config.get("role")
    if configured is not None:
        role = str(configured)
        if role not in protocol.ROLES:
            raise ProtocolError(f"node_config role={role!r} is not one of {list(protocol.ROLES)}.")
    else:
        partition = int(context.node_config.get("partition-id", -1))
        try:
            first = int(message_config.get("keyholder-partition-id", -2))
            count = int(message_config.get("keyholders", 1))
        except (TypeError, ValueError, OverflowError) as err:
            raise ProtocolError(
                "query.whoami config 'keyholder-partition-id' and 'keyholders' must be "
                f"integers (the first key holder's partition id, how many follow): {err}."
            ) from err
        role = (
            protocol.ROLE_KEYHOLDER if first <= partition < first + count else protocol.ROLE_PARTY
        )
    context.state[_ROLE_RECORD] = ConfigRecord({"role": role})
    return role


def hold_key_share(context: Context) -> None:
    """This party also holds a share of the job's key (`--keyholders parties`): it answers the
    key holders' messages too, with its own key-holder state and identity."""
    context.state[_KEY_SHARE_RECORD] = ConfigRecord({"holds": True})


def require_role(context: Context, expected: str) -> None:
    record = context.state.get(_ROLE_RECORD)
    role = None if record is None else record["role"]
    if role is None:
        raise ProtocolError(
            "this node has no role yet: the aggregator must send query.whoami first."
        )
    if expected == protocol.ROLE_KEYHOLDER and _KEY_SHARE_RECORD in context.state:
        return
    if role != expected:
        raise ProtocolError(f"this node is a {role}; it does not handle {expected} messages.")


def partition_id(context: Context) -> int:
    return int(context.node_config.get("partition-id", -1))


def site_name(context: Context) -> str:
    """This site's name from its own node config ("" on a simulated node)."""
    return str(context.node_config.get(SITE_NAME, ""))


def allows_plaintext(context: Context) -> bool:
    """True only when this node's own config says `allow-plaintext=true` (bool or "true"): a
    job's messages alone can never make a party send its data unencrypted."""
    return node_flag(context, ALLOW_PLAINTEXT)


def node_flag(context: Context, key: str) -> bool:
    """A yes/no setting of this node's own config: only True or "true" say yes."""
    value = context.node_config.get(key, False)
    return value is True or value == "true"


class WithNodeConfig(ClientApp):
    """`app` on nodes whose config gets `extra` on top of their own. Flower's simulation engine
    fixes a simulated node's config to its partition (`partition-id`, `num-partitions`), so
    `fedhe simulate` adds `allow-plaintext` this way."""

    def __init__(self, app: ClientApp, extra: Mapping[str, Any]) -> None:
        super().__init__()
        self.app = app
        self.extra = dict(extra)

    def __call__(self, message: Message, context: Context) -> Message:
        context.node_config = {**context.node_config, **self.extra}
        return self.app(message, context)
