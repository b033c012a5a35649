// Causal attention straight from the paged KV cache, for CPUs, for every query of a
// step: decode queries (one per sequence) and prefill chunks (many) alike.
//
// One task per (sequence, tile of up to kTile consecutive queries, KV head). The query
// heads sharing the KV head walk the sequence's blocks once per tile, so each K and V row
// is read once per tile and nothing is gathered into a temporary.
//
// Batch invariance by construction: a query at position p always computes
//   s_t = dot(q, k_t) * scale for t = 0..p, softmax over them in that order,
//   out = sum_t p_t v_t in that order,
// with the same instructions whatever the tile, chunking or batch it arrives in. So a
// request's output does not depend on chunked prefill, prefix-cache hits or neighbours.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int kLanes = 16;   // independent partial sums: lets the compiler vectorize dot products
constexpr int64_t kTile = 16;

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

struct Task {
  int64_t seq, q_begin, q_end, kv_head;
};

}  // namespace

// q: [T, H, hd] f32 (flat tokens of all sequences, each sequence's queries consecutive);
// k_cache, v_cache: [S, KV, hd] f32; block_tables: [N, B] i64 (one row per sequence);
// query_start: [N + 1] i64 (sequence n owns tokens query_start[n] .. query_start[n+1]);
// first_pos: [N] i64 (absolute position of each sequence's first query).
// Returns out [T, H, hd]. Query i of sequence n sees keys 0 .. first_pos[n] + i.
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor query_start,
                              torch::Tensor first_pos, int64_t block_size, double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && k_cache.dtype() == torch::kFloat32 &&
              v_cache.dtype() == torch::kFloat32, "paged_attention: float32 only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV cache must be contiguous");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  query_start = query_start.contiguous();
  first_pos = first_pos.contiguous();
  const int64_t H = q.size(1), hd = q.size(2);
  const int64_t KV = k_cache.size(1);
  const int64_t group = H / KV;
  const int64_t num_seqs = first_pos.size(0);
  const int64_t max_blocks = block_tables.size(1);
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* qs = query_start.data_ptr<int64_t>();
  const int64_t* fp = first_pos.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

  std::vector<Task> tasks;
  for (int64_t n = 0; n < num_seqs; ++n) {
    for (int64_t b = qs[n]; b < qs[n + 1]; b += kTile) {
      for (int64_t h = 0; h < KV; ++h) tasks.push_back({n, b, std::min(b + kTile, qs[n + 1]), h});
    }
  }

  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc;
    for (int64_t ti = begin; ti < end; ++ti) {
      const Task& task = tasks[ti];
      const int64_t n = task.seq, kvh = task.kv_head;
      const int64_t rows = (task.q_end - task.q_begin) * group;
      const int64_t pos0 = fp[n] + (task.q_begin - qs[n]);      // position of the tile's first query
      const int64_t len = pos0 + (task.q_end - task.q_begin);   // keys the last query sees
      const int64_t* table = bt + n * max_blocks;
      scores.assign(rows * len, 0.f);
      acc.assign(rows * hd, 0.f);
      // Scores: one pass over K; query i (position pos0 + i) uses keys t <= pos0 + i.
      for (int64_t t = 0; t < len; ++t) {
        const int64_t slot = table[t / block_size] * block_size + t % block_size;
        const float* krow = kp + (slot * KV + kvh) * hd;
        const int64_t first_query = std::max<int64_t>(0, t - pos0);
        for (int64_t i = first_query; i < task.q_end - task.q_begin; ++i) {
          const float* qrow = qp + ((task.q_begin + i) * H + kvh * group) * hd;
          for (int64_t g = 0; g < group; ++g) {
            scores[(i * group + g) * len + t] = dot(qrow + g * hd, krow, static_cast<int>(hd)) * fscale;
          }
        }
      }
      // Softmax of each row over its own keys 0 .. pos.
      for (int64_t i = 0; i < task.q_end - task.q_begin; ++i) {
        const int64_t visible = pos0 + i + 1;
        for (int64_t g = 0; g < group; ++g) {
          float* s = scores.data() + (i * group + g) * len;
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t t = 0; t < visible; ++t) mx = std::max(mx, s[t]);
          float total = 0.f;
          for (int64_t t = 0; t < visible; ++t) { s[t] = std::exp(s[t] - mx); total += s[t]; }
          const float inv = 1.f / total;
          for (int64_t t = 0; t < visible; ++t) s[t] *= inv;
        }
      }
      // Weighted sum of V: one pass over V.
      for (int64_t t = 0; t < len; ++t) {
        const int64_t slot = table[t / block_size] * block_size + t % block_size;
        const float* vrow = vp + (slot * KV + kvh) * hd;
        const int64_t first_query = std::max<int64_t>(0, t - pos0);
        for (int64_t i = first_query; i < task.q_end - task.q_begin; ++i) {
          for (int64_t g = 0; g < group; ++g) {
            const int64_t r = i * group + g;
            axpy(acc.data() + r * hd, vrow, scores[r * len + t], static_cast<int>(hd));
          }
        }
      }
      for (int64_t i = 0; i < task.q_end - task.q_begin; ++i) {
        for (int64_t g = 0; g < group; ++g) {
          std::copy(acc.begin() + (i * group + g) * hd, acc.begin() + (i * group + g + 1) * hd,
                    op + ((task.q_begin + i) * H + kvh * group + g) * hd);
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention,
        "Causal attention over a paged KV cache for decode and prefill queries (CPU, float32)");
}
