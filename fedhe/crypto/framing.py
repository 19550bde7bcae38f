"""Versioned framing of every serialized fedhe object: ``magic | version | header | body``."""

from __future__ import annotations

import json
import struct
from typing import Any

from fedhe.errors import FedHEError

FRAME_PREFIX = struct.Struct(">4sHI")  # magic, format version, length of the JSON header
MAX_FRAME_HEADER = 1 << 20


def frame(magic: bytes, version: int, header: dict[str, Any], body: bytes) -> bytes:
    header_bytes = json.dumps(header, sort_keys=True).encode()
    return FRAME_PREFIX.pack(magic, version, len(header_bytes)) + header_bytes + body


def unframe(
    data: object, *, magic: bytes, version: int, what: str, error: type[FedHEError]
) -> tuple[dict[str, Any], bytes]:
    """Split framed bytes into (header, body); any defect raises `error` naming `what`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise error(f"{what} must be bytes, got {type(data).__name__}.")
    data = bytes(data)
    if len(data) < FRAME_PREFIX.size:
        raise error(f"{what} bytes are truncated ({len(data)} bytes).")
    got_magic, got_version, header_len = FRAME_PREFIX.unpack_from(data)
    if got_magic != magic:
        raise error(f"these bytes are not a fedhe {what} (bad magic {got_magic!r}).")
    if got_version != version:
        raise error(
            f"{what} format version {got_version} is not supported (this fedhe reads "
            f"{version}); run the same fedhe version on every role."
        )
    end = FRAME_PREFIX.size + header_len
    if header_len > MAX_FRAME_HEADER or end > len(data):
        raise error(f"{what} header of {header_len} bytes is truncated or too large.")
    try:
        header = json.loads(data[FRAME_PREFIX.size : end])
    except ValueError as err:
        raise error(f"{what} header is not valid JSON: {err}") from err
    if not isinstance(header, dict):
        raise error(f"{what} header is not a JSON object.")
    return header, data[end:]
