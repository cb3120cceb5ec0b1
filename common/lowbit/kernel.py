"""Fused C++ loops for the low-bit step's hottest element-wise work, built on first use.

- ``round_between``: rounding each of a layer's gradient values between its two quantile centres
  takes, in tensor ops, a binary search (``torch.searchsorted``) and five more passes (two
  gathers, a division, a comparison, one more gather) besides the noise; here one pass per
  element, with the same search predicate as ``torch.searchsorted(..., right=True)`` and the
  noise made where it is used.
- ``decode_table``: weight codes to weights, one table lookup each (``codes_to_weight``).
- ``counter_uniform`` / ``project_to_grid_``: ``common.lowbit.noise``'s counter-based draws, and
  the weights' stochastic projection onto their grid (scale, floor, draw, compare, table lookup)
  in one pass, written into the weight.
- ``bounded_quantize`` / ``masked_gradient`` / ``decode_codes``: DoReFa's activation (clamp, the
  clamp's one-bit mask, round, divide, and the codes the next layer saves) in one pass instead
  of six, its backward (unpack the mask and multiply) in one instead of two, and saved codes back
  to floats in one instead of two (``common.lowbit.saved_codes``). Four lanes at a time in
  GCC/Clang vector types: branch-free selects, SSE2 or NEON, which every x86-64 and arm64 CPU has.

Each gives the tensor ops' floats bit for bit: the same float32 arithmetic (compiled with
``-ffp-contract=off``: no fused multiply-add), ties to even as ``torch.round``, signed zeros and
NaN kept as ``torch.clamp`` keeps them, the same noise (``common.lowbit.noise``);
``tests/test_quant.py``, ``tests/test_noise.py`` and
``tests/test_saved_codes.py`` hold them to the tensor-op paths. All run in parallel on torch's
own intra-op threads (``at::parallel_for``).

The C++ is ``csrc/fused.cpp``, built by ``torch.utils.cpp_extension.load`` into torch's
extension cache (``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), under a
name of its own per Python environment (``build_name``): about 30 s once per environment and
source, then loaded from there (~0.1 s). A Flower App Bundle carries only Python, TOML, Markdown,
YAML and JSON (Flower's ``FAB_INCLUDE_PATTERNS``), so an app run from one finds the source where
``source_file`` looks: ``FEDQSSL_KERNEL_SOURCES`` (the Docker image sets it), beside this module,
or the checkout this environment's fedqssl was installed from. Where it cannot be built (no
source, no C++ compiler or ninja: ``scripts/setup.sh`` installs both; a failed build; a build of
another interface version) or is switched off (``FEDQSSL_FUSED_KERNEL=off``), every accessor
returns None and the callers keep their tensor ops: slower, the same numbers. CPU tensors only.
``scripts/setup.sh`` builds it, so training does not wait for it; processes that load it at once
(Ray actors) share one build under torch's OS-level lock, which a crashed build releases.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import torch

SWITCH = "FEDQSSL_FUSED_KERNEL"  # "off": never build or use the kernel
SOURCES = "FEDQSSL_KERNEL_SOURCES"  # a folder holding SOURCE_NAME, for a copy that has none
SOURCE_NAME = "fused.cpp"
ABI_VERSION = 1  # what the source's abi_version() must return: the functions' signatures

_log = logging.getLogger(__name__)
_FUNCTIONS = [
    "counter_uniform",
    "project_to_grid_",
    "round_between",
    "bounded_quantize",
    "masked_gradient",
    "decode_codes",
    "decode_table",
    "window_max_pool",
    "window_max_unpool",
]


@functools.cache
def compiled() -> object | None:
    """The built module (its functions: ``_FUNCTIONS``), or None where it is off or cannot be
    built (said once in the log: the callers then run their tensor ops)."""
    if os.environ.get(SWITCH, "").lower() in ("off", "0", "false", "no"):
        return None
    for tool in (os.environ.get("CXX", "c++"), "ninja"):
        if shutil.which(tool) is None:
            _log.warning(
                "no %s on PATH (Debian: g++, ninja-build): the low-bit step runs without its "
                "fused kernels",
                tool,
            )
            return None
    # importing cpp_extension warns that no CUDA runtime exists: nothing to a CPU kernel
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)
    source = source_file()
    if source is None:
        _log.warning(
            "no %s found (set %s to the folder of common/lowbit/csrc): the low-bit step runs "
            "without its fused kernels",
            SOURCE_NAME,
            SOURCES,
        )
        return None
    _log.info("loading the low-bit step's fused kernels (built on first use: ~30 s once)")
    try:
        from torch.utils.cpp_extension import load

        module = load(
            build_name(),
            sources=[str(source)],
            extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as error:  # a failed build costs speed, never results
        _log.warning("the low-bit step's fused kernels did not build (%s): tensor ops", error)
        return None
    finally:
        cpp_log.setLevel(level)
    version = module.abi_version()
    if version != ABI_VERSION or not all(hasattr(module, name) for name in _FUNCTIONS):
        _log.warning(
            "%s is of interface version %s, this code needs %s: tensor ops (point %s at the "
            "source of this version)",
            source,
            version,
            ABI_VERSION,
            SOURCES,
        )
        return None
    return module


def source_file() -> Path | None:
    """The kernels' C++: in the folder ``FEDQSSL_KERNEL_SOURCES`` names, beside this module (a
    checkout, an installed package), or in the checkout this environment's fedqssl was installed
    from in editable mode (``scripts/setup.sh``'s; the one an app run from a bundle can reach)."""
    named = os.environ.get(SOURCES)
    candidates = [Path(named) / SOURCE_NAME] if named else []
    candidates.append(Path(__file__).with_name("csrc") / SOURCE_NAME)
    candidates += _installed_sources()
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if named:
        _log.warning("%s=%s holds no %s", SOURCES, named, SOURCE_NAME)
    return None


def _installed_sources() -> list[Path]:
    """Where the installed fedqssl distribution keeps the source: its package data, or, for an
    editable install, the checkout its ``direct_url.json`` names."""
    try:
        distribution = importlib.metadata.distribution("fedqssl")
    except importlib.metadata.PackageNotFoundError:
        return []
    relative = f"common/lowbit/csrc/{SOURCE_NAME}"
    found = [Path(str(distribution.locate_file(relative)))]
    try:
        url = json.loads(distribution.read_text("direct_url.json") or "{}").get("url", "")
    except (json.JSONDecodeError, AttributeError):
        url = ""
    if url.startswith("file:"):
        found.append(Path(url2pathname(urlparse(url).path)) / relative)
    return found


def loaded() -> bool | None:
    """Whether this process runs the fused kernels: True once built or loaded, False where they
    are off or did not build, None before any step asked for them (for provenance records)."""
    if compiled.cache_info().currsize == 0:
        return None
    return compiled() is not None


def build_name() -> str:
    """The extension's name, one per Python environment: torch keeps one build folder per name,
    and two environments (another venv's include paths and flags) taking turns with one folder
    rebuild it on every load (~30 s each)."""
    return "fedqssl_kernels_" + hashlib.sha256(sys.prefix.encode()).hexdigest()[:10]


def fusable(tensor: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """Whether the kernels take ``tensor``: contiguous on the CPU, of one of ``dtypes``."""
    return tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.dtype in dtypes


def _function(name: str) -> Callable[..., object] | None:
    module = compiled()
    return None if module is None else getattr(module, name)


def counter_uniform() -> Callable[..., torch.Tensor] | None:
    """``counter_uniform(seed, count)``: a draw of ``common.lowbit.noise``."""
    return _function("counter_uniform")


def project_to_grid_() -> Callable[..., None] | None:
    """``project_to_grid_(weight, companded, divisor, levels, seed, table)``: the weights'
    stochastic grid projection, written into ``weight``."""
    return _function("project_to_grid_")


def round_between() -> Callable[..., torch.Tensor] | None:
    """``round_between(values, centres, seed | None, out | None)``: the gradient quantizer's
    rounding (into ``out`` where given, ``values`` itself allowed)."""
    return _function("round_between")


def bounded_quantize() -> Callable[..., list[torch.Tensor]] | None:
    """``bounded_quantize(x, levels, code_bytes)`` -> [out, packed mask, codes]: the activation."""
    return _function("bounded_quantize")


def masked_gradient() -> Callable[..., torch.Tensor] | None:
    """``masked_gradient(grad, packed mask)``: the activation's backward."""
    return _function("masked_gradient")


def window_max_pool() -> Callable[..., list[torch.Tensor]] | None:
    """``window_max_pool(x, k)`` -> [values, uint8 argmax]: the codes path's max-pool."""
    return _function("window_max_pool")


def window_max_unpool() -> Callable[..., torch.Tensor] | None:
    """``window_max_unpool(grad, argmax, k, height, width)``: that max-pool's backward."""
    return _function("window_max_unpool")


def decode_table() -> Callable[..., torch.Tensor] | None:
    """``decode_table(codes, table)``: weight codes to their layer's weights."""
    return _function("decode_table")


def decode_codes() -> Callable[..., torch.Tensor] | None:
    """``decode_codes(codes, levels)``: a saved activation back to float32."""
    return _function("decode_codes")
