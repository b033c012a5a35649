// Exact mode's float32 linear layer: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]).
//
// Why not MKL's sgemm: at decoding batch sizes (a few rows) it runs far below this machine's
// memory bandwidth on wide matrices (the 49152 x 576 tied head of SmolLM2 took ~13 ms at one
// row where streaming its 113 MB takes ~4.5 ms), and its blocking, hence its summation
// order, changes with the number of rows, so a row's logits depend on its company.
//
// Here every output element is one dot product computed the same way whatever M is and
// whichever tile it falls in: 16 lane-wise partial sums over k = l, l + 16, l + 32, ... (a
// zero-padded last chunk), then a fixed tree over the 16 lanes. Tiles only decide how many
// dot products share the loads of one x or w vector. The vectors are GCC vector types, so
// the same source builds for every ISA variant (AVX-512 registers, pairs of AVX2 ones, or
// SSE), and the order of the arithmetic is the same on all of them.
#include "common.h"

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

inline v16 load16(const float* p) {
  v16 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline v16 load_tail(const float* p, int64_t n) {
  v16 v = {};
  __builtin_memcpy(&v, p, static_cast<size_t>(n) * sizeof(float));
  return v;
}

// The 16 lanes summed in a fixed tree: halves, then quarters, ...
inline float hsum(v16 a) {
  const v8 s8 = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
  const v4 s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
  const float s2a = s4[0] + s4[2], s2b = s4[1] + s4[3];
  return s2a + s2b;
}

// R rows of x times C rows of w, each of the R * C dot products in the order above.
template <int R, int C>
inline void tile(const float* x, int64_t ldx, const float* w, int64_t K, const float* bias,
                 float* out, int64_t ldo) {
  v16 acc[R][C] = {};
  const int64_t full = K - K % 16;
  for (int64_t k = 0; k < full; k += 16) {
    v16 xv[R];
    for (int r = 0; r < R; ++r) xv[r] = load16(x + r * ldx + k);
    for (int c = 0; c < C; ++c) {
      const v16 wv = load16(w + c * K + k);
      for (int r = 0; r < R; ++r) acc[r][c] += xv[r] * wv;
    }
  }
  if (full < K) {
    const int64_t rest = K - full;
    for (int c = 0; c < C; ++c) {
      const v16 wv = load_tail(w + c * K + full, rest);
      for (int r = 0; r < R; ++r) acc[r][c] += load_tail(x + r * ldx + full, rest) * wv;
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      const float v = hsum(acc[r][c]);
      out[r * ldo + c] = bias != nullptr ? v + bias[c] : v;
    }
  }
}

// Tile shapes: with 32 vector registers (AVX-512) 4 x 4 accumulators fit beside the loaded
// vectors; elsewhere a v16 takes two or four registers, so tiles are smaller.
#ifdef __AVX512F__
constexpr int kRows = 4, kCols = 4, kColsOneRow = 8;
#else
constexpr int kRows = 2, kCols = 2, kColsOneRow = 4;
#endif

// Columns [c0, c1) for all M rows. Rows go in panels so that a tile of w stays in cache
// while it meets every row of the panel.
template <int C>
void columns(const float* x, int64_t M, int64_t K, const float* w, const float* bias, float* out,
             int64_t N, int64_t c0, int64_t c1) {
  constexpr int64_t kPanel = 64;
  for (int64_t m0 = 0; m0 < M; m0 += kPanel) {
    const int64_t m1 = std::min(M, m0 + kPanel);
    int64_t n = c0;
    for (; n + C <= c1; n += C) {
      const float* wn = w + n * K;
      const float* bn = bias != nullptr ? bias + n : nullptr;
      int64_t m = m0;
      for (; m + kRows <= m1; m += kRows) tile<kRows, C>(x + m * K, K, wn, K, bn, out + m * N + n, N);
      for (; m < m1; ++m) tile<1, C>(x + m * K, K, wn, K, bn, out + m * N + n, N);
    }
    for (; n < c1; ++n) {
      const float* bn = bias != nullptr ? bias + n : nullptr;
      for (int64_t m = m0; m < m1; ++m) tile<1, 1>(x + m * K, K, w + n * K, K, bn, out + m * N + n, N);
    }
  }
}

}  // namespace

// x float32 [M, K] (rows ldx = K), w float32 [N, K], bias [N] or null -> out [M, N]. Threads
// split the columns: each streams its share of w once per row panel.
SHOAL_API void shoal_f32_linear(const float* x, const float* w, const float* bias, int64_t M,
                                int64_t K, int64_t N, float* out) {
  const int64_t step = std::max<int64_t>(kColsOneRow, kCols);
  const int64_t tiles = (N + step - 1) / step;
  shoal::parallel_for(tiles, 8, [&](int64_t begin, int64_t end) {
    const int64_t c0 = begin * step, c1 = std::min(N, end * step);
    if (M == 1) {
      columns<kColsOneRow>(x, M, K, w, bias, out, N, c0, c1);
    } else {
      columns<kCols>(x, M, K, w, bias, out, N, c0, c1);
    }
  });
}
