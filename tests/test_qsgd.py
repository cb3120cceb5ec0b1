"""FedPAQ's update quantizer (QSGD): unbiased, in range, and its payload decodes or is refused."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from common.codec import PayloadError, decode_state, encode_update, payload_nbytes
from common.qsgd import qsgd_decode, qsgd_encode, qsgd_expected_levels, qsgd_levels

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(values=arrays(np.float32, st.integers(1, 300), elements=finite), bits=st.integers(2, 16))
def test_qsgd_expectation_is_exactly_the_input(values, bits):
    """E[Q(v)] = ||v|| sign(v) (lower + p) / s, computed from the two-point rounding law."""
    v = torch.from_numpy(values)
    lower, p_upper = qsgd_expected_levels(v, bits)
    assert ((p_upper >= 0) & (p_upper < 1)).all()
    expected = v.double().norm() * torch.sign(v.double()) * (lower + p_upper) / qsgd_levels(bits)
    assert torch.allclose(expected, v.double(), rtol=1e-9, atol=1e-9 * float(v.abs().max() + 1))


@settings(max_examples=100, deadline=None)
@given(values=arrays(np.float32, st.integers(1, 200), elements=finite), bits=st.integers(2, 16))
def test_qsgd_codes_lie_in_range_and_decode_to_neighbouring_levels(values, bits):
    v = torch.from_numpy(values)
    codes, norm = qsgd_encode(v, bits, torch.Generator().manual_seed(0))
    levels = qsgd_levels(bits)
    assert codes.min() >= 0 and codes.max() <= 2 * levels < 2**bits
    decoded = qsgd_decode(codes, norm, bits)
    step = norm / levels
    assert (decoded - v.double()).abs().max() <= step * (1 + 1e-6) + 1e-12
    assert (torch.sign(decoded) * torch.sign(v.double()) >= 0).all()  # never flips a sign


def test_qsgd_sample_mean_converges_to_the_input():
    v = torch.tensor([0.3, -1.2, 0.05, 2.0, -0.7, 0.0])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([qsgd_decode(*qsgd_encode(v, 3, generator), 3) for _ in range(20000)])
    # 3 bits: 3 levels, per-entry variance <= (||v||/s)^2 / 4; 6 standard errors of the mean
    bound = 6 * (v.norm() / 3) / 2 / np.sqrt(len(draws))
    assert (draws.mean(dim=0) - v.double()).abs().max() < bound
    assert draws.std(dim=0).max() > 0  # it is stochastic, not a rounding


def test_update_payload_round_trip_and_size():
    torch.manual_seed(0)
    update = {
        "conv.weight": torch.randn(16, 8, 3, 3),
        "bn.bias": torch.randn(16),
        "n": torch.tensor(7),
    }
    payload = encode_update(update, 4, torch.Generator().manual_seed(1))
    decoded = decode_state(payload, expect_bits=4, template=update)
    assert torch.equal(decoded["n"], update["n"])
    for name in ("conv.weight", "bn.bias"):
        step = float(update[name].norm()) / qsgd_levels(4)
        assert (decoded[name] - update[name]).abs().max() <= step * 1.0001
    count = sum(t.numel() for t in update.values() if t.is_floating_point())
    assert payload[1].nbytes == (count * 4 + 7) // 8  # 4 bits per entry, packed
    full = encode_update(update, 32)
    assert torch.equal(decode_state(full)["conv.weight"], update["conv.weight"])
    assert payload_nbytes(payload) < payload_nbytes(full) / 6


def test_out_of_range_qsgd_code_and_negative_norm_are_payload_errors():
    update = {"w": torch.randn(5)}
    payload = encode_update(update, 2, torch.Generator().manual_seed(0))
    # 2 bits: codes 0..2 are levels -1, 0, +1; code 3 does not exist
    forged = [payload[0], np.array([0b11111111, 0b00000011], dtype=np.uint8), *payload[2:]]
    with pytest.raises(PayloadError, match="QSGD code 3 exceeds 2"):
        decode_state(forged)
    negative = [*payload[:2], -np.abs(payload[2]) - 1, payload[3]]
    with pytest.raises(PayloadError, match="qsgd scale"):
        decode_state(negative)
