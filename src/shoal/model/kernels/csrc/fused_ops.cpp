// Fused elementwise ops around the int8 matmuls of fast mode (CPU, float32).
//
// Each op replaces a chain of small PyTorch ops whose dispatch cost dominated decoding
// at small batch sizes. Every op works row by row with a fixed order of arithmetic, so a
// row's result never depends on the other rows of the batch.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

namespace {

// Quantizes one row (already smoothed) to int8 with a symmetric per-row scale.
inline float quantize_row(const float* x, int64_t n, int8_t* out) {
  float amax = 0.f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float scale = std::max(amax, 1e-12f) / 127.f;
  const float inv = 1.f / scale;
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::nearbyint(x[i] * inv);
    out[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
  }
  return scale;
}

inline int64_t grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

}  // namespace

// If add_residual: residual += x (in place). Then h = residual (or x), and each row of
// h * rsqrt(mean(h^2) + eps) * weight is quantized to int8. `weight` is the norm weight
// already divided by the next layer's smoothing factors. Returns (int8 [T, K], scale [T, 1]).
std::tuple<torch::Tensor, torch::Tensor> rms_norm_quant(torch::Tensor x, torch::Tensor residual,
                                                        torch::Tensor weight, double eps,
                                                        bool add_residual) {
  x = x.contiguous();
  TORCH_CHECK(residual.is_contiguous() && weight.is_contiguous(), "contiguous inputs expected");
  const int64_t T = x.size(0), K = x.size(1);
  auto q = torch::empty({T, K}, x.options().dtype(torch::kInt8));
  auto scale = torch::empty({T, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, T, grain(K), [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t t = begin; t < end; ++t) {
      const float* h = xp + t * K;
      if (add_residual) {
        float* r = rp + t * K;
        for (int64_t i = 0; i < K; ++i) r[i] += h[i];
        h = r;
      }
      float sum = 0.f;
      for (int64_t i = 0; i < K; ++i) sum += h[i] * h[i];
      const float inv_rms = 1.f / std::sqrt(sum / static_cast<float>(K) + feps);
      for (int64_t i = 0; i < K; ++i) row[i] = h[i] * inv_rms * wp[i];
      sp[t] = quantize_row(row.data(), K, qp + t * K);
    }
  });
  return {q, scale};
}

// x * inv_smooth, quantized per row. Returns (int8 [T, K], scale [T, 1]).
std::tuple<torch::Tensor, torch::Tensor> quant_rows(torch::Tensor x, torch::Tensor inv_smooth) {
  x = x.contiguous();
  const int64_t T = x.size(0), K = x.size(1);
  auto q = torch::empty({T, K}, x.options().dtype(torch::kInt8));
  auto scale = torch::empty({T, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* sm = inv_smooth.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  at::parallel_for(0, T, grain(K), [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i = 0; i < K; ++i) row[i] = xp[t * K + i] * sm[i];
      sp[t] = quantize_row(row.data(), K, qp + t * K);
    }
  });
  return {q, scale};
}

// gate_up: [T, 2I] (gate then up). silu(gate) * up * inv_smooth, quantized per row.
std::tuple<torch::Tensor, torch::Tensor> silu_mul_quant(torch::Tensor gate_up,
                                                        torch::Tensor inv_smooth) {
  gate_up = gate_up.contiguous();
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  auto q = torch::empty({T, I}, gate_up.options().dtype(torch::kInt8));
  auto scale = torch::empty({T, 1}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  const float* sm = inv_smooth.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  at::parallel_for(0, T, grain(I), [&](int64_t begin, int64_t end) {
    std::vector<float> row(I);
    for (int64_t t = begin; t < end; ++t) {
      const float* g = gp + t * 2 * I;
      const float* u = g + I;
      for (int64_t i = 0; i < I; ++i) {
        const float silu = g[i] / (1.f + std::exp(-g[i]));
        row[i] = silu * u[i] * sm[i];
      }
      sp[t] = quantize_row(row.data(), I, qp + t * I);
    }
  });
  return {q, scale};
}

// acc: int32 [T, N]; returns float acc * x_scale[t] * w_scale[n] (+ bias[n]).
torch::Tensor dequant_rows(torch::Tensor acc, torch::Tensor x_scale, torch::Tensor w_scale,
                           torch::Tensor bias) {
  acc = acc.contiguous();
  const int64_t T = acc.size(0), N = acc.size(1);
  auto out = torch::empty({T, N}, x_scale.options());
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float* xs = x_scale.data_ptr<float>();
  const float* ws = w_scale.data_ptr<float>();
  const bool has_bias = bias.defined() && bias.numel() == N;
  const float* bp = has_bias ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, grain(N), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float s = xs[t];
      for (int64_t n = 0; n < N; ++n) {
        float v = static_cast<float>(ap[t * N + n]) * s * ws[n];
        if (has_bias) v += bp[n];
        op[t * N + n] = v;
      }
    }
  });
  return out;
}

// qkv: [T, (H + 2 KV) * hd]. Returns contiguous q [T, H, hd], k [T, KV, hd] with rotary
// embeddings (HF "rotate half" layout) at `positions`, and v [T, KV, hd].
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> rope_split(
    torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
  qkv = qkv.contiguous();
  positions = positions.contiguous();
  const int64_t T = qkv.size(0), W = qkv.size(1);
  const int64_t half = head_dim / 2;
  auto q = torch::empty({T, num_heads, head_dim}, qkv.options());
  auto k = torch::empty({T, num_kv_heads, head_dim}, qkv.options());
  auto v = torch::empty({T, num_kv_heads, head_dim}, qkv.options());
  const float* src = qkv.data_ptr<float>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  at::parallel_for(0, T, grain(W), [&](int64_t begin, int64_t end) {
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
  return {q, k, v};
}

namespace {

inline int32_t dot_i8(const int8_t* a, const int8_t* b, int64_t k) {
  int32_t sum = 0;
  for (int64_t i = 0; i < k; ++i) sum += static_cast<int16_t>(a[i]) * static_cast<int16_t>(b[i]);
  return sum;
}

}  // namespace

// x: int8 [M, K] (small M: decoding), w: int8 [N, K]. Returns int32 x w^T, exactly the
// integers torch._int_mm gives (integer sums do not depend on order), but streaming each
// weight row once for all M rows: at batch 1 this is a memory-bound matrix-vector product.
torch::Tensor int8_matmul_small(torch::Tensor x, torch::Tensor w) {
  x = x.contiguous();
  TORCH_CHECK(w.is_contiguous(), "weights must be contiguous [N, K]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto out = torch::empty({M, N}, x.options().dtype(torch::kInt32));
  const int8_t* xp = x.data_ptr<int8_t>();
  const int8_t* wp = w.data_ptr<int8_t>();
  int32_t* op = out.data_ptr<int32_t>();
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* row = wp + n * K;
      for (int64_t m = 0; m < M; ++m) op[m * N + n] = dot_i8(xp + m * K, row, K);
    }
  });
  return out;
}

// ----- Gemma 3 -------------------------------------------------------------------------
// Gemma normalises each sublayer's output before adding it to the residual stream, and the
// stream again before the next sublayer; its norm weights arrive here as (1 + w).

// residual += RMSNorm(x) * x_weight (in place); then RMSNorm(residual) * weight, quantized
// per row. `weight` is already divided by the next linear's smoothing factors.
// Returns (int8 [T, K], scale [T, 1]).
std::tuple<torch::Tensor, torch::Tensor> rms_norm_add_norm_quant(torch::Tensor x,
                                                                 torch::Tensor residual,
                                                                 torch::Tensor x_weight,
                                                                 torch::Tensor weight, double eps) {
  x = x.contiguous();
  TORCH_CHECK(residual.is_contiguous() && weight.is_contiguous() && x_weight.is_contiguous(),
              "contiguous inputs expected");
  const int64_t T = x.size(0), K = x.size(1);
  auto q = torch::empty({T, K}, x.options().dtype(torch::kInt8));
  auto scale = torch::empty({T, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  const float* xw = x_weight.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, T, grain(K), [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t t = begin; t < end; ++t) {
      const float* h = xp + t * K;
      float* r = rp + t * K;
      float sum = 0.f;
      for (int64_t i = 0; i < K; ++i) sum += h[i] * h[i];
      const float inv_x = 1.f / std::sqrt(sum / static_cast<float>(K) + feps);
      for (int64_t i = 0; i < K; ++i) r[i] += h[i] * inv_x * xw[i];
      sum = 0.f;
      for (int64_t i = 0; i < K; ++i) sum += r[i] * r[i];
      const float inv_r = 1.f / std::sqrt(sum / static_cast<float>(K) + feps);
      for (int64_t i = 0; i < K; ++i) row[i] = r[i] * inv_r * wp[i];
      sp[t] = quantize_row(row.data(), K, qp + t * K);
    }
  });
  return {q, scale};
}

// gate_up: [T, 2I] (gate then up). gelu_tanh(gate) * up * inv_smooth, quantized per row.
std::tuple<torch::Tensor, torch::Tensor> gelu_tanh_mul_quant(torch::Tensor gate_up,
                                                             torch::Tensor inv_smooth) {
  gate_up = gate_up.contiguous();
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  auto q = torch::empty({T, I}, gate_up.options().dtype(torch::kInt8));
  auto scale = torch::empty({T, 1}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  const float* sm = inv_smooth.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  constexpr float kAlpha = 0.7978845608028654f;   // sqrt(2 / pi)
  constexpr float kBeta = 0.044715f;
  at::parallel_for(0, T, grain(I), [&](int64_t begin, int64_t end) {
    std::vector<float> row(I);
    for (int64_t t = begin; t < end; ++t) {
      const float* g = gp + t * 2 * I;
      const float* u = g + I;
      for (int64_t i = 0; i < I; ++i) {
        const float x = g[i];
        const float gelu = 0.5f * x * (1.f + std::tanh(kAlpha * (x + kBeta * x * x * x)));
        row[i] = gelu * u[i] * sm[i];
      }
      sp[t] = quantize_row(row.data(), I, qp + t * I);
    }
  });
  return {q, scale};
}

// qkv: [T, (H + 2 KV) * hd]. Returns contiguous q [T, H, hd] and k [T, KV, hd], each head
// RMS-normalised over hd (weights q_weight / k_weight) and then rotated at `positions`
// (HF "rotate half" layout), and v [T, KV, hd] as is.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> qk_norm_rope_split(
    torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
    torch::Tensor q_weight, torch::Tensor k_weight, double eps, int64_t num_heads,
    int64_t num_kv_heads, int64_t head_dim) {
  qkv = qkv.contiguous();
  positions = positions.contiguous();
  TORCH_CHECK(q_weight.is_contiguous() && k_weight.is_contiguous() &&
              q_weight.numel() == head_dim && k_weight.numel() == head_dim,
              "q/k norm weights must be contiguous [head_dim]");
  const int64_t T = qkv.size(0), W = qkv.size(1);
  const int64_t half = head_dim / 2;
  auto q = torch::empty({T, num_heads, head_dim}, qkv.options());
  auto k = torch::empty({T, num_kv_heads, head_dim}, qkv.options());
  auto v = torch::empty({T, num_kv_heads, head_dim}, qkv.options());
  const float* src = qkv.data_ptr<float>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const float* qw = q_weight.data_ptr<float>();
  const float* kw = k_weight.data_ptr<float>();
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  float* vp = v.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, T, grain(W), [&](int64_t begin, int64_t end) {
    std::vector<float> tmp(head_dim);
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + pos[t] * head_dim;
      const float* s = sp + pos[t] * head_dim;
      const float* row = src + t * W;
      auto norm_rotate = [&](const float* in, const float* w, float* out) {
        float sum = 0.f;
        for (int64_t i = 0; i < head_dim; ++i) sum += in[i] * in[i];
        const float inv = 1.f / std::sqrt(sum / static_cast<float>(head_dim) + feps);
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
  return {q, k, v};
}
