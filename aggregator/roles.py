"""Find which node is the key holder and which are parties (`query.whoami`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from fedhe import protocol
from fedhe.aggregator.session import Session
from fedhe.errors import ProtocolError

log = logging.getLogger("fedhe.aggregator")


@dataclass(frozen=True)
class Federation:
    """The key holder's node id and the parties' node ids by name (party-0, party-1, …)."""

    keyholder: int
    parties: dict[str, int]


def wait_for_nodes(session: Session, expected: int, timeout_s: float) -> list[int]:
    """Node ids, once `expected` have connected (Flower may list none right after start)."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(session.grid.get_node_ids())
        if len(nodes) >= expected or time.monotonic() > deadline:
            return nodes
        time.sleep(0.5)


def discover(
    session: Session, node_ids: list[int], *, keyholder_partition_id: int, min_parties: int
) -> Federation:
    """Ask every node its role; refuse to go on without one key holder and enough parties."""
    exchange = session.ask(
        {str(n): n for n in node_ids},
        protocol.WHOAMI,
        protocol.content(config={"keyholder-partition-id": keyholder_partition_id}),
        role="node",
    )
    keyholders, parties = [], []
    for name, reply in exchange.replies.items():
        info = protocol.config_of(reply)
        if info.get("role") == protocol.ROLE_KEYHOLDER:
            keyholders.append(int(name))
        else:
            parties.append((int(info.get("partition-id", -1)), int(name)))
    if len(keyholders) != 1:
        raise ProtocolError(
            f"found {len(keyholders)} key holders among {len(node_ids)} nodes; exactly one "
            'SuperNode must run with role="keyholder".'
        )
    if len(parties) < min_parties:
        raise ProtocolError(
            f"found {len(parties)} parties, fewer than min_parties={min_parties}; start more "
            f"party SuperNodes (unreachable: {sorted(exchange.failures) or 'none'})."
        )
    ordered = [node for _, node in sorted(parties)]
    federation = Federation(keyholders[0], {f"party-{i}": n for i, n in enumerate(ordered)})
    log.info("key holder: node %s; %d parties", federation.keyholder, len(ordered))
    return federation
