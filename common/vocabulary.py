"""The words every layer agrees on, with no torch: supported bitwidths, model and dataset names,
full-precision nonlinearities. ``common.config`` validates against these alone, so reading a
config (the checkpoint reader, ``simulation.py``'s plan and reports) never loads torch."""

from __future__ import annotations

FULL_PRECISION = 32
MIN_BITS = 2
MAX_BITS = 16
# The nonlinearity of a full-precision (32-bit) model: ReLU (the paper's and DoReFa's convention)
# or clamp(0, 1), the one low-bit models use (a control)
FP_ACTIVATIONS = ("relu", "clamp")
MODEL_NAMES = ("resnet18", "small_cnn")
DATASET_NAMES = ("fashion-mnist", "cifar10", "cifar100", "synthetic")


def is_whole_number(text: str) -> bool:
    """Whether ``text`` is a whole number >= 0 written in ASCII digits: ``str.isdigit`` also
    takes superscript two (which ``int`` refuses) and Arabic-Indic one (read by ``int`` as 1)."""
    return text.isascii() and text.isdigit()


def check_bits(bits: int) -> int:
    """Return ``bits`` if it is a supported bitwidth (2..16 or 32), else raise ``ValueError``."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"bitwidth must be an int, got {bits!r}")
    if bits != FULL_PRECISION and not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(
            f"bitwidth {bits} is not supported: use {MIN_BITS}..{MAX_BITS}, "
            f"or {FULL_PRECISION} for full precision"
        )
    return bits
