"""FedPAQ's update quantizer (QSGD): unbiased, in range, and its payload decodes or is refused."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from common.lowbit.qsgd import (
    num_buckets,
    qsgd_decode,
    qsgd_encode,
    qsgd_expected_levels,
    qsgd_levels,
)
from common.wire.payload import PayloadError, decode_state, encode_update, payload_nbytes

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
    codes, norms = qsgd_encode(v, bits, torch.Generator().manual_seed(0))
    levels = qsgd_levels(bits)
    assert codes.min() >= 0 and codes.max() <= 2 * levels < 2**bits
    decoded = qsgd_decode(codes, norms, bits)
    step = float(norms[0]) / levels
    assert (decoded - v.double()).abs().max() <= step * (1 + 1e-6) + 1e-12
    assert (torch.sign(decoded) * torch.sign(v.double()) >= 0).all()  # never flips a sign


@settings(max_examples=100, deadline=None)
@given(
    values=arrays(np.float32, st.integers(1, 300), elements=finite),
    bits=st.integers(2, 8),
    bucket=st.integers(1, 64),
)
def test_bucketed_qsgd_is_unbiased_and_each_bucket_bounds_its_own_error(values, bits, bucket):
    v = torch.from_numpy(values)
    lower, p_upper = qsgd_expected_levels(v, bits, bucket)
    codes, norms = qsgd_encode(v, bits, torch.Generator().manual_seed(0), bucket)
    assert len(norms) == num_buckets(v.numel(), bucket) == -(-v.numel() // bucket)
    levels = qsgd_levels(bits)
    per_entry = norms.repeat_interleave(bucket)[: v.numel()]
    expected = per_entry * torch.sign(v.double()) * (lower + p_upper) / levels
    assert torch.allclose(expected, v.double(), rtol=1e-9, atol=1e-9 * float(v.abs().max() + 1))
    error = (qsgd_decode(codes, norms, bits, bucket) - v.double()).abs()
    assert (error <= per_entry / levels * (1 + 1e-6) + 1e-12).all()


def test_buckets_cut_the_noise_of_a_layer_with_one_large_entry():
    """Whole-tensor QSGD scales every entry's noise by the largest entries' norm; buckets of 512
    confine it. A 4,608-entry layer with one outlier: noise at 4 bits drops several-fold."""
    torch.manual_seed(0)
    v = torch.randn(4608) * 1e-3
    v[0] = 1.0
    generator = torch.Generator().manual_seed(0)

    def noise(bucket: int) -> float:
        draws = [qsgd_decode(*qsgd_encode(v, 4, generator, bucket), 4, bucket) for _ in range(20)]
        return float(torch.stack([d - v.double() for d in draws]).norm() / (20**0.5 * v.norm()))

    whole, bucketed = noise(0), noise(512)
    assert bucketed < whole / 3, (whole, bucketed)


def test_qsgd_sample_mean_converges_to_the_input():
    v = torch.tensor([0.3, -1.2, 0.05, 2.0, -0.7, 0.0])
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([qsgd_decode(*qsgd_encode(v, 3, generator), 3) for _ in range(20000)])
    # 3 bits: 3 levels, per-entry variance <= (||v||/s)^2 / 4; 6 standard errors of the mean
    bound = 6 * (v.norm() / 3) / 2 / np.sqrt(len(draws))
    assert (draws.mean(dim=0) - v.double()).abs().max() < bound
    assert draws.std(dim=0).max() > 0  # it is stochastic, not a rounding


def test_update_payload_round_trip_and_size():
    """Weights are QSGD-coded, batch-norm tensors and integers travel exactly (QSGD noise on a
    running variance could make it negative: NaN features in FedPAQ's global model)."""
    torch.manual_seed(0)
    update = {
        "conv.weight": torch.randn(16, 8, 3, 3),
        "bn.bias": torch.randn(16),
        "bn.running_var": -torch.rand(16),
        "n": torch.tensor(7),
    }
    payload = encode_update(update, 4, torch.Generator().manual_seed(1), bucket_size=0)
    decoded = decode_state(payload, expect_bits=4, template=update)
    for name in ("n", "bn.bias", "bn.running_var"):
        assert torch.equal(decoded[name], update[name])
    step = float(update["conv.weight"].norm()) / qsgd_levels(4)
    assert (decoded["conv.weight"] - update["conv.weight"]).abs().max() <= step * 1.0001
    assert not torch.equal(decoded["conv.weight"], update["conv.weight"])
    assert payload[1].nbytes == (update["conv.weight"].numel() * 4 + 7) // 8  # 4 bits, packed
    assert payload[2].size == 1 + 32  # one norm for the one coded tensor, 32 exact floats
    # buckets of 512: conv.weight (1,152 entries) sends 3 norms, each 4 bytes
    bucketed = encode_update(update, 4, torch.Generator().manual_seed(1), bucket_size=512)
    assert bucketed[2].size == 3 + 32
    assert payload_nbytes(bucketed[1:]) == payload_nbytes(payload[1:]) + 2 * 4
    decoded = decode_state(bucketed, expect_bits=4, template=update)
    first = update["conv.weight"].reshape(-1)[:512]
    step = float(first.norm()) / qsgd_levels(4)
    assert (decoded["conv.weight"].reshape(-1)[:512] - first).abs().max() <= step * 1.0001
    full = encode_update(update, 32)
    assert torch.equal(decode_state(full)["conv.weight"], update["conv.weight"])
    assert payload_nbytes(payload) < payload_nbytes(full) / 4


def test_out_of_range_qsgd_code_and_negative_norm_are_payload_errors():
    update = {"w.weight": torch.randn(5, 1)}
    payload = encode_update(update, 2, torch.Generator().manual_seed(0))
    # 2 bits: codes 0..2 are levels -1, 0, +1; code 3 does not exist
    forged = [payload[0], np.array([0b11111111, 0b00000011], dtype=np.uint8), *payload[2:]]
    with pytest.raises(PayloadError, match="QSGD code 3 exceeds 2"):
        decode_state(forged)
    negative = [*payload[:2], -np.abs(payload[2]) - 1, payload[3]]
    with pytest.raises(PayloadError, match="qsgd scale"):
        decode_state(negative)


def test_a_header_whose_bucket_size_disagrees_with_the_norms_sent_is_refused():
    update = {"w.weight": torch.randn(40, 1)}
    payload = encode_update(update, 4, torch.Generator().manual_seed(0), bucket_size=16)
    assert payload[2].size == 3
    header = json.loads(payload[0].tobytes())
    for bucket, message in ((8, "floats"), (-1, "qsgd-bucket"), ("16", "qsgd-bucket")):
        forged = np.frombuffer(json.dumps({**header, "qsgd-bucket": bucket}).encode(), np.uint8)
        with pytest.raises(PayloadError, match=message):
            decode_state([forged.copy(), *payload[1:]])
