// Causal attention straight from the paged KV cache, for CPUs, for every query of a
// step: decode queries (one per sequence) and prefill chunks (many) alike.
//
// K/V are float32 (exact mode), bfloat16 (fast mode's default) or float16; the 16-bit
// types are widened to float exactly on load.
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

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

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

// bfloat16 KV (fast mode's default, stored as raw uint16_t bits): 16 values widened to float by a
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
// float16 KV (SHOAL_KV_CACHE_DTYPE=float16: 3 more mantissa bits than bfloat16, as
// llama.cpp's KV cache): widened to float exactly. NOTE: GCC 12 converts a _Float16 vector one lane at a
// time, so the F16C / AVX-512 conversions are named; every route is exact, so the bits
// are the same on every ISA.
typedef _Float16 h16x16 __attribute__((vector_size(32)));
inline v16 load16(const _Float16* p) {
  v16 v;
#if defined(__AVX512F__)
  const __m512 w = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  __builtin_memcpy(&v, &w, sizeof(v));
#elif defined(__F16C__)
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  __builtin_memcpy(&v, &lo, sizeof(lo));
  __builtin_memcpy(reinterpret_cast<char*>(&v) + sizeof(lo), &hi, sizeof(hi));
#else
  h16x16 h;
  __builtin_memcpy(&h, p, sizeof(h));
  v = __builtin_convertvector(h, v16);
#endif
  return v;
}
inline void store16(float* p, v16 v) { __builtin_memcpy(p, &v, sizeof(v)); }

constexpr int kScoreRows = 16;   // rows scored together: independent FMA chains
constexpr int kValueRows = 6;    // rows accumulated together: 6 x 4 vectors of accumulators

// Scores of R rows (query, head) against one block's 16 keys ([hd][BS], as floats or as the
// cache's 16-bit values, widened on load): acc[r] lanes = keys. Each lane sums q[d] * k[d]
// for d = 0..hd-1 in order, whatever R is.
// qt: the rows' queries transposed, [hd][kScoreRows] (one pointer, constant offsets).
template <int R, typename ET>
inline void score_block(const float* qt, const ET* kt, int64_t hd, float scale,
                        float* const* out) {
  v16 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = v16{};
  for (int64_t d = 0; d < hd; ++d) {
    const v16 k = load16(kt + d * BS);
    for (int r = 0; r < R; ++r) acc[r] += qt[d * kScoreRows + r] * k;
  }
  for (int r = 0; r < R; ++r) store16(out[r], acc[r] * scale);
}

// out[r][:] += sum over the block's 16 keys of p[r][l] * v[l][:], key by key: rows that see
// the whole block. J vectors of 16 dims per row at a time (R x J accumulators in registers).
template <int R, int J, typename ET>
inline void accumulate_full(const float* const* p, const ET* vblock, int64_t hd,
                            float* const* out) {
  for (int64_t j = 0; j < hd; j += 16 * J) {
    v16 acc[R][J];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < J; ++c) acc[r][c] = load16(out[r] + j + 16 * c);
    for (int l = 0; l < BS; ++l) {
      v16 v[J];
      for (int c = 0; c < J; ++c) v[c] = load16(vblock + l * hd + j + 16 * c);
      for (int r = 0; r < R; ++r) {
        const float pl = p[r][l];
        for (int c = 0; c < J; ++c) acc[r][c] += pl * v[c];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < J; ++c) store16(out[r] + j + 16 * c, acc[r][c]);
  }
}

// The same for one row that sees only the block's first `lanes` keys (its query's own block).
template <typename ET>
inline void accumulate_partial(const float* p, int64_t lanes, const ET* vblock, int64_t hd,
                               float* out) {
  for (int64_t j = 0; j < hd; j += 16) {
    v16 acc = load16(out + j);
    for (int64_t l = 0; l < lanes; ++l) acc += p[l] * load16(vblock + l * hd + j);
    store16(out + j, acc);
  }
}

template <int R, typename ET>
void score_rows(int nr, const float* qt, const ET* kt, int64_t hd, float scale,
                float* const* out) {
  if (nr == R) score_block<R>(qt, kt, hd, scale, out);
  else if constexpr (R > 1) score_rows<R - 1>(nr, qt, kt, hd, scale, out);
}

template <int R, int J, typename ET>
void accumulate_rows(int nr, const float* const* p, const ET* vblock, int64_t hd,
                     float* const* out) {
  if (nr == R) accumulate_full<R, J>(p, vblock, hd, out);
  else if constexpr (R > 1) accumulate_rows<R - 1, J>(nr, p, vblock, hd, out);
}


// One block of K or V as floats: bfloat16 / float16 widened once per tile (not once per row
// group).
inline const float* widen(const float* src, int64_t, float*) { return src; }
inline const float* widen(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; i += 16) store16(dst + i, load16(src + i));
  return dst;
}
inline const float* widen(const _Float16* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; i += 16) store16(dst + i, load16(src + i));
  return dst;
}

// e^x for x <= 0, 16 lanes, within ~1 ulp (e^x below e^-87 gives e^-87: it weighs nothing
// beside the row's maximum, whose e^0 = 1 is in every sum). NOTE: the softmax's scalar
// expf calls and the serial sum were most of a long prompt's attention time.
inline v16 exp16(v16 x) {
  typedef int32_t i32x16 __attribute__((vector_size(64)));
  const v16 lo = v16{} - 87.f;
  x = x < lo ? lo : x;
  const v16 magic = v16{} + 12582912.f;                 // 1.5 * 2^23: round to an integer
  const v16 n = (x * 1.44269504f + magic) - magic;       // round(x / ln 2)
  const v16 r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  v16 p = v16{} + (1.f / 5040.f);
  p = p * r + (1.f / 720.f);
  p = p * r + (1.f / 120.f);
  p = p * r + (1.f / 24.f);
  p = p * r + (1.f / 6.f);
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const i32x16 bits = (__builtin_convertvector(n, i32x16) + 127) << 23;   // 2^n
  v16 scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Softmax of one row in place over keys lo .. pos (s[t]: key t, absolute; s is aligned so
// that t % 16 is a lane): 16 lanes per step; lanes outside lo .. pos of the touched blocks
// become 0. The sum runs lane-wise over the blocks in order, then over the lanes in a fixed
// tree: a function of (lo, pos) and the scores alone, so batch invariance holds.
inline void softmax_row(float* s, int64_t lo, int64_t pos) {
  typedef int32_t i32x16 __attribute__((vector_size(64)));
  i32x16 lane;
  for (int i = 0; i < BS; ++i) lane[i] = i;
  const int64_t first = lo / BS, last = pos / BS;
  const v16 ninf = v16{} - std::numeric_limits<float>::infinity();
  auto valid = [&](int64_t b) {
    const int64_t t0 = b * BS;
    const i32x16 t = lane + static_cast<int32_t>(t0);
    return (t >= static_cast<int32_t>(lo)) & (t <= static_cast<int32_t>(pos));
  };
  v16 vmax = ninf;
  for (int64_t b = first; b <= last; ++b) {
    const v16 v = load16(s + b * BS);
    const v16 m = valid(b) ? v : ninf;
    vmax = vmax > m ? vmax : m;
  }
  float mx = vmax[0];
  for (int i = 1; i < BS; ++i) mx = std::max(mx, vmax[i]);
  v16 total = v16{};
  for (int64_t b = first; b <= last; ++b) {
    const v16 e = exp16(load16(s + b * BS) - mx);
    const v16 z = valid(b) ? e : v16{};
    total += z;
    store16(s + b * BS, z);
  }
  float t8[8], t4[4], t2[2];
  for (int i = 0; i < 8; ++i) t8[i] = total[i] + total[i + 8];
  for (int i = 0; i < 4; ++i) t4[i] = t8[i] + t8[i + 4];
  for (int i = 0; i < 2; ++i) t2[i] = t4[i] + t4[i + 2];
  const float inv = 1.f / (t2[0] + t2[1]);
  for (int64_t b = first; b <= last; ++b) store16(s + b * BS, load16(s + b * BS) * inv);
}

template <typename KT>
void attend_tile(const Task& task, const float* qp, const KT* kp, const KT* vp,
                 const int64_t* table, int64_t pos0, int64_t H, int64_t KV, int64_t hd,
                 int64_t group, float scale, int64_t window, float* op,
                 std::vector<float>& scores, std::vector<float>& acc, std::vector<float>& wide,
                 std::vector<float>& qt) {
  const int64_t nq = task.q_end - task.q_begin;
  const int64_t rows = nq * group;                     // row = (query i, head g), i-major
  const int64_t len = pos0 + nq;                       // keys the tile's last query sees
  const int64_t nblocks = (len + BS - 1) / BS;
  // First block any query of the tile sees; scores are stored from its first key on.
  const int64_t b0 = window > 0 ? std::max<int64_t>(0, pos0 - window + 1) / BS : 0;
  const int64_t base = b0 * BS;
  const int64_t width = (nblocks - b0) * BS;
  const int64_t kvh = task.kv_head;
  scores.resize(rows * width);
  acc.assign(rows * hd, 0.f);
  wide.resize(hd * BS);
  // the queries by groups of kScoreRows rows, each group transposed to [hd][kScoreRows]
  const int64_t groups = (rows + kScoreRows - 1) / kScoreRows;
  qt.assign(groups * hd * kScoreRows, 0.f);
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

  for (int64_t r = 0; r < rows; ++r) {
    const float* q = qrow(r);
    float* dst = qt.data() + (r / kScoreRows) * hd * kScoreRows + r % kScoreRows;
    for (int64_t d = 0; d < hd; ++d) dst[d * kScoreRows] = q[d];
  }
  // Scores: rows whose query sees any key of the block, kScoreRows at a time (groups aligned
  // to kScoreRows, so a row's queries sit in one transposed group).
  // NOTE: a block's 16-bit K (V) is widened into `wide` once when several row groups read it;
  // a decode tile's one group (a query's heads) reads the cache directly, each value widened
  // in the register that uses it, skipping a store and reload of the whole block. Widening
  // is exact, so both give the same bits.
  const bool direct_k = rows <= kScoreRows, direct_v = rows <= 2 * kValueRows;
  auto score_keys = [&](int64_t b, const auto* kt) {
    const int64_t t0 = b * BS;
    int64_t first_row, end_row;
    row_range(t0, first_row, end_row);
    for (int64_t r0 = first_row / kScoreRows * kScoreRows; r0 < end_row; r0 += kScoreRows) {
      // NOTE: a group may start before first_row: those rows score keys they never read.
      const int nr = static_cast<int>(std::min<int64_t>(kScoreRows, rows - r0));
      float* out[kScoreRows];
      for (int r = 0; r < nr; ++r) out[r] = scores.data() + (r0 + r) * width + (t0 - base);
      score_rows<kScoreRows>(nr, qt.data() + (r0 / kScoreRows) * hd * kScoreRows, kt, hd, scale,
                             out);
    }
  };
  for (int64_t b = b0; b < nblocks; ++b) {
    const KT* kt = kp + table[b] * block_stride + kvh * hd * BS;
    if (direct_k) score_keys(b, kt);
    else score_keys(b, widen(kt, hd * BS, wide.data()));
  }
  // Softmax of each row over its own keys lo .. pos (keys of the first block before the
  // window: scored above, weigh 0).
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = pos0 + r / group;
    const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
    softmax_row(scores.data() + r * width - base, lo, pos);
  }
  // Weighted sum of V, key by key in order: rows that see the whole block kValueRows at a
  // time, rows whose own block it is one at a time over their keys.
  auto add_values = [&](int64_t b, const auto* vblock) {
    const int64_t t0 = b * BS;
    int64_t first_row, end_row;
    row_range(t0, first_row, end_row);
    // rows from here on see all BS keys of the block
    const int64_t full_row = std::min(end_row, std::max(first_row, (t0 + BS - 1 - pos0) * group));
    for (int64_t r = first_row; r < full_row; ++r) {
      accumulate_partial(scores.data() + r * width + (t0 - base), pos0 + r / group + 1 - t0,
                         vblock, hd, acc.data() + r * hd);
    }
    for (int64_t r0 = full_row; r0 < end_row; r0 += kValueRows) {
      const int nr = static_cast<int>(std::min<int64_t>(kValueRows, end_row - r0));
      const float* p[kValueRows];
      float* out[kValueRows];
      for (int r = 0; r < nr; ++r) {
        p[r] = scores.data() + (r0 + r) * width + (t0 - base);
        out[r] = acc.data() + (r0 + r) * hd;
      }
      if (hd % 64 == 0) accumulate_rows<kValueRows, 4>(nr, p, vblock, hd, out);
      else accumulate_rows<kValueRows, 1>(nr, p, vblock, hd, out);
    }
  };
  for (int64_t b = b0; b < nblocks; ++b) {
    const KT* vblock = vp + table[b] * block_stride + kvh * BS * hd;
    if (direct_v) add_values(b, vblock);
    else add_values(b, widen(vblock, hd * BS, wide.data()));
  }
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(acc.begin() + r * hd, acc.begin() + (r + 1) * hd,
              op + ((task.q_begin + r / group) * H + kvh * group + r % group) * hd);
  }
}

}  // namespace

namespace {

// NOTE: float -> bfloat16 and float -> float16 round to nearest even, as torch's .to().
template <typename KT> inline KT convert(float x);
template <> inline float convert<float>(float x) { return x; }
template <> inline uint16_t convert<uint16_t>(float x) { return shoal::to_bf16(x); }
template <> inline _Float16 convert<_Float16>(float x) { return static_cast<_Float16>(x); }

// The cache's element type, as the Python side passes it.
enum KvType : int32_t { kKvF32 = 0, kKvBF16 = 1, kKvF16 = 2 };

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
// v_cache [N, KV, bs, hd] (float32, bfloat16 or float16 as kv_type says); slots [T].
SHOAL_API void shoal_write_kv(const float* k, const float* v, int64_t T, int64_t KV, int64_t hd,
                              void* k_cache, void* v_cache, int32_t kv_type, int64_t bs,
                              const int64_t* slots) {
  if (kv_type == kKvBF16) {
    write_rows(k, v, slots, static_cast<uint16_t*>(k_cache), static_cast<uint16_t*>(v_cache), T,
               KV, hd, bs);
  } else if (kv_type == kKvF16) {
    write_rows(k, v, slots, static_cast<_Float16*>(k_cache), static_cast<_Float16*>(v_cache), T,
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
                                     const void* vp, int32_t kv_type, int64_t KV,
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
    thread_local std::vector<float> scores, acc, wide, qt;
    for (int64_t ti = begin; ti < end; ++ti) {
      const Task& task = tasks[ti];
      const int64_t pos0 = fp[task.seq] + (task.q_begin - qs[task.seq]);
      const int64_t* table = bt + task.seq * max_blocks;
      if (kv_type == kKvBF16) {
        attend_tile(task, qp, static_cast<const uint16_t*>(kp), static_cast<const uint16_t*>(vp),
                    table, pos0, H, KV, hd, group, scale, window, op, scores, acc, wide, qt);
      } else if (kv_type == kKvF16) {
        attend_tile(task, qp, static_cast<const _Float16*>(kp), static_cast<const _Float16*>(vp),
                    table, pos0, H, KV, hd, group, scale, window, op, scores, acc, wide, qt);
      } else {
        attend_tile(task, qp, static_cast<const float*>(kp), static_cast<const float*>(vp),
                    table, pos0, H, KV, hd, group, scale, window, op, scores, acc, wide, qt);
      }
    }
  });
}
