"""What a client's reply may carry: metric types and example counts, checked before use.

Flower lets a client put any scalar (int, float, str, bytes, bool) under any metric key. The
strategy stores these in ``rounds.jsonl`` and sorts and averages them, so a value of the wrong
type from one client would end the run far from its cause (a ``json.dumps`` of bytes, a sort of
str against int). Every reply is checked here first; a reply with a problem becomes that client's
logged failure, and the round goes on without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

Check = Callable[[object], bool]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)  # type: ignore[arg-type]


def _non_negative_int(value: object) -> bool:
    return _is_int(value) and value >= 0  # type: ignore[operator]


def _non_negative_number(value: object) -> bool:
    return _is_number(value) and value >= 0  # type: ignore[operator]


def _fraction(value: object) -> bool:
    return _is_number(value) and 0.0 <= value <= 1.0  # type: ignore[operator]


def _hex_id(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and value.isalnum()


def _allocator_mode(value: object) -> bool:
    return value in ("lean", "fast")


def _device_type(value: object) -> bool:
    return value in ("cpu", "cuda", "mps")


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


_RULES: dict[Check, str] = {
    _is_int: "an int",
    _is_number: "a finite number",
    _non_negative_int: "an int >= 0",
    _non_negative_number: "a finite number >= 0",
    _fraction: "a number in [0, 1]",
    _allocator_mode: "lean or fast",
    _device_type: "cpu, cuda or mps",
    _is_bool: "a bool",
    _hex_id: "an id of at most 64 letters and digits",
}

# key -> (check, required)
FIT_METRICS: dict[str, tuple[Check, bool]] = {
    "bitwidth": (_is_int, True),
    "partition-id": (_non_negative_int, True),
    "loss": (_is_number, False),
    "train-steps": (_non_negative_int, False),
    "payload-bytes": (_non_negative_int, False),
    "train-seconds": (_non_negative_number, False),
    "torch-threads": (_non_negative_int, False),
    "gpu-peak-mb": (_non_negative_number, False),
    "peak-rss-mb": (_non_negative_number, False),
    "allocator": (_allocator_mode, False),
    "device": (_device_type, False),
    "fused-kernels": (_is_bool, False),
    "ray-node": (_hex_id, False),
}
EVALUATE_METRICS: dict[str, tuple[Check, bool]] = {
    "partition-id": (_non_negative_int, True),
    "bitwidth": (_is_int, True),
    "local-accuracy": (_fraction, False),
    "local-probe-accuracy": (_fraction, False),
    "untrained-local-accuracy": (_fraction, False),
    "untrained-local-probe-accuracy": (_fraction, False),
    "local-loss": (_non_negative_number, False),
    "local-model": (lambda value: isinstance(value, str) and len(value) <= 64, False),
    "saved-model": (lambda value: isinstance(value, str) and len(value) <= 1024, False),
}


def reply_problem(
    metrics: Mapping[str, object],
    num_examples: object,
    rules: Mapping[str, tuple[Check, bool]],
    max_examples: int,
) -> str | None:
    """Why a reply cannot be used (the first problem found), or None when it can.

    ``num_examples`` weighs a client in sample-weighted averaging, so a client claiming more than
    ``max_examples`` (the ``max-client-examples`` key) would take the round: it is refused.
    """
    if not _non_negative_int(num_examples):
        return f"num_examples must be an int >= 0, got {num_examples!r}"
    if num_examples > max_examples:  # type: ignore[operator]
        return (
            f"num_examples {num_examples} exceeds max-client-examples {max_examples} "
            "(raise that key if devices really hold more)"
        )
    for key, (check, required) in rules.items():
        if key not in metrics:
            if required:
                return f"metric {key!r} is missing"
            continue
        if not check(metrics[key]):
            what = _RULES.get(check, "a short str")
            return f"metric {key!r} must be {what}, got {_short(metrics[key])}"
    return None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
