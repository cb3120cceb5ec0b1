"""Helpers the test modules share that need no Flower: float bit patterns, the fused kernels on
or off, record comparison, what a server round gave each client, plots. Test files importing
only these run on a GPU image without flwr or Ray (``benchmarks/gpu_check.py`` selects them)."""

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.lowbit import kernel
from fedqssl_server.rounds import RoundOutcome

needs_compiler = pytest.mark.skipif(
    shutil.which("c++") is None or shutil.which("ninja") is None,
    reason="the fused kernels are built with a C++ compiler and ninja (scripts/setup.sh: both)",
)


@contextlib.contextmanager
def kernels(on: bool) -> Iterator[None]:
    """The fused kernels as built here (on), or every accessor None (off: the tensor ops, as on
    a machine without a compiler)."""
    with pytest.MonkeyPatch.context() as patch:
        if not on:
            patch.setattr(kernel, "compiled", lambda: None)
        yield


def bits_of(tensor: torch.Tensor) -> torch.Tensor:
    """A float tensor's bit patterns: equal only if every value is the same float (-0 != 0)."""
    return tensor.contiguous().view(torch.int32)


def without_timings(value):
    """A record with every measured figure dropped: wall-clock seconds, resident memory
    (``*-mb``), the Ray node a client ran on, and how and when a process was started (its
    provenance's ``command`` and ``started``) differ run to run; nothing else may."""
    if isinstance(value, dict):
        return {
            k: without_timings(v)
            for k, v in value.items()
            if not k.endswith(("seconds", "-mb")) and k not in ("ray-node", "started", "command")
        }
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def differences(a, b, path: str = "") -> list[str]:
    """Where two records differ, as ``path: a != b`` lines (so a failure says what differed)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d
            for k in sorted(set(a) | set(b))
            for d in differences(a.get(k), b.get(k), f"{path}.{k}")
        ]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"[:300]]


def weights_of(outcome: RoundOutcome) -> list[float]:
    """p_k of the clients that counted, in partition order."""
    return [client.weight for client in outcome.clients.values()]


def losses_of(outcome: RoundOutcome) -> list[float | None]:
    """L_DQ of the clients that counted, in partition order."""
    return [client.dq_loss for client in outcome.clients.values()]


def plotted(path: Path) -> np.ndarray:
    """The pixels of a plot the code wrote, asserted to be a PNG that decodes and holds a
    drawing (more than 1% of its pixels not background white), not an empty canvas."""
    with Image.open(path) as image:
        assert image.format == "PNG", path
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] >= 100 and pixels.shape[1] >= 100, pixels.shape
    assert (pixels < 250).any(axis=2).mean() > 0.01, f"{path} is a blank canvas"
    return pixels
