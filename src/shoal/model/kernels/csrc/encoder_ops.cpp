// The encoder's fast-mode pass on the work pool: int8 x int8 matrix products on AMX tiles,
// and bidirectional attention over runs of equal-length inputs.
//
// Why: torch's _int_mm and SDPA split each op evenly over OpenMP threads and end at a
// barrier, so a thread the OS lends to the event loop for a moment stalls the whole op. On a
// 2-core server that also parses HTTP, that cost all-MiniLM a third of its throughput (a
// process burning a quarter of one core slowed the OpenMP pass by ~40%, the pool-based
// decoder by ~19%). On the pool (pool.h) a late thread only means the other does more.
//
// The products are exact integer sums: the same int32s torch._int_mm gives, whatever the
// split. Attention is float32 with a fixed order per output row, so an input's result does
// not depend on the batch it came in.
#include "common.h"

#include <cmath>
#include <vector>

#include "amx.h"
#include "kernels.h"

using shoal::parallel_for;

namespace {

constexpr int64_t kTileK = 64;     // int8 values of one A-tile row
constexpr int64_t kTileN = 16;     // output columns of one B tile
constexpr int64_t kPanel = kTileN * kTileK;   // bytes of one packed B tile

// Each input's first row and length, from runs of R x (first row, inputs, length).
struct Inputs {
  std::vector<int64_t> first, length;
  int64_t longest = 0;
  Inputs(const int64_t* runs, int64_t R) {
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t i = 0; i < runs[3 * r + 1]; ++i) {
        first.push_back(runs[3 * r] + i * runs[3 * r + 2]);
        length.push_back(runs[3 * r + 2]);
      }
      longest = std::max(longest, runs[3 * r + 2]);
    }
  }
  int64_t count() const { return static_cast<int64_t>(first.size()); }
};

#if SHOAL_AMX
// One 16 x 16 block of int32 results into out (row stride N), `rows` of them valid.
inline void store_rows(const int32_t* block, int64_t rows, int32_t* out, int64_t N) {
  for (int64_t r = 0; r < rows; ++r) std::memcpy(out + r * N, block + r * 16, 16 * sizeof(int32_t));
}
#endif

}  // namespace

// 1 where shoal_int8_gemm can run: built for AMX and the kernel lets this process use it.
SHOAL_API int32_t shoal_int8_gemm_ready() {
#if SHOAL_AMX
  return shoal::amx_permitted() ? 1 : 0;
#else
  return 0;
#endif
}

// w int8 [N, K] (N a multiple of 16, K of 64) -> the B tiles shoal_int8_gemm reads:
// [N/16][K/64][16 rows][64 bytes], row r holding values 4r..4r+3 of each of the 16 columns.
SHOAL_API void shoal_int8_gemm_pack(const int8_t* w, int64_t N, int64_t K, int8_t* out) {
  const int64_t kb_count = K / kTileK;
  parallel_for(N / kTileN, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      for (int64_t kb = 0; kb < kb_count; ++kb) {
        int8_t* dst = out + (j * kb_count + kb) * kPanel;
        for (int64_t r = 0; r < 16; ++r) {
          for (int64_t c = 0; c < kTileN; ++c) {
            std::memcpy(dst + r * 64 + c * 4, w + (kTileN * j + c) * K + kTileK * kb + 4 * r, 4);
          }
        }
      }
    }
  });
}

// x int8 [M, K] times the packed w (shoal_int8_gemm_pack of [N, K]) -> int32 x w^T [M, N].
// Callers check shoal_int8_gemm_ready() first; without AMX this does nothing.
SHOAL_API void shoal_int8_gemm(const int8_t* x, int64_t M, int64_t K, const int8_t* wp, int64_t N,
                               int32_t* out) {
#if SHOAL_AMX
  const int64_t kb_count = K / kTileK, nb_count = N / kTileN;
  const int64_t full = M / 16, mb_count = (M + 15) / 16;
  // the last rows short of 16, as a zero-padded tile source
  std::vector<int8_t> tail(M % 16 ? 16 * K : 0, 0);
  if (M % 16) std::memcpy(tail.data(), x + full * 16 * K, (M % 16) * K);
  const int64_t mpairs = (mb_count + 1) / 2, npairs = (nb_count + 1) / 2;
  // NOTE: items in n-major order: a chunk's consecutive items reuse one pair of weight
  // panels (12-48 KB) while the activations stream past.
  parallel_for(mpairs * npairs, 1, [&](int64_t begin, int64_t end) {
    shoal::TileConfig cfg;
    for (int t = 0; t < 8; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
    alignas(64) int32_t block[16 * 16];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t mp = item % mpairs, np = item / mpairs;
      const int64_t mb0 = 2 * mp, nb0 = 2 * np;
      const bool two_m = mb0 + 1 < mb_count, two_n = nb0 + 1 < nb_count;
      const int8_t* a0 = mb0 < full ? x + mb0 * 16 * K : tail.data();
      const int8_t* a1 = mb0 + 1 < full ? x + (mb0 + 1) * 16 * K : tail.data();
      const int8_t* b0 = wp + nb0 * kb_count * kPanel;
      const int8_t* b1 = b0 + kb_count * kPanel;
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      for (int64_t kb = 0; kb < kb_count; ++kb) {
        _tile_loadd(4, a0 + kb * kTileK, K);
        _tile_loadd(6, b0 + kb * kPanel, 64);
        _tile_dpbssd(0, 4, 6);
        if (two_n) {
          _tile_loadd(7, b1 + kb * kPanel, 64);
          _tile_dpbssd(1, 4, 7);
        }
        if (two_m) {
          _tile_loadd(5, a1 + kb * kTileK, K);
          _tile_dpbssd(2, 5, 6);
          if (two_n) _tile_dpbssd(3, 5, 7);
        }
      }
      auto put = [&](int which, int64_t mb, int64_t nb) {
        int32_t* dst = out + mb * 16 * N + nb * kTileN;
        const int64_t rows = std::min<int64_t>(16, M - mb * 16);
        if (rows == 16) {
          switch (which) {
            case 0: _tile_stored(0, dst, N * 4); break;
            case 1: _tile_stored(1, dst, N * 4); break;
            case 2: _tile_stored(2, dst, N * 4); break;
            default: _tile_stored(3, dst, N * 4); break;
          }
          return;
        }
        switch (which) {
          case 0: _tile_stored(0, block, 64); break;
          case 1: _tile_stored(1, block, 64); break;
          case 2: _tile_stored(2, block, 64); break;
          default: _tile_stored(3, block, 64); break;
        }
        store_rows(block, rows, dst, N);
      };
      put(0, mb0, nb0);
      if (two_n) put(1, mb0, nb0 + 1);
      if (two_m) put(2, mb0 + 1, nb0);
      if (two_m && two_n) put(3, mb0 + 1, nb0 + 1);
    }
    _tile_release();
  });
#else
  (void)x; (void)M; (void)K; (void)wp; (void)N; (void)out;
#endif
}

// Bidirectional attention of every input with itself. qkv: [T, 3 H D] (queries, keys, values
// side by side, each head's D values contiguous); runs: R x (first row, inputs, length) with
// the inputs of a run back to back. Writes out [T, H D]. softmax(q k^T * scale) v per input
// and head, no mask (every input is whole).
SHOAL_API void shoal_encoder_attention(const float* qkv, int64_t H, int64_t D, const int64_t* runs,
                                       int64_t R, float scale, float* out) {
  const Inputs inputs(runs, R);
  const int64_t width = 3 * H * D, out_width = H * D;
  parallel_for(inputs.count() * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(inputs.longest), acc(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t input = item / H, h = item % H;
      const int64_t r0 = inputs.first[input], L = inputs.length[input];
      const float* keys = qkv + r0 * width + H * D + h * D;
      const float* values = qkv + r0 * width + 2 * H * D + h * D;
      for (int64_t a = 0; a < L; ++a) {
        const float* q = qkv + (r0 + a) * width + h * D;
        float top = -INFINITY;
        for (int64_t b = 0; b < L; ++b) {
          const float* k = keys + b * width;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += q[d] * k[d];
          p[b] = s * scale;
          top = std::max(top, p[b]);
        }
        float sum = 0.f;
        for (int64_t b = 0; b < L; ++b) {
          p[b] = shoal::exp_neg(top - p[b]);
          sum += p[b];
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t b = 0; b < L; ++b) {
          const float* v = values + b * width;
          const float w = p[b];
          for (int64_t d = 0; d < D; ++d) acc[d] += w * v[d];
        }
        float* o = out + (r0 + a) * out_width + h * D;
        const float inv = 1.f / sum;
        for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv;
      }
    }
  });
}

namespace {

// row = LayerNorm(row) * weight + bias, in place: mean, then the mean of squared deviations.
inline void layer_norm_row(float* row, int64_t K, const float* weight, const float* bias,
                           float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < K; ++i) sum += row[i];
  const float mean = sum / static_cast<float>(K);
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < K; ++i) squares += (row[i] - mean) * (row[i] - mean);
  const float inv = 1.f / std::sqrt(squares / static_cast<float>(K) + eps);
  for (int64_t i = 0; i < K; ++i) row[i] = (row[i] - mean) * inv * weight[i] + bias[i];
}

}  // namespace

// x = LayerNorm(x + y) * weight + bias over rows of K, in place (the encoder's residual add
// and norm after each sublayer): one pass on the pool instead of two torch ops on the
// engine thread. Each row's arithmetic is fixed, so its result does not depend on the batch.
SHOAL_API void shoal_add_layer_norm(float* x, const float* y, const float* weight,
                                    const float* bias, int64_t T, int64_t K, float eps) {
  parallel_for(T, shoal::grain(K), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      float* row = x + t * K;
      const float* add = y + t * K;
      for (int64_t i = 0; i < K; ++i) row[i] += add[i];
      layer_norm_row(row, K, weight, bias, eps);
    }
  });
}

// ----- the whole layer stack in one call --------------------------------------------------
// model/encoder.py's fast pool pass, layer by layer, from one Python call: the same kernel
// entry points in the same order on the same floats, so the results are bit-identical to it.
// What it saves is the GIL: the per-op path took it back ~15 times per layer, and while the
// event loop parses HTTP it holds the GIL, so under load each hand-back waited for it (a pass
// of 1-8 inputs took 15-20 ms over HTTP against 2-4 ms alone, the engine busy all along).

namespace {

// One layer's row of the table (model/encoder.py, EncoderStack, writes it): for each int8
// linear its tiles, scales [N], bias [N] (0: none) and the smoothing its quantizer applies [K].
enum EncoderField : int64_t {
  kQkvTiles, kQkvScale, kQkvBias, kQkvSmooth,
  kOutTiles, kOutScale, kOutBias, kOutSmooth,
  kAttnNormWeight, kAttnNormBias,
  kUpTiles, kUpScale, kUpBias, kUpSmooth,
  kDownTiles, kDownScale, kDownBias,          // behind the Hadamard rotation: no smoothing
  kMlpNormWeight, kMlpNormBias,
  kEncoderFields
};

template <typename T> inline T* field(const int64_t* f, int64_t k) {
  return reinterpret_cast<T*>(static_cast<intptr_t>(f[k]));
}

}  // namespace

// x [T, K] (the embeddings after their norm) -> the last layer's hidden states, in place.
// table: L rows of kEncoderFields; K hidden, I intermediate, H heads; runs as for
// shoal_encoder_attention.
SHOAL_API void shoal_encoder_stack(const int64_t* table, int64_t L, int64_t K, int64_t I,
                                   int64_t H, float eps, float scale, const int64_t* runs,
                                   int64_t R, int64_t T, float* x) {
  const int64_t D = K / H;
  std::vector<int8_t> q(T * std::max(K, I));
  std::vector<float> xs(T), hs(T), wide(T * 3 * K), attn(T * K), y(T * K);
  std::vector<int32_t> acc(T * std::max(3 * K, I));
  // quantized rows (scales xs) -> int32 products -> float [T, N] with the layer's scales
  auto linear = [&](const float* in, int64_t width, const int64_t* f, int64_t first, int64_t N,
                    float* out) {
    shoal_quant_rows(in, field<float>(f, first + 3), T, width, q.data(), xs.data());
    shoal_int8_gemm(q.data(), T, width, field<int8_t>(f, first), N, acc.data());
    shoal_dequant_rows(acc.data(), xs.data(), field<float>(f, first + 1),
                       field<float>(f, first + 2), T, N, out);
  };
  for (int64_t l = 0; l < L; ++l) {
    const int64_t* f = table + l * kEncoderFields;
    linear(x, K, f, kQkvTiles, 3 * K, wide.data());
    shoal_encoder_attention(wide.data(), H, D, runs, R, scale, attn.data());
    linear(attn.data(), K, f, kOutTiles, K, y.data());
    shoal_add_layer_norm(x, y.data(), field<float>(f, kAttnNormWeight),
                         field<float>(f, kAttnNormBias), T, K, eps);
    // feed-forward: up, GELU, the rotation and the quantizer in one pass, then down
    shoal_quant_rows(x, field<float>(f, kUpSmooth), T, K, q.data(), xs.data());
    shoal_int8_gemm(q.data(), T, K, field<int8_t>(f, kUpTiles), I, acc.data());
    shoal_dequant_gelu_hadamard_quant(acc.data(), xs.data(), field<float>(f, kUpScale),
                                      field<float>(f, kUpBias), T, I, q.data(), hs.data());
    shoal_int8_gemm(q.data(), T, I, field<int8_t>(f, kDownTiles), K, acc.data());
    shoal_dequant_rows(acc.data(), hs.data(), field<float>(f, kDownScale),
                       field<float>(f, kDownBias), T, K, y.data());
    shoal_add_layer_norm(x, y.data(), field<float>(f, kMlpNormWeight),
                         field<float>(f, kMlpNormBias), T, K, eps);
  }
}

// ----- a whole pass: embeddings, the stack, pooling ---------------------------------------
// The embeddings' sum and norm before the stack and the pooling after it, so that a pass takes
// the GIL once (see above): even the dozen small torch ops around the stack waited for the
// event loop under load. `model`: the fields of EncoderModel below; `ids` the inputs' token
// ids back to back, in the order of `runs`. Writes one pooled row per input [B, K].

namespace {

enum EncoderModel : int64_t {
  kWord, kPosition, kType0, kEmbedNormWeight, kEmbedNormBias, kPooling, kNormalize,
  kModelFields
};
enum Pooling : int64_t { kMean, kCls, kLast, kMax };

}  // namespace

SHOAL_API void shoal_encoder_pass(const int64_t* model, const int64_t* table, int64_t L,
                                  int64_t K, int64_t I, int64_t H, float eps, float scale,
                                  const int64_t* ids, const int64_t* runs, int64_t R, int64_t T,
                                  float* out) {
  const float* word = field<float>(model, kWord);
  const float* position = field<float>(model, kPosition);
  const float* type0 = field<float>(model, kType0);
  const Inputs inputs(runs, R);
  const std::vector<int64_t>& first = inputs.first;
  const std::vector<int64_t>& length = inputs.length;
  const int64_t B = inputs.count();
  std::vector<float> x(T * K);
  // (word + position) + type 0, then the norm: the order of the torch expression it replaces
  parallel_for(B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t p = 0; p < length[b]; ++p) {
        const int64_t t = first[b] + p;
        float* row = x.data() + t * K;
        const float* w = word + ids[t] * K;
        const float* pos = position + p * K;
        for (int64_t k = 0; k < K; ++k) row[k] = (w[k] + pos[k]) + type0[k];
        layer_norm_row(row, K, field<float>(model, kEmbedNormWeight),
                       field<float>(model, kEmbedNormBias), eps);
      }
    }
  });
  shoal_encoder_stack(table, L, K, I, H, eps, scale, runs, R, T, x.data());
  const int64_t pooling = model[kPooling];
  const bool normalize = model[kNormalize] != 0;
  parallel_for(B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float* o = out + b * K;
      const float* rows = x.data() + first[b] * K;
      const int64_t n = length[b];
      if (pooling == kCls || pooling == kLast) {
        std::memcpy(o, rows + (pooling == kCls ? 0 : n - 1) * K, K * sizeof(float));
      } else if (pooling == kMax) {
        std::memcpy(o, rows, K * sizeof(float));
        for (int64_t p = 1; p < n; ++p) {
          for (int64_t k = 0; k < K; ++k) o[k] = std::max(o[k], rows[p * K + k]);
        }
      } else {
        std::fill(o, o + K, 0.f);
        for (int64_t p = 0; p < n; ++p) {
          for (int64_t k = 0; k < K; ++k) o[k] += rows[p * K + k];
        }
        for (int64_t k = 0; k < K; ++k) o[k] /= static_cast<float>(n);
      }
      if (normalize) {   // as F.normalize: v / max(|v|, 1e-12)
        float squares = 0.f;
#pragma omp simd reduction(+ : squares)
        for (int64_t k = 0; k < K; ++k) squares += o[k] * o[k];
        const float norm = std::max(std::sqrt(squares), 1e-12f);
        for (int64_t k = 0; k < K; ++k) o[k] /= norm;
      }
    }
  });
}
