// A decoder's whole layer stack in one call from Python, in two variants over one table:
// - fast mode on packed GGUF blocks (int8 activations per 32-element block);
// - exact mode on float32 weights (f32_linear.cpp's fixed-order dot products).
//
// Each runs the per-layer sequence of model/decoder.py for the plain pre-norm families
// (Llama, SmolLM, Mistral, Qwen2: no q/k norms, no sandwich norms; model/layers/
// decoder_stack.py checks): norm, QKV, RoPE, KV write, paged attention, O, norm, gate/up,
// act * up, down. The fast variant calls the very kernel entry points of the fused Python path
// in the same order on the same floats, so its results are bit-identical to it for any batch.
// The exact variant's norm and activation are the float versions of the same row helpers
// (common.h); it is what exact mode runs whenever the kernels are built (the per-op Python
// path stays for other families and devices), and every row's arithmetic is fixed, so it is
// batch-invariant too. What both save is the Python between the kernels: ~11 calls per layer,
// each with its checks and output allocations, cost about as much as the weight streaming
// itself when decoding one sequence.
//
// The layers are described once (model/layers/decoder_stack.py) by a table of int64 fields per
// layer (pointers to weights, norms and the layer's KV cache, GGML types, the window); the
// scratch buffers of a call are allocated here, once per call, sized by its token count.
#include "common.h"

#include <vector>

#include "kernels.h"

namespace {

// The fields of one layer's row in the table (model/layers/decoder_stack.py writes them).
// A weight is packed GGUF tiles (fast) or a float32 [N, K] matrix (exact; its type is 0, F32).
enum Field : int64_t {
  kAttnNorm, kMlpNorm,   // the input norms' float32 weights [K]
  kQkvType, kQkvWeight, kQkvBias, kOType, kOWeight, kGateUpType, kGateUpWeight, kDownType,
  kDownWeight, kKCache, kVCache, kCos, kSin, kWindow,
  kFields
};

// The model's sizes and switches (the dims array); kKvType is paged_attention's code.
enum Dim : int64_t { kHidden, kInter, kHeads, kKvHeads, kHeadDim, kGelu, kKvType, kBlockSize, kDims };

template <typename T> inline T* ptr(int64_t v) { return reinterpret_cast<T*>(static_cast<intptr_t>(v)); }

// One call's arguments and the model's sizes, read once from the dims array.
struct Stack {
  const int64_t* table;
  int64_t L;
  const int64_t* dims;
  float eps, scale;
  float* residual;
  float* out;
  int64_t T;
  const int64_t *positions, *slots, *block_tables;
  int64_t max_blocks;
  const int64_t *query_start, *first_pos;
  int64_t num_seqs;
  int64_t K = dims[kHidden], I = dims[kInter], H = dims[kHeads], KV = dims[kKvHeads];
  int64_t hd = dims[kHeadDim], W = (H + 2 * KV) * hd, A = H * hd;
  int32_t kv_type = static_cast<int32_t>(dims[kKvType]);
  bool gelu = dims[kGelu] != 0;
};

// Scratch of one call, sized by its token count.
struct Attention {
  std::vector<float> q, k, v, out;
  explicit Attention(const Stack& s)
      : q(s.T * s.A), k(s.T * s.KV * s.hd), v(s.T * s.KV * s.hd), out(s.T * s.A) {}

  // qkv [T, W] of layer row f -> out [T, A]: RoPE, the layer's KV written, paged attention.
  void run(const Stack& s, const int64_t* f, const float* qkv) {
    shoal_rope_split(qkv, s.T, s.W, s.positions, ptr<float>(f[kCos]), ptr<float>(f[kSin]), s.H,
                     s.KV, s.hd, q.data(), k.data(), v.data());
    shoal_write_kv(k.data(), v.data(), s.T, s.KV, s.hd, ptr<void>(f[kKCache]),
                   ptr<void>(f[kVCache]), s.kv_type, s.dims[kBlockSize], s.slots);
    shoal_paged_attention(q.data(), s.H, s.hd, ptr<void>(f[kKCache]), ptr<void>(f[kVCache]),
                          s.kv_type, s.KV, s.block_tables, s.max_blocks, s.query_start,
                          s.first_pos, s.num_seqs, s.scale, f[kWindow], out.data());
  }
};

// Fast mode: every linear on packed GGUF blocks, activations quantized per 32-value block.
void packed_stack(const Stack& s) {
  const int64_t T = s.T, K = s.K, I = s.I, A = s.A, W = s.W;
  const int64_t widest = std::max(std::max(K, I), A);
  std::vector<int8_t> xq(T * widest);
  std::vector<float> xd(T * widest / 32), qkv(T * W), proj(T * K), gate_up(T * 2 * I);
  std::vector<int32_t> xs(T * widest / 32);
  Attention attention(s);
  auto linear = [&](const int64_t* f, Field type, Field weight, int64_t n, int64_t k,
                    const float* bias, float* y) {
    shoal_packed_linear(static_cast<int32_t>(f[type]), ptr<uint8_t>(f[weight]), n, k, xq.data(),
                        xd.data(), xs.data(), bias, T, y);
  };
  for (int64_t l = 0; l < s.L; ++l) {
    const int64_t* f = s.table + l * kFields;
    // the previous layer's MLP output joins the stream (the first layer's stream is the input)
    shoal_rms_norm_quant_blocks(l == 0 ? s.residual : s.out, s.residual, ptr<float>(f[kAttnNorm]),
                                T, K, s.eps, l == 0 ? 0 : 1, xq.data(), xd.data(), xs.data());
    linear(f, kQkvType, kQkvWeight, W, K, ptr<float>(f[kQkvBias]), qkv.data());
    attention.run(s, f, qkv.data());
    shoal_quant_blocks(attention.out.data(), T, A, xq.data(), xd.data(), xs.data());
    linear(f, kOType, kOWeight, K, A, nullptr, proj.data());
    shoal_rms_norm_quant_blocks(proj.data(), s.residual, ptr<float>(f[kMlpNorm]), T, K, s.eps, 1,
                                xq.data(), xd.data(), xs.data());
    linear(f, kGateUpType, kGateUpWeight, 2 * I, K, nullptr, gate_up.data());
    shoal_act_mul_quant_blocks(gate_up.data(), T, I, s.gelu ? 1 : 0, xq.data(), xd.data(), xs.data());
    linear(f, kDownType, kDownWeight, K, I, nullptr, s.out);
  }
}

// Exact mode: every linear float32 (f32_linear.cpp); norm and activation row by row.
void f32_stack(const Stack& s) {
  const int64_t T = s.T, K = s.K, I = s.I, A = s.A, W = s.W;
  std::vector<float> normed(T * K), qkv(T * W), proj(T * K), gate_up(T * 2 * I), act(T * I);
  Attention attention(s);
  // x joins the stream (when add) and the stream is normed into `normed`.
  auto norm = [&](const float* x, const float* weight, bool add) {
    shoal::parallel_for(T, shoal::grain(K), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        shoal::rms_norm_row(x + t * K, add ? s.residual + t * K : nullptr, weight, K, s.eps,
                            normed.data() + t * K);
      }
    });
  };
  auto linear = [&](const float* x, int64_t weight, const float* bias, int64_t in, int64_t n,
                    float* y) { shoal_f32_linear(x, ptr<float>(weight), bias, T, in, n, y); };
  for (int64_t l = 0; l < s.L; ++l) {
    const int64_t* f = s.table + l * kFields;
    norm(l == 0 ? s.residual : s.out, ptr<float>(f[kAttnNorm]), l != 0);
    linear(normed.data(), f[kQkvWeight], ptr<float>(f[kQkvBias]), K, W, qkv.data());
    attention.run(s, f, qkv.data());
    linear(attention.out.data(), f[kOWeight], nullptr, A, K, proj.data());
    norm(proj.data(), ptr<float>(f[kMlpNorm]), true);
    linear(normed.data(), f[kGateUpWeight], nullptr, K, 2 * I, gate_up.data());
    shoal::parallel_for(T, shoal::grain(I), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* g = gate_up.data() + t * 2 * I;
        shoal::act_mul_row(g, g + I, I, s.gelu, act.data() + t * I);
      }
    });
    linear(act.data(), f[kDownWeight], nullptr, I, K, s.out);
  }
}

}  // namespace

// f32: 0 the packed variant, 1 the float32 one (the table's weights say which it holds).
// residual [T, K]: the embeddings in, the residual stream before the last layer's MLP output
// joins it out; out [T, K]: the last layer's MLP output (model/decoder.py's (hidden, residual)).
// The attention arguments are paged_attention's (one row per sequence of the step).
SHOAL_API void shoal_decoder_stack(int32_t f32, const int64_t* table, int64_t L,
                                   const int64_t* dims, float eps, float scale, float* residual,
                                   float* out, int64_t T, const int64_t* positions,
                                   const int64_t* slots, const int64_t* block_tables,
                                   int64_t max_blocks, const int64_t* query_start,
                                   const int64_t* first_pos, int64_t num_seqs) {
  const Stack s{table, L, dims, eps, scale, residual, out, T, positions, slots, block_tables,
                max_blocks, query_start, first_pos, num_seqs};
  if (f32 != 0) {
    f32_stack(s);
  } else {
    packed_stack(s);
  }
}

// The work pool (pool.h) on or off; off, its jobs run as OpenMP regions (benchmarks' A/B).
SHOAL_API void shoal_set_work_pool(int32_t on) { shoal::WorkPool::enabled().store(on != 0); }
SHOAL_API void shoal_openmp_in_this_thread(int32_t on) { shoal::WorkPool::openmp_here() = on != 0; }
// The OpenMP team size of torch's (and MKL's, oneDNN's) parallel ops started from this thread
// only: omp_set_num_threads sets the calling thread's ICV. The work pool is made first, so its
// size still follows the process's setting.
SHOAL_API void shoal_omp_threads_in_this_thread(int32_t n) {
  shoal::WorkPool::get();
  omp_set_num_threads(n);
}
