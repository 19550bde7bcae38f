"""The aggregator's send-and-wait: a sliding window of messages in flight, replies as they come."""

import uuid

import pytest
from flwr.app import Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedhe.aggregator import session
from fedhe.aggregator.session import MAX_POLL_S, send_and_receive


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps messages with the running task's identity (as tests/inprocess.py does)."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 0


class SlowGrid:
    """Answers at most `per_pull` pending messages per pull; `silent` nodes never answer."""

    def __init__(self, per_pull=3, silent=()):
        self.per_pull = per_pull
        self.silent = set(silent)
        self.in_flight: dict[str, Message] = {}
        self.most_in_flight = 0
        self.pushed: list[int] = []

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.in_flight[message.metadata.message_id] = message
            self.pushed.append(message.metadata.dst_node_id)
            ids.append(message.metadata.message_id)
        self.most_in_flight = max(self.most_in_flight, len(self.in_flight))
        return ids

    def pull_messages(self, message_ids):
        answerable = [
            i for i in message_ids if self.in_flight[i].metadata.dst_node_id not in self.silent
        ]
        replies = []
        for message_id in answerable[: self.per_pull]:
            message = self.in_flight.pop(message_id)
            replies.append(Message(RecordDict(), reply_to=message))
        return replies


def _messages(n):
    return [Message(RecordDict(), dst_node_id=100 + i, message_type="query.x") for i in range(n)]


def test_every_reply_arrives_with_at_most_a_window_in_flight():
    grid = SlowGrid()
    replies = send_and_receive(grid, _messages(50), timeout_s=10, window=8)
    assert len(replies) == 50
    assert grid.most_in_flight <= 8


class FakeClock:
    """Stands in for the session module's `time`: a sleep advances the clock, nothing waits."""

    MAX_SLEEPS = 100_000  # a loop that never reaches its timeout fails instead of hanging

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    perf_counter = monotonic

    def sleep(self, seconds: float) -> None:
        assert seconds > 0 and len(self.sleeps) < self.MAX_SLEEPS, (seconds, len(self.sleeps))
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(session, "time", fake)
    return fake


def test_a_silent_node_times_out_and_messages_not_yet_sent_stay_unsent(clock):
    grid = SlowGrid(silent={100, 101})  # the first two hold their window slots forever
    replies = send_and_receive(grid, _messages(10), timeout_s=30, window=2)
    assert replies == []
    assert grid.pushed == [100, 101]  # the window never freed: the rest were never sent
    # it gave up at its timeout, not later, polling ever more slowly (at most 4×/s)
    assert clock.now == 30
    backing_off = clock.sleeps[:-1]  # the last sleep is what was left of the timeout
    assert backing_off == sorted(backing_off)
    assert max(clock.sleeps) == MAX_POLL_S
    assert len(clock.sleeps) < 30 / MAX_POLL_S + 100
