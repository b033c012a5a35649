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
#if defined(__AVX512F__) && defined(__FMA__)
#include <immintrin.h>
#endif

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

#if defined(__AVX512F__) && defined(__FMA__) && defined(__GLIBC__)
// glibc's expf for 8 floats at once, operation for operation as its FMA build (__expf_fma,
// which glibc picks on every x86-64 CPU with FMA and AVX2, so on every machine this build
// runs on):
// x = (k + r) ln2 / 32, 2^(k/32) from a 32-entry table, a cubic in r, all in double. So a
// SiLU row costs a few vector instructions per value instead of a library call each, with
// the same bits (tests/model/test_packed_linear.py checks it against the C library's expf).
// Valid for x in [-88, 88.72]; act_mul_row handles the rest as expf's special cases do.
alignas(64) inline constexpr uint64_t kExp2fTable[32] = {
    0x3ff0000000000000, 0x3fefd9b0d3158574, 0x3fefb5586cf9890f, 0x3fef9301d0125b51,
    0x3fef72b83c7d517b, 0x3fef54873168b9aa, 0x3fef387a6e756238, 0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715, 0x3feef1a7373aa9cb, 0x3feedea64c123422, 0x3feece086061892d,
    0x3feebfdad5362a27, 0x3feeb42b569d4f82, 0x3feeab07dd485429, 0x3feea47eb03a5585,
    0x3feea09e667f3bcd, 0x3fee9f75e8ec5f74, 0x3feea11473eb0187, 0x3feea589994cce13,
    0x3feeace5422aa0db, 0x3feeb737b0cdc5e5, 0x3feec49182a3f090, 0x3feed503b23e255d,
    0x3feee89f995ad3ad, 0x3feeff76f2fb5e47, 0x3fef199bdd85529c, 0x3fef3720dcef9069,
    0x3fef5818dcfba487, 0x3fef7c97337b9b5f, 0x3fefa4afa2a490da, 0x3fefd0765b6e4540};

inline __m512d bits_pd(uint64_t bits) { return _mm512_castsi512_pd(_mm512_set1_epi64(static_cast<long long>(bits))); }

inline __m256 expf8(__m256 x) {
  const __m512d xd = _mm512_cvtps_pd(x);
  const __m512d inv_ln2_n = bits_pd(0x40471547652b82fe), shift = bits_pd(0x4338000000000000);
  const __m512d kd_shifted = _mm512_fmadd_pd(inv_ln2_n, xd, shift);
  const __m512i ki = _mm512_castpd_si512(kd_shifted);
  const __m512d kd = _mm512_sub_pd(kd_shifted, shift);
  const __m512d r = _mm512_fmsub_pd(inv_ln2_n, xd, kd);
  const __m512i* table = reinterpret_cast<const __m512i*>(kExp2fTable);
  const __m512i j = _mm512_and_si512(ki, _mm512_set1_epi64(31));
  const __m512i low = _mm512_permutex2var_epi64(_mm512_load_si512(table), j, _mm512_load_si512(table + 1));
  const __m512i high = _mm512_permutex2var_epi64(_mm512_load_si512(table + 2), j, _mm512_load_si512(table + 3));
  const __mmask8 upper = _mm512_test_epi64_mask(j, _mm512_set1_epi64(16));
  const __m512d s = _mm512_castsi512_pd(_mm512_add_epi64(_mm512_mask_blend_epi64(upper, low, high),
                                                          _mm512_slli_epi64(ki, 47)));
  const __m512d z = _mm512_fmadd_pd(bits_pd(0x3ebc6af84b912394), r, bits_pd(0x3f2ebfce50fac4f3));
  const __m512d r2 = _mm512_mul_pd(r, r);
  __m512d y = _mm512_fmadd_pd(r, bits_pd(0x3f962e42ff0c52d6), _mm512_set1_pd(1.0));
  y = _mm512_fmadd_pd(z, r2, y);
  return _mm512_cvtpd_ps(_mm512_mul_pd(y, s));
}
#define SHOAL_VECTOR_SILU 1
#endif

// out[i] = act(g[i]) * u[i] for i < n (SiLU, or GELU-tanh), the same floats as the scalar
// expressions above.
inline void act_mul_row(const float* g, const float* u, int64_t n, bool gelu, float* out) {
  int64_t i = 0;
#if SHOAL_VECTOR_SILU
  if (!gelu) {
    const __m256 one = _mm256_set1_ps(1.f), inf = _mm256_set1_ps(INFINITY);
    const __m256 top = _mm256_set1_ps(0x1.62e42ep6f), bottom = _mm256_set1_ps(-88.f);
    for (; i + 8 <= n; i += 8) {
      const __m256 x = _mm256_loadu_ps(g + i);
      const __m256 neg = _mm256_sub_ps(_mm256_setzero_ps(), x);
      // NOTE: where expf overflows it gives inf; below -88 it gives at most a subnormal,
      // which 1 + e rounds away, as 0 does (and e^-inf = 0). NaN stays NaN.
      __m256 e = expf8(neg);
      e = _mm256_blendv_ps(e, inf, _mm256_cmp_ps(neg, top, _CMP_GT_OQ));
      e = _mm256_blendv_ps(e, _mm256_setzero_ps(), _mm256_cmp_ps(neg, bottom, _CMP_LT_OQ));
      const __m256 act = _mm256_div_ps(x, _mm256_add_ps(one, e));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(act, _mm256_loadu_ps(u + i)));
    }
  }
#endif
  for (; i < n; ++i) out[i] = (gelu ? gelu_tanh(g[i]) : silu(g[i])) * u[i];
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
