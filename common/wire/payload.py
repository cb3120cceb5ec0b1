"""Wire format of a model: bit-packed integer codes, their per-layer scales, and float tensors.

A payload is four numpy arrays (Flower ships each as ``np.save`` bytes, about 128 bytes of header
apiece, so a model travels in four arrays whatever its size):

0. ``header``: uint8 bytes of UTF-8 JSON: format name, version, bitwidth, and one entry per tensor
   ``[name, shape, dtype, kind]`` in state-dict order, ``kind`` being ``codes`` (a weight's
   compander codes), ``qsgd`` (an update's QSGD codes, ``common.lowbit.qsgd``), ``float`` or
   ``int``.
1. ``codes``: uint8, the codes of every ``codes``/``qsgd`` tensor, concatenated and packed at
   ``bits`` bits (exactly ceil(total * bits / 8) bytes, padding bits zero).
2. ``floats``: float32, the scales of every coded tensor in order (one compander scale per
   ``codes`` tensor; one QSGD norm per bucket of a ``qsgd`` tensor, ``qsgd-bucket`` entries each in
   the header, 0 meaning the whole tensor), then every ``float`` tensor.
3. ``ints``: int64, every ``int`` tensor (BatchNorm's ``num_batches_tracked``).

Quantized tensors are the weights of convolutions and linear layers (floating, ``*.weight``, two
or more dimensions); BatchNorm parameters, biases and buffers travel as float32. At 32 bits every
floating tensor travels as float32 and ``codes`` is empty.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from common.lowbit.qsgd import (
    DEFAULT_BUCKET_SIZE,
    num_buckets,
    qsgd_decode,
    qsgd_encode,
    qsgd_levels,
)
from common.lowbit.quantizers import MAX_SCALE, codes_to_weight, weight_codes
from common.vocabulary import FULL_PRECISION, check_bits
from common.wire.packing import pack_bits, packed_size, padding_is_zero, unpack_bits

FORMAT_NAME = "fedqssl-state"
FORMAT_VERSION = 1
NUM_ARRAYS = 4
MAX_HEADER_BYTES = 1 << 20  # a ResNet-18 header is about 8 KB
_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}
_INT_DTYPES = {
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_KINDS = ("codes", "qsgd", "float", "int")
_CODED_KINDS = ("codes", "qsgd")


class PayloadError(ValueError):
    """A received payload is malformed; the message says what is wrong."""


# The largest magnitude a float tensor of a received model may hold. Trained weights, BatchNorm
# statistics and biases of these models are orders of magnitude below it; a value beyond it can
# only be an attack or a diverged peer, and one such model would dominate any average.
MAX_MAGNITUDE = 1e6


def check_plausible(state: Mapping[str, torch.Tensor], update: bool = False) -> None:
    """``PayloadError`` unless every float is within ``MAX_MAGNITUDE`` and, for a model (not an
    ``update``), every BatchNorm running variance is finite and >= 0: what the codec's format
    checks cannot know, a sane model's range. The server applies it to every uplink, each
    client to its downlink."""
    for name, tensor in state.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        largest = float(tensor.abs().max())
        if not largest <= MAX_MAGNITUDE:
            raise PayloadError(
                f"tensor {name!r} holds {largest:.3g}, beyond the {MAX_MAGNITUDE:g} a sane model "
                "holds (common.wire.payload.MAX_MAGNITUDE)"
            )
        if not update and name.endswith("running_var") and float(tensor.min()) < 0:
            raise PayloadError(f"tensor {name!r}: a BatchNorm variance below 0")


# ---------------------------------------------------------------- model payloads


def is_quantized(name: str, tensor: torch.Tensor) -> bool:
    """Conv and linear weights travel as codes; everything else as full-precision numbers."""
    return name.endswith("weight") and tensor.ndim >= 2 and tensor.is_floating_point()


def encode_state(state_dict: Mapping[str, torch.Tensor], bits: int) -> list[np.ndarray]:
    """A model's state dict as the four payload arrays, its quantized weights at ``bits`` bits.

    The codes are the forward pass's, so ``decode_state`` returns exactly the weights the sender's
    forward pass used.
    """

    def weight_layer(name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, list[float]] | None:
        """(codes, [scale]) of a conv or linear weight, or None to send the tensor as is."""
        if bits == FULL_PRECISION or not is_quantized(name, tensor):
            return None
        codes, scale = weight_codes(tensor, bits)
        return codes, [float(scale)]

    return _encode(state_dict, bits, "codes", weight_layer)


def encode_update(
    update: Mapping[str, torch.Tensor],
    bits: int,
    generator: torch.Generator | None = None,
    bucket_size: int = DEFAULT_BUCKET_SIZE,
) -> list[np.ndarray]:
    """A model *update* (FedPAQ's uplink): the tensors ``encode_state`` quantizes (conv and
    linear weights) QSGD-quantized at ``bits`` in buckets of ``bucket_size`` entries (0: whole
    tensors), one float32 norm per bucket; the rest (biases, batch-norm parameters and running
    statistics) as float32, as in ``encode_state``.

    Unbiased: the decoded update's expectation is ``update``. QSGD's noise on a running variance
    could drive it negative (NaN features), which is one reason those stay exact. Integer tensors
    travel as they are. At 32 bits every floating tensor travels as float32.
    """

    def qsgd_layer(name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, list[float]] | None:
        """(QSGD codes, bucket norms) of a weight update, or None to send it as is."""
        if bits == FULL_PRECISION or not is_quantized(name, tensor):
            return None
        codes, norms = qsgd_encode(tensor, bits, generator, bucket_size)
        return codes, norms.tolist()

    return _encode(update, bits, "qsgd", qsgd_layer, {"qsgd-bucket": bucket_size})


def _encode(
    state_dict: Mapping[str, torch.Tensor],
    bits: int,
    coded_kind: str,
    coder: Callable[[str, torch.Tensor], tuple[torch.Tensor, list[float]] | None],
    extra_header: Mapping[str, int] | None = None,
) -> list[np.ndarray]:
    """The payload arrays; ``coder`` gives a tensor's (codes, scales), or None to send it as is."""
    check_bits(bits)
    entries: list[list[object]] = []
    codes: list[np.ndarray] = []
    scales: list[float] = []
    floats: list[np.ndarray] = []
    ints: list[np.ndarray] = []
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        dtype = str(tensor.dtype).removeprefix("torch.")
        allowed = _FLOAT_DTYPES if tensor.is_floating_point() else _INT_DTYPES
        if dtype not in allowed:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be encoded")
        coded = coder(name, tensor)
        if coded is not None:
            codes.append(coded[0].reshape(-1).to(torch.int64).numpy())
            scales.extend(coded[1])
            kind = coded_kind
        elif tensor.is_floating_point():
            floats.append(tensor.reshape(-1).to(torch.float32).numpy())
            kind = "float"
        else:
            ints.append(tensor.reshape(-1).to(torch.int64).numpy())
            kind = "int"
        entries.append([name, list(tensor.shape), dtype, kind])
    header = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "bits": bits, "tensors": entries}
    header.update(extra_header or {})
    all_codes = np.concatenate(codes) if codes else np.empty(0, dtype=np.int64)
    return [
        np.frombuffer(json.dumps(header, separators=(",", ":")).encode(), dtype=np.uint8).copy(),
        pack_bits(all_codes, bits) if codes else np.empty(0, dtype=np.uint8),
        np.concatenate([np.asarray(scales, dtype=np.float32), *floats]).astype(np.float32),
        np.concatenate(ints) if ints else np.empty(0, dtype=np.int64),
    ]


def payload_bits(arrays: Sequence[np.ndarray]) -> int:
    """The bitwidth a payload declares (validated)."""
    return _parse_header(_check_arrays(arrays)[0])["bits"]


def payload_nbytes(arrays: Sequence[np.ndarray]) -> int:
    """Bytes of array data in a payload (Flower adds about 128 bytes of ``np.save`` header each)."""
    return int(sum(np.asarray(array).nbytes for array in arrays))


def decode_state(
    arrays: Sequence[np.ndarray],
    expect_bits: int | None = None,
    template: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The state dict a payload carries. Every size is checked against the header before
    anything is allocated, so any bytes a peer sends end in a ``PayloadError`` at worst.

    Args:
        arrays: the four payload arrays (``encode_state``'s or ``encode_update``'s output, as
            Flower delivers them).
        expect_bits: the bitwidth the receiver expects (a client's partition's), or None.
        template: the receiver's own state dict: names, shapes and dtypes the payload must
            match, or None.

    Returns:
        The tensors by name, on the CPU: quantized weights decoded from their codes (exactly
        the weights the sender's forward pass used), every other tensor as sent.

    Raises:
        PayloadError: a malformed payload (header, sizes, codes, padding), or one whose
            bitwidth, names or shapes differ from ``expect_bits`` / ``template``.
    """
    header_array, codes_buffer, floats, ints = _check_arrays(arrays)
    header = _parse_header(header_array)
    bits, entries = header["bits"], header["tensors"]
    if expect_bits is not None and bits != expect_bits:
        raise PayloadError(f"payload is at {bits} bits, the receiver expects {expect_bits}")
    if template is not None:
        _check_against_template(entries, template, bits)

    bucket = header.get("qsgd-bucket", 0)
    coded = [kind in _CODED_KINDS for *_, kind in entries]
    num_layers = sum(coded)
    num_codes = sum(math.prod(e[1]) for e, c in zip(entries, coded, strict=True) if c)
    scale_counts = [
        num_buckets(math.prod(shape), bucket) if kind == "qsgd" else 1
        for _, shape, _, kind in entries
        if kind in _CODED_KINDS
    ]
    num_scales = sum(scale_counts)
    counts = {
        kind: sum(math.prod(shape) for _, shape, _, k in entries if k == kind) for kind in _KINDS
    }
    _check_size("codes", codes_buffer.size, packed_size(num_codes, bits) if num_layers else 0)
    _check_size("floats", floats.size, num_scales + counts["float"])
    _check_size("ints", ints.size, counts["int"])
    if num_layers and not padding_is_zero(codes_buffer, bits, num_codes):
        raise PayloadError("packed codes have non-zero padding bits after the last code")
    if not np.isfinite(floats).all():
        raise PayloadError("payload holds NaN or infinite floats (scales or tensors)")
    _check_scales(entries, scale_counts, floats[:num_scales])

    all_codes = unpack_bits(codes_buffer, bits, num_codes) if num_layers else None
    offsets = {"coded": 0, "float": num_scales, "int": 0}
    sources = {"coded": all_codes, "float": floats, "int": ints}
    state: dict[str, torch.Tensor] = {}
    layer, scale_start = 0, 0
    for name, shape, dtype, kind in entries:
        size = math.prod(shape)
        source = "coded" if kind in _CODED_KINDS else kind
        start = offsets[source]
        values = torch.from_numpy(np.array(sources[source][start : start + size]))
        offsets[source] = start + size
        if kind == "codes":
            scale = torch.tensor(floats[scale_start], dtype=torch.float32)
            values = codes_to_weight(values.to(torch.float32), scale, bits)
        elif kind == "qsgd":
            values = values.to(torch.int64)
            if size and int(values.max()) > 2 * qsgd_levels(bits):
                raise PayloadError(
                    f"tensor {name!r}: QSGD code {int(values.max())} exceeds "
                    f"{2 * qsgd_levels(bits)} at {bits} bits"
                )
            norms = torch.from_numpy(floats[scale_start : scale_start + scale_counts[layer]].copy())
            values = qsgd_decode(values, norms, bits, bucket)
        if kind in _CODED_KINDS:
            scale_start += scale_counts[layer]
            layer += 1
        dtypes = _INT_DTYPES if kind == "int" else _FLOAT_DTYPES
        state[name] = values.to(dtypes[dtype]).reshape(shape)
    return state


def _check_scales(entries: list, counts: list[int], scales: np.ndarray) -> None:
    """Compander scales lie in [0, MAX_SCALE]; QSGD norms are >= 0."""
    coded = [kind for *_, kind in entries if kind in _CODED_KINDS]
    kinds = [kind for kind, count in zip(coded, counts, strict=True) for _ in range(count)]
    for kind, scale in zip(kinds, scales, strict=True):
        upper = MAX_SCALE if kind == "codes" else np.inf
        if not 0 <= scale <= upper:
            raise PayloadError(f"a {kind} scale must lie in [0, {upper}], got {scale}")


def _check_arrays(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    if not isinstance(arrays, (list, tuple)) or len(arrays) != NUM_ARRAYS:
        count = len(arrays) if isinstance(arrays, (list, tuple)) else type(arrays).__name__
        raise PayloadError(
            f"a payload is {NUM_ARRAYS} arrays (header, codes, floats, ints), got {count}"
        )
    expected = (
        ("header", np.uint8),
        ("codes", np.uint8),
        ("floats", np.float32),
        ("ints", np.int64),
    )
    checked = []
    for array, (role, dtype) in zip(arrays, expected, strict=True):
        if not isinstance(array, np.ndarray) or array.dtype != dtype or array.ndim != 1:
            described = (
                f"{array.dtype} array of shape {array.shape}"
                if isinstance(array, np.ndarray)
                else type(array).__name__
            )
            raise PayloadError(
                f"payload {role} must be a 1-D {np.dtype(dtype)} array, got {described}"
            )
        checked.append(array)
    return tuple(checked)


def _parse_header(array: np.ndarray) -> dict:
    if array.size > MAX_HEADER_BYTES:
        raise PayloadError(f"payload header is {array.size} bytes, more than {MAX_HEADER_BYTES}")
    try:
        header = json.loads(array.tobytes().decode("utf-8"))
    except RecursionError as error:
        raise PayloadError("payload header nests too deep to be a header") from error
    except ValueError as error:  # not UTF-8, not JSON, or an int of thousands of digits
        raise PayloadError(f"payload header is not UTF-8 JSON: {str(error)[:200]}") from error
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise PayloadError(f"payload header is not a {FORMAT_NAME!r} header")
    if header.get("version") != FORMAT_VERSION:
        raise PayloadError(
            f"unknown payload format version {header.get('version')!r}: this build reads "
            f"version {FORMAT_VERSION}; upgrade the older side"
        )
    bits = header.get("bits")
    try:
        check_bits(bits)
    except ValueError as error:
        raise PayloadError(f"payload {error}") from error
    bucket = header.get("qsgd-bucket", 0)
    if isinstance(bucket, bool) or not isinstance(bucket, int) or not 0 <= bucket < 2**31:
        raise PayloadError(f"payload qsgd-bucket must be an int in [0, 2**31), got {bucket!r}")
    tensors = header.get("tensors")
    if not isinstance(tensors, list):
        raise PayloadError("payload header has no tensor list")
    names = set()
    for entry in tensors:
        _check_entry(entry, bits)
        if entry[0] in names:
            raise PayloadError(f"payload names tensor {entry[0]!r} twice")
        names.add(entry[0])
    return header


def _check_entry(entry: object, bits: int) -> None:
    if not (isinstance(entry, list) and len(entry) == 4 and isinstance(entry[0], str)):
        raise PayloadError(f"payload tensor entry {entry!r} is not [name, shape, dtype, kind]")
    name, shape, dtype, kind = entry
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)
        or len(shape) > 8
    ):
        raise PayloadError(f"tensor {name!r}: invalid shape {shape!r}")
    if kind not in _KINDS:
        raise PayloadError(f"tensor {name!r}: unknown kind {kind!r} (expected one of {_KINDS})")
    allowed = _INT_DTYPES if kind == "int" else _FLOAT_DTYPES
    if dtype not in allowed:
        raise PayloadError(f"tensor {name!r}: dtype {dtype!r} not allowed for kind {kind!r}")
    if kind in _CODED_KINDS and bits == FULL_PRECISION:
        raise PayloadError(f"tensor {name!r}: codes in a {FULL_PRECISION}-bit payload")


def _check_size(role: str, actual: int, expected: int) -> None:
    if actual != expected:
        problem = "truncated" if actual < expected else "has extra data"
        raise PayloadError(
            f"payload {role} array {problem}: {actual} elements/bytes, the header "
            f"describes {expected}"
        )


def _check_against_template(entries: list, template: Mapping[str, torch.Tensor], bits: int) -> None:
    """Names and shapes as the receiver's model, and each tensor sent the way an honest sender at
    ``bits`` sends it: a conv/linear weight as codes below 32 bits, every other floating tensor
    as floats, integer buffers as ints (so no fp32 weights under a 4-bit header, no weight
    smuggled in as int64)."""
    received = {name: tuple(shape) for name, shape, _, _ in entries}
    expected = {name: tuple(tensor.shape) for name, tensor in template.items()}
    missing, unexpected = expected.keys() - received.keys(), received.keys() - expected.keys()
    if missing or unexpected:
        raise PayloadError(
            f"payload tensors do not match the receiver's model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    for name, shape, _, kind in entries:
        if tuple(shape) != expected[name]:
            raise PayloadError(
                f"tensor {name!r} has shape {list(shape)}, the receiver's model has "
                f"{list(expected[name])}"
            )
        allowed = _kinds_for(name, template[name], bits)
        if kind not in allowed:
            raise PayloadError(
                f"tensor {name!r} sent as {kind!r}; at {bits} bits it travels as "
                f"{' or '.join(repr(k) for k in allowed)}"
            )


def _kinds_for(name: str, tensor: torch.Tensor, bits: int) -> tuple[str, ...]:
    if not tensor.is_floating_point():
        return ("int",)
    if bits != FULL_PRECISION and is_quantized(name, tensor):
        return _CODED_KINDS
    return ("float",)
