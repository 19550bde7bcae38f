"""An in-process stand-in for Flower's Grid: routes each message to the real ClientApp.

It runs the real ServerApp logic (`run_job`) and the real ClientApp handlers in one process,
without Ray, and records every message so tests can inspect what crossed a role boundary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedhe.clients.app import app as client_app
from fedhe.clients.roles import SIMULATION_NODE_CONFIG


@dataclass
class _Run:
    run_id: int


@dataclass
class InProcessGrid:
    num_nodes: int
    run_id: int = field(default_factory=lambda: random.getrandbits(62))
    node_configs: dict[int, dict] = field(default_factory=dict)
    log: list[tuple[str, Message]] = field(default_factory=list)
    unreachable: set[int] = field(default_factory=set)  # node indexes that never answer
    lose_first_reply: set[str] = field(default_factory=set)  # message types: 1st reply lost

    def __post_init__(self) -> None:
        TaskIdentity.run_id = self.run_id
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = 0
        self.run = _Run(self.run_id)
        self.contexts = {
            1000 + i: Context(
                run_id=self.run_id,
                node_id=1000 + i,
                node_config=self.node_configs.get(
                    i,
                    {
                        "partition-id": i,
                        "num-partitions": self.num_nodes,
                        **SIMULATION_NODE_CONFIG,
                    },
                ),
                state=RecordDict(),
                run_config={},
            )
            for i in range(self.num_nodes)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            self.log.append(("sent", message))
            if message.metadata.dst_node_id - 1000 in self.unreachable:
                continue
            context = self.contexts[message.metadata.dst_node_id]
            try:
                reply = client_app(message, context)
            except Exception as err:  # Flower turns handler exceptions into error replies
                reply = Message(
                    Error(code=1, reason=f"{type(err).__name__}: {err}"), reply_to=message
                )
            kind = message.metadata.message_type
            if kind in self.lose_first_reply:
                self.lose_first_reply.discard(kind)  # handled, but the reply never arrives
                continue
            self.log.append(("received", reply))
            replies.append(reply)
        return replies


def check_logged(direction: str, message: Message) -> None:
    """The full check every message passes (`fedhe.protocol.check_message`: its schema, and
    no secret-key material in any bytes) of one message of `grid.log`."""
    from fedhe import protocol

    kind = protocol.REQUEST if direction == "sent" else protocol.REPLY
    protocol.check_message(message.content, message.metadata.message_type, kind)


def kept_answers(grid: InProcessGrid, kind: str, *, encrypted: bool, node: int = 1000):
    """What the querier (party-0: node 1000) kept of a job's answers, in query order:
    `kind` "predictions" (KNN) or "logits-batched" (MLP). They never leave its node."""
    import numpy as np

    from fedhe import protocol

    suffix = "-he" if encrypted else "-plain"
    found = []
    for key, record in grid.contexts[node].state.items():
        if not key.startswith("fedhe.output."):
            continue
        job, _, name = key.removeprefix("fedhe.output.").rpartition(".")
        if suffix in job and name.startswith(kind + "-"):
            start = int(name.rsplit("-", 1)[1])
            found.append((start, protocol.array_from_bytes(bytes(record["values"]))))
    return np.concatenate([values for _, values in sorted(found, key=lambda f: f[0])])


def assign_roles(grid: InProcessGrid, keyholder: int) -> InProcessGrid:
    """Tell every node its role (`query.whoami`): node index `keyholder` holds the keys."""
    from flwr.app import Message

    from fedhe import protocol

    grid.send_and_receive(
        [
            Message(
                protocol.content(
                    protocol.WHOAMI,
                    protocol.REQUEST,
                    config={"keyholder-partition-id": keyholder},
                ),
                dst_node_id=node,
                message_type=protocol.WHOAMI,
            )
            for node in grid.contexts
        ]
    )
    return grid
