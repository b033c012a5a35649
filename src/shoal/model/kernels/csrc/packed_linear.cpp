// Linear layers on GGUF's packed blocks (Q4_0, Q4_1, Q8_0) with int8 activations, as
// llama.cpp's q4_1 x q8_1 dot products, plus the activation quantizers that feed them.
//
// Weights: repacked once at load (model/layers/packed.py) into tiles of 8 output rows x one
// 32-element block: [8 fp16 scales][8 fp16 mins, Q4_1 only][values]. Value register j (32
// bytes) holds elements 4j..4j+3 of each of the 8 rows (row r in bytes 4r..4r+3), so one
// u8 x s8 dot-product instruction against 4 broadcast activation bytes gives the 8 rows'
// partial sums in 8 lanes: no horizontal reductions. Q4 tiles hold registers j and j+4 as
// the low and high nibbles of one 32-byte chunk (128 bytes); Q8_0 tiles hold all 8 (256).
//
// Activations: each row quantized per 32-element block to int8 with a float scale d and the
// integer sum of its values (for Q4_1's min and Q4_0's offset of 8).
//
// The arithmetic is fixed per output element, whatever the ISA, batch size or thread count:
// per block b an exact integer dot D_b, then in float32, without fused multiply-adds
// (this file builds with -ffp-contract=off):
//   t_b = float(D_b) * (dw_b * dx_b)                          (Q4_0, Q8_0)
//   t_b = float(D_b) * (dw_b * dx_b) + mw_b * (dx_b * float(sum_b))   (Q4_1)
//   y = ((0 + t_0) + t_1) + ... (+ bias)
// so the AVX-512 VNNI, AVX-VNNI, AVX2 and scalar paths, and the PyTorch twin, agree bit for
// bit, and a row's result never depends on the other rows of the batch.
#include "common.h"

#include <cmath>
#include <vector>

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define SHOAL_PACKED_SIMD 1
#endif
#if SHOAL_PACKED_SIMD && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AVX512F__)
#include <sys/syscall.h>
#include <unistd.h>
#define SHOAL_PACKED_AMX 1
#endif

using shoal::grain;
using shoal::parallel_for;

namespace {

enum PackedType : int32_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8 };   // GGML type ids
constexpr int64_t kBlock = 32;
constexpr int64_t kRows = 8;   // output rows per tile
constexpr int64_t kSmallRows = 8;   // decode-sized batches: finer chunks (below)

inline int64_t tile_bytes(int32_t type) {
  return type == kQ4_1 ? 32 + 128 : type == kQ4_0 ? 16 + 128 : 16 + 256;
}

// IEEE half -> float, exactly (what F16C's vcvtph2ps and torch's .float() give).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {   // subnormal: normalise
    exp = 113;
    while (!(mant & 0x400u)) { mant <<= 1; --exp; }
    bits = sign | (exp << 23) | ((mant & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// One row of K floats -> int8 per 32-block, scale d = amax / 127, integer block sums.
inline void quantize_blocks(const float* x, int64_t K, int8_t* q, float* d, int32_t* s) {
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    const float amax = shoal::abs_max(xb, kBlock);
    const float scale = amax / 127.f;
    const float inv = scale > 0.f ? 1.f / scale : 0.f;
    int32_t sum = 0;
    for (int64_t i = 0; i < kBlock; ++i) {
      const float v = std::min(127.f, std::max(-127.f, std::nearbyint(xb[i] * inv)));
      q[b * kBlock + i] = static_cast<int8_t>(v);
      sum += static_cast<int32_t>(v);
    }
    d[b] = scale;
    s[b] = sum;
  }
}

#if SHOAL_PACKED_SIMD
// The 8 rows' integer dots with one activation block (Q8_0 on VNNI still offset by 128).
template <int32_t TYPE>
inline __m256i block_dot(const __m256i* W, const int8_t* xb) {
  __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
#if !(defined(__AVX512VNNI__) && defined(__AVX512VL__)) && !defined(__AVXVNNI__)
  const __m256i ones16 = _mm256_set1_epi16(1);
#endif
  for (int c = 0; c < 8; ++c) {
    int32_t four;
    std::memcpy(&four, xb + 4 * c, 4);
    const __m256i xv = _mm256_set1_epi32(four);
    __m256i& a = (c & 1) ? acc1 : acc0;
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    a = _mm256_dpbusd_epi32(a, W[c], xv);
#elif defined(__AVXVNNI__)
    a = _mm256_dpbusd_avx_epi32(a, W[c], xv);
#else
    // maddubs saturates at int16: Q4's 15 * 127 * 2 cannot; Q8_0 takes |w| and x * sign(w).
    const __m256i pairs = TYPE == kQ8_0
        ? _mm256_maddubs_epi16(_mm256_sign_epi8(W[c], W[c]), _mm256_sign_epi8(xv, W[c]))
        : _mm256_maddubs_epi16(W[c], xv);
    a = _mm256_add_epi32(a, _mm256_madd_epi16(pairs, ones16));
#endif
  }
  return _mm256_add_epi32(acc0, acc1);
}

// One block's float step for the 8 rows of one activation row: acc += t (see the top).
template <int32_t TYPE>
inline void finish(__m256i isum, __m256 dw, __m256 mw, float dx, int32_t sum, float* acc) {
  if (TYPE == kQ4_0) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(8 * sum));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__)
  if (TYPE == kQ8_0) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(128 * sum));
#endif
  __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dw, _mm256_set1_ps(dx)));
  if (TYPE == kQ4_1) {
    t = _mm256_add_ps(t, _mm256_mul_ps(mw, _mm256_set1_ps(dx * static_cast<float>(sum))));
  }
  _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_loadu_ps(acc), t));
}
#endif

// Accumulates the tiles of one 8-row group g into acc [M][8] (zeroed by the caller).
template <int32_t TYPE>
void group_dot(const uint8_t* w, int64_t B, int64_t g, const int8_t* xq, const float* xd,
               const int32_t* xs, int64_t M, int64_t K, float* acc) {
  const int64_t tb = tile_bytes(TYPE);
  const int64_t nscales = TYPE == kQ4_1 ? 2 : 1;
#if SHOAL_PACKED_SIMD
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* tile = w + (g * B + b) * tb;
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile)));
    __m256 mw = _mm256_setzero_ps();
    if (TYPE == kQ4_1) mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + 16)));
    const uint8_t* qs = tile + 16 * nscales;
    __m256i W[8];
    if (TYPE == kQ8_0) {
      for (int c = 0; c < 8; ++c) W[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
    } else {
      for (int c = 0; c < 4; ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
        W[c] = _mm256_and_si256(v, low4);
        W[c + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
      }
    }
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) || defined(__AVXVNNI__)
    // u8 x s8: Q8_0's signed weights shift by 128 (w ^ 0x80 = w + 128), undone below.
    if (TYPE == kQ8_0) {
      const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
      for (int c = 0; c < 8; ++c) W[c] = _mm256_xor_si256(W[c], flip);
    }
#endif
    // NOTE: two partial sums per row and rows in fours: independent dependency chains, so
    // the dot-product units are not left waiting on one accumulator's latency.
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      __m256i isum[4];
      for (int i = 0; i < 4; ++i) isum[i] = block_dot<TYPE>(W, xq + (m + i) * K + b * kBlock);
      for (int i = 0; i < 4; ++i) finish<TYPE>(isum[i], dw, mw, xd[(m + i) * B + b], xs[(m + i) * B + b], acc + (m + i) * kRows);
    }
    for (; m < M; ++m) {
      finish<TYPE>(block_dot<TYPE>(W, xq + m * K + b * kBlock), dw, mw, xd[m * B + b], xs[m * B + b], acc + m * kRows);
    }
  }
#else
  int32_t wv[kRows][kBlock];
  float dw[kRows], mw[kRows];
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* tile = w + (g * B + b) * tb;
    for (int r = 0; r < kRows; ++r) {
      uint16_t h;
      std::memcpy(&h, tile + 2 * r, 2);
      dw[r] = half_to_float(h);
      if (TYPE == kQ4_1) {
        std::memcpy(&h, tile + 16 + 2 * r, 2);
        mw[r] = half_to_float(h);
      }
    }
    const uint8_t* qs = tile + 16 * nscales;
    for (int j = 0; j < 8; ++j) {
      for (int r = 0; r < kRows; ++r) {
        for (int kk = 0; kk < 4; ++kk) {
          int32_t v;
          if (TYPE == kQ8_0) {
            v = static_cast<int8_t>(qs[32 * j + 4 * r + kk]);
          } else {
            const uint8_t byte = qs[32 * (j & 3) + 4 * r + kk];
            v = j < 4 ? (byte & 0x0F) : (byte >> 4);
            if (TYPE == kQ4_0) v -= 8;
          }
          wv[r][4 * j + kk] = v;
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* xb = xq + m * K + b * kBlock;
      const float dx = xd[m * B + b];
      const float sx = dx * static_cast<float>(xs[m * B + b]);
      float* a = acc + m * kRows;
      for (int r = 0; r < kRows; ++r) {
        int32_t dot = 0;
        for (int k = 0; k < kBlock; ++k) dot += wv[r][k] * static_cast<int32_t>(xb[k]);
        float t = static_cast<float>(dot) * (dw[r] * dx);
        if (TYPE == kQ4_1) t = t + mw[r] * sx;
        a[r] = a[r] + t;
      }
    }
  }
#endif
}


#if SHOAL_PACKED_AMX
// ----- AMX (Sapphire Rapids and later): batches of rows --------------------------------------
// The tile unit computes the same exact integer block dots for 16 activation rows x 16 output
// rows (two 8-row groups) per instruction; the float steps after it are the lane-wise ones of
// the path above, so its results are bit-identical and the switch between them by batch size
// cannot break batch invariance. Decoding's 1-2 rows stay on the VNNI path.
constexpr int64_t kAmxMinRows = 8;

bool amx_permitted() {
  // NOTE: Linux hands out the tile state only on request (arch_prctl, once per process);
  // refused (an old kernel, a sandbox), the VNNI path serves every batch.
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// C_i = A_i . B (tile 6) for `tiles` (1-3) consecutive 16-row tiles of activations at xa
// (row stride K), stored to cbuf row after row. Tile numbers are immediates, hence the cases.
template <int32_t TYPE>
inline void tile_products(int64_t tiles, const int8_t* xa, int64_t K, int32_t* cbuf) {
#define SHOAL_TDP(c, a) do { if (TYPE == kQ8_0) _tile_dpbssd(c, a, 6); else _tile_dpbsud(c, a, 6); } while (0)
  _tile_loadd(3, xa, K);
  _tile_zero(0);
  if (tiles > 1) { _tile_loadd(4, xa + 16 * K, K); _tile_zero(1); }
  if (tiles > 2) { _tile_loadd(5, xa + 32 * K, K); _tile_zero(2); }
  SHOAL_TDP(0, 3);   // signed activations x signed Q8_0 weights, or x unsigned nibbles
  if (tiles > 1) SHOAL_TDP(1, 4);
  if (tiles > 2) SHOAL_TDP(2, 5);
  _tile_stored(0, cbuf, 64);
  if (tiles > 1) _tile_stored(1, cbuf + 256, 64);
  if (tiles > 2) _tile_stored(2, cbuf + 512, 64);
#undef SHOAL_TDP
}

template <int32_t TYPE>
void packed_linear_amx(const uint8_t* w, int64_t N, int64_t K, const int8_t* xq, const float* xd,
                       const int32_t* xs, const float* bias, int64_t M, float* out) {
  const int64_t B = K / kBlock, G = (N + kRows - 1) / kRows, pairs = (G + 1) / 2;
  const int64_t tb = tile_bytes(TYPE), nscales = TYPE == kQ4_1 ? 2 : 1;
  const int64_t M16 = (M + 15) / 16 * 16;
  // The A tiles read 16 rows at a time: a short last tile reads zeros, not past the end.
  std::vector<int8_t> padded;
  if (M16 != M) {
    padded.assign(M16 * K, 0);
    std::memcpy(padded.data(), xq, M * K);
    xq = padded.data();
  }
  parallel_for(pairs, 4, [&, xq](int64_t begin, int64_t end) {
    // NOTE: locals, not the captured references: the vector stores below may alias anything,
    // which made the compiler reload every captured pointer inside the loops.
    const uint8_t* const wp = w;
    const int8_t* const xp = xq;
    const float* const xdp = xd;
    const int32_t* const xsp = xs;
    const float* const bp = bias;
    float* const op = out;
    const int64_t n_out = N, k_in = K, m_rows = M, nb = B, ng = G, tbytes = tb, scales = nscales;
    TileConfig cfg;
    for (int i = 0; i < 3; ++i) {
      cfg.rows[i] = 16; cfg.colsb[i] = 64;       // C: 16 activation rows x 16 int32 sums
      cfg.rows[3 + i] = 16; cfg.colsb[3 + i] = 32;   // A: 16 activation rows x one int8 block
    }
    cfg.rows[6] = 8; cfg.colsb[6] = 64;          // B: 8 dwords of 4 values x 16 output rows
    _tile_loadconfig(&cfg);
    alignas(64) uint8_t wbuf[8 * 64];
    alignas(64) int32_t cbuf[3 * 16 * 16];
    std::vector<float> acc_buf(M16 * 16);
    float* const acc = acc_buf.data();
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int64_t p = begin; p < end; ++p) {
      std::fill(acc, acc + m_rows * 16, 0.f);
      for (int64_t b = 0; b < nb; ++b) {
        __m256 dw[2], mw[2];
        for (int h = 0; h < 2; ++h) {
          const int64_t g = 2 * p + h;
          if (g >= ng) {   // an odd group count: the second half computes zeros (below)
            dw[h] = mw[h] = _mm256_setzero_ps();
            continue;
          }
          const uint8_t* tile = wp + (g * nb + b) * tbytes;
          dw[h] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile)));
          mw[h] = TYPE == kQ4_1 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + 16)))
                                : _mm256_setzero_ps();
          const uint8_t* qs = tile + 16 * scales;
          for (int c = 0; c < (TYPE == kQ8_0 ? 8 : 4); ++c) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
            if (TYPE == kQ8_0) {
              _mm256_store_si256(reinterpret_cast<__m256i*>(wbuf + 64 * c + 32 * h), v);
            } else {
              _mm256_store_si256(reinterpret_cast<__m256i*>(wbuf + 64 * c + 32 * h),
                                 _mm256_and_si256(v, low4));
              _mm256_store_si256(reinterpret_cast<__m256i*>(wbuf + 64 * (c + 4) + 32 * h),
                                 _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
            }
          }
        }
        if (2 * p + 1 >= ng) {
          for (int c = 0; c < 8; ++c) std::memset(wbuf + 64 * c + 32, 0, 32);
        }
        const __m512 dw16 = _mm512_insertf32x8(_mm512_castps256_ps512(dw[0]), dw[1], 1);
        const __m512 mw16 = _mm512_insertf32x8(_mm512_castps256_ps512(mw[0]), mw[1], 1);
        _tile_loadd(6, wbuf, 64);
        // NOTE: three 16-row tiles in flight (C in tiles 0-2, A in 3-5): a tile product's
        // latency is several times its issue rate, and batches of rows give independent ones.
        for (int64_t m0 = 0; m0 < m_rows; m0 += 48) {
          const int64_t tiles = std::min<int64_t>(3, (m_rows - m0 + 15) / 16);
          const int8_t* xa = xp + m0 * k_in + b * kBlock;
          tile_products<TYPE>(tiles, xa, k_in, cbuf);
          for (int64_t m = m0; m < std::min(m_rows, m0 + 48); ++m) {
            __m512i isum = _mm512_load_si512(cbuf + 16 * (m - m0));
            const int32_t sum = xsp[m * nb + b];
            if (TYPE == kQ4_0) isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(8 * sum));
            const float dx = xdp[m * nb + b];
            __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw16, _mm512_set1_ps(dx)));
            if (TYPE == kQ4_1) {
              t = _mm512_add_ps(t, _mm512_mul_ps(mw16, _mm512_set1_ps(dx * static_cast<float>(sum))));
            }
            float* a = acc + m * 16;
            _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), t));
          }
        }
      }
      const int64_t n0 = 2 * p * kRows, width = std::min<int64_t>(16, n_out - n0);
      const __mmask16 lanes = static_cast<__mmask16>((1u << width) - 1);
      const __m512 bias16 = bp != nullptr ? _mm512_maskz_loadu_ps(lanes, bp + n0) : _mm512_setzero_ps();
      for (int64_t m = 0; m < m_rows; ++m) {
        __m512 v = _mm512_loadu_ps(acc + m * 16);
        if (bp != nullptr) v = _mm512_add_ps(v, bias16);
        _mm512_mask_storeu_ps(op + m * n_out + n0, lanes, v);
      }
    }
    _tile_release();
  });
}
#endif

template <int32_t TYPE>
void packed_linear(const uint8_t* w, int64_t N, int64_t K, const int8_t* xq, const float* xd,
                   const int32_t* xs, const float* bias, int64_t M, float* out) {
#if SHOAL_PACKED_AMX
  if (M >= kAmxMinRows && amx_permitted()) {
    packed_linear_amx<TYPE>(w, N, K, xq, xd, xs, bias, M, out);
    return;
  }
#endif
  const int64_t B = K / kBlock, G = (N + kRows - 1) / kRows;
  // NOTE: threads split the output columns (whole 8-row groups); each group's weights are
  // unpacked once per block for all M rows.
  auto groups = [&](int64_t begin, int64_t end) {
    std::vector<float> acc(M * kRows);
    for (int64_t g = begin; g < end; ++g) {
      std::fill(acc.begin(), acc.end(), 0.f);
      group_dot<TYPE>(w, B, g, xq, xd, xs, M, K, acc.data());
      const int64_t rows = std::min(kRows, N - g * kRows);
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t n = g * kRows + r;
          float v = acc[m * kRows + r];
          if (bias != nullptr) v = v + bias[n];
          out[m * N + n] = v;
        }
      }
    }
  };
  if (M <= kSmallRows) {
    // decoding: ~8 chunks per call (each claim moves a cache line between cores, so not
    // many more), at most ~256 KB of weights each (the output head: ~110 chunks)
    const int64_t most = std::max<int64_t>(1, 262144 / (B * tile_bytes(TYPE)));
    shoal::WorkPool::get().run(G, std::min(most, std::max<int64_t>(1, G / 8)), groups);
  } else {
    parallel_for(G, 8, groups);
  }
}

}  // namespace

// y [M, N] = x [M, K] (quantized per block: q, d [M, K/32], s [M, K/32]) times the packed
// weight [N, K] of GGML type `type` (+ bias [N] when not null).
SHOAL_API void shoal_packed_linear(int32_t type, const uint8_t* w, int64_t N, int64_t K,
                                   const int8_t* xq, const float* xd, const int32_t* xs,
                                   const float* bias, int64_t M, float* out) {
  switch (type) {
    case kQ4_0: packed_linear<kQ4_0>(w, N, K, xq, xd, xs, bias, M, out); break;
    case kQ4_1: packed_linear<kQ4_1>(w, N, K, xq, xd, xs, bias, M, out); break;
    case kQ8_0: packed_linear<kQ8_0>(w, N, K, xq, xd, xs, bias, M, out); break;
    default: break;   // kernels/cpu.py admits only these types
  }
}

// x [T, K] -> per-block int8 q [T, K], d [T, K/32], s [T, K/32].
SHOAL_API void shoal_quant_blocks(const float* xp, int64_t T, int64_t K, int8_t* qp, float* dp,
                                  int32_t* sp) {
  const int64_t B = K / kBlock;
  parallel_for(T, grain(K), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) quantize_blocks(xp + t * K, K, qp + t * K, dp + t * B, sp + t * B);
  });
}

// As shoal_rms_norm_quant (fused_ops.cpp), quantizing per block: if add_residual,
// residual += x; then RMSNorm(residual or x) * weight, quantized.
SHOAL_API void shoal_rms_norm_quant_blocks(const float* xp, float* rp, const float* wp, int64_t T,
                                           int64_t K, float eps, int32_t add_residual,
                                           int8_t* qp, float* dp, int32_t* sp) {
  const int64_t B = K / kBlock;
  parallel_for(T, grain(K), [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t t = begin; t < end; ++t) {
      shoal::rms_norm_row(xp + t * K, add_residual ? rp + t * K : nullptr, wp, K, eps, row.data());
      quantize_blocks(row.data(), K, qp + t * K, dp + t * B, sp + t * B);
    }
  });
}

// As shoal_rms_norm_add_norm_quant (Gemma's sandwich norms), quantizing per block.
SHOAL_API void shoal_rms_norm_add_norm_quant_blocks(const float* xp, float* rp, const float* xw,
                                                    const float* wp, int64_t T, int64_t K,
                                                    float eps, int8_t* qp, float* dp,
                                                    int32_t* sp) {
  const int64_t B = K / kBlock;
  parallel_for(T, grain(K), [&](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    for (int64_t t = begin; t < end; ++t) {
      shoal::rms_norm_add_norm_row(xp + t * K, rp + t * K, xw, wp, K, eps, row.data());
      quantize_blocks(row.data(), K, qp + t * K, dp + t * B, sp + t * B);
    }
  });
}

// gate_up [T, 2I] (gate then up): act(gate) * up, quantized per block; gelu: 0 silu, 1 gelu_tanh.
SHOAL_API void shoal_act_mul_quant_blocks(const float* gp, int64_t T, int64_t I, int32_t gelu,
                                          int8_t* qp, float* dp, int32_t* sp) {
  const int64_t B = I / kBlock;
  parallel_for(T, grain(I), [&](int64_t begin, int64_t end) {
    std::vector<float> row(I);
    for (int64_t t = begin; t < end; ++t) {
      const float* g = gp + t * 2 * I;
      const float* u = g + I;
      for (int64_t i = 0; i < I; ++i) row[i] = (gelu ? shoal::gelu_tanh(g[i]) : shoal::silu(g[i])) * u[i];
      quantize_blocks(row.data(), I, qp + t * I, dp + t * B, sp + t * B);
    }
  });
}

// GGUF blocks (raw [N, K/32 blocks]) -> the tiles described at the top ([ceil(N/8), K/32,
// tile bytes], rows past N zero). One pass at load; layers/packed.py's `repack` is the same
// in PyTorch (and the reference it is tested against).
SHOAL_API void shoal_packed_repack(int32_t type, const uint8_t* raw, int64_t N, int64_t K,
                                   uint8_t* tiles) {
  const int64_t B = K / kBlock, G = (N + kRows - 1) / kRows, tb = tile_bytes(type);
  const int64_t nscales = type == kQ4_1 ? 2 : 1;
  const int64_t bb = type == kQ4_1 ? 20 : type == kQ4_0 ? 18 : 34;
  parallel_for(G, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t b = 0; b < B; ++b) {
        uint8_t* t = tiles + (g * B + b) * tb;
        std::memset(t, 0, tb);
        uint8_t* dst = t + 16 * nscales;
        for (int64_t r = 0; r < kRows && g * kRows + r < N; ++r) {
          const uint8_t* blk = raw + ((g * kRows + r) * B + b) * bb;
          std::memcpy(t + 2 * r, blk, 2);
          if (type == kQ4_1) std::memcpy(t + 16 + 2 * r, blk + 2, 2);
          const uint8_t* qs = blk + 2 * nscales;
          for (int64_t k = 0; k < kBlock; ++k) {
            const int64_t j = k / 4, at = 4 * r + k % 4;
            if (type == kQ8_0) {
              dst[32 * j + at] = qs[k];
            } else {
              const uint8_t v = k < 16 ? (qs[k] & 0x0F) : (qs[k - 16] >> 4);
              dst[32 * (j & 3) + at] |= j < 4 ? v : static_cast<uint8_t>(v << 4);
            }
          }
        }
      }
    }
  });
}
