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

}  // namespace

// residual [T, K]: the embeddings in, the residual stream before the last layer's MLP output
// joins it out; out [T, K]: the last layer's MLP output (model/decoder.py's (hidden, residual)).
// The attention arguments are paged_attention's (one row per sequence of the step).
SHOAL_API void shoal_packed_decoder_stack(const int64_t* table, int64_t L, const int64_t* dims,
                                          float eps, float scale, float* residual, float* out,
                                          int64_t T, const int64_t* positions, const int64_t* slots,
                                          const int64_t* block_tables, int64_t max_blocks,
                                          const int64_t* query_start, const int64_t* first_pos,
                                          int64_t num_seqs) {
  const int64_t K = dims[kHidden], I = dims[kInter], H = dims[kHeads], KV = dims[kKvHeads];
  const int64_t hd = dims[kHeadDim], W = (H + 2 * KV) * hd, A = H * hd;
  const int32_t gelu = static_cast<int32_t>(dims[kGelu]), kv_type = static_cast<int32_t>(dims[kKvType]);
  const int64_t widest = std::max(std::max(K, I), A);
  std::vector<int8_t> xq(T * widest);
  std::vector<float> xd(T * widest / 32), qkv(T * W), q(T * A), k(T * KV * hd), v(T * KV * hd),
      attn(T * A), proj(T * K), gate_up(T * 2 * I);
  std::vector<int32_t> xs(T * widest / 32);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t* f = table + l * kFields;
    // the previous layer's MLP output joins the stream (the first layer's stream is the input)
    shoal_rms_norm_quant_blocks(l == 0 ? residual : out, residual, ptr<float>(f[kAttnNorm]), T, K,
                                eps, l == 0 ? 0 : 1, xq.data(), xd.data(), xs.data());
    shoal_packed_linear(static_cast<int32_t>(f[kQkvType]), ptr<uint8_t>(f[kQkvWeight]), W, K,
                        xq.data(), xd.data(), xs.data(), ptr<float>(f[kQkvBias]), T, qkv.data());
    shoal_rope_split(qkv.data(), T, W, positions, ptr<float>(f[kCos]), ptr<float>(f[kSin]), H, KV,
                     hd, q.data(), k.data(), v.data());
    shoal_write_kv(k.data(), v.data(), T, KV, hd, ptr<void>(f[kKCache]), ptr<void>(f[kVCache]),
                   kv_type, dims[kBlockSize], slots);
    shoal_paged_attention(q.data(), H, hd, ptr<void>(f[kKCache]), ptr<void>(f[kVCache]), kv_type, KV,
                          block_tables, max_blocks, query_start, first_pos, num_seqs, scale,
                          f[kWindow], attn.data());
    shoal_quant_blocks(attn.data(), T, A, xq.data(), xd.data(), xs.data());
    shoal_packed_linear(static_cast<int32_t>(f[kOType]), ptr<uint8_t>(f[kOWeight]), K, A, xq.data(),
                        xd.data(), xs.data(), nullptr, T, proj.data());
    shoal_rms_norm_quant_blocks(proj.data(), residual, ptr<float>(f[kMlpNorm]), T, K, eps, 1,
                                xq.data(), xd.data(), xs.data());
    shoal_packed_linear(static_cast<int32_t>(f[kGateUpType]), ptr<uint8_t>(f[kGateUpWeight]), 2 * I,
                        K, xq.data(), xd.data(), xs.data(), nullptr, T, gate_up.data());
    shoal_act_mul_quant_blocks(gate_up.data(), T, I, gelu, xq.data(), xd.data(), xs.data());
    shoal_packed_linear(static_cast<int32_t>(f[kDownType]), ptr<uint8_t>(f[kDownWeight]), K, I,
                        xq.data(), xd.data(), xs.data(), nullptr, T, out);
  }
}

// The exact variant: residual and out as above; the same attention arguments.
SHOAL_API void shoal_f32_decoder_stack(const int64_t* table, int64_t L, const int64_t* dims,
                                       float eps, float scale, float* residual, float* out,
                                       int64_t T, const int64_t* positions, const int64_t* slots,
                                       const int64_t* block_tables, int64_t max_blocks,
                                       const int64_t* query_start, const int64_t* first_pos,
                                       int64_t num_seqs) {
  const int64_t K = dims[kHidden], I = dims[kInter], H = dims[kHeads], KV = dims[kKvHeads];
  const int64_t hd = dims[kHeadDim], W = (H + 2 * KV) * hd, A = H * hd;
  const bool gelu = dims[kGelu] != 0;
  const int32_t kv_type = static_cast<int32_t>(dims[kKvType]);
  std::vector<float> normed(T * K), qkv(T * W), q(T * A), k(T * KV * hd), v(T * KV * hd),
      attn(T * A), proj(T * K), gate_up(T * 2 * I), act(T * I);
  // x joins the stream (when add) and the stream is normed into `normed`, row by row.
  auto norm = [&](const float* x, const float* weight, bool add) {
    shoal::parallel_for(T, shoal::grain(K), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        shoal::rms_norm_row(x + t * K, add ? residual + t * K : nullptr, weight, K, eps, normed.data() + t * K);
      }
    });
  };
  auto linear = [&](const float* x, int64_t weight, const float* bias, int64_t in, int64_t n,
                    float* y) { shoal_f32_linear(x, ptr<float>(weight), bias, T, in, n, y); };
  for (int64_t l = 0; l < L; ++l) {
    const int64_t* f = table + l * kFields;
    norm(l == 0 ? residual : out, ptr<float>(f[kAttnNorm]), l != 0);
    linear(normed.data(), f[kQkvWeight], ptr<float>(f[kQkvBias]), K, W, qkv.data());
    shoal_rope_split(qkv.data(), T, W, positions, ptr<float>(f[kCos]), ptr<float>(f[kSin]), H, KV,
                     hd, q.data(), k.data(), v.data());
    shoal_write_kv(k.data(), v.data(), T, KV, hd, ptr<void>(f[kKCache]), ptr<void>(f[kVCache]),
                   kv_type, dims[kBlockSize], slots);
    shoal_paged_attention(q.data(), H, hd, ptr<void>(f[kKCache]), ptr<void>(f[kVCache]), kv_type,
                          KV, block_tables, max_blocks, query_start, first_pos, num_seqs, scale,
                          f[kWindow], attn.data());
    linear(attn.data(), f[kOWeight], nullptr, A, K, proj.data());
    norm(proj.data(), ptr<float>(f[kMlpNorm]), true);
    linear(normed.data(), f[kGateUpWeight], nullptr, K, 2 * I, gate_up.data());
    shoal::parallel_for(T, shoal::grain(I), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* g = gate_up.data() + t * 2 * I;
        float* a = act.data() + t * I;
        for (int64_t i = 0; i < I; ++i) a[i] = (gelu ? shoal::gelu_tanh(g[i]) : shoal::silu(g[i])) * g[I + i];
      }
    });
    linear(act.data(), f[kDownWeight], nullptr, I, K, out);
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
