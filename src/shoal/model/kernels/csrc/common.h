// What every kernel source shares: the C ABI, work splitting (pool.h) and bfloat16.
//
// The kernels are plain C++ with C entry points (no torch headers: they compile in a few
// seconds instead of minutes). Python allocates every tensor and passes data pointers
// (kernels/cpu.py). The instruction set is chosen by the build flags of the variant that
// kernels/cpu.py picked for this CPU at run time, never by the machine that built it.
#pragma once

#include "pool.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#define SHOAL_API extern "C" __attribute__((visibility("default")))

namespace shoal {

// f(begin, end) over [0, n) in contiguous chunks of at least `grain` items on the work pool
// (pool.h): about four chunks per thread, claimed by whichever thread is free, so a thread
// the OS took away delays no one. Each item's result must not depend on the split.
template <typename F>
inline void parallel_for(int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
  WorkPool& pool = WorkPool::get();
  const int64_t per = (n + 4 * pool.threads() - 1) / (4 * pool.threads());
  pool.run(n, std::max<int64_t>(std::max<int64_t>(grain, 1), per), f);
}

inline int64_t grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// float -> bfloat16, rounding to nearest even (NaN stays a quiet NaN), as c10::BFloat16.
inline uint16_t to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if (f != f) return 0x7FC0;
  const uint32_t rounding = ((bits >> 16) & 1u) + 0x7FFFu;
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

// max |x[i]| over n floats (NaN-free input). NOTE: a float max reduction is a dependency
// chain the compiler may not reorder (it was most of a quantizer's time); for non-negative
// floats the bit patterns order as the values do, and an integer max vectorizes. Same result.
inline float abs_max(const float* x, int64_t n) {
  uint32_t top = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof(bits));
    top = std::max(top, bits & 0x7FFFFFFFu);
  }
  float out;
  std::memcpy(&out, &top, sizeof(out));
  return out;
}

// e^-z for z >= 0 from arithmetic the compiler vectorizes (std::exp is a library call per
// value): 2^k times a degree-6 polynomial on |r| <= ln2 / 2; relative error ~2e-7.
inline float exp_neg(float z) {
  const float y = std::max(-87.f, -z);
  const float k = std::nearbyint(y * 1.44269504f);
  const float r = (y - k * 0.693145752f) - k * 1.42860677e-6f;
  const float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 +
                  r * (1.f / 720))))));
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof(two_k));
  return p * two_k;
}

// The gated MLPs' activations, one definition for every kernel so all quantize the same floats.
// NOTE: SiLU keeps std::exp, which rounds as torch's does for most values: an exp_neg SiLU
// (3.3 -> 1.4 ms over 1,024 rows, as faithful to exact mode by benchmarks/fast_quality.py)
// changed enough last bits that greedy answers the tests rely on changed (a JSON-schema answer
// that no longer ended within its tokens). GELU-tanh (Gemma's) is from exp_neg: the loops over
// a row vectorize (15.6 -> 1.4 ms over 1,024 rows; ~40% of a prefill), within ~3e-7 relative
// of std::tanh.
inline float silu(float x) { return x / (1.f + std::exp(-x)); }
inline float gelu_tanh(float x) {
  constexpr float kAlpha = 0.7978845608028654f;   // sqrt(2 / pi)
  constexpr float kBeta = 0.044715f;
  const float u = kAlpha * (x + kBeta * x * x * x);
  const float e = exp_neg(2.f * std::fabs(u));      // tanh|u| = (1 - e^-2|u|) / (1 + e^-2|u|)
  const float t = (1.f - e) / (1.f + e);
  return 0.5f * x * (1.f + (u < 0.f ? -t : t));
}

// One row of a decoder's pre-norm into `row`: with `residual`, residual += x first and the
// sum is normed; then h * rsqrt(mean(h^2) + eps) * weight. Shared by the per-row (fused_ops)
// and per-block (packed_linear) quantizers, so both quantize bit-identical floats.
inline void rms_norm_row(const float* x, float* residual, const float* weight, int64_t K, float eps,
                         float* row) {
  const float* h = x;
  if (residual != nullptr) {
    for (int64_t i = 0; i < K; ++i) residual[i] += x[i];
    h = residual;
  }
  float sum = 0.f;
  for (int64_t i = 0; i < K; ++i) sum += h[i] * h[i];
  const float inv_rms = 1.f / std::sqrt(sum / static_cast<float>(K) + eps);
  for (int64_t i = 0; i < K; ++i) row[i] = h[i] * inv_rms * weight[i];
}

// Gemma's sandwich norms for one row: residual += RMSNorm(x) * x_weight, then
// row = RMSNorm(residual) * weight.
inline void rms_norm_add_norm_row(const float* x, float* residual, const float* x_weight,
                                  const float* weight, int64_t K, float eps, float* row) {
  float sum = 0.f;
  for (int64_t i = 0; i < K; ++i) sum += x[i] * x[i];
  const float inv_x = 1.f / std::sqrt(sum / static_cast<float>(K) + eps);
  for (int64_t i = 0; i < K; ++i) residual[i] += x[i] * inv_x * x_weight[i];
  rms_norm_row(residual, nullptr, weight, K, eps, row);
}

}  // namespace shoal
