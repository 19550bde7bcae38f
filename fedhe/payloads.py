"""The kinds of bytes a message payload may hold, each checked, and `check_bytes`, the one
encoder every bytes value passes before it enters or after it leaves a Flower message.

A kind (`fedhe.messages.Kind`) is checked from its framing only (ciphertexts are not parsed);
every value is also searched for secret-key material (`fedhe.crypto.secret_material`).
"""

from __future__ import annotations

import hashlib
import io
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from fedhe.crypto.context import CONTEXT_MAGIC, PublicContext
from fedhe.crypto.multiparty import DECRYPTION_MAGIC, KEYGEN_MAGIC
from fedhe.crypto.params import MAX_LOG_Q_128
from fedhe.crypto.secret_material import frame_at, refuse_unframed
from fedhe.crypto.tensor import TENSOR_MAGIC
from fedhe.errors import ProtocolError
from fedhe.messages import Kind

__all__ = ["check_bytes"]


def check_bytes(data: Any, kinds: Iterable[Kind], *, what: str) -> bytes:
    """`data` as it may enter a message: bytes of one of `kinds` that hold no secret-key
    material. Raises SecretKeyLeakError for secret material (whatever its framing) and
    ProtocolError for bytes of another kind."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"{what} must be bytes, got {type(data).__name__}.")
    data = bytes(data)
    refuse_unframed(
        data,
        what=what,
        embedded=False,  # pragma: no mutate  # None is as false; each kind searches further
    )
    kinds = tuple(kinds)
    reasons = []
    for kind in kinds:
        reason = _KIND_CHECKS[kind](data, what)
        if reason is None:
            return data
        reasons.append(f"not {kind.value}: {reason}")
    raise ProtocolError(
        f"{what} must be {' or '.join(k.value for k in kinds)}; its {len(data)} bytes "
        f"(starting {data[:8].hex() or 'empty'}) are {'; '.join(reasons)}."
    )


# -- the kinds of bytes a payload may hold ------------------------------------------------------


def _context_reason(data: bytes, what: str) -> str | None:
    if data[:4] != CONTEXT_MAGIC:
        return "no FHEC magic"
    # The same context goes to every party (~10 ms to parse each time): remember the digests
    # of contexts that passed; a refused one is parsed and refused every time.
    digest = hashlib.sha256(data).digest()
    if digest in _PUBLIC_DIGESTS:
        return None
    PublicContext.from_bytes(data)  # raises SecretKeyLeakError if a secret key is inside
    _PUBLIC_DIGESTS[digest] = None  # pragma: no mutate  # the value is never read
    while len(_PUBLIC_DIGESTS) > 64:
        _PUBLIC_DIGESTS.popitem(
            last=False,  # pragma: no mutate  # None is as false: the oldest goes
        )
    return None


_PUBLIC_DIGESTS: OrderedDict[bytes, None] = OrderedDict()


def _tensor_reason(data: bytes, what: str) -> str | None:
    """Framing only (the ciphertexts are not parsed): the header, the body's size, and no raw
    SEAL object, TenSEAL context or fedhe secret frame where a ciphertext starts."""
    framed = frame_at(data, 0, TENSOR_MAGIC)
    if framed is None:
        return "no FHET frame"
    header, start = framed
    shape = _shape(header)
    if shape is None:
        return f"header shape {header.get('shape')!r} is malformed"
    if header.get("kind") == "plain":
        if len(data) - start != 8 * math.prod(shape):
            return f"a plain tensor of shape {shape} with {len(data) - start} bytes of values"
        refuse_unframed(data[start:], what=what, embedded=True)
        return None
    sizes = header.get("chunk_bytes")
    if header.get("kind") != "ckks" or not _counts(sizes) or sum(sizes) != len(data) - start:
        return f"kind {header.get('kind')!r} with chunks {sizes!s:.40} of {len(data) - start}"
    for size in sizes:
        chunk = data[start : start + size]
        # Where a chunk starts: TenSEAL's vector, never a raw SEAL or TenSEAL object.
        # (embedded=None is equally false: an equivalent mutant.)
        refuse_unframed(chunk, what=f"{what} ciphertext", embedded=False)  # pragma: no mutate
        # A chunk is TenSEAL's vector around raw SEAL ciphertexts: any secret key inside it
        # (a SecretKey in place of a ciphertext, a context frame) is refused.
        refuse_unframed(chunk, what=f"{what} ciphertext", embedded=True, secret_only=True)
        start += size
    return None


_KEYGEN_KINDS = frozenset({"ckg-share", "rkg1-share", "rkg2-share", "rtg-share", "rkg1"})


def _keygen_reason(data: bytes, what: str) -> str | None:
    framed = frame_at(data, 0, KEYGEN_MAGIC)
    if framed is None:
        return "no FHEG frame"
    header, start = framed
    shape = _shape(header)
    if header.get("kind") not in _KEYGEN_KINDS:
        return f"kind {header.get('kind')!r} is no public key-generation share"
    if shape is None or len(data) - start != 8 * math.prod(shape):
        return f"shape {header.get('shape')!r} does not fit {len(data) - start} bytes"
    refuse_unframed(data[start:], what=what, embedded=True)  # residues: nothing else in them
    return None


def _decryption_share_reason(data: bytes, what: str) -> str | None:
    framed = frame_at(data, 0, DECRYPTION_MAGIC)
    if framed is None:
        return "no FHED frame"
    header, start = framed
    levels = header.get("levels")
    if not _counts(levels) or len(levels) != header.get("chunks"):
        return f"levels {levels!s:.40} do not match chunks {header.get('chunks')!r}"
    size = len(data) - start
    if not levels:
        return None if size == 0 else f"{size} bytes of residues for no levels"
    n, rest = divmod(size, 8 * sum(levels))
    if rest or n not in MAX_LOG_Q_128:  # n: the ring degree N of the residues
        return f"{size} bytes of residues do not fit levels {levels}"
    refuse_unframed(data[start:], what=what, embedded=True)  # residues: nothing else in them
    return None


_SEALED_MIN_BYTES = 12 + 16  # nonce and AES-GCM tag (fedhe.crypto.channel)


def _sealed_reason(data: bytes, what: str) -> str | None:
    if len(data) < _SEALED_MIN_BYTES:
        return f"shorter than a nonce and a tag ({_SEALED_MIN_BYTES} bytes)"
    refuse_unframed(data, what=what, embedded=True)  # sealed bytes look random: nothing in them
    return None


def _identity_reason(data: bytes, what: str) -> str | None:
    return None if len(data) == 32 else f"{len(data)} bytes"


def _array_reason(data: bytes, what: str) -> str | None:
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = _NPY_HEADERS.get(version)
        if read_header is None:
            return f".npy format version {version} (this fedhe writes 1.0)"
        shape, _, dtype = read_header(buffer)
    except (ValueError, TypeError, SyntaxError, EOFError) as err:
        return f"no .npy array ({err})"
    if dtype.kind != "f" or dtype.hasobject:
        return f"an array of {dtype}, not of floats"
    if len(data) - buffer.tell() != dtype.itemsize * math.prod(shape):
        return f"an array of shape {shape} with {len(data) - buffer.tell()} bytes of values"
    refuse_unframed(data, what=what, embedded=True)
    return None


_NPY_HEADERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def _empty_reason(data: bytes, what: str) -> str | None:
    return None if not data else f"{len(data)} bytes"


_KIND_CHECKS = {
    Kind.CONTEXT: _context_reason,
    Kind.TENSOR: _tensor_reason,
    Kind.KEYGEN: _keygen_reason,
    Kind.DECRYPTION_SHARE: _decryption_share_reason,
    Kind.SEALED: _sealed_reason,
    Kind.IDENTITY: _identity_reason,
    Kind.ARRAY: _array_reason,
    Kind.EMPTY: _empty_reason,
}


def _shape(header: Mapping[str, Any]) -> list[int] | None:
    shape = header.get("shape")
    ok = isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
    return shape if ok else None


def _counts(values: Any) -> bool:
    return isinstance(values, list) and all(isinstance(v, int) and v > 0 for v in values)
