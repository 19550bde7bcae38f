"""How a node's refusal travels back to the aggregator: Flower's error reply, fedhe's code.

A handler that refuses its message with a FedHEError answers with `error_reply`: Flower's
public `Error`, code FEDHE_ERROR_CODE and fedhe's own one-line reason. The aggregator tells it
apart from Flower's own failures (a handler that crashed, a node that went away) by the code
alone (`Error.code`), never by parsing Flower's error text.
"""

from __future__ import annotations

from flwr.app import Error, Message

from fedhe.errors import FedHEError

# Flower's own codes are 0–8 in flwr 1.42 (flwr.common.constant.ErrorCode, not public API);
# fedhe's sits well clear of them.
FEDHE_ERROR_CODE = 100
# Flower's ErrorCode.INVALID_FAB: a deployed site's launcher (`fedhe.supernode`) refused the
# run's app bundle because its hash is not in the site's approved list.
INVALID_FAB_CODE = 7


def error_reply(msg: Message, err: FedHEError) -> Message:
    """The reply to `msg` of a handler that refused it with `err`."""
    return Message(Error(code=FEDHE_ERROR_CODE, reason=reason_of(err)), reply_to=msg)


def reason_of(err: FedHEError) -> str:
    """fedhe's one line for a refusal: "<error class>: <what was wrong and what to do>"."""
    return f"{type(err).__name__}: {err}"


def failure_reason(error: Error) -> str:
    """What a node's error reply says: a fedhe handler's own line, or Flower's error code and
    reason for anything else."""
    reason = (error.reason or "").strip()
    if error.code == FEDHE_ERROR_CODE:
        return reason
    if error.code == INVALID_FAB_CODE:
        return (
            "the site refused this run's app bundle: its hash is not in the site's approved "
            "list (the site reviews the code and adds `fedhe deploy approve APP_DIR` to it)"
        )
    return f"Flower error code {error.code}: {reason or 'no reason given'}"
