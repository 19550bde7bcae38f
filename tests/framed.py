"""What tests read of framed bytes: through the one parser (`fedhe.crypto.framing.unframe`) and
the magic and version of the module that writes them, never by byte offsets."""

from __future__ import annotations

from typing import Any

import tenseal as ts

from fedhe.crypto.context import CONTEXT_MAGIC, CONTEXT_VERSION
from fedhe.crypto.framing import frame, unframe
from fedhe.crypto.tensor import TENSOR_MAGIC, TENSOR_VERSION
from fedhe.errors import FedHEError

FRAMES = {TENSOR_MAGIC: TENSOR_VERSION, CONTEXT_MAGIC: CONTEXT_VERSION}


def _framed(data: bytes, magic: bytes) -> tuple[dict[str, Any], bytes] | None:
    try:
        return unframe(data, magic=magic, version=FRAMES[magic], what="frame", error=FedHEError)
    except FedHEError:
        return None


def _split(data: bytes) -> tuple[bytes, dict[str, Any], bytes]:
    for magic in FRAMES:
        framed = _framed(data, magic)
        if framed is not None:
            return magic, *framed
    raise AssertionError(f"neither a tensor nor a context frame: {data[:16]!r}…")


def tensor_frame(data: bytes) -> tuple[dict[str, Any], bytes] | None:
    """(header, body) of tensor bytes; None for anything else."""
    return _framed(data, TENSOR_MAGIC)


def context_in(data: bytes) -> tuple[dict[str, Any], ts.Context] | None:
    """The header of context bytes and the TenSEAL context inside, as TenSEAL itself parses it
    (not `PublicContext.from_bytes`, whose own refusal of a secret key a test must not rely
    on); None for anything that is not framed as a context."""
    framed = _framed(data, CONTEXT_MAGIC)
    if framed is None:
        return None
    header, body = framed
    return header, ts.context_from(body[: header.get("context_bytes", len(body))])


def with_header(data: bytes, **changes: Any) -> bytes:
    """Tensor or context bytes with header fields replaced (what a forger would send)."""
    magic, header, body = _split(data)
    return frame(magic, FRAMES[magic], {**header, **changes}, body)


def with_body(data: bytes, body: bytes) -> bytes:
    """Tensor or context bytes with the same header over another body."""
    magic, header, _ = _split(data)
    return frame(magic, FRAMES[magic], header, body)
