"""Bit packing of integer codes: ``bits``-bit codes packed into bytes, little-endian bit order,
exactly ceil(count * bits / 8) bytes with zero padding bits (the ``codes`` array of a payload,
``common.wire.payload``)."""

from __future__ import annotations

import numpy as np

from common.vocabulary import MAX_BITS

_PACK_CHUNK = 1 << 20  # codes per chunk: a multiple of 8, so every chunk ends on a byte boundary


# ---------------------------------------------------------------- bit packing


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take: ceil(count * bits / 8)."""
    return (count * bits + 7) // 8


def _check_pack_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in 1..{MAX_BITS}, got {bits!r}")


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes in [0, 2^bits - 1] into ceil(len * bits / 8) bytes, little-endian bit
    order (code i occupies bits i*bits .. i*bits + bits - 1 of the stream)."""
    _check_pack_bits(bits)
    codes = np.asarray(codes).reshape(-1)
    if codes.size and not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() > (1 << bits) - 1):
        raise ValueError(
            f"codes out of range for {bits} bits: found [{codes.min()}, {codes.max()}], "
            f"allowed [0, {(1 << bits) - 1}]"
        )
    if bits == 8:
        return codes.astype(np.uint8)
    if bits == 16:
        return codes.astype("<u2").view(np.uint8).copy()
    shifts = np.arange(bits, dtype=np.uint32)
    chunks = []
    for start in range(0, codes.size, _PACK_CHUNK):
        chunk = codes[start : start + _PACK_CHUNK].astype(np.uint32)
        bit_matrix = ((chunk[:, None] >> shifts) & 1).astype(np.uint8)
        chunks.append(np.packbits(bit_matrix.reshape(-1), bitorder="little"))
    packed = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.uint8)
    return packed[: packed_size(codes.size, bits)]


def unpack_bits(buffer: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: ``count`` codes (uint16) from exactly ceil(count*bits/8) bytes."""
    _check_pack_bits(bits)
    buffer = np.asarray(buffer)
    if buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise ValueError(
            f"packed codes must be a 1-D uint8 array, got {buffer.dtype} {buffer.shape}"
        )
    if count < 0 or buffer.size != packed_size(count, bits):
        raise ValueError(
            f"{count} codes of {bits} bits need {packed_size(max(count, 0), bits)} bytes, "
            f"got {buffer.size}"
        )
    if bits == 8:
        return buffer.astype(np.uint16)
    if bits == 16:
        return buffer.view("<u2").astype(np.uint16)
    weights = (np.uint32(1) << np.arange(bits, dtype=np.uint32)).astype(np.uint32)
    chunk_bytes = _PACK_CHUNK * bits // 8
    out = np.empty(count, dtype=np.uint16)
    for index, start in enumerate(range(0, buffer.size, chunk_bytes)):
        first = index * _PACK_CHUNK
        size = min(_PACK_CHUNK, count - first)
        bit_matrix = np.unpackbits(
            buffer[start : start + chunk_bytes], count=size * bits, bitorder="little"
        ).reshape(size, bits)
        out[first : first + size] = bit_matrix.astype(np.uint32) @ weights
    return out


def padding_is_zero(buffer: np.ndarray, bits: int, count: int) -> bool:
    """Whether the bits after the last code in the final byte are all zero."""
    used = (count * bits) % 8
    return used == 0 or buffer.size == 0 or int(buffer[-1]) >> used == 0
