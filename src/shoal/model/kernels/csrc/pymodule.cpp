// The kernels' Python entry points: a plain CPython extension (no torch headers), taking
// data pointers and sizes as ints and floats with METH_FASTCALL. A call costs well under a
// microsecond: ctypes' argument conversion cost 4-5 us, which over the ~400 kernel calls of
// a decode step would have been most of what fusing the ops saved. The GIL is released
// while a kernel runs (the thread settings below, which return at once, keep it).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>

#include "kernels.h"

namespace {

constexpr int kMaxArgs = 16;

// The call's arguments: ints (pointers, sizes, flags) and floats, converted once.
struct Args {
  int64_t i[kMaxArgs];
  double f[kMaxArgs];
  bool ok = true;
  Args(PyObject* const* a, Py_ssize_t n, Py_ssize_t expected) {
    if (n != expected) {
      PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", expected, n);
      ok = false;
      return;
    }
    for (Py_ssize_t k = 0; k < n; ++k) {
      if (PyFloat_Check(a[k])) {
        f[k] = PyFloat_AS_DOUBLE(a[k]);
      } else {
        i[k] = PyLong_AsLongLong(a[k]);   // None -> error below; a null pointer is 0
        if (i[k] == -1 && PyErr_Occurred()) { ok = false; return; }
        f[k] = static_cast<double>(i[k]);   // an int where a float is expected
      }
    }
  }
  template <typename T> T* p(int k) const { return reinterpret_cast<T*>(static_cast<intptr_t>(i[k])); }
};

#define SHOAL_WRAP(name, nargs, call)                                                   \
  PyObject* py_##name(PyObject*, PyObject* const* a, Py_ssize_t n) {                    \
    Args x(a, n, nargs);                                                                \
    if (!x.ok) return nullptr;                                                          \
    Py_BEGIN_ALLOW_THREADS call; Py_END_ALLOW_THREADS                                   \
    Py_RETURN_NONE;                                                                     \
  }

SHOAL_WRAP(write_kv, 10, shoal_write_kv(x.p<float>(0), x.p<float>(1), x.i[2], x.i[3], x.i[4],
                                        x.p<void>(5), x.p<void>(6), int32_t(x.i[7]), x.i[8],
                                        x.p<int64_t>(9)))
SHOAL_WRAP(paged_attention, 15,
           shoal_paged_attention(x.p<float>(0), x.i[1], x.i[2], x.p<void>(3), x.p<void>(4),
                                 int32_t(x.i[5]), x.i[6], x.p<int64_t>(7), x.i[8],
                                 x.p<int64_t>(9), x.p<int64_t>(10), x.i[11], float(x.f[12]),
                                 x.i[13], x.p<float>(14)))
SHOAL_WRAP(rms_norm_quant, 9,
           shoal_rms_norm_quant(x.p<float>(0), x.p<float>(1), x.p<float>(2), x.i[3], x.i[4],
                                float(x.f[5]), int32_t(x.i[6]), x.p<int8_t>(7), x.p<float>(8)))
SHOAL_WRAP(quant_rows, 6, shoal_quant_rows(x.p<float>(0), x.p<float>(1), x.i[2], x.i[3],
                                           x.p<int8_t>(4), x.p<float>(5)))
SHOAL_WRAP(hadamard_quant_rows, 5, shoal_hadamard_quant_rows(x.p<float>(0), x.i[1], x.i[2],
                                                             x.p<int8_t>(3), x.p<float>(4)))
SHOAL_WRAP(dequant_gelu_hadamard_quant, 8,
           shoal_dequant_gelu_hadamard_quant(x.p<int32_t>(0), x.p<float>(1), x.p<float>(2),
                                             x.p<float>(3), x.i[4], x.i[5], x.p<int8_t>(6),
                                             x.p<float>(7)))
SHOAL_WRAP(silu_mul_quant, 6, shoal_silu_mul_quant(x.p<float>(0), x.p<float>(1), x.i[2], x.i[3],
                                                   x.p<int8_t>(4), x.p<float>(5)))
SHOAL_WRAP(gelu_tanh_mul_quant, 6,
           shoal_gelu_tanh_mul_quant(x.p<float>(0), x.p<float>(1), x.i[2], x.i[3],
                                     x.p<int8_t>(4), x.p<float>(5)))
SHOAL_WRAP(dequant_rows, 7, shoal_dequant_rows(x.p<int32_t>(0), x.p<float>(1), x.p<float>(2),
                                               x.p<float>(3), x.i[4], x.i[5], x.p<float>(6)))
SHOAL_WRAP(rope_split, 12,
           shoal_rope_split(x.p<float>(0), x.i[1], x.i[2], x.p<int64_t>(3), x.p<float>(4),
                            x.p<float>(5), x.i[6], x.i[7], x.i[8], x.p<float>(9), x.p<float>(10),
                            x.p<float>(11)))
SHOAL_WRAP(qk_norm_rope_split, 15,
           shoal_qk_norm_rope_split(x.p<float>(0), x.i[1], x.i[2], x.p<int64_t>(3),
                                    x.p<float>(4), x.p<float>(5), x.p<float>(6), x.p<float>(7),
                                    float(x.f[8]), x.i[9], x.i[10], x.i[11], x.p<float>(12),
                                    x.p<float>(13), x.p<float>(14)))
SHOAL_WRAP(int8_matmul_small, 6, shoal_int8_matmul_small(x.p<int8_t>(0), x.p<int8_t>(1), x.i[2],
                                                         x.i[3], x.i[4], x.p<int32_t>(5)))
SHOAL_WRAP(int8_linear_small, 9,
           shoal_int8_linear_small(x.p<int8_t>(0), x.p<float>(1), x.p<int8_t>(2), x.p<float>(3),
                                   x.p<float>(4), x.i[5], x.i[6], x.i[7], x.p<float>(8)))
SHOAL_WRAP(rms_norm_add_norm_quant, 9,
           shoal_rms_norm_add_norm_quant(x.p<float>(0), x.p<float>(1), x.p<float>(2),
                                         x.p<float>(3), x.i[4], x.i[5], float(x.f[6]),
                                         x.p<int8_t>(7), x.p<float>(8)))
SHOAL_WRAP(argmax_rows, 4, shoal_argmax_rows(x.p<float>(0), x.i[1], x.i[2], x.p<int64_t>(3)))
SHOAL_WRAP(top_k_rows, 4, shoal_top_k_rows(x.p<float>(0), x.i[1], x.i[2], x.p<int64_t>(3)))
SHOAL_WRAP(draw_rows, 7, shoal_draw_rows(x.p<float>(0), x.i[1], x.i[2], x.p<double>(3),
                                         x.p<float>(4), x.p<int64_t>(5), x.p<int64_t>(6)))
// exact mode's float32 linear
SHOAL_WRAP(f32_linear, 7, shoal_f32_linear(x.p<float>(0), x.p<float>(1), x.p<float>(2), x.i[3],
                                           x.i[4], x.i[5], x.p<float>(6)))
// packed_linear.cpp
SHOAL_WRAP(packed_linear, 10,
           shoal_packed_linear(int32_t(x.i[0]), x.p<uint8_t>(1), x.i[2], x.i[3], x.p<int8_t>(4),
                               x.p<float>(5), x.p<int32_t>(6), x.p<float>(7), x.i[8],
                               x.p<float>(9)))
SHOAL_WRAP(quant_blocks, 6, shoal_quant_blocks(x.p<float>(0), x.i[1], x.i[2], x.p<int8_t>(3),
                                               x.p<float>(4), x.p<int32_t>(5)))
SHOAL_WRAP(rms_norm_quant_blocks, 10,
           shoal_rms_norm_quant_blocks(x.p<float>(0), x.p<float>(1), x.p<float>(2), x.i[3],
                                       x.i[4], float(x.f[5]), int32_t(x.i[6]), x.p<int8_t>(7),
                                       x.p<float>(8), x.p<int32_t>(9)))
SHOAL_WRAP(rms_norm_add_norm_quant_blocks, 10,
           shoal_rms_norm_add_norm_quant_blocks(x.p<float>(0), x.p<float>(1), x.p<float>(2),
                                                x.p<float>(3), x.i[4], x.i[5], float(x.f[6]),
                                                x.p<int8_t>(7), x.p<float>(8), x.p<int32_t>(9)))
SHOAL_WRAP(act_mul_quant_blocks, 7,
           shoal_act_mul_quant_blocks(x.p<float>(0), x.i[1], x.i[2], int32_t(x.i[3]),
                                      x.p<int8_t>(4), x.p<float>(5), x.p<int32_t>(6)))
SHOAL_WRAP(decoder_stack, 16,
           shoal_decoder_stack(int32_t(x.i[0]), x.p<int64_t>(1), x.i[2], x.p<int64_t>(3),
                               float(x.f[4]), float(x.f[5]), x.p<float>(6), x.p<float>(7), x.i[8],
                               x.p<int64_t>(9), x.p<int64_t>(10), x.p<int64_t>(11), x.i[12],
                               x.p<int64_t>(13), x.p<int64_t>(14), x.i[15]))
SHOAL_WRAP(packed_rows, 6, shoal_packed_rows(int32_t(x.i[0]), x.p<uint8_t>(1), x.i[2],
                                             x.p<int64_t>(3), x.i[4], x.p<float>(5)))
// encoder_ops.cpp
SHOAL_WRAP(int8_gemm_pack, 4, shoal_int8_gemm_pack(x.p<int8_t>(0), x.i[1], x.i[2], x.p<int8_t>(3)))
SHOAL_WRAP(int8_gemm, 6, shoal_int8_gemm(x.p<int8_t>(0), x.i[1], x.i[2], x.p<int8_t>(3), x.i[4],
                                         x.p<int32_t>(5)))
SHOAL_WRAP(encoder_attention, 7,
           shoal_encoder_attention(x.p<float>(0), x.i[1], x.i[2], x.p<int64_t>(3), x.i[4],
                                   float(x.f[5]), x.p<float>(6)))
SHOAL_WRAP(encoder_stack, 11,
           shoal_encoder_stack(x.p<int64_t>(0), x.i[1], x.i[2], x.i[3], x.i[4], float(x.f[5]),
                               float(x.f[6]), x.p<int64_t>(7), x.i[8], x.i[9], x.p<float>(10)))
SHOAL_WRAP(encoder_pass, 13,
           shoal_encoder_pass(x.p<int64_t>(0), x.p<int64_t>(1), x.i[2], x.i[3], x.i[4], x.i[5],
                              float(x.f[6]), float(x.f[7]), x.p<int64_t>(8), x.p<int64_t>(9),
                              x.i[10], x.i[11], x.p<float>(12)))
SHOAL_WRAP(add_layer_norm, 7, shoal_add_layer_norm(x.p<float>(0), x.p<float>(1), x.p<float>(2),
                                                   x.p<float>(3), x.i[4], x.i[5], float(x.f[6])))

PyObject* py_int8_gemm_ready(PyObject*, PyObject* const*, Py_ssize_t n) {
  if (n != 0) {
    PyErr_Format(PyExc_TypeError, "expected 0 arguments, got %zd", n);
    return nullptr;
  }
  return PyBool_FromLong(shoal_int8_gemm_ready());
}

// Settings that return at once keep the GIL: giving it up and taking it back costs the engine
// thread a wait whenever the event loop holds it meanwhile (twice per decode step here).
#define SHOAL_WRAP_QUICK(name, nargs, call)                                             \
  PyObject* py_##name(PyObject*, PyObject* const* a, Py_ssize_t n) {                    \
    Args x(a, n, nargs);                                                                \
    if (!x.ok) return nullptr;                                                          \
    call;                                                                               \
    Py_RETURN_NONE;                                                                     \
  }

SHOAL_WRAP_QUICK(set_work_pool, 1, shoal_set_work_pool(int32_t(x.i[0])))
SHOAL_WRAP_QUICK(openmp_in_this_thread, 1, shoal_openmp_in_this_thread(int32_t(x.i[0])))
SHOAL_WRAP_QUICK(omp_threads_in_this_thread, 1, shoal_omp_threads_in_this_thread(int32_t(x.i[0])))
SHOAL_WRAP(packed_repack, 5, shoal_packed_repack(int32_t(x.i[0]), x.p<uint8_t>(1), x.i[2], x.i[3],
                                                 x.p<uint8_t>(4)))

#define SHOAL_METHOD(name) {#name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_##name)), METH_FASTCALL, nullptr}

PyMethodDef methods[] = {
    SHOAL_METHOD(write_kv), SHOAL_METHOD(paged_attention), SHOAL_METHOD(rms_norm_quant),
    SHOAL_METHOD(quant_rows), SHOAL_METHOD(hadamard_quant_rows), SHOAL_METHOD(silu_mul_quant),
    SHOAL_METHOD(gelu_tanh_mul_quant), SHOAL_METHOD(dequant_gelu_hadamard_quant),
    SHOAL_METHOD(dequant_rows), SHOAL_METHOD(rope_split), SHOAL_METHOD(qk_norm_rope_split),
    SHOAL_METHOD(int8_matmul_small), SHOAL_METHOD(int8_linear_small),
    SHOAL_METHOD(rms_norm_add_norm_quant),
    SHOAL_METHOD(top_k_rows), SHOAL_METHOD(argmax_rows), SHOAL_METHOD(draw_rows),
    // exact mode's float32 linear
    SHOAL_METHOD(f32_linear),
    // packed_linear.cpp
    SHOAL_METHOD(packed_linear), SHOAL_METHOD(quant_blocks), SHOAL_METHOD(rms_norm_quant_blocks),
    SHOAL_METHOD(rms_norm_add_norm_quant_blocks), SHOAL_METHOD(act_mul_quant_blocks),
    SHOAL_METHOD(packed_repack), SHOAL_METHOD(packed_rows), SHOAL_METHOD(decoder_stack),
    SHOAL_METHOD(set_work_pool), SHOAL_METHOD(openmp_in_this_thread),
    SHOAL_METHOD(omp_threads_in_this_thread),
    // encoder_ops.cpp
    SHOAL_METHOD(int8_gemm_ready), SHOAL_METHOD(int8_gemm_pack), SHOAL_METHOD(int8_gemm),
    SHOAL_METHOD(encoder_attention), SHOAL_METHOD(add_layer_norm),
    SHOAL_METHOD(encoder_stack), SHOAL_METHOD(encoder_pass),
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_shoal_cpu", "shoal's C++ CPU kernels", -1, methods,
                      nullptr, nullptr, nullptr, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__shoal_cpu() { return PyModule_Create(&module); }
