// Python bindings of shoal's CPU kernels (one extension module, several sources).
#include <torch/extension.h>

#include <tuple>

torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                              torch::Tensor block_tables, torch::Tensor query_start,
                              torch::Tensor first_pos, double scale, int64_t window);
void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
              torch::Tensor slots);
std::tuple<torch::Tensor, torch::Tensor> rms_norm_quant(torch::Tensor x, torch::Tensor residual,
                                                        torch::Tensor weight, double eps,
                                                        bool add_residual);
std::tuple<torch::Tensor, torch::Tensor> quant_rows(torch::Tensor x, torch::Tensor inv_smooth);
std::tuple<torch::Tensor, torch::Tensor> silu_mul_quant(torch::Tensor gate_up,
                                                        torch::Tensor inv_smooth);
torch::Tensor dequant_rows(torch::Tensor acc, torch::Tensor x_scale, torch::Tensor w_scale,
                           torch::Tensor bias);
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> rope_split(
    torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim);
std::tuple<torch::Tensor, torch::Tensor> rms_norm_add_norm_quant(torch::Tensor x,
                                                                 torch::Tensor residual,
                                                                 torch::Tensor x_weight,
                                                                 torch::Tensor weight, double eps);
std::tuple<torch::Tensor, torch::Tensor> gelu_tanh_mul_quant(torch::Tensor gate_up,
                                                             torch::Tensor inv_smooth);
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> qk_norm_rope_split(
    torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
    torch::Tensor q_weight, torch::Tensor k_weight, double eps, int64_t num_heads,
    int64_t num_kv_heads, int64_t head_dim);

torch::Tensor int8_matmul_small(torch::Tensor x, torch::Tensor w);

torch::Tensor sample_rows(torch::Tensor logits, torch::Tensor temperatures, torch::Tensor top_ks,
                          torch::Tensor top_ps, torch::Tensor min_ps, torch::Tensor random_bits);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention,
        "Causal (optionally sliding-window) attention over a blocked paged KV cache for decode "
        "and prefill queries (CPU, f32)",
        pybind11::arg("q"), pybind11::arg("k_cache"), pybind11::arg("v_cache"),
        pybind11::arg("block_tables"), pybind11::arg("query_start"), pybind11::arg("first_pos"),
        pybind11::arg("scale"), pybind11::arg("window") = 0);
  m.def("write_kv", &write_kv, "Write K/V rows into a blocked paged KV cache (CPU, f32)");
  m.def("rms_norm_quant", &rms_norm_quant,
        "(residual += x,) RMSNorm with a folded weight, per-row int8 quantization");
  m.def("quant_rows", &quant_rows, "Per-row symmetric int8 quantization after smoothing");
  m.def("silu_mul_quant", &silu_mul_quant, "silu(gate) * up, smoothing, per-row int8 quantization");
  m.def("dequant_rows", &dequant_rows, "int32 accumulators -> float with row and column scales (+ bias)");
  m.def("int8_matmul_small", &int8_matmul_small,
        "int8 x int8 -> int32 for a few rows (decoding), exact like torch._int_mm");
  m.def("sample_rows", &sample_rows,
        "temperature / top_k / top_p / min_p sampling of logit rows with per-row random bits");
  m.def("rope_split", &rope_split, "Split fused QKV into contiguous q, k, v with RoPE applied");
  m.def("rms_norm_add_norm_quant", &rms_norm_add_norm_quant,
        "residual += RMSNorm(x) * x_weight, then RMSNorm(residual) * weight quantized per row "
        "(Gemma's post-norm + residual + pre-norm)");
  m.def("gelu_tanh_mul_quant", &gelu_tanh_mul_quant,
        "gelu_tanh(gate) * up, smoothing, per-row int8 quantization");
  m.def("qk_norm_rope_split", &qk_norm_rope_split,
        "Split fused QKV; RMSNorm over head_dim of q and k, then RoPE (Gemma 3)");
}
