"""One place where the aggregator talks to nodes: sends, waits, logs failures, counts bytes."""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedhe import protocol

log = logging.getLogger("fedhe.aggregator")


@dataclass
class Exchange:
    """Replies by node name, failures by node name (with the reason), and the wall time."""

    replies: dict[str, RecordDict]
    failures: dict[str, str]
    wall_s: float


@dataclass
class Session:
    grid: Grid
    timeout_s: float
    bytes: Counter = field(default_factory=Counter)
    round_trips: int = 0  # send-and-wait exchanges: the latency floor of a real deployment

    def ask(
        self,
        nodes: Mapping[str, int],
        message_type: str,
        contents: Mapping[str, RecordDict] | RecordDict,
        *,
        role: str,
    ) -> Exchange:
        """Send one message per node and wait; a failed or missing reply is logged, not raised."""
        messages, names = [], {}
        for name, node_id in nodes.items():
            body = contents if isinstance(contents, RecordDict) else contents[name]
            self.bytes[f"aggregator->{role}"] += protocol.message_nbytes(body)
            messages.append(Message(body, dst_node_id=node_id, message_type=message_type))
            names[node_id] = name
        started = time.perf_counter()
        self.round_trips += 1
        replies = send_and_receive(self.grid, messages, timeout_s=self.timeout_s)
        wall = time.perf_counter() - started
        got, failures = {}, {}
        for reply in replies:
            name = names.get(reply.metadata.src_node_id)
            if name is None:
                continue
            if reply.has_error():
                failures[name] = short_reason(reply.error.reason)
                log.warning("%s %s failed: %s", name, message_type, failures[name])
                log.debug("%s %s full error: %s", name, message_type, reply.error.reason)
                continue
            self.bytes[f"{role}->aggregator"] += protocol.message_nbytes(reply.content)
            got[name] = reply.content
        for name in nodes:
            if name not in got and name not in failures:
                failures[name] = f"no reply within {self.timeout_s:.0f} s"
                log.warning("%s %s: no reply within %.0f s", name, message_type, self.timeout_s)
        return Exchange(got, failures, wall)


# Flower's own send_and_receive sleeps a fixed interval between pulls (0.1 s in simulation, 3 s
# against a SuperLink), so every exchange ends on that grid. Sleeping an eighth of the time
# since the last reply finds the next within ~12% and still polls a SuperLink at most 4×/s.
FIRST_POLL_S = 0.002
MAX_POLL_S = 0.25
# Messages in flight per exchange in Flower's simulation engine. Its in-memory link state scans
# every stored message for each node it polls (all nodes, every 0.1 s), so a whole federation's
# messages at once cost O(nodes²) per poll: linreg with 1,000 parties took 81 s, 52 s with a
# window of 16 (64: 64 s, 32: 55 s), now about linear in parties. A deployment sends all at
# once: its SuperNodes poll on their own schedule (3 s), so a message sent late waits for it.
SIMULATION_WINDOW = 16


def send_and_receive(
    grid: Grid, messages: list[Message], *, timeout_s: float, window: int | None = None
) -> list[Message]:
    """Push `messages`, at most `window` awaiting a reply at a time (default: SIMULATION_WINDOW
    in the simulation engine, all at once otherwise), and pull replies until all are in or
    `timeout_s` has passed (messages not yet pushed by then are never sent)."""
    if not hasattr(grid, "push_messages"):  # a grid that offers only send_and_receive
        return list(grid.send_and_receive(messages, timeout=timeout_s))
    if window is None:
        window = SIMULATION_WINDOW if _in_simulation(grid) else max(len(messages), 1)
    queue = deque(messages)
    pending: set[str] = set()
    replies: list[Message] = []
    started = last_reply = time.monotonic()
    while True:
        batch = [queue.popleft() for _ in range(min(window - len(pending), len(queue)))]
        if batch:
            pending.update(grid.push_messages(batch))
        if not pending:
            break
        pulled = list(grid.pull_messages(pending))
        replies.extend(pulled)
        pending -= {reply.metadata.reply_to_message_id for reply in pulled}
        now = time.monotonic()
        if pulled:
            last_reply = now
        if (not pending and not queue) or now - started >= timeout_s:
            break
        if not pulled:
            backoff = max(FIRST_POLL_S, (now - last_reply) / 8)
            time.sleep(min(backoff, MAX_POLL_S, timeout_s - (now - started)))
    return replies


def _in_simulation(grid: Grid) -> bool:
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid  # the simulation engine's grid

    return isinstance(grid, InMemoryGrid)


def short_reason(reason: str) -> str:
    """The handler's own error message, without the simulation engine's traceback around it."""
    marker = "occurred. Message:"
    if marker not in reason:
        return reason.strip()
    return reason.rsplit(marker, 1)[-1].strip().removesuffix("'>").strip()
