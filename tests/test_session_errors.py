"""Failed replies, told apart by Flower's public `Error.code`: fedhe's refusals, Flower's own
failures, silence; and the window of messages in flight, set by whoever starts the engine."""

from __future__ import annotations

import ast
import uuid
from pathlib import Path

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedhe import protocol, refusals
from fedhe.aggregator.session import SIMULATION_WINDOW, Session, send_and_receive
from fedhe.clients.app import app as client_app
from fedhe.errors import ProtocolError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def task_identity():
    """Flower stamps messages with the running task's identity (as tests/inprocess.py does)."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 0


class ScriptedGrid:
    """Answers each node as scripted: an Error, nothing (silent), or an empty reply."""

    def __init__(self, answers: dict[int, Error | str | None]):
        self.answers = answers
        self.in_flight: dict[str, Message] = {}
        self.most_in_flight = 0
        self.pushed = 0

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self.in_flight[message.metadata.message_id] = message
            ids.append(message.metadata.message_id)
        self.pushed += len(ids)
        self.most_in_flight = max(self.most_in_flight, len(self.in_flight))
        return ids

    def pull_messages(self, message_ids):
        replies = []
        for message_id in list(message_ids):
            message = self.in_flight[message_id]
            answer = self.answers.get(message.metadata.dst_node_id, "ok")
            if answer is None:
                continue  # silent
            del self.in_flight[message_id]
            if isinstance(answer, Error):
                replies.append(Message(answer, reply_to=message))
            else:
                replies.append(Message(RecordDict(), reply_to=message))
        return replies


def test_refusals_flower_failures_and_silence_are_told_apart_by_code():
    grid = ScriptedGrid(
        {
            1: Error(refusals.FEDHE_ERROR_CODE, "PolicyError: decryption refused: budget spent."),
            2: Error(2, "<class 'RuntimeError'>:<'segfault ahead'>"),
            3: None,
            4: Error(5, None),
        }
    )
    session = Session(grid, timeout_s=0.2)  # type: ignore[arg-type]
    nodes = {"refuses": 1, "crashes": 2, "silent": 3, "gone": 4}
    exchange = session.ask(nodes, protocol.WHOAMI, RecordDict(), role="node")
    assert exchange.replies == {}
    assert exchange.failures == {
        "refuses": "PolicyError: decryption refused: budget spent.",
        "crashes": "Flower error code 2: <class 'RuntimeError'>:<'segfault ahead'>",
        "silent": "no reply within 0 s",
        "gone": "Flower error code 5: no reason given",
    }
    assert exchange.silent == {"silent"}


def test_the_client_app_answers_a_refusal_with_fedhes_code_and_its_own_line():
    context = Context(run_id=7, node_id=1000, node_config={}, state=RecordDict(), run_config={})
    message = Message(RecordDict(), dst_node_id=1000, message_type=protocol.SETUP)
    message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    reply = client_app(message, context)  # no role yet: refused, not raised
    assert reply.has_error() and reply.error.code == refusals.FEDHE_ERROR_CODE
    assert reply.error.reason.startswith("ProtocolError: this node has no role yet")
    assert refusals.failure_reason(reply.error) == reply.error.reason


def test_a_refusal_reply_carries_the_error_class_and_message():
    message = Message(RecordDict(), dst_node_id=3, message_type=protocol.SETUP)
    message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    reply = refusals.error_reply(message, ProtocolError("no such job: declare it first."))
    assert reply.error.code == refusals.FEDHE_ERROR_CODE
    assert reply.error.reason == "ProtocolError: no such job: declare it first."
    assert reply.metadata.reply_to_message_id == message.metadata.message_id


def _messages(n):
    return [Message(RecordDict(), dst_node_id=100 + i, message_type="query.x") for i in range(n)]


def test_without_a_window_every_message_is_sent_at_once():
    grid = ScriptedGrid({})
    replies = send_and_receive(grid, _messages(40), timeout_s=5)  # type: ignore[arg-type]
    assert len(replies) == 40 and grid.most_in_flight == 40


def test_a_session_started_for_the_simulation_engine_keeps_its_window():
    grid = ScriptedGrid({})
    session = Session(grid, timeout_s=5, window=SIMULATION_WINDOW)  # type: ignore[arg-type]
    nodes = {f"n{i}": 100 + i for i in range(3 * SIMULATION_WINDOW)}
    session.ask(nodes, "query.x", RecordDict(), role="node")
    assert grid.pushed == len(nodes) and not grid.in_flight  # every message sent and answered
    assert grid.most_in_flight == SIMULATION_WINDOW


@pytest.mark.parametrize("module", ["aggregator/session.py", "fedhe/refusals.py"])
def test_only_flowers_public_api_is_imported(module):
    tree = ast.parse((ROOT / module).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    flower = {name for name in imported if name and name.split(".")[0] == "flwr"}
    assert flower and flower <= {"flwr.app", "flwr.serverapp"}, flower


def test_a_site_that_refused_the_app_bundle_is_named_as_such():
    """Flower's INVALID_FAB reply (the site's launcher refused an unapproved bundle) reads as
    that refusal, with the fix, not as a node that is unreachable."""
    from flwr.app import Error
    from flwr.common.constant import ErrorCode

    reason = refusals.failure_reason(Error(ErrorCode.INVALID_FAB, "The FAB could not be verified."))
    assert "refused this run's app bundle" in reason and "fedhe deploy approve" in reason


def test_a_deployed_grids_reply_pulls_retry_quickly_and_other_grids_are_left_alone():
    """`quicken_reply_pulls` gives the HTTP grid's object pulls a short first backoff (latency
    only); a grid of another module, or one already quickened, is left as it is."""
    import sys
    import types

    from fedhe.aggregator.session import REPLY_PULL_BACKOFF_S, quicken_reply_pulls

    def pull_objects(object_ids, pull_object_fn, *, initial_backoff=1.0, backoff_cap=10.0):
        return initial_backoff, backoff_cap

    module = types.ModuleType("fake_http_grid")
    module.pull_objects = pull_objects
    grid_type = type("HttpGrid", (), {"__module__": "fake_http_grid"})
    sys.modules["fake_http_grid"] = module
    try:
        quicken_reply_pulls(grid_type())
        assert module.pull_objects([], None)[0] == REPLY_PULL_BACKOFF_S
        quickened = module.pull_objects
        quicken_reply_pulls(grid_type())
        assert module.pull_objects is quickened
    finally:
        del sys.modules["fake_http_grid"]
    quicken_reply_pulls(object())  # a grid of a module without pull_objects: nothing happens
