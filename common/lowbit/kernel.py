"""A fused C++ loop for the gradient quantizer's hottest step, built on first use.

Rounding each of a large layer's gradient values between its two quantile centres takes, in
tensor ops, a binary search (``torch.searchsorted``) and then five passes over the tensor (two
gathers, a division, a comparison, one more gather). ``round_between`` does all of it in one pass
per element, in parallel on torch's own intra-op threads (``at::parallel_for``): 3.6-4.7x faster
on a 2.4 M-element layer (docs/BENCHMARKS.md), and the same numbers bit for bit: the same
search predicate as ``torch.searchsorted(..., right=True)``, the same float32 arithmetic
(compiled with ``-ffp-contract=off``: no fused multiply-add), the same noise tensor
(``tests/test_quant.py`` holds it to the tensor-op path).

It is built by ``torch.utils.cpp_extension.load_inline`` into torch's extension cache
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``): about 20 s once per
machine and torch version, then loaded from there. Where it cannot be built (no C++ compiler or
ninja: ``scripts/setup.sh`` installs both; a failed build) or is switched off
(``FEDQSSL_FUSED_KERNEL=off``), ``round_between`` returns None and the quantizer keeps its tensor
ops: slower, the same numbers. CPU tensors only. ``scripts/setup.sh`` builds it, so training
does not wait for it; processes that load it at once (Ray actors) share one build under torch's
OS-level lock, which a crashed build releases.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Callable

import torch

SWITCH = "FEDQSSL_FUSED_KERNEL"  # "off": never build or use the kernel

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <limits>
#include <vector>

// values rounded to centres[b] or centres[b + 1], b = upper_bound(centres, value) - 1 clamped to
// [0, count - 2]; upward where (value - centres[b]) / gap > threshold (noise, or 0.5)
torch::Tensor round_between(torch::Tensor values, torch::Tensor centres,
                            c10::optional<torch::Tensor> noise) {
  for (const auto& t : {values, centres}) {
    TORCH_CHECK(t.is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous());
  }
  const int64_t n = values.numel(), count = centres.numel();
  TORCH_CHECK(count >= 2, "at least two centres");
  const float* noise_data = nullptr;
  if (noise.has_value()) {
    TORCH_CHECK(noise->is_cpu() && noise->scalar_type() == torch::kFloat &&
                noise->is_contiguous() && noise->numel() == n);
    noise_data = noise->data_ptr<float>();
  }
  auto out = torch::empty_like(values);
  const float* v = values.data_ptr<float>();
  const float* c = centres.data_ptr<float>();
  float* o = out.data_ptr<float>();
  std::vector<float> gaps(count - 1);  // a zero gap divides by inf: fraction 0, the lower centre
  for (int64_t k = 0; k + 1 < count; ++k) {
    const float gap = c[k + 1] - c[k];
    gaps[k] = gap > 0 ? gap : std::numeric_limits<float>::infinity();
  }
  const float* g = gaps.data();
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float x = v[i];
      const float* base = c;  // branchless upper bound, searchsorted's predicate !(x < centre)
      int64_t length = count;
      while (length > 1) {
        const int64_t half = length / 2;
        base = !(x < base[half]) ? base + half : base;
        length -= half;
      }
      int64_t b = (base - c) + (!(x < *base) ? 1 : 0) - 1;
      b = b < 0 ? 0 : (b > count - 2 ? count - 2 : b);
      const float fraction = (x - c[b]) / g[b];
      const float threshold = noise_data ? noise_data[i] : 0.5f;
      o[i] = c[b + (fraction > threshold ? 1 : 0)];
    }
  });
  return out;
}
"""

_log = logging.getLogger(__name__)


@functools.cache
def round_between() -> Callable[..., torch.Tensor] | None:
    """The kernel ``round_between(values, centres, noise | None)``, or None where it is off or
    cannot be built (said once in the log: the quantizer then runs its tensor ops)."""
    if os.environ.get(SWITCH, "").lower() in ("off", "0", "false", "no"):
        return None
    for tool in (os.environ.get("CXX", "c++"), "ninja"):
        if shutil.which(tool) is None:
            _log.warning(
                "no %s on PATH (Debian: g++, ninja-build): the gradient quantizer runs without "
                "its fused kernel",
                tool,
            )
            return None
    # importing cpp_extension warns that no CUDA runtime exists: nothing to a CPU kernel
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)
    _log.info("loading the gradient quantizer's fused kernel (built on first use: ~20 s once)")
    try:
        from torch.utils.cpp_extension import load_inline

        module = load_inline(
            "fedqssl_round_between",
            cpp_sources=_SOURCE,
            functions=["round_between"],
            extra_cflags=["-O3", "-ffp-contract=off"],
        )
    except Exception as error:  # a failed build costs speed, never results
        _log.warning("the gradient quantizer's fused kernel did not build (%s): tensor ops", error)
        return None
    finally:
        cpp_log.setLevel(level)
    return module.round_between
