// Fused elementwise ops around the int8 matmuls of fast mode (CPU, float32).
//
// Each op replaces a chain of small PyTorch ops whose dispatch cost dominated decoding
// at small batch sizes. Every op works row by row with a fixed order of arithmetic, so a
// row's result never depends on the other rows of the batch. Outputs are allocated by the
// caller (kernels/cpu.py); inputs are contiguous.
#include "common.h"

#include <cmath>
#include <vector>

using shoal::grain;
using shoal::parallel_for;

namespace {

// Quantizes one row (already smoothed) to int8 with a symmetric per-row scale.
inline float quantize_row(const float* x, int64_t n, int8_t* out) {
  const float amax = shoal::abs_max(x, n);
  const float scale = std::max(amax, 1e-12f) / 127.f;
  const float inv = 1.f / scale;
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::nearbyint(x[i] * inv);
    out[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
  }
  return scale;
}

// One int32 sum back to float: sum * row scale * column scale (+ bias), in this order
// everywhere, so the fused paths give dequant_rows' bits.
inline float dequant(int32_t sum, float x_scale, float w_scale, const float* bias, int64_t n) {
  const float v = static_cast<float>(sum) * x_scale * w_scale;
  return bias != nullptr ? v + bias[n] : v;
}

}  // namespace

// If add_residual: residual += x (in place). Then h = residual (or x), and each row of
// h * rsqrt(mean(h^2) + eps) * weight is quantized to int8. `weight` is the norm weight
// already divided by the next layer's smoothing factors. Writes q [T, K] and scale [T].
SHOAL_API void shoal_rms_norm_quant(const float* xp, float* rp, const float* wp, int64_t T,
                                    int64_t K, float eps, int32_t add_residual, int8_t* qp,
                                    float* sp) {
  parallel_for(T, grain(K), [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t t = begin; t < end; ++t) {
      shoal::rms_norm_row(xp + t * K, add_residual ? rp + t * K : nullptr, wp, K, eps, row.data());
      sp[t] = quantize_row(row.data(), K, qp + t * K);
    }
  });
}

// x * inv_smooth, quantized per row: q [T, K], scale [T].
SHOAL_API void shoal_quant_rows(const float* xp, const float* sm, int64_t T, int64_t K, int8_t* qp,
                                float* sp) {
  parallel_for(T, grain(K), [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i = 0; i < K; ++i) row[i] = xp[t * K + i] * sm[i];
      sp[t] = quantize_row(row.data(), K, qp + t * K);
    }
  });
}

namespace {

// Mixes a row's 32 chunks of C = K / 32 values by an (unnormalised, +-1) Walsh-Hadamard
// transform, in place. NOTE: a rotation spreads a channel that dwarfs the rest over 32
// values, so one int8 scale per row holds it (the encoders' GELU outputs have such channels,
// token by token); the weights were rotated the same way at load (layers/hadamard.py), so the
// product is the unrotated one. Mixing whole chunks keeps every butterfly a contiguous,
// vectorizable add. The butterfly order is layers/hadamard.py's PyTorch twin's: same bits.
inline void hadamard_chunks(float* row, int64_t K) {
  const int64_t C = K / 32;
  for (int64_t h = 1; h < 32; h *= 2) {
    for (int64_t i = 0; i < 32; i += 2 * h) {
      for (int64_t j = i; j < i + h; ++j) {
        float* a = row + j * C;
        float* b = a + h * C;
        for (int64_t c = 0; c < C; ++c) {
          const float x = a[c], y = b[c];
          a[c] = x + y;
          b[c] = x - y;
        }
      }
    }
  }
}

// GELU with the error function (BERT's), erf from Abramowitz & Stegun 7.1.26 (absolute
// error below 1.5e-7, far under the int8 step that follows).
inline float gelu_erf(float x) {
  const float z = std::fabs(x) * 0.70710678f;
  const float t = 1.f / (1.f + 0.3275911f * z);
  const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f +
                     t * (-1.453152027f + t * 1.061405429f))));
  const float erf_abs = 1.f - poly * shoal::exp_neg(z * z);
  return 0.5f * x * (1.f + (x < 0.f ? -erf_abs : erf_abs));
}

}  // namespace

// x [T, K], K = 32 * C: each row's chunks mixed (hadamard_chunks), then quantized per row.
SHOAL_API void shoal_hadamard_quant_rows(const float* xp, int64_t T, int64_t K, int8_t* qp,
                                         float* sp) {
  parallel_for(T, grain(K), [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t t = begin; t < end; ++t) {
      std::copy(xp + t * K, xp + (t + 1) * K, row.begin());
      hadamard_chunks(row.data(), K);
      sp[t] = quantize_row(row.data(), K, qp + t * K);
    }
  });
}

// An encoder's feed-forward middle in one pass: acc int32 [T, K] of the up projection,
// dequantized as dequant_rows does (x_scale [T], w_scale [K], bias [K] or null), GELU (erf),
// rotated and quantized per row as hadamard_quant_rows.
SHOAL_API void shoal_dequant_gelu_hadamard_quant(const int32_t* ap, const float* xs,
                                                 const float* ws, const float* bp, int64_t T,
                                                 int64_t K, int8_t* qp, float* sp) {
  parallel_for(T, grain(K), [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t t = begin; t < end; ++t) {
      const float s = xs[t];
      const int32_t* a = ap + t * K;
      for (int64_t i = 0; i < K; ++i) row[i] = gelu_erf(dequant(a[i], s, ws[i], bp, i));
      hadamard_chunks(row.data(), K);
      sp[t] = quantize_row(row.data(), K, qp + t * K);
    }
  });
}

namespace {

// gate_up: [T, 2I] (gate then up). act(gate) * up * inv_smooth, quantized per row.
void act_mul_smooth_quant(const float* gp, const float* sm, int64_t T, int64_t I, bool gelu,
                          int8_t* qp, float* sp) {
  parallel_for(T, grain(I), [&](int64_t begin, int64_t end) {
    std::vector<float> row(I);
    for (int64_t t = begin; t < end; ++t) {
      const float* g = gp + t * 2 * I;
      shoal::act_mul_row(g, g + I, I, gelu, row.data());
      for (int64_t i = 0; i < I; ++i) row[i] = row[i] * sm[i];
      sp[t] = quantize_row(row.data(), I, qp + t * I);
    }
  });
}

}  // namespace

// gate_up: [T, 2I] (gate then up). silu(gate) * up * inv_smooth, quantized per row.
SHOAL_API void shoal_silu_mul_quant(const float* gp, const float* sm, int64_t T, int64_t I,
                                    int8_t* qp, float* sp) {
  act_mul_smooth_quant(gp, sm, T, I, false, qp, sp);
}

// acc: int32 [T, N]; out = acc * x_scale[t] * w_scale[n] (+ bias[n] when bias is not null).
SHOAL_API void shoal_dequant_rows(const int32_t* ap, const float* xs, const float* ws,
                                  const float* bp, int64_t T, int64_t N, float* op) {
  parallel_for(T, grain(N), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float s = xs[t];
      for (int64_t n = 0; n < N; ++n) op[t * N + n] = dequant(ap[t * N + n], s, ws[n], bp, n);
    }
  });
}

// qkv: [T, W = (H + 2 KV) * hd]. Writes q [T, H, hd], k [T, KV, hd] with rotary embeddings
// (HF "rotate half" layout) at `positions` (cos/sin: [max_pos, hd]), and v [T, KV, hd].
SHOAL_API void shoal_rope_split(const float* src, int64_t T, int64_t W, const int64_t* pos,
                                const float* cp, const float* sp, int64_t num_heads,
                                int64_t num_kv_heads, int64_t head_dim, float* qp, float* kp,
                                float* vp) {
  const int64_t half = head_dim / 2;
  parallel_for(T, grain(W), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + pos[t] * head_dim;
      const float* s = sp + pos[t] * head_dim;
      const float* row = src + t * W;
      auto rotate = [&](const float* in, float* out) {
        for (int64_t i = 0; i < half; ++i) {
          out[i] = in[i] * c[i] - in[i + half] * s[i];
          out[i + half] = in[i + half] * c[i + half] + in[i] * s[i + half];
        }
      };
      for (int64_t h = 0; h < num_heads; ++h) {
        rotate(row + h * head_dim, qp + (t * num_heads + h) * head_dim);
      }
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        rotate(row + (num_heads + h) * head_dim, kp + (t * num_kv_heads + h) * head_dim);
        std::copy(row + (num_heads + num_kv_heads + h) * head_dim,
                  row + (num_heads + num_kv_heads + h + 1) * head_dim,
                  vp + (t * num_kv_heads + h) * head_dim);
      }
    }
  });
}

namespace {

inline int32_t dot_i8(const int8_t* a, const int8_t* b, int64_t k) {
  int32_t sum = 0;
  for (int64_t i = 0; i < k; ++i) sum += static_cast<int16_t>(a[i]) * static_cast<int16_t>(b[i]);
  return sum;
}

}  // namespace

// x: int8 [M, K] (small M: decoding), w: int8 [N, K]. Writes int32 x w^T [M, N], exactly the
// integers torch._int_mm gives (integer sums do not depend on order), but streaming each
// weight row once for all M rows: at batch 1 this is a memory-bound matrix-vector product.
SHOAL_API void shoal_int8_matmul_small(const int8_t* xp, const int8_t* wp, int64_t M, int64_t K,
                                       int64_t N, int32_t* op) {
  parallel_for(N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* row = wp + n * K;
      for (int64_t m = 0; m < M; ++m) op[m * N + n] = dot_i8(xp + m * K, row, K);
    }
  });
}

// The two above in one pass for decoding: x int8 [M, K] with row scales x_scale [M] times
// w int8 [N, K] with scales w_scale [N] (+ bias [N] when not null) -> float [M, N]. The same
// integers and the same float expression as int8_matmul_small then dequant_rows, so the
// results are bit-identical; one call and one output instead of two.
SHOAL_API void shoal_int8_linear_small(const int8_t* xp, const float* xs, const int8_t* wp,
                                       const float* ws, const float* bp, int64_t M, int64_t K,
                                       int64_t N, float* op) {
  parallel_for(N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* row = wp + n * K;
      for (int64_t m = 0; m < M; ++m) {
        op[m * N + n] = dequant(dot_i8(xp + m * K, row, K), xs[m], ws[n], bp, n);
      }
    }
  });
}

// ----- Gemma 3 -------------------------------------------------------------------------
// Gemma normalises each sublayer's output before adding it to the residual stream, and the
// stream again before the next sublayer; its norm weights arrive here as (1 + w).

// residual += RMSNorm(x) * x_weight (in place); then RMSNorm(residual) * weight, quantized
// per row. `weight` is already divided by the next linear's smoothing factors.
SHOAL_API void shoal_rms_norm_add_norm_quant(const float* xp, float* rp, const float* xw,
                                             const float* wp, int64_t T, int64_t K, float eps,
                                             int8_t* qp, float* sp) {
  parallel_for(T, grain(K), [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t t = begin; t < end; ++t) {
      shoal::rms_norm_add_norm_row(xp + t * K, rp + t * K, xw, wp, K, eps, row.data());
      sp[t] = quantize_row(row.data(), K, qp + t * K);
    }
  });
}

// gate_up: [T, 2I] (gate then up). gelu_tanh(gate) * up * inv_smooth, quantized per row.
SHOAL_API void shoal_gelu_tanh_mul_quant(const float* gp, const float* sm, int64_t T, int64_t I,
                                         int8_t* qp, float* sp) {
  act_mul_smooth_quant(gp, sm, T, I, true, qp, sp);
}

// qkv: [T, W]. Writes q [T, H, hd] and k [T, KV, hd], each head RMS-normalised over hd
// (weights q_weight / k_weight, [hd]) and then rotated at `positions` (HF "rotate half"
// layout), and v [T, KV, hd] as is.
SHOAL_API void shoal_qk_norm_rope_split(const float* src, int64_t T, int64_t W,
                                        const int64_t* pos, const float* cp, const float* sp,
                                        const float* qw, const float* kw, float eps,
                                        int64_t num_heads, int64_t num_kv_heads,
                                        int64_t head_dim, float* qp, float* kp, float* vp) {
  const int64_t half = head_dim / 2;
  parallel_for(T, grain(W), [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(head_dim);
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + pos[t] * head_dim;
      const float* s = sp + pos[t] * head_dim;
      const float* row = src + t * W;
      auto norm_rotate = [&](const float* in, const float* w, float* out) {
        float sum = 0.f;
        for (int64_t i = 0; i < head_dim; ++i) sum += in[i] * in[i];
        const float inv = 1.f / std::sqrt(sum / static_cast<float>(head_dim) + eps);
        for (int64_t i = 0; i < head_dim; ++i) tmp[i] = in[i] * inv * w[i];
        for (int64_t i = 0; i < half; ++i) {
          out[i] = tmp[i] * c[i] - tmp[i + half] * s[i];
          out[i + half] = tmp[i + half] * c[i + half] + tmp[i] * s[i + half];
        }
      };
      for (int64_t h = 0; h < num_heads; ++h) {
        norm_rotate(row + h * head_dim, qw, qp + (t * num_heads + h) * head_dim);
      }
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        norm_rotate(row + (num_heads + h) * head_dim, kw, kp + (t * num_kv_heads + h) * head_dim);
        std::copy(row + (num_heads + num_kv_heads + h) * head_dim,
                  row + (num_heads + num_kv_heads + h + 1) * head_dim,
                  vp + (t * num_kv_heads + h) * head_dim);
      }
    }
  });
}
