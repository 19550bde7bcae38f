"""The ClientApp every SuperNode runs; its role (party or key holder) is set by `query.whoami`."""

from __future__ import annotations

import functools
import logging

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedhe import protocol, refusals
from fedhe.clients import keyholder, party
from fedhe.clients.roles import (
    HOLD_KEY_SHARE,
    hold_key_share,
    node_flag,
    partition_id,
    require_role,
    resolve_role,
    site_name,
)
from fedhe.crypto import pause_precompute
from fedhe.errors import FedHEError, ProtocolError

app = ClientApp()
log = logging.getLogger("fedhe.clients")


def _replying(handler):
    """`handler`, with a refusal (a FedHEError) answered by fedhe's error reply
    (`fedhe.refusals`: the aggregator tells it from Flower's own failures by its code)."""

    @functools.wraps(handler)
    def replying(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except FedHEError as err:
            log.warning("refused %s: %s", msg.metadata.message_type, refusals.reason_of(err))
            return refusals.error_reply(msg, party.site_private(err, context))

    return replying


@app.query("whoami")
@_replying
def whoami(msg: Message, context: Context) -> Message:
    protocol.check_message(msg.content, protocol.WHOAMI, protocol.REQUEST)
    config = protocol.config_of(msg.content)
    role = resolve_role(context, config)
    holds_keys = role == protocol.ROLE_KEYHOLDER or bool(config.get("parties-hold-keys"))
    if holds_keys and role == protocol.ROLE_PARTY:
        if "role" in context.node_config and not node_flag(context, HOLD_KEY_SHARE):
            raise ProtocolError(
                "the job has the parties hold the key's shares, but this site did not opt in: "
                f"start it with {HOLD_KEY_SHARE}=true and a keyholder-path."
            )
        hold_key_share(context)
    identity = keyholder.keyholder_for(context).identity.public if holds_keys else b""
    info = {"role": role, "partition-id": partition_id(context)}
    if site_name(context):  # deployed: the aggregator orders and names the sites by it
        info["site-name"] = site_name(context)
    return Message(
        protocol.content(
            protocol.WHOAMI,
            protocol.REPLY,
            config=info,
            payload={"identity": identity} if identity else None,
        ),
        reply_to=msg,
    )


def _as(role: str, handler):
    """Run `handler` only on a node of `role`; a malformed message becomes a ProtocolError."""

    def checked(msg: Message, context: Context) -> Message:
        require_role(context, role)
        protocol.check_message(msg.content, msg.metadata.message_type, protocol.REQUEST)
        try:
            with pause_precompute():  # next round's Enc(0)s wait until this message is done
                return handler(msg, context)
        except FedHEError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            raise ProtocolError(
                f"malformed {msg.metadata.message_type} message: {type(err).__name__}: {err}"
            ) from err

    checked.__name__ = handler.__name__
    return _replying(checked)


app.query("declare")(_as(protocol.ROLE_KEYHOLDER, keyholder.declare))
app.query("register")(_as(protocol.ROLE_KEYHOLDER, keyholder.register))
app.query("decrypt")(_as(protocol.ROLE_KEYHOLDER, keyholder.decrypt))
app.query("audit")(_as(protocol.ROLE_KEYHOLDER, keyholder.audit))
app.query("group")(_as(protocol.ROLE_KEYHOLDER, keyholder.group_step))
app.query("setup")(_as(protocol.ROLE_PARTY, party.setup))
app.query("moments")(_as(protocol.ROLE_PARTY, party.feature_moments))
app.query("stats")(_as(protocol.ROLE_PARTY, party.masked_statistics))
app.query("gradient")(_as(protocol.ROLE_PARTY, party.gradient))
app.query("model_step")(_as(protocol.ROLE_PARTY, party.model_step))
app.query("knn_upload")(_as(protocol.ROLE_PARTY, party.knn_upload))
app.query("knn_query")(_as(protocol.ROLE_PARTY, party.knn_query))
app.query("knn_answer")(_as(protocol.ROLE_PARTY, party.knn_answer))
app.query("mlp_query")(_as(protocol.ROLE_PARTY, party.mlp_query))
app.query("mlp_answer")(_as(protocol.ROLE_PARTY, party.mlp_answer))
app.query("model_release")(_as(protocol.ROLE_PARTY, party.model_release))
app.query("final_model")(_as(protocol.ROLE_PARTY, party.final_model))
app.query("shape")(_as(protocol.ROLE_PARTY, party.shape))
app.train()(_as(protocol.ROLE_PARTY, party.train))
