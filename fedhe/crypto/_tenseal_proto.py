"""TenSEAL's CKKSVector wire format, written by hand (TenSEAL has no API to wrap a SEAL
ciphertext as a vector without a save-and-load round trip through its own objects).

``message CKKSVectorProto {repeated uint32 sizes = 1; repeated bytes ciphertexts = 2;
double scale = 3;}``: the few protobuf rules that message needs (varints, length-delimited
fields, one little-endian double), nothing more.
"""

from __future__ import annotations

import struct

_SIZES = b"\x0a"  # field 1, length-delimited (packed repeated uint32)
_CIPHERTEXTS = b"\x12"  # field 2, length-delimited
_SCALE = b"\x19"  # field 3, 64-bit


def vector_proto(size: int, ciphertext: bytes, scale: float) -> bytes:
    """A CKKSVectorProto of one ciphertext (SEAL's own serialization) holding `size` values."""
    sizes = varint(size)
    return (
        _SIZES
        + varint(len(sizes))
        + sizes
        + _CIPHERTEXTS
        + varint(len(ciphertext))
        + ciphertext
        + _SCALE
        + struct.pack("<d", scale)
    )


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative integer."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
