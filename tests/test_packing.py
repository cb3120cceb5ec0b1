"""Bit packing (common.wire.packing): any 1..16-bit codes round-trip in exactly
ceil(count * bits / 8) bytes, across chunk boundaries; bad codes and bitwidths are refused."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.wire.packing import pack_bits, packed_size, unpack_bits


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 16), count=st.integers(0, 5000), seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip_with_exact_size(bits, count, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=count)
    packed = pack_bits(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == packed_size(count, bits)
    assert packed.size == -(-count * bits // 8)
    assert np.array_equal(unpack_bits(packed, bits, count), codes)


def test_pack_round_trip_across_chunk_boundary():
    codes = np.random.default_rng(0).integers(0, 2**13, size=(1 << 20) + 13)
    assert np.array_equal(unpack_bits(pack_bits(codes, 13), 13, codes.size), codes)


def test_pack_rejects_out_of_range_codes_and_bad_bits():
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(np.array([0, 16]), 4)
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(np.array([-1]), 4)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(np.array([0]), 17)
    with pytest.raises(ValueError, match="need"):
        unpack_bits(np.zeros(3, dtype=np.uint8), 4, 7)
