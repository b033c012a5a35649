"""Builds (once, cached, in seconds) and loads shoal's C++ CPU kernels; None when unavailable.

The kernels (csrc/) are plain C++ with C entry points and a small CPython module
(pymodule.cpp) that takes data pointers and sizes, all without torch's headers: the machine's
compiler builds them in a few seconds (the torch extension they replaced took 2-5 minutes),
into ~/.cache/shoal/kernels (or SHOAL_KERNEL_CACHE). `CpuKernels` allocates the outputs and
keeps the tensor-level interface the model uses.

The instruction set is picked at run time from this CPU's flags (`select_isa`), and each
variant is built and cached under its own name with flags naming that instruction set, never
-march=native: a cache shared by machines with different CPUs (a home directory on NFS, a
container image) can then never hand a machine code it cannot run (SIGILL).

Where no compiler is present, or SHOAL_CPU_KERNELS=0, shoal uses pure PyTorch paths with
the same semantics. `start_build` begins the build on a thread so that a server can
download and load its model meanwhile; `kernel_status` says where it stands.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGMLQuantizationType

log = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ("paged_attention.cpp", "fused_ops.cpp", "sampling.cpp", "packed_linear.cpp",
            "f32_linear.cpp", "decoder_stack.cpp", "encoder_ops.cpp", "pymodule.cpp")
_HEADERS = ("common.h", "pool.h", "kernels.h", "amx.h")
# the GGUF block formats packed_linear.cpp computes on
_PACKED_GGML_TYPES = tuple(int(t) for t in (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
                                            GGMLQuantizationType.Q8_0))
# KV cache element types the attention kernel reads, as its kv_type code (paged_attention.cpp).
_KV_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@dataclass(frozen=True)
class Isa:
    """One build variant: a name and the compiler flags that target exactly that ISA."""

    name: str
    flags: tuple[str, ...]


# x86-64 micro-architecture levels (psABI), best first, with the /proc/cpuinfo flags each needs.
_X86_LEVELS = (
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma",
                   "bmi2", "movbe"}),
    ("x86-64-v3", {"avx2", "fma", "bmi1", "bmi2", "movbe", "f16c"}),
    ("x86-64-v2", {"sse4_2", "ssse3", "popcnt"}),
)


def select_isa(cpu_flags: set[str] | None = None, machine: str | None = None) -> Isa:
    """The best variant this CPU runs (its flags from /proc/cpuinfo unless given)."""
    machine = machine or platform.machine()
    if machine not in ("x86_64", "AMD64"):
        return Isa("generic", ())   # the compiler's default target for this architecture
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    for level, needed in _X86_LEVELS:
        if needed <= flags:
            if level == "x86-64-v4" and "avx512_vnni" in flags:
                if {"amx_tile", "amx_int8"} <= flags:
                    # NOTE: Sapphire Rapids' tile unit, for the packed linears' batches.
                    return Isa(level + "-amx", (f"-march={level}", "-mavx512vnni", "-mamx-tile",
                                                "-mamx-int8"))
                return Isa(level + "-vnni", (f"-march={level}", "-mavx512vnni"))
            if level == "x86-64-v3" and "avx_vnni" in flags:
                # NOTE: 256-bit VNNI without AVX-512 (Alder Lake and later client cores).
                return Isa(level + "-avxvnni", (f"-march={level}", "-mavxvnni"))
            return Isa(level, (f"-march={level}",))
    return Isa("x86-64", ("-march=x86-64",))


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _compiler_id(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], check=False, capture_output=True, text=True, timeout=30)
    return out.stdout.splitlines()[0] if out.stdout else cxx


def cache_root() -> Path:
    env = os.environ.get("SHOAL_KERNEL_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shoal" / "kernels"


# NOTE: no fused multiply-add contraction in the elementwise ops: their results are then the
# same on every ISA level (v2 has no FMA, v3 does) and equal to the separate-step forms they
# are checked against (int8_linear_small vs dequant_rows). Attention keeps FMAs: its scores
# are compute-bound and it is compared with a tolerance.
# The float32 linear fuses every multiply-add where the ISA has FMA: each output element is
# computed in one fixed order whatever the batch (f32_linear.cpp), so fusing changes nothing
# between rows or batches, only between ISA variants.
_SOURCE_FLAGS = {"fused_ops.cpp": ("-ffp-contract=off",), "sampling.cpp": ("-ffp-contract=off",),
                 "packed_linear.cpp": ("-ffp-contract=off",), "f32_linear.cpp": ("-ffp-contract=fast",)}


def _common_flags() -> tuple[str, ...]:
    return ("-O3", "-fopenmp", "-fPIC", "-fvisibility=hidden", "-std=c++17",
            "-I" + sysconfig.get_paths()["include"])


def _library_path(cxx: str, isa: Isa) -> Path:
    digest = hashlib.sha256()
    for name in (*_SOURCES, *_HEADERS):
        digest.update((_CSRC / name).read_bytes())
    # NOTE: the Python module is built against this interpreter's headers and ABI.
    digest.update(" ".join((_compiler_id(cxx), sys.version, *_common_flags(), *isa.flags,
                            repr(sorted(_SOURCE_FLAGS.items())))).encode())
    return cache_root() / f"shoal_cpu_{isa.name}_{digest.hexdigest()[:12]}.so"


def build_library(isa: Isa | None = None) -> Path:
    """Compiles the kernels for `isa` (this CPU's by default) unless cached; their path.

    Sources compile in parallel into a temporary directory and the library is renamed into
    place, so a build killed half-way leaves nothing that a later start would trust.
    """
    isa = isa or select_isa()
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    target = _library_path(cxx, isa)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    # NOTE: the OS lock is released when its holder dies, so a killed build never blocks.
    with FileLock(str(target.with_suffix(".lock"))):
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
            flags = [*_common_flags(), *isa.flags]
            objects = [Path(tmp) / (name + ".o") for name in _SOURCES]
            compiles = [subprocess.Popen([cxx, *flags, *_SOURCE_FLAGS.get(name, ()), "-c",
                                          str(_CSRC / name), "-o", str(obj)],
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                        for name, obj in zip(_SOURCES, objects)]
            errors = [p.communicate()[0].decode(errors="replace") for p in compiles]
            if any(p.returncode for p in compiles):
                raise RuntimeError("kernel compile failed: " + "".join(errors)[-2000:])
            lib = Path(tmp) / "lib.so"
            linked = subprocess.run([cxx, "-shared", "-fopenmp", *map(str, objects), "-o", str(lib)],
                                    check=False, capture_output=True, text=True)
            if linked.returncode:
                raise RuntimeError("kernel link failed: " + linked.stderr[-2000:])
            lib.replace(target)
    return target


# ----- the tensor-level interface ------------------------------------------------------

def _need(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _f32(t: torch.Tensor, what: str) -> torch.Tensor:
    _need(t.dtype == torch.float32 and t.device.type == "cpu", f"{what}: float32 CPU tensor expected")
    return t.contiguous()


def _long(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64).contiguous()


def _dequant_args(acc, x_scale, w_scale, bias, what: str):
    """int32 sums [T, N] with float32 row and column scales, and a bias [N] (an absent or
    empty one is none): (acc, x_scale, w_scale, bias or None), checked for the C side."""
    _need(acc.dtype == torch.int32, f"{what}: int32 accumulators")
    x_scale, w_scale = _f32(x_scale, "x_scale"), _f32(w_scale, "w_scale")
    has_bias = bias is not None and bias.numel() == acc.shape[1]
    return acc.contiguous(), x_scale, w_scale, _f32(bias, "bias") if has_bias else None


def _runs_table(runs: list[tuple[int, int, int]], rows: int, what: str) -> torch.Tensor:
    """Runs of equal-length inputs, (first row, inputs, length), checked to cover rows 0 to
    `rows` in order: as the int64 [R, 3] table the C side reads."""
    row = 0
    for first, count, length in runs:
        _need(first == row and count > 0 and length > 0, f"{what}: runs must cover the rows in order")
        row += count * length
    _need(row == rows, f"{what}: runs must cover the rows in order")
    return torch.tensor(runs, dtype=torch.int64)


class CpuKernels:
    """The compiled kernels behind the tensor interface the model calls (CPU tensors).

    Every argument is made contiguous and type-checked here: the C side trusts its pointers.
    Tensors modified in place (the residual, the KV cache) must already be contiguous.
    """

    def __init__(self, path: Path, isa: Isa) -> None:
        self.path, self.isa = path, isa
        loader = importlib.machinery.ExtensionFileLoader("_shoal_cpu", str(path))
        module = importlib.util.module_from_spec(importlib.util.spec_from_loader("_shoal_cpu", loader))
        loader.exec_module(module)
        for name in ("write_kv", "paged_attention", "rms_norm_quant", "quant_rows",
                     "hadamard_quant_rows", "dequant_gelu_hadamard_quant",
                     "silu_mul_quant", "gelu_tanh_mul_quant", "dequant_rows", "rope_split",
                     "qk_norm_rope_split", "int8_matmul_small", "int8_linear_small",
                     "rms_norm_add_norm_quant",
                     "top_k_rows", "argmax_rows", "draw_rows",
                     "f32_linear",
                     # packed_linear.cpp
                     "packed_linear", "quant_blocks", "rms_norm_quant_blocks",
                     "rms_norm_add_norm_quant_blocks", "act_mul_quant_blocks", "packed_repack",
                     "packed_rows",
                     # decoder_stack.cpp
                     "decoder_stack", "set_work_pool",
                     # encoder_ops.cpp
                     "int8_gemm_ready", "int8_gemm_pack", "int8_gemm", "encoder_attention",
                     "add_layer_norm", "encoder_stack", "encoder_pass",
                     "openmp_in_this_thread", "omp_threads_in_this_thread"):
            setattr(self, "_" + name, getattr(module, name))

    # --- attention
    @staticmethod
    def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
        """The cache's element type as the kernel's kv_type code."""
        _need(k_cache.dtype in _KV_TYPES and v_cache.dtype == k_cache.dtype,
              "paged attention: float32, float16 or bfloat16 KV cache")
        _need(k_cache.is_contiguous() and v_cache.is_contiguous(), "KV cache must be contiguous")
        _need(k_cache.dim() == 4 and v_cache.dim() == 4, "KV cache must be blocked (4-D)")
        return _KV_TYPES[k_cache.dtype]

    def write_kv(self, k, v, k_cache, v_cache, slots) -> None:
        kv_type = self._check_cache(k_cache, v_cache)
        k, v, slots = _f32(k, "write_kv"), _f32(v, "write_kv"), _long(slots)
        T, KV, hd = k.shape
        _need(v.shape == k.shape and slots.numel() == T, "write_kv: shapes differ")
        self._write_kv(k.data_ptr(), v.data_ptr(), T, KV, hd, k_cache.data_ptr(),
                       v_cache.data_ptr(), kv_type, k_cache.shape[3], slots.data_ptr())

    def paged_attention(self, q, k_cache, v_cache, block_tables, query_start, first_pos,
                        scale: float, window: int = 0) -> torch.Tensor:
        kv_type = self._check_cache(k_cache, v_cache)
        q = _f32(q, "paged attention: queries")
        block_tables, query_start, first_pos = _long(block_tables), _long(query_start), _long(first_pos)
        _, H, hd = q.shape
        _need(k_cache.shape[3] == 16, "paged attention kernel: block size 16 only")
        _need(hd % 16 == 0, "paged attention kernel: head_dim must be a multiple of 16")
        _need(window >= 0, "paged attention kernel: window must be >= 0")
        out = torch.empty_like(q)
        self._paged_attention(q.data_ptr(), H, hd, k_cache.data_ptr(), v_cache.data_ptr(), kv_type,
                              k_cache.shape[1], block_tables.data_ptr(), block_tables.shape[1],
                              query_start.data_ptr(), first_pos.data_ptr(), first_pos.shape[0],
                              float(scale), int(window), out.data_ptr())
        return out

    # --- fused ops of fast mode
    def _quant_out(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty(rows, cols, dtype=torch.int8), torch.empty(rows, 1)

    def rms_norm_quant(self, x, residual, weight, eps: float, add_residual: bool):
        x, weight = _f32(x, "rms_norm_quant"), _f32(weight, "rms_norm_quant")
        _need(residual.is_contiguous() and residual.dtype == torch.float32, "residual: contiguous f32")
        T, K = x.shape
        q, s = self._quant_out(T, K)
        self._rms_norm_quant(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), T, K, float(eps),
                             int(add_residual), q.data_ptr(), s.data_ptr())
        return q, s

    def quant_rows(self, x, inv_smooth):
        x, inv_smooth = _f32(x, "quant_rows"), _f32(inv_smooth, "quant_rows")
        T, K = x.shape
        q, s = self._quant_out(T, K)
        self._quant_rows(x.data_ptr(), inv_smooth.data_ptr(), T, K, q.data_ptr(), s.data_ptr())
        return q, s

    def hadamard_quant_rows(self, x):
        """Each row's 32 chunks mixed by a Walsh-Hadamard transform, then quantized per row
        (layers/hadamard.py)."""
        x = _f32(x, "hadamard_quant_rows")
        T, K = x.shape
        _need(K % 32 == 0, "hadamard_quant_rows: width must be a multiple of 32")
        q, s = self._quant_out(T, K)
        self._hadamard_quant_rows(x.data_ptr(), T, K, q.data_ptr(), s.data_ptr())
        return q, s

    def dequant_gelu_hadamard_quant(self, acc, x_scale, w_scale, bias):
        """An encoder's up projection (int32) dequantized, through GELU (erf), then as
        hadamard_quant_rows: int8 [T, K] and row scales [T, 1]."""
        acc, x_scale, w_scale, bias = _dequant_args(acc, x_scale, w_scale, bias,
                                                    "dequant_gelu_hadamard_quant")
        T, K = acc.shape
        _need(K % 32 == 0, "dequant_gelu_hadamard_quant: width must be a multiple of 32")
        q, s = self._quant_out(T, K)
        self._dequant_gelu_hadamard_quant(acc.data_ptr(), x_scale.data_ptr(), w_scale.data_ptr(),
                                          0 if bias is None else bias.data_ptr(), T, K,
                                          q.data_ptr(), s.data_ptr())
        return q, s

    def _act_mul_quant(self, fn, gate_up, inv_smooth):
        gate_up, inv_smooth = _f32(gate_up, "gate_up"), _f32(inv_smooth, "inv_smooth")
        T, I2 = gate_up.shape
        q, s = self._quant_out(T, I2 // 2)
        fn(gate_up.data_ptr(), inv_smooth.data_ptr(), T, I2 // 2, q.data_ptr(), s.data_ptr())
        return q, s

    def silu_mul_quant(self, gate_up, inv_smooth):
        return self._act_mul_quant(self._silu_mul_quant, gate_up, inv_smooth)

    def gelu_tanh_mul_quant(self, gate_up, inv_smooth):
        return self._act_mul_quant(self._gelu_tanh_mul_quant, gate_up, inv_smooth)

    def dequant_rows(self, acc, x_scale, w_scale, bias) -> torch.Tensor:
        acc, x_scale, w_scale, bias = _dequant_args(acc, x_scale, w_scale, bias, "dequant_rows")
        T, N = acc.shape
        out = torch.empty(T, N)
        self._dequant_rows(acc.data_ptr(), x_scale.data_ptr(), w_scale.data_ptr(),
                           0 if bias is None else bias.data_ptr(), T, N, out.data_ptr())
        return out

    def _qkv_out(self, T: int, H: int, KV: int, hd: int):
        return torch.empty(T, H, hd), torch.empty(T, KV, hd), torch.empty(T, KV, hd)

    def rope_split(self, qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim):
        qkv, cos, sin = _f32(qkv, "qkv"), _f32(cos, "cos"), _f32(sin, "sin")
        positions = _long(positions)
        T, W = qkv.shape
        _need(W == (num_heads + 2 * num_kv_heads) * head_dim, "rope_split: qkv width")
        q, k, v = self._qkv_out(T, num_heads, num_kv_heads, head_dim)
        self._rope_split(qkv.data_ptr(), T, W, positions.data_ptr(), cos.data_ptr(),
                         sin.data_ptr(), num_heads, num_kv_heads, head_dim, q.data_ptr(),
                         k.data_ptr(), v.data_ptr())
        return q, k, v

    def qk_norm_rope_split(self, qkv, positions, cos, sin, q_weight, k_weight, eps, num_heads,
                           num_kv_heads, head_dim):
        qkv, cos, sin = _f32(qkv, "qkv"), _f32(cos, "cos"), _f32(sin, "sin")
        q_weight, k_weight = _f32(q_weight, "q_weight"), _f32(k_weight, "k_weight")
        _need(q_weight.numel() == head_dim and k_weight.numel() == head_dim,
              "q/k norm weights must be contiguous [head_dim]")
        positions = _long(positions)
        T, W = qkv.shape
        _need(W == (num_heads + 2 * num_kv_heads) * head_dim, "qk_norm_rope_split: qkv width")
        q, k, v = self._qkv_out(T, num_heads, num_kv_heads, head_dim)
        self._qk_norm_rope_split(qkv.data_ptr(), T, W, positions.data_ptr(), cos.data_ptr(),
                                 sin.data_ptr(), q_weight.data_ptr(), k_weight.data_ptr(), float(eps),
                                 num_heads, num_kv_heads, head_dim, q.data_ptr(), k.data_ptr(),
                                 v.data_ptr())
        return q, k, v

    def int8_matmul_small(self, x, w) -> torch.Tensor:
        _need(x.dtype == torch.int8 and w.dtype == torch.int8, "int8_matmul_small: int8 inputs")
        _need(w.is_contiguous(), "weights must be contiguous [N, K]")
        x = x.contiguous()
        M, K = x.shape
        N = w.shape[0]
        _need(w.shape[1] == K, "int8_matmul_small: inner sizes differ")
        out = torch.empty(M, N, dtype=torch.int32)
        self._int8_matmul_small(x.data_ptr(), w.data_ptr(), M, K, N, out.data_ptr())
        return out

    def int8_linear_small(self, x, x_scale, w, w_scale, bias) -> torch.Tensor:
        """dequant_rows(int8_matmul_small(x, w), x_scale, w_scale, bias) in one call, bit for bit."""
        _need(x.dtype == torch.int8 and w.dtype == torch.int8 and w.is_contiguous(),
              "int8_linear_small: int8 inputs, contiguous weights")
        x = x.contiguous()
        x_scale, w_scale = _f32(x_scale, "x_scale"), _f32(w_scale, "w_scale")
        M, K = x.shape
        N = w.shape[0]
        _need(w.shape[1] == K and x_scale.numel() == M and w_scale.numel() == N,
              "int8_linear_small: shapes differ")
        has_bias = bias is not None and bias.numel() == N
        bias = _f32(bias, "bias") if has_bias else None
        out = torch.empty(M, N)
        self._int8_linear_small(x.data_ptr(), x_scale.data_ptr(), w.data_ptr(), w_scale.data_ptr(),
                                bias.data_ptr() if has_bias else 0, M, K, N, out.data_ptr())
        return out

    def rms_norm_add_norm_quant(self, x, residual, x_weight, weight, eps: float):
        x = _f32(x, "rms_norm_add_norm_quant")
        x_weight, weight = _f32(x_weight, "x_weight"), _f32(weight, "weight")
        _need(residual.is_contiguous() and residual.dtype == torch.float32, "residual: contiguous f32")
        T, K = x.shape
        q, s = self._quant_out(T, K)
        self._rms_norm_add_norm_quant(x.data_ptr(), residual.data_ptr(), x_weight.data_ptr(),
                                      weight.data_ptr(), T, K, float(eps), q.data_ptr(), s.data_ptr())
        return q, s

    # --- exact mode
    def f32_linear(self, x, weight, bias=None) -> torch.Tensor:
        """x [M, K] @ weight[N, K]^T (+ bias), float32; a row's result never depends on the
        other rows (f32_linear.cpp)."""
        x, weight = _f32(x, "f32_linear"), _f32(weight, "f32_linear weight")
        M, K = x.shape
        N = weight.shape[0]
        _need(weight.dim() == 2 and weight.shape[1] == K, "f32_linear: inner sizes differ")
        bias = _f32(bias, "f32_linear bias") if bias is not None else None
        _need(bias is None or bias.numel() == N, "f32_linear: bias size")
        out = torch.empty(M, N)
        self._f32_linear(x.data_ptr(), weight.data_ptr(), bias.data_ptr() if bias is not None else 0,
                         M, K, N, out.data_ptr())
        return out

    # --- packed GGUF blocks x per-block int8 activations (packed_linear.cpp)
    @staticmethod
    def _blocks_out(rows: int, cols: int):
        _need(cols % 32 == 0, "per-block quantization: the row length must be a multiple of 32")
        return (torch.empty(rows, cols, dtype=torch.int8), torch.empty(rows, cols // 32),
                torch.empty(rows, cols // 32, dtype=torch.int32))

    def quant_blocks(self, x):
        """x [T, K] -> (int8 [T, K], scales [T, K/32], integer block sums [T, K/32])."""
        x = _f32(x, "quant_blocks")
        T, K = x.shape
        q, d, s = self._blocks_out(T, K)
        self._quant_blocks(x.data_ptr(), T, K, q.data_ptr(), d.data_ptr(), s.data_ptr())
        return q, d, s

    def rms_norm_quant_blocks(self, x, residual, weight, eps: float, add_residual: bool):
        x, weight = _f32(x, "rms_norm_quant_blocks"), _f32(weight, "weight")
        _need(residual.is_contiguous() and residual.dtype == torch.float32, "residual: contiguous f32")
        T, K = x.shape
        q, d, s = self._blocks_out(T, K)
        self._rms_norm_quant_blocks(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), T, K,
                                    float(eps), int(add_residual), q.data_ptr(), d.data_ptr(),
                                    s.data_ptr())
        return q, d, s

    def rms_norm_add_norm_quant_blocks(self, x, residual, x_weight, weight, eps: float):
        x = _f32(x, "rms_norm_add_norm_quant_blocks")
        x_weight, weight = _f32(x_weight, "x_weight"), _f32(weight, "weight")
        _need(residual.is_contiguous() and residual.dtype == torch.float32, "residual: contiguous f32")
        T, K = x.shape
        q, d, s = self._blocks_out(T, K)
        self._rms_norm_add_norm_quant_blocks(x.data_ptr(), residual.data_ptr(), x_weight.data_ptr(),
                                             weight.data_ptr(), T, K, float(eps), q.data_ptr(),
                                             d.data_ptr(), s.data_ptr())
        return q, d, s

    def act_mul_quant_blocks(self, gate_up, gelu: bool):
        """act(gate) * up of gate_up [T, 2I] (silu, or gelu_tanh if `gelu`), quantized per block."""
        gate_up = _f32(gate_up, "gate_up")
        T, I2 = gate_up.shape
        q, d, s = self._blocks_out(T, I2 // 2)
        self._act_mul_quant_blocks(gate_up.data_ptr(), T, I2 // 2, int(gelu), q.data_ptr(),
                                   d.data_ptr(), s.data_ptr())
        return q, d, s

    def packed_repack(self, ggml_type: int, data: torch.Tensor, groups: int, blocks: int,
                      tile_bytes: int) -> torch.Tensor:
        """GGUF block bytes uint8 [N, K/32 * block] -> the kernels' tiles [groups, blocks, tile]."""
        _need(ggml_type in (2, 3, 8) and data.dtype == torch.uint8, "packed_repack: GGUF blocks")
        data = data.contiguous()
        tiles = torch.empty(groups, blocks, tile_bytes, dtype=torch.uint8)
        self._packed_repack(ggml_type, data.data_ptr(), data.shape[0], blocks * 32, tiles.data_ptr())
        return tiles

    def packed_rows(self, ggml_type: int, packed: torch.Tensor, in_features: int,
                    rows: torch.Tensor) -> torch.Tensor:
        """Rows of a packed weight as floats (layers/packed.py's dequantized_rows, bit for
        bit): [len(rows), in_features]. rows: int64 indices below the weight's row count."""
        _need(ggml_type in _PACKED_GGML_TYPES, "packed_rows: Q4_0, Q4_1 or Q8_0 weights only")
        _need(packed.dtype == torch.uint8 and packed.is_contiguous() and packed.dim() == 3,
              "packed weights: contiguous uint8 tiles")
        rows = _long(rows).reshape(-1)
        _need(packed.shape[1] * 32 == in_features, "packed_rows: in_features differs")
        if rows.numel():
            _need(int(rows.min()) >= 0 and int(rows.max()) < packed.shape[0] * 8,
                  "packed_rows: a row index outside the weight")
        out = torch.empty(rows.numel(), in_features)
        self._packed_rows(ggml_type, packed.data_ptr(), in_features, rows.data_ptr(), rows.numel(),
                          out.data_ptr())
        return out

    def packed_linear(self, ggml_type: int, packed, out_features: int, in_features: int,
                      q, d, s, bias) -> torch.Tensor:
        """Per-block int8 rows (q, d, s) times a weight packed by layers/packed.py -> [M, N]."""
        _need(ggml_type in _PACKED_GGML_TYPES, "packed_linear: Q4_0, Q4_1 or Q8_0 weights only")
        _need(packed.dtype == torch.uint8 and packed.is_contiguous(), "packed weights: contiguous uint8")
        _need(q.dtype == torch.int8 and s.dtype == torch.int32, "packed_linear: quantized rows")
        q, d, s = q.contiguous(), _f32(d, "block scales"), s.contiguous()
        M, K = q.shape
        _need(K == in_features and d.shape == (M, K // 32) and s.shape == (M, K // 32),
              "packed_linear: shapes differ")
        has_bias = bias is not None and bias.numel() == out_features
        bias = _f32(bias, "bias") if has_bias else None
        out = torch.empty(M, out_features)
        self._packed_linear(ggml_type, packed.data_ptr(), out_features, K, q.data_ptr(),
                            d.data_ptr(), s.data_ptr(), bias.data_ptr() if has_bias else 0, M,
                            out.data_ptr())
        return out

    def decoder_stack(self, kind: str, table: torch.Tensor, dims: torch.Tensor, eps: float,
                      scale: float, residual: torch.Tensor, positions, slots, block_tables,
                      query_start, first_pos) -> torch.Tensor:
        """Every decoder layer in one call (decoder_stack.cpp), `kind` 'packed' (GGUF blocks)
        or 'f32' (float32 weights); the table and dims from model/layers/decoder_stack.py,
        which holds the tensors they point to. residual [T, K]: the embeddings, updated in
        place into the stream; returns the last MLP output."""
        _need(kind in ("packed", "f32"), "decoder stack: kind is 'packed' or 'f32'")
        _need(table.dtype == torch.int64 and table.is_contiguous() and dims.dtype == torch.int64,
              "decoder stack: int64 table and dims")
        _need(residual.is_contiguous() and residual.dtype == torch.float32, "residual: contiguous f32")
        T, K = residual.shape
        positions, slots, block_tables = _long(positions), _long(slots), _long(block_tables)
        query_start, first_pos = _long(query_start), _long(first_pos)
        _need(positions.numel() == T and slots.numel() == T, "decoder stack: token counts")
        out = torch.empty(T, K)
        self._decoder_stack(int(kind == "f32"), table.data_ptr(), table.shape[0], dims.data_ptr(),
                            float(eps), float(scale), residual.data_ptr(), out.data_ptr(), T,
                            positions.data_ptr(), slots.data_ptr(), block_tables.data_ptr(),
                            block_tables.shape[1], query_start.data_ptr(), first_pos.data_ptr(),
                            first_pos.shape[0])
        return out

    # --- the encoder's fast pass on the work pool (encoder_ops.cpp)
    @property
    def int8_gemm_ready(self) -> bool:
        """int8_gemm runs here: this build has AMX and the CPU and OS let the process use it."""
        return bool(self._int8_gemm_ready())

    @staticmethod
    def int8_gemm_fits(out_features: int, in_features: int) -> bool:
        """Whether a weight [out, in] packs into int8_gemm's tiles (16 x 64 multiples)."""
        return out_features % 16 == 0 and in_features % 64 == 0

    def int8_gemm_pack(self, w: torch.Tensor) -> torch.Tensor:
        """int8 weights [N, K] as int8_gemm's tiles [N/16, K/64, 16, 64]."""
        _need(w.dtype == torch.int8 and w.dim() == 2, "int8_gemm_pack: int8 [N, K] weights")
        N, K = w.shape
        _need(self.int8_gemm_fits(N, K), "int8_gemm_pack: N must be a multiple of 16, K of 64")
        w = w.contiguous()
        out = torch.empty(N // 16, K // 64, 16, 64, dtype=torch.int8)
        self._int8_gemm_pack(w.data_ptr(), N, K, out.data_ptr())
        return out

    def int8_gemm(self, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """int8 [M, K] x the packed weights [N, K] -> int32 [M, N]: the integers torch._int_mm
        gives, on AMX tiles and the work pool."""
        _need(self.int8_gemm_ready, "int8_gemm: no AMX here (check int8_gemm_ready)")
        _need(x.dtype == torch.int8 and x.dim() == 2, "int8_gemm: int8 [M, K] activations")
        _need(packed.dtype == torch.int8 and packed.dim() == 4 and packed.is_contiguous(),
              "int8_gemm: weights from int8_gemm_pack")
        x = x.contiguous()
        M, K = x.shape
        N = packed.shape[0] * 16
        _need(packed.shape[1] * 64 == K, "int8_gemm: inner sizes differ")
        out = torch.empty(M, N, dtype=torch.int32)
        if M:
            self._int8_gemm(x.data_ptr(), M, K, packed.data_ptr(), N, out.data_ptr())
        return out

    def encoder_attention(self, qkv: torch.Tensor, runs: list[tuple[int, int, int]],
                          num_heads: int, head_dim: int, scale: float) -> torch.Tensor:
        """Each input's bidirectional attention over its own rows. qkv [T, 3 H D]; runs:
        (first row, inputs, length) of each run of equal-length inputs, back to back from
        row 0 to T. Returns [T, H D]."""
        qkv = _f32(qkv, "encoder_attention")
        T, W = qkv.shape
        _need(W == 3 * num_heads * head_dim, "encoder_attention: qkv width is not 3 H D")
        table = _runs_table(runs, T, "encoder_attention")
        out = torch.empty(T, num_heads * head_dim)
        self._encoder_attention(qkv.data_ptr(), num_heads, head_dim, table.data_ptr(), len(runs),
                                float(scale), out.data_ptr())
        return out

    def add_layer_norm(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float) -> torch.Tensor:
        """x = LayerNorm(x + y) * weight + bias over the last dimension, in place; returns x."""
        _need(x.dtype == torch.float32 and x.is_contiguous() and x.dim() == 2,
              "add_layer_norm: x must be contiguous float32 [T, K]")
        y, weight, bias = _f32(y, "add_layer_norm"), _f32(weight, "weight"), _f32(bias, "bias")
        T, K = x.shape
        _need(y.shape == x.shape and weight.shape == (K,) and bias.shape == (K,),
              "add_layer_norm: shapes differ")
        self._add_layer_norm(x.data_ptr(), y.data_ptr(), weight.data_ptr(), bias.data_ptr(), T, K,
                             float(eps))
        return x

    def encoder_stack(self, table: torch.Tensor, sizes: tuple[int, int, int], eps: float,
                      scale: float, runs: list[tuple[int, int, int]], x: torch.Tensor) -> torch.Tensor:
        """An encoder's layers in one call (model/encoder.py's EncoderStack builds `table`, one
        row of pointers per layer, and keeps what they point at alive); x [T, hidden] is
        overwritten with the last layer's output and returned. sizes: (hidden, intermediate,
        heads); runs as for encoder_attention."""
        _need(self.int8_gemm_ready, "encoder_stack: no AMX here (check int8_gemm_ready)")
        _need(table.dtype == torch.int64 and table.dim() == 2 and table.is_contiguous(),
              "encoder_stack: an int64 table [layers, fields]")
        _need(x.dtype == torch.float32 and x.is_contiguous() and x.dim() == 2,
              "encoder_stack: x must be contiguous float32 [T, hidden]")
        hidden, inter, heads = sizes
        T = x.shape[0]
        _need(x.shape[1] == hidden and hidden % heads == 0, "encoder_stack: sizes differ")
        runs_table = _runs_table(runs, T, "encoder_stack")
        self._encoder_stack(table.data_ptr(), table.shape[0], hidden, inter, heads, float(eps),
                            float(scale), runs_table.data_ptr(), len(runs), T, x.data_ptr())
        return x

    def encoder_pass(self, model: torch.Tensor, table: torch.Tensor, sizes: tuple[int, int, int],
                     eps: float, scale: float, ids: torch.Tensor, runs: list[tuple[int, int, int]],
                     inputs: int) -> torch.Tensor:
        """A whole fast pass in one call: embeddings and their norm, encoder_stack, pooling (and
        the L2 normalisation when asked). `model`: int64 fields (word, position and type-0
        embeddings, the embedding norm, pooling code, normalize; EncoderStack writes them);
        `ids`: int64 token ids back to back in the order of `runs`, each a valid row of the
        tables (the caller checks). Returns the pooled rows [inputs, hidden] in that order."""
        _need(self.int8_gemm_ready, "encoder_pass: no AMX here (check int8_gemm_ready)")
        _need(model.dtype == torch.int64 and model.numel() == 7 and table.dtype == torch.int64
              and table.dim() == 2, "encoder_pass: int64 model fields and layer table")
        _need(ids.dtype == torch.int64 and ids.dim() == 1 and ids.is_contiguous(),
              "encoder_pass: ids must be contiguous int64 [T]")
        runs_table = _runs_table(runs, ids.shape[0], "encoder_pass")
        _need(sum(count for _, count, _ in runs) == inputs, "encoder_pass: input count differs")
        hidden, inter, heads = sizes
        out = torch.empty(inputs, hidden)
        self._encoder_pass(model.data_ptr(), table.data_ptr(), table.shape[0], hidden, inter, heads,
                           float(eps), float(scale), ids.data_ptr(), runs_table.data_ptr(),
                           len(runs), ids.shape[0], out.data_ptr())
        return out

    def set_work_pool(self, on: bool) -> None:
        """Small decode-time jobs on the work pool (csrc/pool.h, the default) or as OpenMP
        regions: the benchmarks' before/after switch; results are the same bits either way."""
        self._set_work_pool(int(on))

    def openmp_in_this_thread(self, on: bool = True) -> None:
        """This thread's jobs as OpenMP regions, for work that alternates with torch's own
        OpenMP ops (csrc/pool.h, WorkPool::openmp_here)."""
        self._openmp_in_this_thread(int(on))

    def omp_threads_in_this_thread(self, n: int) -> None:
        """The team size of torch's parallel ops started from this thread (not the process's:
        torch.set_num_threads would change every thread's, and the work pool's size)."""
        self._omp_threads_in_this_thread(int(n))

    @contextmanager
    def torch_alone_in_this_thread(self) -> Iterator[None]:
        """Within: torch's ops started from this thread run on it alone (a team of 1); the
        thread's team is restored after. For work whose heavy parts run on the pool."""
        team = torch.get_num_threads()
        self.omp_threads_in_this_thread(1)
        try:
            yield
        finally:
            self.omp_threads_in_this_thread(team)

    # --- sampling
    def argmax_rows(self, x: torch.Tensor) -> torch.Tensor:
        """torch.argmax(x, 1) of float32 rows [R, V] (the first maximum; the first NaN if any),
        vectorized and on the work pool (sampling.cpp)."""
        x = _f32(x, "argmax_rows")
        _need(x.dim() == 2, "argmax_rows: [rows, vocab] expected")
        out = torch.empty(x.shape[0], dtype=torch.int64)
        self._argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
        return out

    def sample_rows(self, logits, temperatures, top_ks, top_ps, min_ps, random_bits) -> torch.Tensor:
        """temperature / top_k / top_p / min_p sampling of logit rows with per-row random bits.

        NOTE: temperature scaling and softmax are ATen's own, so probabilities are
        bit-identical to the PyTorch twin (engine/sampling/filters.py).
        """
        scaled = (logits.to(torch.float32) / temperatures.to(torch.float32).unsqueeze(1)).contiguous()
        R, V = scaled.shape
        top_ks = _long(top_ks)
        self._top_k_rows(scaled.data_ptr(), R, V, top_ks.data_ptr())
        probs = torch.softmax(scaled, 1).contiguous()
        top_ps = top_ps.to(torch.float64).contiguous()
        min_ps, bits = min_ps.to(torch.float32).contiguous(), _long(random_bits)
        out = torch.empty(R, dtype=torch.int64)
        self._draw_rows(probs.data_ptr(), R, V, top_ps.data_ptr(), min_ps.data_ptr(),
                        bits.data_ptr(), out.data_ptr())
        return out


# ----- the one build per process ------------------------------------------------------

@dataclass
class KernelStatus:
    """Where this process's kernels stand: disabled, idle, building, ready or failed."""

    state: str
    isa: str | None = None
    seconds: float | None = None   # building: so far; ready/failed: what the build took
    error: str | None = None


_lock = threading.Lock()
_done = threading.Event()
_module: CpuKernels | None = None
_status = KernelStatus("idle")
_started_at: float | None = None


def kernels_enabled() -> bool:
    return os.environ.get("SHOAL_CPU_KERNELS", "1").lower() not in ("0", "false", "no", "off")


def _build() -> None:
    global _module, _status
    isa = select_isa()
    try:
        path = _library_path(_compiler() or "c++", isa)
        cached = path.exists()
        _module = CpuKernels(build_library(isa), isa)
        _status = KernelStatus("ready", isa.name, time.monotonic() - (_started_at or 0))
        log.info("%s the CPU kernels (%s) in %.1fs", "loaded" if cached else "built", isa.name,
                 _status.seconds)
    except Exception as exc:  # noqa: BLE001 - any build failure means "use the fallback"
        log.warning("shoal CPU kernels unavailable, using PyTorch fallbacks: %s", exc)
        _status = KernelStatus("failed", isa.name, time.monotonic() - (_started_at or 0), str(exc))
    finally:
        _done.set()


def start_build() -> None:
    """Begins building (or loading the cached) kernels on a thread; returns at once."""
    global _status, _started_at
    with _lock:
        if _started_at is not None or _done.is_set():
            return
        if not kernels_enabled():
            _status = KernelStatus("disabled")
            _done.set()
            return
        _started_at = time.monotonic()
        _status = KernelStatus("building", select_isa().name)
        threading.Thread(target=_build, name="shoal-kernel-build", daemon=True).start()


def kernel_status() -> KernelStatus:
    """A snapshot; `seconds` of a running build counts up."""
    status = _status
    if status.state == "building" and _started_at is not None:
        return KernelStatus("building", status.isa, time.monotonic() - _started_at)
    return status


def load_cpu_kernels() -> CpuKernels | None:
    """The kernels (waiting for their build if one runs), or None if disabled or unbuildable."""
    start_build()
    _done.wait()
    return _module
