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
#include <new>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#define SHOAL_PACKED_SIMD 1
#endif
#include "amx.h"
#if SHOAL_PACKED_SIMD && SHOAL_AMX
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


#if SHOAL_PACKED_SIMD && defined(__AVX512VNNI__) && defined(__AVX512BW__)
// ----- AVX-512 VNNI without the tile unit: two 8-row groups per 512-bit register ---------------
// Group g's value register c in the low half and group g+1's in the high half: each u8 x s8
// instruction gives 16 output rows' partial sums, the float step runs 16 lanes at once, and a
// row's activation broadcast feeds twice the rows. Every lane's arithmetic is the 8-lane
// path's (the same exact integer dot, the same float steps in the same order), so results
// are bit-identical to it and to the PyTorch twin.
// Below kPairRows rows the two groups' unpacking (twice the 8-lane path's vector operations
// per block, with the halves' inserts) is not spread over enough rows to pay: 1-4 rows ran
// 0.6-1.0x the 8-lane path, 8-64 rows 1.2-1.6x (two threads, SmolLM2's gate/up and head).
#define SHOAL_PACKED_PAIRS 1
constexpr int64_t kPairRows = 8;

inline __m512i both_halves(const uint8_t* lo, const uint8_t* hi) {
  return _mm512_inserti64x4(
      _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo))),
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi)), 1);
}

inline __m512 halves_to_float(const uint8_t* lo, const uint8_t* hi) {
  return _mm512_cvtph_ps(_mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(hi)), 1));
}

inline __m512i pair_block_dot(const __m512i* W, const int8_t* xb) {
  __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
  for (int c = 0; c < 8; ++c) {
    int32_t four;
    std::memcpy(&four, xb + 4 * c, 4);
    __m512i& a = (c & 1) ? acc1 : acc0;
    a = _mm512_dpbusd_epi32(a, W[c], _mm512_set1_epi32(four));
  }
  return _mm512_add_epi32(acc0, acc1);
}

template <int32_t TYPE>
inline void pair_finish(__m512i isum, __m512 dw, __m512 mw, float dx, int32_t sum, float* acc) {
  if (TYPE == kQ4_0) isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(8 * sum));
  if (TYPE == kQ8_0) isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(128 * sum));
  __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, _mm512_set1_ps(dx)));
  if (TYPE == kQ4_1) {
    t = _mm512_add_ps(t, _mm512_mul_ps(mw, _mm512_set1_ps(dx * static_cast<float>(sum))));
  }
  _mm512_storeu_ps(acc, _mm512_add_ps(_mm512_loadu_ps(acc), t));
}

// As group_dot for groups g and g+1 together: acc [M][16] (zeroed by the caller).
template <int32_t TYPE>
void pair_dot(const uint8_t* w, int64_t B, int64_t g, const int8_t* xq, const float* xd,
              const int32_t* xs, int64_t M, int64_t K, float* acc) {
  const int64_t tb = tile_bytes(TYPE);
  const int64_t nscales = TYPE == kQ4_1 ? 2 : 1;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  // NOTE: the two groups' tiles are two runs of B * tb bytes read side by side, and each run
  // then jumps over the other's: the hardware prefetcher loses both streams at every pair
  // (decode-sized batches ran at half the 8-lane path's speed). So each run is fetched
  // kAhead bytes early, continuing into the next pair's run of the same half past its end.
  constexpr int64_t kAhead = 1024;
  const int64_t span = B * tb;
  const uintptr_t base = reinterpret_cast<uintptr_t>(w);
  auto fetch_ahead = [&](int64_t gg, int64_t at) {
    const int64_t from = at < span ? gg * span + at : (gg + 2) * span + (at - span);
    _mm_prefetch(reinterpret_cast<const char*>(base + from), _MM_HINT_T0);
  };
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* lo = w + (g * B + b) * tb;
    const uint8_t* hi = w + ((g + 1) * B + b) * tb;
    for (int64_t line = 0; line < tb; line += 64) {
      fetch_ahead(g, b * tb + kAhead + line);
      fetch_ahead(g + 1, b * tb + kAhead + line);
    }
    const __m512 dw = halves_to_float(lo, hi);
    const __m512 mw = TYPE == kQ4_1 ? halves_to_float(lo + 16, hi + 16) : _mm512_setzero_ps();
    const int64_t at = 16 * nscales;
    __m512i W[8];
    if (TYPE == kQ8_0) {
      // u8 x s8: the signed weights shift by 128 (w ^ 0x80 = w + 128), undone in pair_finish
      const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
      for (int c = 0; c < 8; ++c) W[c] = _mm512_xor_si512(both_halves(lo + at + 32 * c, hi + at + 32 * c), flip);
    } else {
      for (int c = 0; c < 4; ++c) {
        const __m512i v = both_halves(lo + at + 32 * c, hi + at + 32 * c);
        W[c] = _mm512_and_si512(v, low4);
        W[c + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      }
    }
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      __m512i isum[4];
      for (int i = 0; i < 4; ++i) isum[i] = pair_block_dot(W, xq + (m + i) * K + b * kBlock);
      for (int i = 0; i < 4; ++i) pair_finish<TYPE>(isum[i], dw, mw, xd[(m + i) * B + b], xs[(m + i) * B + b], acc + (m + i) * 2 * kRows);
    }
    for (; m < M; ++m) {
      pair_finish<TYPE>(pair_block_dot(W, xq + m * K + b * kBlock), dw, mw, xd[m * B + b], xs[m * B + b], acc + m * 2 * kRows);
    }
  }
}
#endif

#if SHOAL_PACKED_AMX
// ----- AMX (Sapphire Rapids and later): batches of rows --------------------------------------
// The tile unit computes the same exact integer block dots for 16 activation rows x 16 output
// rows (two 8-row groups) per instruction; the float steps after it are the lane-wise ones of
// the path above, so its results are bit-identical and the switch between them by batch size
// cannot break batch invariance. Decoding's 1-2 rows stay on the VNNI path.
constexpr int64_t kAmxMinRows = 8;

template <typename T>
struct AlignedAlloc {
  using value_type = T;
  AlignedAlloc() = default;
  template <typename U> AlignedAlloc(const AlignedAlloc<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  bool operator==(const AlignedAlloc&) const { return true; }
  bool operator!=(const AlignedAlloc&) const { return false; }
};

constexpr int64_t kAmxChunk = 64;   // activation rows per pass over a thread's columns
constexpr int64_t kAmxUnpackedBytes = 2 << 20;   // a thread's columns unpacked at most

// The 16 output rows of pair p (groups 2p, 2p+1) for every block, as B tiles: [B][8 rows of
// 64 bytes] (value register c of group 2p+h at bytes 64c + 32h, nibbles widened to bytes),
// and their scales and mins as floats [B][16]. An odd group count's missing half is zeros.
template <int32_t TYPE>
void unpack_pair(const uint8_t* w, int64_t p, int64_t nb, int64_t ng, uint8_t* wb, float* dw,
                 float* mw) {
  const int64_t tb = tile_bytes(TYPE), scales = TYPE == kQ4_1 ? 2 : 1;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* dst = wb + b * 512;
    for (int h = 0; h < 2; ++h) {
      const int64_t g = 2 * p + h;
      if (g >= ng) {
        for (int c = 0; c < 8; ++c) std::memset(dst + 64 * c + 32 * h, 0, 32);
        _mm256_store_ps(dw + b * 16 + 8 * h, _mm256_setzero_ps());
        _mm256_store_ps(mw + b * 16 + 8 * h, _mm256_setzero_ps());
        continue;
      }
      const uint8_t* tile = w + (g * nb + b) * tb;
      _mm256_store_ps(dw + b * 16 + 8 * h,
                      _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile))));
      _mm256_store_ps(mw + b * 16 + 8 * h, TYPE == kQ4_1
          ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + 16)))
          : _mm256_setzero_ps());
      const uint8_t* qs = tile + 16 * scales;
      for (int c = 0; c < (TYPE == kQ8_0 ? 8 : 4); ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
        if (TYPE == kQ8_0) {
          _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 64 * c + 32 * h), v);
        } else {
          _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 64 * c + 32 * h),
                             _mm256_and_si256(v, low4));
          _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 64 * (c + 4) + 32 * h),
                             _mm256_and_si256(_mm256_srli_epi16(v, 4), low4));
        }
      }
    }
  }
}

// One block's float step for 16 activation rows x 16 output rows, from the tile unit's int32
// sums C (row i at cbuf + 16 i), into the accumulators held in registers (see the top).
template <int32_t TYPE>
inline void amx_finish(const int32_t* cbuf, __m512 dw, __m512 mw, const float* dx,
                       const float* sx, const int32_t* off, __m512* acc) {
  for (int i = 0; i < 16; ++i) {
    __m512i isum = _mm512_load_si512(cbuf + 16 * i);
    if (TYPE == kQ4_0) isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(off[i]));
    __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dw, _mm512_set1_ps(dx[i])));
    if (TYPE == kQ4_1) t = _mm512_add_ps(t, _mm512_mul_ps(mw, _mm512_set1_ps(sx[i])));
    acc[i] = _mm512_add_ps(acc[i], t);
  }
}

template <int32_t TYPE>
void packed_linear_amx(const uint8_t* w, int64_t N, int64_t K, const int8_t* xq, const float* xd,
                       const int32_t* xs, const float* bias, int64_t M, float* out) {
  const int64_t B = K / kBlock, G = (N + kRows - 1) / kRows, pairs = (G + 1) / 2;
  const int64_t M16 = (M + 15) / 16 * 16;
  // The activations as the A tiles read them: per 16 rows and block, 16 x 32 contiguous
  // bytes (a tile load is then one sequential run, not 16 rows K bytes apart); a short last
  // tile reads zeros.
  std::vector<int8_t, AlignedAlloc<int8_t>> xa_tiles(M16 * K, 0);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(xa_tiles.data() + ((m / 16) * B + b) * 512 + (m % 16) * kBlock,
                  xq + m * K + b * kBlock, kBlock);
    }
  }
  // Per block, the rows' scales (and Q4_1's dx * sum, Q4_0's 8 * sum) side by side: 16 rows'
  // values in one run for the float steps. Zero for the padding rows.
  std::vector<float> dxt(B * M16, 0.f), sxt(TYPE == kQ4_1 ? B * M16 : 0, 0.f);
  std::vector<int32_t> offt(TYPE == kQ4_0 ? B * M16 : 0, 0);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < B; ++b) {
      const float dx = xd[m * B + b];
      const int32_t sum = xs[m * B + b];
      dxt[b * M16 + m] = dx;
      if (TYPE == kQ4_1) sxt[b * M16 + m] = dx * static_cast<float>(sum);
      if (TYPE == kQ4_0) offt[b * M16 + m] = 8 * sum;
    }
  }
  parallel_for(pairs, 4, [&](int64_t begin, int64_t end) {
    // NOTE: locals, not the captured references: the vector stores below may alias anything,
    // which made the compiler reload every captured pointer inside the loops.
    const int8_t* const xp = xa_tiles.data();
    const float* const dxp = dxt.data();
    const float* const sxp = sxt.data();
    const int32_t* const offp = offt.data();
    const float* const bp = bias;
    float* const op = out;
    const int64_t n_out = N, m_rows = M, m16 = M16, nb = B, ng = G;
    shoal::TileConfig cfg;
    for (int i = 0; i < 2; ++i) {
      cfg.rows[i] = 16; cfg.colsb[i] = 64;       // C: 16 activation rows x 16 int32 sums
      cfg.rows[2 + i] = 16; cfg.colsb[2 + i] = 32;   // A: 16 activation rows x one int8 block
      cfg.rows[4 + i] = 8; cfg.colsb[4 + i] = 64;    // B: 8 dwords of 4 values x 16 output rows
    }
    _tile_loadconfig(&cfg);
    // NOTE: where the thread's columns fit in L2 unpacked (every linear but an output head),
    // they are unpacked once and each 16-row tile then passes over all of them, so a tile
    // writes its rows' outputs as one compact region; wider ones are unpacked pair by pair
    // per 64-row chunk, as are batches of one chunk. (Chunks of many rows per pair wrote 64
    // bytes per output row at the row stride: with 3072 columns, a TLB miss per row.)
    const int64_t npairs = end - begin;
    const bool whole = m16 > kAmxChunk && npairs * nb * 512 <= kAmxUnpackedBytes;
    const int64_t slots = whole ? npairs : 1, chunk = whole ? 16 : kAmxChunk;
    std::vector<uint8_t, AlignedAlloc<uint8_t>> wb(slots * nb * 512);
    std::vector<float, AlignedAlloc<float>> dwb(slots * nb * 16), mwb(slots * nb * 16);
    if (whole) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t at = p - begin;
        unpack_pair<TYPE>(w, p, nb, ng, wb.data() + at * nb * 512, dwb.data() + at * nb * 16,
                          mwb.data() + at * nb * 16);
      }
    }
    alignas(64) int32_t cbuf[2][2][16 * 16];
    for (int64_t c0 = 0; c0 < m16; c0 += chunk) {
      const int64_t c1 = std::min(m16, c0 + chunk);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t at = whole ? p - begin : 0;
        uint8_t* const wbp = wb.data() + at * nb * 512;
        float* const dwp = dwb.data() + at * nb * 16;
        float* const mwp = mwb.data() + at * nb * 16;
        if (!whole) unpack_pair<TYPE>(w, p, nb, ng, wbp, dwp, mwp);
        const int64_t n0 = 2 * p * kRows, width = std::min<int64_t>(16, n_out - n0);
        const __mmask16 lanes = static_cast<__mmask16>((1u << width) - 1);
        const __m512 bias16 = bp != nullptr ? _mm512_maskz_loadu_ps(lanes, bp + n0) : _mm512_setzero_ps();
        for (int64_t m0 = c0; m0 < c1; m0 += 16) {
          __m512 acc[16];
          for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
          const int8_t* xa = xp + (m0 / 16) * nb * 512;
          // NOTE: two blocks per step in two sets of tiles (C 0-1, A 2-3, B 4-5); the tile
          // products of the next two blocks are issued before the float steps, and those
          // read the sums stored one step earlier: the tile unit and the vector units work
          // at once, and no load waits for a tile store just issued.
          auto issue = [&](int64_t bb, int slot) {
            if (slot == 0) {
              _tile_loadd(2, xa + bb * 512, kBlock);
              _tile_loadd(4, wbp + bb * 512, 64);
              _tile_zero(0);
              if (TYPE == kQ8_0) _tile_dpbssd(0, 2, 4); else _tile_dpbsud(0, 2, 4);
            } else {
              _tile_loadd(3, xa + bb * 512, kBlock);
              _tile_loadd(5, wbp + bb * 512, 64);
              _tile_zero(1);
              if (TYPE == kQ8_0) _tile_dpbssd(1, 3, 5); else _tile_dpbsud(1, 3, 5);
            }
          };
          auto finish = [&](int64_t bb, const int32_t* c) {
            amx_finish<TYPE>(c, _mm512_load_ps(dwp + bb * 16), _mm512_load_ps(mwp + bb * 16),
                             dxp + bb * m16 + m0,
                             sxp + (TYPE == kQ4_1 ? bb * m16 + m0 : 0),
                             offp + (TYPE == kQ4_0 ? bb * m16 + m0 : 0), acc);
          };
          issue(0, 0);
          if (nb > 1) issue(1, 1);
          for (int64_t b = 0; b < nb; b += 2) {
            int32_t (*const cb)[256] = cbuf[(b / 2) & 1];
            _tile_stored(0, cb[0], 64);
            if (b + 1 < nb) _tile_stored(1, cb[1], 64);
            if (b + 2 < nb) issue(b + 2, 0);
            if (b + 3 < nb) issue(b + 3, 1);
            if (b >= 2) {   // the previous two blocks, stored one step ago
              int32_t (*const prev)[256] = cbuf[((b - 2) / 2) & 1];
              finish(b - 2, prev[0]);
              finish(b - 1, prev[1]);
            }
          }
          {   // the last step's one or two blocks
            const int64_t last = (nb - 1) / 2 * 2;
            int32_t (*const cb)[256] = cbuf[(last / 2) & 1];
            finish(last, cb[0]);
            if (last + 1 < nb) finish(last + 1, cb[1]);
          }
          for (int i = 0; i < 16 && m0 + i < m_rows; ++i) {
            __m512 v = acc[i];
            if (bp != nullptr) v = _mm512_add_ps(v, bias16);
            _mm512_mask_storeu_ps(op + (m0 + i) * n_out + n0, lanes, v);
          }
        }
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
  if (M >= kAmxMinRows && shoal::amx_permitted()) {
    packed_linear_amx<TYPE>(w, N, K, xq, xd, xs, bias, M, out);
    return;
  }
#endif
  const int64_t B = K / kBlock, G = (N + kRows - 1) / kRows;
  // NOTE: threads split the output columns (whole 8-row groups); each group's weights are
  // unpacked once per block for all M rows.
  // acc [M][width] for the groups from g on -> out (+ bias); width a compile-time constant
  // (a runtime one cost decoding's one-row calls ~5%)
  auto store = [&](const float* acc, int64_t g, auto width_constant) {
    constexpr int64_t width = decltype(width_constant)::value;
    const int64_t cols = std::min(width, N - g * kRows);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t r = 0; r < cols; ++r) {
        const int64_t n = g * kRows + r;
        float v = acc[m * width + r];
        if (bias != nullptr) v = v + bias[n];
        out[m * N + n] = v;
      }
    }
  };
  auto groups = [&](int64_t begin, int64_t end) {
    std::vector<float> acc(M * 2 * kRows);
    int64_t g = begin;
#if SHOAL_PACKED_PAIRS
    for (; M >= kPairRows && g + 2 <= end; g += 2) {
      std::fill(acc.begin(), acc.end(), 0.f);
      pair_dot<TYPE>(w, B, g, xq, xd, xs, M, K, acc.data());
      store(acc.data(), g, std::integral_constant<int64_t, 2 * kRows>{});
    }
#endif
    for (; g < end; ++g) {
      std::fill(acc.begin(), acc.begin() + M * kRows, 0.f);
      group_dot<TYPE>(w, B, g, xq, xd, xs, M, K, acc.data());
      store(acc.data(), g, std::integral_constant<int64_t, kRows>{});
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
      shoal::act_mul_row(g, u, I, gelu != 0, row.data());
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

// Rows of a packed weight as floats, as layers/packed.py's dequantized_rows gives them (the
// embedding lookup of a tied head): per block d * v (+ m for Q4_1), v the integer value (Q4_0
// less 8). Only the tiles of the rows asked for are read. out: [n, K].
SHOAL_API void shoal_packed_rows(int32_t type, const uint8_t* tiles, int64_t K, const int64_t* rows,
                                 int64_t n, float* out) {
  const int64_t B = K / kBlock, tb = tile_bytes(type);
  const int64_t scales = type == kQ4_1 ? 2 : 1;
  parallel_for(n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t g = rows[i] / kRows, r = rows[i] % kRows;
      float* o = out + i * K;
      for (int64_t b = 0; b < B; ++b) {
        const uint8_t* tile = tiles + (g * B + b) * tb;
        uint16_t h;
        std::memcpy(&h, tile + 2 * r, 2);
        const float d = half_to_float(h);
        float m = 0.f;
        if (type == kQ4_1) {
          std::memcpy(&h, tile + 16 + 2 * r, 2);
          m = half_to_float(h);
        }
        const uint8_t* qs = tile + 16 * scales;
        for (int64_t e = 0; e < kBlock; ++e) {
          const int64_t j = e / 4, at = 4 * r + e % 4;
          float v;
          if (type == kQ8_0) {
            v = static_cast<float>(static_cast<int8_t>(qs[32 * j + at]));
          } else {
            const uint8_t byte = qs[32 * (j % 4) + at];
            const int32_t nibble = j < 4 ? (byte & 0x0F) : (byte >> 4);
            v = static_cast<float>(type == kQ4_0 ? nibble - 8 : nibble);
          }
          o[b * kBlock + e] = type == kQ4_1 ? d * v + m : d * v;
        }
      }
    }
  });
}
