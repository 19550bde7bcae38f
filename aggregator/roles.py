"""Find which node is the key holder and which are parties (`query.whoami`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from fedhe import protocol
from fedhe.aggregator.session import Session
from fedhe.errors import ProtocolError

log = logging.getLogger("fedhe.aggregator")


@dataclass(frozen=True)
class Federation:
    """The key holders' node ids and identities by name (one: "keyholder"; a group:
    keyholder-0, keyholder-1, …) and the parties' node ids by name (party-0, party-1, …).
    `sites`: the site name of each of them that has one (a deployment), by that same name."""

    keyholders: dict[str, int]
    parties: dict[str, int]
    identities: dict[str, bytes] = field(default_factory=dict)
    sites: dict[str, str] = field(default_factory=dict)

    @property
    def keyholder(self) -> int:
        """The single key holder's node id (the first member's in a group)."""
        return next(iter(self.keyholders.values()))

    @property
    def is_group(self) -> bool:
        return len(self.keyholders) > 1


def wait_for_nodes(session: Session, expected: int, timeout_s: float) -> list[int]:
    """Node ids, once `expected` have connected (Flower may list none right after start)."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(session.grid.get_node_ids())
        if len(nodes) >= expected or time.monotonic() > deadline:
            return nodes
        time.sleep(0.1)


def discover(
    session: Session,
    node_ids: list[int],
    *,
    keyholder_partition_id: int,
    min_parties: int,
    keyholders: int = 1,
    parties_hold_keys: bool = False,
) -> Federation:
    """Ask every node its role; refuse to go on without the expected key holders and enough
    parties. Parties are named party-0, party-1, … and group members keyholder-0, … in the
    order of their site name (a deployment: `fedhe deploy site` sets it, so the order is the
    sites' names sorted, whichever node Flower lists first), then of their partition id (a
    simulation), then of their node id; with `parties_hold_keys` every party is also a
    member, under its party name. Two nodes claiming one site name are refused."""
    content = protocol.content(
        protocol.WHOAMI,
        protocol.REQUEST,
        config={
            "keyholder-partition-id": keyholder_partition_id,
            "keyholders": 0 if parties_hold_keys else keyholders,
            "parties-hold-keys": parties_hold_keys,
        },
    )
    exchange = session.ask({str(n): n for n in node_ids}, protocol.WHOAMI, content, role="node")
    silent = {n: int(n) for n in exchange.silent}
    if silent:  # a SuperNode that has just started may take a while to answer its first message
        again = session.ask(silent, protocol.WHOAMI, content, role="node")
        exchange.replies.update(again.replies)
        exchange.failures = {n: r for n, r in exchange.failures.items() if n not in again.replies}
    found: list[_Node] = []
    parties: list[_Node] = []
    for name, reply in exchange.replies.items():
        info = protocol.config_of(reply)
        node = _Node(
            str(info.get("site-name", "")),
            int(info.get("partition-id", -1)),
            int(name),
            protocol.payload_of(reply).get("identity", b""),
        )
        (found if info.get("role") == protocol.ROLE_KEYHOLDER else parties).append(node)
    _refuse_shared_site_names(found + parties)
    found.sort()
    parties.sort()
    if parties_hold_keys:
        return _parties_as_holders(parties, min_parties, found)
    if len(found) != keyholders:
        raise ProtocolError(
            f"found {len(found)} key holders among {len(node_ids)} nodes; the job needs "
            f'{keyholders} SuperNode(s) running with role="keyholder" (unreachable: '
            f"{sorted(exchange.failures) or 'none'})."
        )
    if len(parties) < min_parties:
        raise ProtocolError(
            f"found {len(parties)} parties, fewer than min_parties={min_parties}; start more "
            f"party SuperNodes (unreachable: {sorted(exchange.failures) or 'none'})."
        )
    names = ["keyholder"] if keyholders == 1 else [f"keyholder-{i}" for i in range(keyholders)]
    holders = dict(zip(names, found, strict=True))
    members = {f"party-{i}": node for i, node in enumerate(parties)}
    federation = Federation(
        {name: node.node_id for name, node in holders.items()},
        {name: node.node_id for name, node in members.items()},
        {name: node.identity for name, node in holders.items()},
        _site_names(holders | members),
    )
    log.info("key holders: %s; %d parties", federation.keyholders, len(parties))
    return federation


@dataclass(frozen=True, order=True)
class _Node:
    """One node's whoami reply, ordered as `discover` names the nodes."""

    site: str  # "" on a simulated node
    partition: int  # -1 on a deployed node
    node_id: int
    identity: bytes = field(compare=False)


def _site_names(named: dict[str, _Node]) -> dict[str, str]:
    return {name: node.site for name, node in named.items() if node.site}


def _refuse_shared_site_names(nodes: list[_Node]) -> None:
    """A site name names one site: the user reads results, and picks the querier, by it."""
    seen: dict[str, int] = {}
    for node in nodes:
        if node.site and node.site in seen:
            raise ProtocolError(
                f"nodes {seen[node.site]} and {node.node_id} both say they are site "
                f"{node.site!r}: give each SuperNode its own site-name (fedhe deploy site NAME)."
            )
        seen[node.site] = node.node_id


def _parties_as_holders(
    parties: list[_Node], min_parties: int, dedicated: list[_Node]
) -> Federation:
    """`--keyholders parties`: every party is also a member of the key-holder group."""
    if dedicated:
        raise ProtocolError(
            f"{len(dedicated)} dedicated key holders answered, but the job has the parties "
            "hold the key: start no keyholder SuperNode for it."
        )
    if len(parties) < max(min_parties, 2):
        raise ProtocolError(f"found {len(parties)} parties, fewer than min_parties={min_parties}.")
    names = {f"party-{i}": node for i, node in enumerate(sorted(parties))}
    missing = sorted(name for name, node in names.items() if not node.identity)
    if missing:
        raise ProtocolError(f"parties {missing} hold no key share: they sent no identity.")
    federation = Federation(
        {name: node.node_id for name, node in names.items()},
        {name: node.node_id for name, node in names.items()},
        {name: node.identity for name, node in names.items()},
        _site_names(names),
    )
    log.info("parties hold the key's shares: %s", sorted(names))
    return federation
