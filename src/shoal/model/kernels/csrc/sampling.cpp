// Random sampling of logit rows on the CPU: temperature, top_k, top_p, min_p, then an
// inverse-CDF draw with each row's own random bits. Same semantics as
// shoal/engine/sampling/filters.py (its PyTorch twin, used on other devices), in one pass
// per row instead of a dozen full-vocabulary tensor ops.
//
// Probabilities become integers in units of 2^-31, so every cumulative sum and cut is
// exact; a row's result depends only on its own logits, settings and random bits.
#include "common.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kProbOne = int64_t(1) << 31;
constexpr int kRandomBits = 31;
constexpr int64_t kNucleusPrefix = 1024;

// Sets entries of a row below its k-th largest value to -inf (ties with it stay).
void apply_top_k(float* row, int64_t V, int64_t k, std::vector<float>& copy) {
  if (k <= 0 || k >= V) return;
  copy.assign(row, row + V);
  std::nth_element(copy.begin(), copy.begin() + (k - 1), copy.end(), std::greater<float>());
  const float kth = copy[k - 1];
  for (int64_t v = 0; v < V; ++v) {
    if (row[v] < kth) row[v] = -std::numeric_limits<float>::infinity();
  }
}

// Index of the token drawn from one row of probabilities (already softmaxed).
int64_t draw_row(const float* probs, int64_t V, double top_p, float min_p, int64_t bits,
                 std::vector<int64_t>& q, std::vector<int64_t>& sorted) {
  q.resize(V);
  float pmax = 0.f;
  for (int64_t v = 0; v < V; ++v) {
    const float p = std::isnan(probs[v]) ? 0.f : probs[v];   // an all -inf row gives NaN
    pmax = std::max(pmax, p);
    q[v] = static_cast<int64_t>(p * static_cast<float>(kProbOne));
  }
  if (top_p < 1.0) {
    int64_t total = 0;
    for (int64_t v = 0; v < V; ++v) total += q[v];
    const int64_t tp = std::max<int64_t>(1, static_cast<int64_t>(top_p * static_cast<double>(kProbOne)));
    // A token is kept while the mass before it (in descending order) is below top_p of the
    // total, compared as exact integer products. The cut over a descending prefix of the
    // sorted row; true when the prefix holds the mass the cut needs, so the rest would
    // change nothing.
    auto cut_over = [&](int64_t k, int64_t& cut) -> bool {
      int64_t before = 0;
      int64_t kept = 0;
      for (int64_t j = 0; j < k; ++j) {
        if (static_cast<__int128>(before) * kProbOne < static_cast<__int128>(tp) * total) {
          kept = j + 1;
        }
        before += sorted[j];
      }
      cut = sorted[std::max<int64_t>(kept, 1) - 1];
      return static_cast<__int128>(before) * kProbOne >= static_cast<__int128>(tp) * total;
    };
    // the k largest, in descending order (what partial_sort gives, at O(V) + O(k log k))
    auto top = [&](int64_t k) {
      sorted.assign(q.begin(), q.end());
      if (k < V) std::nth_element(sorted.begin(), sorted.begin() + (k - 1), sorted.end(),
                                  std::greater<int64_t>());
      std::sort(sorted.begin(), sorted.begin() + k, std::greater<int64_t>());
    };
    // NOTE: first only the tokens within 2^-12 of the most likely one, which are exactly the
    // top of the sorted row: a peaked row's nucleus lies within them, found without copying
    // the vocabulary (a partial sort of 1,024 of 49,152 per row was ~6 ms of a 32-row step).
    int64_t qmax = 0;
    for (int64_t v = 0; v < V; ++v) qmax = std::max(qmax, q[v]);
    const int64_t floor_q = std::max<int64_t>(1, qmax >> 12);
    sorted.clear();
    for (int64_t v = 0; v < V; ++v) {
      if (q[v] >= floor_q) sorted.push_back(q[v]);
    }
    const int64_t near = static_cast<int64_t>(sorted.size());
    std::sort(sorted.begin(), sorted.end(), std::greater<int64_t>());
    int64_t cut = 0;
    if (!(near > 0 && cut_over(near, cut))) {
      if (V > kNucleusPrefix && near < kNucleusPrefix) {
        top(kNucleusPrefix);
        if (!cut_over(kNucleusPrefix, cut)) {
          top(V);
          cut_over(V, cut);
        }
      } else {
        top(V);
        cut_over(V, cut);
      }
    }
    for (int64_t v = 0; v < V; ++v) {
      if (q[v] < cut) q[v] = 0;
    }
  }
  if (min_p > 0.f) {
    const float floor_p = min_p * pmax;
    for (int64_t v = 0; v < V; ++v) {
      if (probs[v] < floor_p) q[v] = 0;
    }
  }
  int64_t total = 0;
  for (int64_t v = 0; v < V; ++v) total += q[v];
  const int64_t target = static_cast<int64_t>((static_cast<__int128>(bits) * total) >> kRandomBits);
  int64_t running = 0;
  for (int64_t v = 0; v < V; ++v) {
    running += q[v];
    if (running > target) return v;
  }
  return V - 1;
}

typedef float f16v __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));

// Index of a row's largest value, the first one on ties; the first NaN if there is one
// (torch.argmax's answers). 16 lanes each keep their largest value and its first index (a
// strict > never moves to a later equal value), then the lanes meet. NOTE: torch's argmax
// over the vocabulary is a scalar loop (~5 ns a value); on its own thread, 32 greedy rows
// took ~7 ms of a ~45 ms decode step.
int64_t argmax_row(const float* x, int64_t V) {
  const int64_t full = V - V % 16;
  float best_value = -std::numeric_limits<float>::infinity();
  int64_t best = 0;
  bool nan = false;
  if (full > 0) {
    f16v top;
    std::memcpy(&top, x, sizeof(top));
    i16v at = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    i16v index = at;
    i16v nans = top != top;
    for (int64_t k = 16; k < full; k += 16) {
      f16v v;
      std::memcpy(&v, x + k, sizeof(v));
      index += 16;
      const i16v greater = v > top;
      top = greater ? v : top;
      at = greater ? index : at;
      nans |= v != v;
    }
    best_value = top[0];
    best = at[0];
    for (int lane = 0; lane < 16; ++lane) {
      nan = nan || nans[lane] != 0;
      if (top[lane] > best_value || (top[lane] == best_value && at[lane] < best)) {
        best_value = top[lane];
        best = at[lane];
      }
    }
  }
  for (int64_t k = full; k < V; ++k) {
    nan = nan || std::isnan(x[k]);
    if (x[k] > best_value) {
      best_value = x[k];
      best = k;
    }
  }
  if (nan) {
    for (int64_t k = 0; k < V; ++k) {
      if (std::isnan(x[k])) return k;
    }
  }
  return best;
}

}  // namespace

// x: [R, V] f32 -> out[r] = argmax of row r (as torch.argmax(x, 1)).
SHOAL_API void shoal_argmax_rows(const float* xp, int64_t R, int64_t V, int64_t* op) {
  shoal::parallel_for(R, shoal::grain(V), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) op[r] = argmax_row(xp + r * V, V);
  });
}

// Two steps around the softmax, which stays ATen's (kernels/cpu.py runs it between them),
// so probabilities are bit-identical to the PyTorch twin, boundary cases of min_p/top_p
// included. scaled: [R, V] f32 logits already divided by the temperature, masked in place.
SHOAL_API void shoal_top_k_rows(float* sp, int64_t R, int64_t V, const int64_t* ks) {
  shoal::parallel_for(R, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> copy;
    for (int64_t r = begin; r < end; ++r) apply_top_k(sp + r * V, V, ks[r], copy);
  });
}

// probs: [R, V] f32 (softmax of the masked rows). Writes the drawn token of each row.
SHOAL_API void shoal_draw_rows(const float* pp, int64_t R, int64_t V, const double* ps,
                               const float* mins, const int64_t* bits, int64_t* op) {
  shoal::parallel_for(R, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> q, sorted;
    for (int64_t r = begin; r < end; ++r) {
      op[r] = draw_row(pp + r * V, V, ps[r], mins[r], bits[r], q, sorted);
    }
  });
}
