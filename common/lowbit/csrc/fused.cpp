// The low-bit step's fused CPU loops (common/lowbit/kernel.py says what each replaces and how it
// is held to the tensor ops' floats bit for bit). Built on first use by
// torch.utils.cpp_extension.load with -O3 -ffp-contract=off -fopenmp.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

// stochastic rounding's noise (common.lowbit.noise): SplitMix64's output for counter i of the
// draw with this seed, its top 24 bits over 2^24 (a float in [0, 1) on torch.rand's grid)
static inline float counter_uniform_at(uint64_t seed, int64_t i) {
  uint64_t z = seed + static_cast<uint64_t>(i + 1) * 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * 0x1p-24f;
}

static uint64_t checked_seed(int64_t seed) {
  TORCH_CHECK(seed >= 0 && seed < (int64_t{1} << 62), "seed outside [0, 2^62)");
  return static_cast<uint64_t>(seed);
}

// the draw's first count values
torch::Tensor counter_uniform(int64_t seed, int64_t count) {
  const uint64_t s = checked_seed(seed);
  auto out = torch::empty({count}, torch::dtype(torch::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, count, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) o[i] = counter_uniform_at(s, i);
  });
  return out;
}

// values rounded between centres[b] and centres[b + 1], b = upper_bound(centres, value) - 1
// clamped to [0, count - 2]: upward where (value - c[b]) / gap > the draw's value i (no seed:
// deterministic rounding at 0.5); a zero gap divides by inf (fraction 0: the lower centre, which
// equals the upper one)
// into out (a new tensor where none is given; it may be values itself: each value is read before
// its own result is written)
torch::Tensor round_between(torch::Tensor values, torch::Tensor centres,
                            c10::optional<int64_t> seed, c10::optional<torch::Tensor> into) {
  auto out = into.has_value() ? *into : torch::empty_like(values);
  for (const auto& t : {values, centres, out}) {
    TORCH_CHECK(t.is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous());
  }
  TORCH_CHECK(out.numel() == values.numel(), "round_between: out and values differ in size");
  const int64_t n = values.numel(), count = centres.numel();
  TORCH_CHECK(count >= 2, "at least two centres");
  const bool stochastic = seed.has_value();
  const uint64_t s = stochastic ? checked_seed(*seed) : 0;
  const float* c = centres.data_ptr<float>();
  std::vector<float> gaps(count - 1);
  for (int64_t k = 0; k + 1 < count; ++k) {
    const float gap = c[k + 1] - c[k];
    gaps[k] = gap > 0 ? gap : std::numeric_limits<float>::infinity();
  }
  const float* v = values.data_ptr<float>();
  float* o = out.data_ptr<float>();
  // the binary search runs for a block of values in lockstep: each step's loads and compares
  // are independent across the block, where one value's steps wait on each other
  constexpr int64_t block = 16;
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t first = begin; first < end; first += block) {
      const int64_t lanes = std::min(block, end - first);
      int64_t base[block] = {};  // branchless upper bound, searchsorted's !(x < centre)
      for (int64_t length = count; length > 1;) {
        const int64_t half = length / 2;
        for (int64_t j = 0; j < lanes; ++j) {
          base[j] += static_cast<int64_t>(!(v[first + j] < c[base[j] + half])) * half;
        }
        length -= half;
      }
      for (int64_t j = 0; j < lanes; ++j) {
        const int64_t i = first + j;
        const float x = v[i];
        int64_t b = base[j] + (!(x < c[base[j]]) ? 1 : 0) - 1;
        b = b < 0 ? 0 : (b > count - 2 ? count - 2 : b);
        const float fraction = (x - c[b]) / gaps[b];
        const float threshold = stochastic ? counter_uniform_at(s, i) : 0.5f;
        o[i] = c[b + static_cast<int64_t>(fraction > threshold)];
      }
    }
  });
  return out;
}

// Four floats at a time in GCC/Clang vector types (SSE2 or NEON, which every x86-64 and arm64
// CPU has): branch-free, which a float select in a scalar loop is not (a mispredicted branch an
// element), and no wider than the baseline target, which GCC would otherwise split lane by lane.
typedef float float4 __attribute__((vector_size(16)));
typedef int32_t int4 __attribute__((vector_size(16)));

static inline float4 load4(const float* from) {
  float4 lanes;
  std::memcpy(&lanes, from, sizeof lanes);
  return lanes;
}

static inline void store4(float* to, float4 lanes) { std::memcpy(to, &lanes, sizeof lanes); }

static const int4 low_lane_bits = {1, 2, 4, 8};

// the weights' stochastic projection onto their grid in place (common.lowbit.quantizers.
// project_to_grid_, the tensor ops' floats): from companded = tanh(weight), unit = clamp(companded
// / divisor + 0.5, 0, 1) * levels (NaN kept, as torch.clamp), the code floor(unit) + (unit -
// floor(unit) > the draw's value i), and the weight table[code] (NaN for a NaN unit); four lanes
// at a time, the floor of 0 <= unit <= levels by truncation (no libm call)
void project_to_grid_(torch::Tensor weight, torch::Tensor companded, double divisor,
                      int64_t levels, int64_t seed, torch::Tensor table) {
  for (const auto& t : {weight, companded, table}) {
    TORCH_CHECK(t.is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous());
  }
  TORCH_CHECK(weight.numel() == companded.numel() && table.numel() == levels + 1 &&
              levels >= 1 && levels < (1 << 23));
  const uint64_t s = checked_seed(seed);
  const float d = static_cast<float>(divisor), scale = static_cast<float>(levels);
  const float* t = companded.data_ptr<float>();
  const float* grid = table.data_ptr<float>();
  float* w = weight.data_ptr<float>();
  const float4 nan4 = float4{} + std::numeric_limits<float>::quiet_NaN();
  const auto lanes = [&](const float* from, float* to, int64_t i) {
    const float4 draw = {counter_uniform_at(s, i), counter_uniform_at(s, i + 1),
                         counter_uniform_at(s, i + 2), counter_uniform_at(s, i + 3)};
    float4 unit = load4(from) / d + 0.5f;
    unit = unit < 0.0f ? float4{} : unit;
    unit = unit > 1.0f ? float4{} + 1.0f : unit;
    unit = unit * scale;
    const int4 nan = unit != unit;
    const int4 whole = __builtin_convertvector(unit, int4) & ~nan;
    const int4 code = whole - ((unit - __builtin_convertvector(whole, float4)) > draw);
    const float4 looked = {grid[code[0]], grid[code[1]], grid[code[2]], grid[code[3]]};
    store4(to, nan ? nan4 : looked);
  };
  at::parallel_for(0, weight.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + 4 <= end; i += 4) lanes(t + i, w + i, i);
    if (i < end) {  // the last lanes: padded with zeros, dropped
      float value[4] = {}, result[4];
      std::memcpy(value, t + i, (end - i) * sizeof(float));
      lanes(value, result, i);
      std::memcpy(w + i, result, (end - i) * sizeof(float));
    }
  });
}

// DoReFa's activation on four values (common.lowbit.saved_codes._BoundedQuantize, the same
// floats): bounded = clamp(x, 0, 1) (NaN and -0.0 kept, as torch.clamp), out = round(bounded *
// levels) / levels with ties to even (torch.round); returns the four mask bits (bounded == x)
template <typename code_t, bool with_codes>
static inline int bounded_quantize4(const float* v, float* o, code_t* c, float scale) {
  // (t + 2^23) - 2^23 rounds 0 <= t < 2^23 to the nearest integer, ties to even, with no libm
  // call; the sign bit put back keeps nearbyint's -0.0 for t = -0.0
  const float4 value = load4(v);
  float4 bounded = value < 0.0f ? float4{} : value;
  bounded = value > 1.0f ? float4{} + 1.0f : bounded;
  const int4 bits = (bounded == value) & low_lane_bits;
  const float4 scaled = bounded * scale;
  const float4 rounded = (scaled + 8388608.0f) - 8388608.0f;
  const float4 code = (float4)(((int4)rounded & INT32_MAX) | ((int4)scaled & INT32_MIN));
  store4(o, code / scale);
  if (with_codes) {
    const int4 whole = __builtin_convertvector(code, int4);
    for (int k = 0; k < 4; ++k) c[k] = static_cast<code_t>(whole[k]);
  }
  return bits[0] | bits[1] | bits[2] | bits[3];
}

// eight values: one byte of the mask (little-endian within the byte, as np.packbits)
template <typename code_t, bool with_codes>
static inline void bounded_quantize_lanes(const float* v, float* o, uint8_t* p, code_t* c,
                                          float scale) {
  const int low = bounded_quantize4<code_t, with_codes>(v, o, c, scale);
  const int high =
      bounded_quantize4<code_t, with_codes>(v + 4, o + 4, with_codes ? c + 4 : c, scale);
  *p = static_cast<uint8_t>(low | (high << 4));
}

template <typename code_t, bool with_codes>
void bounded_quantize_all(const float* v, float* o, uint8_t* p, void* codes, float scale,
                          int64_t n) {
  code_t* c = static_cast<code_t*>(codes);
  const int64_t whole = n / 8;
  at::parallel_for(0, whole, 1 << 11, [&](int64_t begin, int64_t end) {
    for (int64_t byte = begin; byte < end; ++byte) {
      bounded_quantize_lanes<code_t, with_codes>(v + 8 * byte, o + 8 * byte, p + byte,
                                                 with_codes ? c + 8 * byte : c, scale);
    }
  });
  if (whole * 8 < n) {  // the last, partial byte: padded lanes compute 0 and are dropped
    float in[8] = {}, out[8];
    code_t code[8];
    std::memcpy(in, v + 8 * whole, (n - 8 * whole) * sizeof(float));
    bounded_quantize_lanes<code_t, with_codes>(in, out, p + whole, code, scale);
    p[whole] &= static_cast<uint8_t>((1 << (n - 8 * whole)) - 1);
    std::memcpy(o + 8 * whole, out, (n - 8 * whole) * sizeof(float));
    if (with_codes) std::memcpy(c + 8 * whole, code, (n - 8 * whole) * sizeof(code_t));
  }
}

// code_bytes 1, 2 or 4: the codes also as uint8, int16 or int32 (0: none, an empty tensor)
std::vector<torch::Tensor> bounded_quantize(torch::Tensor x, int64_t levels, int64_t code_bytes) {
  TORCH_CHECK(x.is_cpu() && x.scalar_type() == torch::kFloat && x.is_contiguous());
  TORCH_CHECK(levels >= 1 && levels < (1 << 23));
  const int64_t n = x.numel();
  auto out = torch::empty_like(x);
  auto packed = torch::empty({(n + 7) / 8}, x.options().dtype(torch::kUInt8));
  const auto code_type = code_bytes == 1 ? torch::kUInt8
                         : code_bytes == 2 ? torch::kInt16 : torch::kInt32;
  auto codes = code_bytes ? torch::empty_like(x, x.options().dtype(code_type))
                          : torch::empty({0}, x.options().dtype(torch::kUInt8));
  const float* v = x.data_ptr<float>();
  float* o = out.data_ptr<float>();
  uint8_t* p = packed.data_ptr<uint8_t>();
  void* c = codes.data_ptr();
  const float scale = static_cast<float>(levels);
  if (code_bytes == 1) bounded_quantize_all<uint8_t, true>(v, o, p, c, scale, n);
  else if (code_bytes == 2) bounded_quantize_all<int16_t, true>(v, o, p, c, scale, n);
  else if (code_bytes == 4) bounded_quantize_all<int32_t, true>(v, o, p, c, scale, n);
  else bounded_quantize_all<uint8_t, false>(v, o, p, c, scale, n);
  return {out, packed, codes};
}

// the activation's backward: grad * bit (1.0 or 0.0: a blocked gradient becomes a signed zero,
// NaN and inf stay NaN, as grad * the unpacked bool mask)
torch::Tensor masked_gradient(torch::Tensor grad, torch::Tensor packed) {
  TORCH_CHECK(grad.is_cpu() && grad.scalar_type() == torch::kFloat && grad.is_contiguous());
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.numel() == (grad.numel() + 7) / 8);
  const int64_t n = grad.numel(), whole = n / 8;
  auto out = torch::empty_like(grad);
  const float* g = grad.data_ptr<float>();
  const uint8_t* p = packed.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  const auto lanes = [&](const float* from, float* to, uint8_t byte) {
    const int4 low = (int4{} + byte) & low_lane_bits, high = (int4{} + (byte >> 4)) & low_lane_bits;
    store4(to, load4(from) * (low != 0 ? float4{} + 1.0f : float4{}));
    store4(to + 4, load4(from + 4) * (high != 0 ? float4{} + 1.0f : float4{}));
  };
  at::parallel_for(0, whole, 1 << 11, [&](int64_t begin, int64_t end) {
    for (int64_t byte = begin; byte < end; ++byte) lanes(g + 8 * byte, o + 8 * byte, p[byte]);
  });
  if (whole * 8 < n) {
    float in[8] = {}, result[8];
    std::memcpy(in, g + 8 * whole, (n - 8 * whole) * sizeof(float));
    lanes(in, result, p[whole]);
    std::memcpy(o + 8 * whole, result, (n - 8 * whole) * sizeof(float));
  }
  return out;
}

// max-pool over non-overlapping k x k windows (common.lowbit.saved_codes._WindowMaxPool): each
// window's maximum and its uint8 index in row-major order, as torch.max over the window's
// elements picks it (the first maximum; the first NaN, which ends the scan)
std::vector<torch::Tensor> window_max_pool(torch::Tensor x, int64_t k) {
  TORCH_CHECK(x.is_cpu() && x.scalar_type() == torch::kFloat && x.is_contiguous() &&
              x.dim() == 4 && k >= 1 && k * k <= 256);
  const int64_t planes = x.size(0) * x.size(1), height = x.size(2), width = x.size(3);
  const int64_t rows = height / k, cols = width / k;
  auto values = torch::empty({x.size(0), x.size(1), rows, cols}, x.options());
  auto argmax = torch::empty({x.size(0), x.size(1), rows, cols}, x.options().dtype(torch::kUInt8));
  const float* v = x.data_ptr<float>();
  float* out = values.data_ptr<float>();
  uint8_t* index = argmax.data_ptr<uint8_t>();
  // torch.max's scan, four windows at a time with lane masks instead of branches: a lane
  // takes value t where !(value <= best) and the lane has not stopped at a NaN
  const auto scan = [&](const float* top, int64_t col, int64_t lanes, float* best_out,
                        uint8_t* at_out) {
    float4 best{};
    int4 at{}, stopped{};
    for (int64_t t = 0; t < k * k; ++t) {  // from 0: a NaN first ends the scan there
      float4 value{};
      for (int64_t lane = 0; lane < lanes; ++lane) {
        value[lane] = top[(t / k) * width + (col + lane) * k + t % k];
      }
      const int4 take = t == 0 ? ~stopped : (~(value <= best)) & ~stopped;
      best = take ? value : best;
      at = take ? int4{} + static_cast<int32_t>(t) : at;
      stopped |= take & (value != value);
    }
    for (int64_t lane = 0; lane < lanes; ++lane) {
      best_out[lane] = best[lane];
      at_out[lane] = static_cast<uint8_t>(at[lane]);
    }
  };
  at::parallel_for(0, planes * rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t line = begin; line < end; ++line) {  // one row of windows in one plane
      const int64_t plane = line / rows, row = line % rows;
      const float* top = v + (plane * height + row * k) * width;
      for (int64_t col = 0; col < cols; col += 4) {
        scan(top, col, std::min<int64_t>(4, cols - col), out + line * cols + col,
             index + line * cols + col);
      }
    }
  });
  return {values, argmax};
}

// its backward: each window's gradient at its argmax, zeros elsewhere (also in the rows and
// columns beyond the last whole window)
torch::Tensor window_max_unpool(torch::Tensor grad, torch::Tensor argmax, int64_t k,
                                int64_t height, int64_t width) {
  TORCH_CHECK(grad.is_cpu() && grad.scalar_type() == torch::kFloat && grad.is_contiguous() &&
              grad.dim() == 4);
  TORCH_CHECK(argmax.scalar_type() == torch::kUInt8 && argmax.is_contiguous() &&
              argmax.sizes() == grad.sizes());
  const int64_t planes = grad.size(0) * grad.size(1), rows = grad.size(2), cols = grad.size(3);
  TORCH_CHECK(rows == height / k && cols == width / k);
  auto out = torch::zeros({grad.size(0), grad.size(1), height, width}, grad.options());
  const float* g = grad.data_ptr<float>();
  const uint8_t* index = argmax.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, planes * rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t line = begin; line < end; ++line) {
      const int64_t plane = line / rows, row = line % rows;
      float* top = o + (plane * height + row * k) * width;
      for (int64_t col = 0; col < cols; ++col) {
        const int64_t at = index[line * cols + col];
        top[(at / k) * width + col * k + at % k] = g[line * cols + col];
      }
    }
  });
  return out;
}

// codes (uint8, int16, int32, or whole-number float32) to floats, decode(code) each: the one
// loop both decoders below run
template <typename Decode>
torch::Tensor map_codes(const torch::Tensor& codes, const char* name, const Decode& decode) {
  TORCH_CHECK(codes.is_cpu() && codes.is_contiguous());
  auto out = torch::empty_like(codes, codes.options().dtype(torch::kFloat));
  float* o = out.data_ptr<float>();
  const auto run = [&](const auto* c) {  // one loop for each type codes are kept in
    at::parallel_for(0, codes.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] = decode(c[i]);
    });
  };
  switch (codes.scalar_type()) {
    case torch::kUInt8: run(codes.data_ptr<uint8_t>()); break;
    case torch::kInt16: run(codes.data_ptr<int16_t>()); break;
    case torch::kInt32: run(codes.data_ptr<int32_t>()); break;
    case torch::kFloat: run(codes.data_ptr<float>()); break;
    default: TORCH_CHECK(false, name, ": codes are uint8, int16, int32 or float32");
  }
  return out;
}

// weight codes to their layer's weights: out[i] = table[codes[i]]
// (common.lowbit.quantizers.codes_to_weight); a NaN float code gives NaN, as the tensor ops do
torch::Tensor decode_table(torch::Tensor codes, torch::Tensor table) {
  TORCH_CHECK(table.is_cpu() && table.scalar_type() == torch::kFloat && table.is_contiguous());
  const float* t = table.data_ptr<float>();
  const int64_t size = table.numel();
  return map_codes(codes, "decode_table", [&](auto code) {
    return (code >= 0 && code < size) ? t[static_cast<int64_t>(code)]
                                      : std::numeric_limits<float>::quiet_NaN();
  });
}

// saved codes back to the float activation: float(code) / levels, as codes.to(float) / levels
torch::Tensor decode_codes(torch::Tensor codes, int64_t levels) {
  const float scale = static_cast<float>(levels);
  return map_codes(codes, "decode_codes",
                   [&](auto code) { return static_cast<float>(code) / scale; });
}

// the interface version common/lowbit/kernel.py expects (ABI_VERSION there): a build of other
// sources than the Python side's is not used
int64_t abi_version() { return 1; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("abi_version", &abi_version);
  m.def("counter_uniform", &counter_uniform);
  m.def("project_to_grid_", &project_to_grid_);
  m.def("round_between", &round_between);
  m.def("bounded_quantize", &bounded_quantize);
  m.def("masked_gradient", &masked_gradient);
  m.def("decode_codes", &decode_codes);
  m.def("decode_table", &decode_table);
  m.def("window_max_pool", &window_max_pool);
  m.def("window_max_unpool", &window_max_unpool);
}
