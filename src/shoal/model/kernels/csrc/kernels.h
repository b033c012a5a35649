// The C entry points of every kernel source, declared once: pymodule.cpp wraps them for
// Python, and decoder_stack.cpp calls them in a layer's order.
#pragma once

#include <cstdint>

extern "C" {
void shoal_write_kv(const float*, const float*, int64_t, int64_t, int64_t, void*, void*, int32_t,
                    int64_t, const int64_t*);
void shoal_paged_attention(const float*, int64_t, int64_t, const void*, const void*, int32_t,
                           int64_t, const int64_t*, int64_t, const int64_t*, const int64_t*,
                           int64_t, float, int64_t, float*);
void shoal_rms_norm_quant(const float*, float*, const float*, int64_t, int64_t, float, int32_t,
                          int8_t*, float*);
void shoal_quant_rows(const float*, const float*, int64_t, int64_t, int8_t*, float*);
void shoal_hadamard_quant_rows(const float*, int64_t, int64_t, int8_t*, float*);
void shoal_dequant_gelu_hadamard_quant(const int32_t*, const float*, const float*, const float*,
                                       int64_t, int64_t, int8_t*, float*);
void shoal_silu_mul_quant(const float*, const float*, int64_t, int64_t, int8_t*, float*);
void shoal_gelu_tanh_mul_quant(const float*, const float*, int64_t, int64_t, int8_t*, float*);
void shoal_dequant_rows(const int32_t*, const float*, const float*, const float*, int64_t,
                        int64_t, float*);
void shoal_rope_split(const float*, int64_t, int64_t, const int64_t*, const float*, const float*,
                      int64_t, int64_t, int64_t, float*, float*, float*);
void shoal_qk_norm_rope_split(const float*, int64_t, int64_t, const int64_t*, const float*,
                              const float*, const float*, const float*, float, int64_t, int64_t,
                              int64_t, float*, float*, float*);
void shoal_int8_matmul_small(const int8_t*, const int8_t*, int64_t, int64_t, int64_t, int32_t*);
void shoal_int8_linear_small(const int8_t*, const float*, const int8_t*, const float*,
                             const float*, int64_t, int64_t, int64_t, float*);
void shoal_rms_norm_add_norm_quant(const float*, float*, const float*, const float*, int64_t,
                                   int64_t, float, int8_t*, float*);
void shoal_top_k_rows(float*, int64_t, int64_t, const int64_t*);
void shoal_argmax_rows(const float*, int64_t, int64_t, int64_t*);
void shoal_draw_rows(const float*, int64_t, int64_t, const double*, const float*,
                     const int64_t*, int64_t*);
// exact mode's float32 linear (f32_linear.cpp)
void shoal_f32_linear(const float*, const float*, const float*, int64_t, int64_t, int64_t, float*);
// packed_linear.cpp: GGUF 4/8-bit blocks x per-block int8 activations
void shoal_packed_linear(int32_t, const uint8_t*, int64_t, int64_t, const int8_t*, const float*,
                         const int32_t*, const float*, int64_t, float*);
void shoal_quant_blocks(const float*, int64_t, int64_t, int8_t*, float*, int32_t*);
void shoal_rms_norm_quant_blocks(const float*, float*, const float*, int64_t, int64_t, float,
                                 int32_t, int8_t*, float*, int32_t*);
void shoal_rms_norm_add_norm_quant_blocks(const float*, float*, const float*, const float*,
                                          int64_t, int64_t, float, int8_t*, float*, int32_t*);
void shoal_act_mul_quant_blocks(const float*, int64_t, int64_t, int32_t, int8_t*, float*,
                                int32_t*);
void shoal_packed_repack(int32_t, const uint8_t*, int64_t, int64_t, uint8_t*);
void shoal_packed_rows(int32_t, const uint8_t*, int64_t, const int64_t*, int64_t, float*);
// decoder_stack.cpp: the decoder layers in one call (packed blocks, or float32 weights)
void shoal_decoder_stack(int32_t, const int64_t*, int64_t, const int64_t*, float, float, float*,
                         float*, int64_t, const int64_t*, const int64_t*, const int64_t*, int64_t,
                         const int64_t*, const int64_t*, int64_t);
// encoder_ops.cpp: the encoder's int8 products on AMX tiles and its attention, on the pool
int32_t shoal_int8_gemm_ready();
void shoal_int8_gemm_pack(const int8_t*, int64_t, int64_t, int8_t*);
void shoal_int8_gemm(const int8_t*, int64_t, int64_t, const int8_t*, int64_t, int32_t*);
void shoal_encoder_attention(const float*, int64_t, int64_t, const int64_t*, int64_t, float,
                             float*);
void shoal_add_layer_norm(float*, const float*, const float*, const float*, int64_t, int64_t, float);
void shoal_encoder_stack(const int64_t*, int64_t, int64_t, int64_t, int64_t, float, float,
                         const int64_t*, int64_t, int64_t, float*);
void shoal_encoder_pass(const int64_t*, const int64_t*, int64_t, int64_t, int64_t, int64_t, float,
                        float, const int64_t*, const int64_t*, int64_t, int64_t, float*);
void shoal_set_work_pool(int32_t);
void shoal_openmp_in_this_thread(int32_t);
void shoal_omp_threads_in_this_thread(int32_t);
}
