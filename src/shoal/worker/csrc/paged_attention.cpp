// Decode attention straight from the paged KV cache, for CPUs.
//
// One task per (sequence, KV head): the query heads that share the KV head walk the
// sequence's blocks once, so every K and V row is read from memory once per step and
// nothing is gathered into a temporary. Each task's arithmetic runs in a fixed order,
// so a sequence's result does not depend on the rest of the batch.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int kLanes = 16;  // independent partial sums: lets the compiler vectorize dot products

inline float dot(const float* a, const float* b, int n) {
  float acc[kLanes] = {0};
  int i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  }
  float sum = 0.f;
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline void axpy(float* y, const float* x, float alpha, int n) {
  for (int i = 0; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace

// q: [D, H, hd] f32; k_cache, v_cache: [S, KV, hd] f32; block_tables: [D, B] i64;
// context_lens: [D] i64; returns out [D, H, hd].
torch::Tensor paged_attention_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens,
                                     int64_t block_size, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_cache.dtype() == torch::kFloat32 &&
              v_cache.dtype() == torch::kFloat32, "paged_attention_decode: float32 only");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV cache must be contiguous");
  const int64_t D = q.size(0), H = q.size(1), hd = q.size(2);
  const int64_t KV = k_cache.size(1);
  const int64_t group = H / KV;
  const int64_t max_blocks = block_tables.size(1);
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, D * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t d = task / KV, kvh = task % KV;
      const int64_t len = lens[d];
      scores.assign(group * len, 0.f);
      acc.assign(group * hd, 0.f);
      const float* qbase = qp + (d * H + kvh * group) * hd;
      // Scores for all group heads, one pass over K.
      for (int64_t t = 0; t < len; ++t) {
        const int64_t slot = bt[d * max_blocks + t / block_size] * block_size + t % block_size;
        const float* krow = kp + (slot * KV + kvh) * hd;
        for (int64_t g = 0; g < group; ++g) {
          scores[g * len + t] = dot(qbase + g * hd, krow, static_cast<int>(hd)) * fscale;
        }
      }
      // Softmax per head (max-subtracted).
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * len;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < len; ++t) mx = std::max(mx, s[t]);
        float total = 0.f;
        for (int64_t t = 0; t < len; ++t) { s[t] = std::exp(s[t] - mx); total += s[t]; }
        const float inv = 1.f / total;
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
      }
      // Weighted sum of V, one pass over V.
      for (int64_t t = 0; t < len; ++t) {
        const int64_t slot = bt[d * max_blocks + t / block_size] * block_size + t % block_size;
        const float* vrow = vp + (slot * KV + kvh) * hd;
        for (int64_t g = 0; g < group; ++g) {
          axpy(acc.data() + g * hd, vrow, scores[g * len + t], static_cast<int>(hd));
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        std::copy(acc.begin() + g * hd, acc.begin() + (g + 1) * hd,
                  op + (d * H + kvh * group + g) * hd);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention_decode", &paged_attention_decode,
        "Decode attention over a paged KV cache (CPU, float32)");
}
