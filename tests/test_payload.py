"""The model payload (common.wire.payload): exact round trips, sizes, every malformed payload."""

import contextlib
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.learning.models import build_model
from common.lowbit.quantizers import quantize_weight, weight_codes
from common.vocabulary import FULL_PRECISION
from common.wire.packing import packed_size
from common.wire.payload import PayloadError, decode_state, encode_state, is_quantized, payload_bits


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    small = build_model("small_cnn", in_channels=1)
    resnet = build_model("resnet18")
    for model in (small, resnet):  # non-trivial BatchNorm state
        model.train()
        model(torch.randn(4, model.stem[0].in_channels if hasattr(model, "stem") else 1, 32, 32))
    return {"small_cnn": small, "resnet18": resnet}


@pytest.mark.parametrize("name", ["small_cnn", "resnet18"])
@pytest.mark.parametrize("bits", [*range(2, 17), FULL_PRECISION])
def test_encode_decode_round_trips_whole_models(models, name, bits):
    state = models[name].state_dict()
    arrays = encode_state(state, bits)
    assert len(arrays) == 4 and payload_bits(arrays) == bits
    decoded = decode_state(arrays, expect_bits=bits, template=state)
    assert list(decoded) == list(state)
    quantized_count = 0
    for key, tensor in state.items():
        assert decoded[key].dtype == tensor.dtype and decoded[key].shape == tensor.shape
        if bits != FULL_PRECISION and is_quantized(key, tensor):
            assert torch.equal(decoded[key], quantize_weight(tensor, bits))
            # re-encoding the decoded weights gives the sender's codes: the grid is a fixed point
            assert torch.equal(weight_codes(decoded[key], bits)[0], weight_codes(tensor, bits)[0])
            quantized_count += tensor.numel()
        else:
            assert torch.equal(decoded[key], tensor)
    assert arrays[1].size == (packed_size(quantized_count, bits) if quantized_count else 0)
    # what the receiver decodes re-encodes to the very same codes
    again = encode_state(decoded, bits)
    assert np.array_equal(again[1], arrays[1])


def test_full_precision_payload_carries_float32_unchanged(models):
    state = models["small_cnn"].state_dict()
    arrays = encode_state(state, FULL_PRECISION)
    assert arrays[1].size == 0
    floats = sum(t.numel() for t in state.values() if t.is_floating_point())
    assert arrays[2].size == floats


# ---------------------------------------------------------------- malformed payloads


@pytest.fixture(scope="module")
def payload(models):
    return encode_state(models["small_cnn"].state_dict(), 5)


def with_header(arrays, **changes):
    header = json.loads(arrays[0].tobytes())
    header.update(changes)
    raw = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8).copy()
    return [raw, *arrays[1:]]


def header_of(arrays):
    return json.loads(arrays[0].tobytes())


def replace(arrays, index, value):
    copy = list(arrays)
    copy[index] = value
    return copy


MALFORMED = {
    "three arrays": lambda a: a[:3],
    "not a list": lambda a: {"header": a[0]},
    "codes not uint8": lambda a: replace(a, 1, a[1].astype(np.int16)),
    "floats 2-D": lambda a: replace(a, 2, a[2].reshape(1, -1)),
    "header not json": lambda a: replace(a, 0, np.frombuffer(b"\xff\xfe{", dtype=np.uint8).copy()),
    "header a list": lambda a: replace(a, 0, np.frombuffer(b"[1, 2]", dtype=np.uint8).copy()),
    "wrong format": lambda a: with_header(a, format="other"),
    "unknown version": lambda a: with_header(a, version=99),
    "bits 0": lambda a: with_header(a, bits=0),
    "bits 1": lambda a: with_header(a, bits=1),
    "bits 17": lambda a: with_header(a, bits=17),
    "bits 33": lambda a: with_header(a, bits=33),
    "bits string": lambda a: with_header(a, bits="5"),
    "codes in a 32-bit payload": lambda a: with_header(a, bits=32),
    "truncated codes": lambda a: replace(a, 1, a[1][:-1]),
    "extra code bytes": lambda a: replace(a, 1, np.append(a[1], np.uint8(0))),
    "truncated floats": lambda a: replace(a, 2, a[2][:-3]),
    "extra floats": lambda a: replace(a, 2, np.append(a[2], np.float32(1))),
    "extra ints": lambda a: replace(a, 3, np.append(a[3], np.int64(1))),
    "nan scale": lambda a: replace(a, 2, np.concatenate([[np.nan], a[2][1:]]).astype(np.float32)),
    "inf tensor": lambda a: replace(a, 2, np.concatenate([a[2][:-1], [np.inf]]).astype(np.float32)),
    "scale above max": lambda a: replace(
        a, 2, np.concatenate([[1.5], a[2][1:]]).astype(np.float32)
    ),
    "negative scale": lambda a: replace(
        a, 2, np.concatenate([[-0.1], a[2][1:]]).astype(np.float32)
    ),
    "duplicate names": lambda a: with_header(
        a, tensors=[header_of(a)["tensors"][0]] * 2 + header_of(a)["tensors"][2:]
    ),
    "negative shape": lambda a: with_header(
        a, tensors=[[n, [-s for s in shape], d, k] for n, shape, d, k in header_of(a)["tensors"]]
    ),
    "huge shape": lambda a: with_header(
        a, tensors=[[n, [2**39, 2**39], d, k] for n, shape, d, k in header_of(a)["tensors"]]
    ),
    "unknown kind": lambda a: with_header(
        a, tensors=[[n, s, d, "blob"] for n, s, d, k in header_of(a)["tensors"]]
    ),
    "unknown dtype": lambda a: with_header(
        a, tensors=[[n, s, "complex64", k] for n, s, d, k in header_of(a)["tensors"]]
    ),
    "entry not a list": lambda a: with_header(a, tensors=["x"]),
    "no tensor list": lambda a: with_header(a, tensors=None),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_every_malformed_payload_raises_payload_error(payload, kind):
    with pytest.raises(PayloadError):
        decode_state(MALFORMED[kind](payload))


def test_nonzero_padding_bits_are_rejected():
    state = {"fc.weight": torch.randn(3, 1) * 0.1}  # 3 codes x 5 bits = 15 bits: one padding bit
    arrays = encode_state(state, 5)
    corrupt = arrays[1].copy()
    corrupt[-1] |= 0x80
    with pytest.raises(PayloadError, match="padding"):
        decode_state(replace(arrays, 1, corrupt))


def test_receiver_expectations_are_enforced(models, payload):
    state = models["small_cnn"].state_dict()
    with pytest.raises(PayloadError, match="expects 8"):
        decode_state(payload, expect_bits=8)
    with pytest.raises(PayloadError, match="missing"):
        decode_state(payload, template={**state, "extra.weight": torch.zeros(1)})
    reshaped = {k: (v.reshape(-1) if v.ndim == 4 else v) for k, v in state.items()}
    with pytest.raises(PayloadError, match="shape"):
        decode_state(payload, template=reshaped)


@settings(max_examples=300, deadline=None)
@given(
    index=st.integers(0, 3),
    data=st.data(),
)
def test_random_corruption_only_ever_raises_payload_error(payload, index, data):
    raw = bytearray(payload[index].tobytes())
    if raw:
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    raw = raw[:cut] if data.draw(st.booleans()) else raw
    dtype = payload[index].dtype
    usable = len(raw) - len(raw) % dtype.itemsize
    corrupt = replace(payload, index, np.frombuffer(bytes(raw[:usable]), dtype=dtype).copy())
    with contextlib.suppress(PayloadError):
        decode_state(corrupt)


def test_a_weight_sent_as_floats_under_a_low_bit_header_is_refused_against_the_template():
    model = build_model("small_cnn", 4, 1)
    template = model.state_dict()
    arrays = encode_state(template, FULL_PRECISION)
    header = {**json.loads(bytes(arrays[0]).decode()), "bits": 4}
    forged = [np.frombuffer(json.dumps(header).encode(), np.uint8), *arrays[1:]]
    decode_state(forged)  # the format alone cannot tell
    with pytest.raises(PayloadError, match="sent as 'float'; at 4 bits"):
        decode_state(forged, template=template)


def _client_and_downlink(tmp_path):
    from helpers import tiny_config

    from fedqssl_client.client import LowBitClient

    config = tiny_config(tmp_path, "fedsimclr", bitwidths="32,32")
    client = LowBitClient(config, 0, 32, None)
    return client, dict(client.model.state_dict())


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("huge", r"holds 3e\+38, beyond the 1e\+06 a sane model holds"),
        ("negative-variance", r"a BatchNorm variance below 0"),
    ],
)
def test_a_client_refuses_a_downlink_it_would_refuse_from_a_peer(tmp_path, damage, reason):
    client, state = _client_and_downlink(tmp_path)
    variance = next(k for k in state if k.endswith("running_var"))
    weight = variance.replace("running_var", "weight")  # that BatchNorm's gamma
    if damage == "huge":
        state[weight] = torch.full_like(state[weight], 3e38)
    else:
        state[variance] = -torch.ones_like(state[variance])
    before = {k: v.clone() for k, v in client.model.state_dict().items()}
    with pytest.raises(PayloadError, match=r"client 0 refuses the server's model: .*" + reason):
        client.fit(encode_state(state, 32), {"server-round": 1})
    with pytest.raises(PayloadError, match=reason):
        client.evaluate(encode_state(state, 32), {})
    assert all(torch.equal(v, client.model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("value", ["abc", -1, 1.5, True])
def test_a_client_refuses_a_fit_config_whose_round_is_not_a_round(tmp_path, value):
    client, state = _client_and_downlink(tmp_path)
    with pytest.raises(PayloadError, match=r"server-round must be an int >= 0, got"):
        client.fit(encode_state(state, 32), {"server-round": value})
