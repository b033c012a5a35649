// Causal attention straight from the paged KV cache, for CPUs, for every query of a
// step: decode queries (one per sequence) and prefill chunks (many) alike.
//
// K/V are float32 (exact mode) or bfloat16 (fast mode; widened exactly on load).
// Cache layout (per layer), chosen for this kernel (BS = 16 keys per block):
//   K: [num_blocks, kv_heads, head_dim, BS]  (transposed inside a block)
//   V: [num_blocks, kv_heads, BS, head_dim]
// so the BS keys of a block are scored with one vector FMA per head dimension (lanes run
// over keys: no horizontal sums), and a block's V rows are one contiguous run.
//
// One task per (sequence, tile of up to kTile consecutive queries, KV head); the query
// heads sharing the KV head walk the sequence's blocks once per tile.
//
// Batch invariance by construction: the score of query q against key t is
//   sum over d = 0..hd-1, in order, of q[d] * k_t[d]   (one lane, fixed order),
// softmax runs over keys lo..pos in order, and out[d] = sum over t = lo..pos, in order, of
// p_t * v_t[d]. Nothing depends on the tile, chunk or batch a query arrives in, so a
// request's output is independent of chunked prefill, prefix-cache hits and neighbours.
//
// Sliding windows (Gemma 3's local layers): with window w > 0 a query at pos sees keys
// lo = max(0, pos - w + 1) .. pos, otherwise lo = 0. A query walks exactly the blocks that
// hold its keys; keys of its first block below lo get probability 0, and adding 0 * v to
// the sum changes nothing, so the arithmetic stays a function of (pos, w) alone.
#include "common.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kTile = 16;

struct Task {
  int64_t seq, q_begin, q_end, kv_head;
};

// 16 floats as one value: GCC/Clang lower it to one AVX-512 register, or to 2 AVX2 / 4 SSE
// registers on older CPUs, with the same per-lane arithmetic.
typedef float v16 __attribute__((vector_size(64)));
constexpr int BS = 16;   // keys per block = lanes of v16

inline v16 load16(const float* p) { v16 v; __builtin_memcpy(&v, p, sizeof(v)); return v; }

// bfloat16 KV (fast mode, stored as raw uint16_t bits): 16 values widened to float by a
// 16-bit shift, exactly.
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
inline v16 load16(const uint16_t* p) {
  u16x16 h;
  __builtin_memcpy(&h, p, sizeof(h));
  const u32x16 w = __builtin_convertvector(h, u32x16) << 16;
  v16 v;
  __builtin_memcpy(&v, &w, sizeof(v));
  return v;
}
inline void store16(float* p, v16 v) { __builtin_memcpy(p, &v, sizeof(v)); }

// Scores of R rows (query, head) against one block's 16 keys: acc[r] lanes = keys.
// Each lane sums q[d] * k[d] for d = 0..hd-1 in order, whatever R is.
template <int R, typename KT>
inline void score_block(const float* const* q, const KT* kt, int64_t hd, float scale,
                        float* const* out) {
  v16 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = v16{};
  for (int64_t d = 0; d < hd; ++d) {
    const v16 k = load16(kt + d * BS);
    for (int r = 0; r < R; ++r) acc[r] += q[r][d] * k;
  }
  for (int r = 0; r < R; ++r) store16(out[r], acc[r] * scale);
}

// out[r][:] += sum over the block's first `lanes[r]` keys of p[r][l] * v[l][:], key by key.
template <int R, typename KT>
inline void accumulate_block(const float* const* p, const int64_t* lanes, const KT* vblock,
                             int64_t hd, float* const* out) {
  for (int64_t j = 0; j < hd; j += 16) {
    v16 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = load16(out[r] + j);
    for (int l = 0; l < BS; ++l) {
      const v16 v = load16(vblock + l * hd + j);
      for (int r = 0; r < R; ++r) {
        if (l < lanes[r]) acc[r] += p[r][l] * v;
      }
    }
    for (int r = 0; r < R; ++r) store16(out[r] + j, acc[r]);
  }
}

template <int R, typename KT>
void score_rows(int nr, const float* const* q, const KT* kt, int64_t hd, float scale,
                float* const* out) {
  if (nr == R) score_block<R>(q, kt, hd, scale, out);
  else if constexpr (R > 1) score_rows<R - 1>(nr, q, kt, hd, scale, out);
}

template <int R, typename KT>
void accumulate_rows(int nr, const float* const* p, const int64_t* lanes, const KT* vblock,
                     int64_t hd, float* const* out) {
  if (nr == R) accumulate_block<R>(p, lanes, vblock, hd, out);
  else if constexpr (R > 1) accumulate_rows<R - 1>(nr, p, lanes, vblock, hd, out);
}

constexpr int kScoreRows = 8;   // rows scored together: independent FMA chains
constexpr int kValueRows = 4;   // rows accumulated together: 4 x hd/16 accumulators

template <typename KT>
void attend_tile(const Task& task, const float* qp, const KT* kp, const KT* vp,
                 const int64_t* table, int64_t pos0, int64_t H, int64_t KV, int64_t hd,
                 int64_t group, float scale, int64_t window, float* op,
                 std::vector<float>& scores, std::vector<float>& acc) {
  const int64_t nq = task.q_end - task.q_begin;
  const int64_t rows = nq * group;                     // row = (query i, head g), i-major
  const int64_t len = pos0 + nq;                       // keys the tile's last query sees
  const int64_t nblocks = (len + BS - 1) / BS;
  // First block any query of the tile sees; scores are stored from its first key on.
  const int64_t b0 = window > 0 ? std::max<int64_t>(0, pos0 - window + 1) / BS : 0;
  const int64_t base = b0 * BS;
  const int64_t width = (nblocks - b0) * BS;
  const int64_t kvh = task.kv_head;
  scores.assign(rows * width, 0.f);
  acc.assign(rows * hd, 0.f);
  const int64_t block_stride = KV * hd * BS;
  auto qrow = [&](int64_t r) {
    return qp + ((task.q_begin + r / group) * H + kvh * group + r % group) * hd;
  };
  // Rows whose query sees a key of block b: from the first query at or after its first key
  // to the last query whose window still reaches its last key.
  auto row_range = [&](int64_t t0, int64_t& first, int64_t& end) {
    first = std::max<int64_t>(0, t0 - pos0) * group;
    end = rows;
    if (window > 0) {
      end = std::min<int64_t>(nq, std::max<int64_t>(0, t0 + BS + window - 1 - pos0)) * group;
    }
  };

  // Scores: rows whose query sees any key of the block, kScoreRows at a time.
  for (int64_t b = b0; b < nblocks; ++b) {
    const KT* kt = kp + table[b] * block_stride + kvh * hd * BS;   // [hd][BS]
    const int64_t t0 = b * BS;
    int64_t first_row, end_row;
    row_range(t0, first_row, end_row);
    for (int64_t r0 = first_row; r0 < end_row; r0 += kScoreRows) {
      const int nr = static_cast<int>(std::min<int64_t>(kScoreRows, end_row - r0));
      const float* q[kScoreRows];
      float* out[kScoreRows];
      for (int r = 0; r < nr; ++r) {
        q[r] = qrow(r0 + r);
        out[r] = scores.data() + (r0 + r) * width + (t0 - base);
      }
      score_rows<kScoreRows, KT>(nr, q, kt, hd, scale, out);
    }
  }
  // Softmax of each row over its own keys lo .. pos.
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = pos0 + r / group;
    const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
    float* s = scores.data() + r * width - base;       // s[t]: key t (absolute position)
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t t = lo; t <= pos; ++t) mx = std::max(mx, s[t]);
    float total = 0.f;
    for (int64_t t = lo; t <= pos; ++t) { s[t] = std::exp(s[t] - mx); total += s[t]; }
    const float inv = 1.f / total;
    for (int64_t t = lo; t <= pos; ++t) s[t] *= inv;
    // keys of the first block before the window: scored above, weigh nothing
    for (int64_t t = lo / BS * BS; t < lo; ++t) s[t] = 0.f;
  }
  // Weighted sum of V, key by key in order, kValueRows rows at a time.
  for (int64_t b = b0; b < nblocks; ++b) {
    const KT* vblock = vp + table[b] * block_stride + kvh * BS * hd;   // [BS][hd]
    const int64_t t0 = b * BS;
    int64_t first_row, end_row;
    row_range(t0, first_row, end_row);
    for (int64_t r0 = first_row; r0 < end_row; r0 += kValueRows) {
      const int nr = static_cast<int>(std::min<int64_t>(kValueRows, end_row - r0));
      const float* p[kValueRows];
      float* out[kValueRows];
      int64_t lanes[kValueRows];
      for (int r = 0; r < nr; ++r) {
        p[r] = scores.data() + (r0 + r) * width + (t0 - base);
        out[r] = acc.data() + (r0 + r) * hd;
        lanes[r] = std::min<int64_t>(BS, pos0 + (r0 + r) / group + 1 - t0);
      }
      accumulate_rows<kValueRows, KT>(nr, p, lanes, vblock, hd, out);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(acc.begin() + r * hd, acc.begin() + (r + 1) * hd,
              op + ((task.q_begin + r / group) * H + kvh * group + r % group) * hd);
  }
}

}  // namespace

namespace {

// NOTE: float -> bfloat16 rounds to nearest even, as torch's .to(torch.bfloat16).
template <typename KT> inline KT convert(float x);
template <> inline float convert<float>(float x) { return x; }
template <> inline uint16_t convert<uint16_t>(float x) { return shoal::to_bf16(x); }

template <typename KT>
void write_rows(const float* kp, const float* vp, const int64_t* sp, KT* kc, KT* vc, int64_t T,
                int64_t KV, int64_t hd, int64_t bs) {
  for (int64_t t = 0; t < T; ++t) {
    const int64_t block = sp[t] / bs, offset = sp[t] % bs;
    for (int64_t h = 0; h < KV; ++h) {
      const float* ksrc = kp + (t * KV + h) * hd;
      const float* vsrc = vp + (t * KV + h) * hd;
      KT* kdst = kc + ((block * KV + h) * hd) * bs + offset;
      KT* vdst = vc + ((block * KV + h) * bs + offset) * hd;
      for (int64_t d = 0; d < hd; ++d) kdst[d * bs] = convert<KT>(ksrc[d]);
      for (int64_t d = 0; d < hd; ++d) vdst[d] = convert<KT>(vsrc[d]);
    }
  }
}

}  // namespace

// Writes each token's K and V into its slot (slot = block * BS + offset), converting to
// the cache's element type. k, v: [T, KV, hd] f32; k_cache [N, KV, hd, bs];
// v_cache [N, KV, bs, hd] (float32, or bfloat16 when bf16); slots [T].
SHOAL_API void shoal_write_kv(const float* k, const float* v, int64_t T, int64_t KV, int64_t hd,
                              void* k_cache, void* v_cache, int32_t bf16, int64_t bs,
                              const int64_t* slots) {
  if (bf16) {
    write_rows(k, v, slots, static_cast<uint16_t*>(k_cache), static_cast<uint16_t*>(v_cache), T,
               KV, hd, bs);
  } else {
    write_rows(k, v, slots, static_cast<float*>(k_cache), static_cast<float*>(v_cache), T, KV,
               hd, bs);
  }
}

// q: [T, H, hd] f32 (flat tokens of all sequences, each sequence's queries consecutive);
// block_tables: [N, max_blocks] (one row per sequence); query_start: [N + 1] (sequence n
// owns tokens query_start[n] .. query_start[n+1]); first_pos: [N] (absolute position of
// each sequence's first query). Query i of sequence n at position p = first_pos[n] + i
// sees keys 0 .. p, or p - window + 1 .. p when window > 0 (sliding-window layers).
// The caller checked the shapes (block size 16, hd % 16 == 0, window >= 0). out: [T, H, hd].
SHOAL_API void shoal_paged_attention(const float* qp, int64_t H, int64_t hd, const void* kp,
                                     const void* vp, int32_t bf16, int64_t KV,
                                     const int64_t* bt, int64_t max_blocks, const int64_t* qs,
                                     const int64_t* fp, int64_t num_seqs, float scale,
                                     int64_t window, float* op) {
  const int64_t group = H / KV;
  std::vector<Task> tasks;
  for (int64_t n = 0; n < num_seqs; ++n) {
    for (int64_t b = qs[n]; b < qs[n + 1]; b += kTile) {
      for (int64_t h = 0; h < KV; ++h) tasks.push_back({n, b, std::min(b + kTile, qs[n + 1]), h});
    }
  }
  // NOTE: a tile's cost grows with its position in a long prompt, so threads claim tasks one
  // at a time (pool.h) rather than taking contiguous halves.
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  shoal::WorkPool::get().run(ntasks, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scores;
    thread_local std::vector<float> acc;
    for (int64_t ti = begin; ti < end; ++ti) {
      const Task& task = tasks[ti];
      const int64_t pos0 = fp[task.seq] + (task.q_begin - qs[task.seq]);
      const int64_t* table = bt + task.seq * max_blocks;
      if (bf16) {
        attend_tile(task, qp, static_cast<const uint16_t*>(kp), static_cast<const uint16_t*>(vp),
                    table, pos0, H, KV, hd, group, scale, window, op, scores, acc);
      } else {
        attend_tile(task, qp, static_cast<const float*>(kp), static_cast<const float*>(vp),
                    table, pos0, H, KV, hd, group, scale, window, op, scores, acc);
      }
    }
  });
}
