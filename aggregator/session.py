"""One place where the aggregator talks to nodes: sends, waits, logs failures, counts bytes.

Flower's public API only (`flwr.app`, `flwr.serverapp`): a failed reply is told apart by its
`Error.code`, never by parsing Flower's error text (`fedhe.refusals`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import time
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedhe import protocol
from fedhe.errors import FedHEError
from fedhe.refusals import failure_reason

log = logging.getLogger("fedhe.aggregator")


@dataclass
class Exchange:
    """Replies by node name, failures by node name (with the reason), and the wall time;
    `silent`: the failed nodes that sent no reply at all (the others answered with an error)."""

    replies: dict[str, RecordDict]
    failures: dict[str, str]
    wall_s: float
    silent: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Request:
    """One message of an exchange: to which node, of which kind, with what, to which role."""

    node_id: int
    message_type: str
    content: RecordDict
    role: str


@dataclass
class Session:
    """`window`: messages awaiting a reply at a time (None: all at once); the simulation engine
    wants SIMULATION_WINDOW, and whoever starts it says so (`fedhe simulate`, or the job's
    `message-window` setting: Flower's public API does not tell a simulation apart)."""

    grid: Grid
    timeout_s: float
    window: int | None = None
    bytes: Counter = field(default_factory=Counter)
    round_trips: int = 0  # send-and-wait exchanges: the latency floor of a real deployment
    names: dict[str, str] = field(default_factory=dict)  # for warnings: party-0 → party-1.csv

    def ask(
        self,
        nodes: Mapping[str, int],
        message_type: str,
        contents: Mapping[str, RecordDict] | RecordDict,
        *,
        role: str,
    ) -> Exchange:
        """Send one message per node and wait; a failed or missing reply is logged, not raised."""
        return self.ask_each(
            {
                name: Request(
                    node_id,
                    message_type,
                    contents if isinstance(contents, RecordDict) else contents[name],
                    role,
                )
                for name, node_id in nodes.items()
            }
        )

    def ask_each(self, requests: Mapping[str, Request]) -> Exchange:
        """One exchange of messages of several kinds (to parties and key holders at once, say):
        one round trip, however many kinds it carries. Replies are keyed as `requests` are."""
        messages, names = [], {}
        for name, request in requests.items():
            self.bytes[f"aggregator->{request.role}"] += protocol.message_nbytes(request.content)
            message = Message(
                request.content, dst_node_id=request.node_id, message_type=request.message_type
            )
            messages.append(message)
            names[id(message)] = name
        started = time.perf_counter()
        self.round_trips += 1
        replies = send_and_receive(
            self.grid, messages, timeout_s=self.timeout_s, window=self.window
        )
        wall = time.perf_counter() - started
        got, failures = {}, {}
        for reply in replies:
            name = _addressee(reply, messages, names)
            if name is None:
                continue
            request = requests[name]
            if reply.has_error():
                failures[name] = failure_reason(reply.error)
                log.warning(
                    "%s %s failed: %s", self.label(name), request.message_type, failures[name]
                )
                continue
            try:  # the same schema and byte checks the node built its reply under
                protocol.check_message(reply.content, request.message_type, protocol.REPLY)
            except FedHEError as err:
                failures[name] = f"{type(err).__name__}: {err}"
                log.warning(
                    "%s %s refused: %s", self.label(name), request.message_type, failures[name]
                )
                continue
            self.bytes[f"{request.role}->aggregator"] += protocol.message_nbytes(reply.content)
            got[name] = reply.content
        silent = {name for name in requests if name not in got and name not in failures}
        for name in silent:
            failures[name] = f"no reply within {self.timeout_s:.0f} s"
            log.warning(
                "%s %s: no reply within %.0f s",
                self.label(name),
                requests[name].message_type,
                self.timeout_s,
            )
        return Exchange(got, failures, wall, silent)

    def label(self, name: str) -> str:
        """A node as the user knows it (a party's CSV file with --data-dir, else its id; `Job`
        sets them)."""
        return self.names.get(name, name)


# The ServerApp's pull of a reply's objects retries after 1 s (Flower's default) when the node
# has announced its reply but not yet uploaded every object of it: a retry at ~50 ms instead
# saves about a second per round trip in a deployment.
REPLY_PULL_BACKOFF_S = 0.05
REPLY_PULL_BACKOFF_CAP_S = 1.0


def quicken_reply_pulls(grid: Grid) -> None:
    """Shorten the retry backoff of the deployed grid's object pulls (Flower's HTTP grid, the
    one a SuperLink gives a ServerApp); any other grid, or a Flower whose pull takes no backoff
    settings, is left as it is: this is latency only."""
    module = sys.modules.get(type(grid).__module__)
    pull = getattr(module, "pull_objects", None)
    if pull is None or getattr(pull, "func", None) is not None:  # absent, or done already
        return
    if "initial_backoff" not in inspect.signature(pull).parameters:
        return
    module.pull_objects = functools.partial(
        pull, initial_backoff=REPLY_PULL_BACKOFF_S, backoff_cap=REPLY_PULL_BACKOFF_CAP_S
    )


def _addressee(reply: Message, messages: list[Message], names: dict[int, str]) -> str | None:
    """Which request `reply` answers: by message id (Flower's grids set it when they push), else
    by its node when that node was sent one message only."""
    for message in messages:
        if message.metadata.message_id and (
            message.metadata.message_id == reply.metadata.reply_to_message_id
        ):
            return names[id(message)]
    sent = [m for m in messages if m.metadata.dst_node_id == reply.metadata.src_node_id]
    return names[id(sent[0])] if len(sent) == 1 else None


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
# Who starts the simulation engine passes this window (`fedhe.cli.simulate`).
SIMULATION_WINDOW = 16


def send_and_receive(
    grid: Grid, messages: list[Message], *, timeout_s: float, window: int | None = None
) -> list[Message]:
    """Push `messages`, at most `window` awaiting a reply at a time (None: all at once), and
    pull replies until all are in or `timeout_s` has passed (messages not yet pushed by then
    are never sent)."""
    if not hasattr(grid, "push_messages"):  # a grid that offers only send_and_receive
        return list(grid.send_and_receive(messages, timeout=timeout_s))
    if window is None:
        window = max(len(messages), 1)
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
