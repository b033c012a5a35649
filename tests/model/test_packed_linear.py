"""Packed GGUF weights (Q4_0, Q4_1, Q8_0) with per-block int8 activations: the C++ kernels
of every instruction set this CPU runs against the PyTorch twin, bit for bit; batch
invariance; the packed recipe on tiny and real models."""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

import pytest
import tiny_models
import torch

from shoal.model.full_sequence import forward_single_sequence
from shoal.model.kernels.cpu import (
    CpuKernels,
    Isa,
    _cpu_flags,
    build_library,
    load_cpu_kernels,
)
from shoal.model.layers.packed import (
    PACKED_TYPES,
    PackedLinear,
    PackedWeight,
    quant_blocks_torch,
    repack,
    unpack,
)
from shoal.model.loaders.dequant import dequantize

pytestmark = pytest.mark.skipif(load_cpu_kernels() is None, reason="no C++ compiler")

TYPES = sorted(PACKED_TYPES)   # GGML ids of Q4_0, Q4_1, Q8_0


def _variants() -> list[Isa]:
    """Every build of the kernels this CPU can run, best first: each SIMD path and scalar."""
    flags = _cpu_flags()
    out = []
    if {"amx_tile", "amx_int8", "avx512_vnni", "avx512vl", "avx512bw"} <= flags:
        out.append(Isa("x86-64-v4-amx", ("-march=x86-64-v4", "-mavx512vnni", "-mamx-tile",
                                         "-mamx-int8")))   # tiles for 8+ rows
    if {"avx512_vnni", "avx512vl", "avx512bw"} <= flags:
        out.append(Isa("x86-64-v4-vnni", ("-march=x86-64-v4", "-mavx512vnni")))
    if {"avx_vnni", "avx2", "f16c"} <= flags:
        out.append(Isa("x86-64-v3-avxvnni", ("-march=x86-64-v3", "-mavxvnni")))
    if {"avx2", "f16c", "fma", "bmi2"} <= flags:
        out.append(Isa("x86-64-v3", ("-march=x86-64-v3",)))   # AVX2 maddubs
    if "sse4_2" in flags:
        out.append(Isa("x86-64-v2", ("-march=x86-64-v2",)))   # no AVX2: the scalar path
    return out


@pytest.fixture(scope="module", params=[isa.name for isa in _variants()])
def variant(request) -> CpuKernels:
    isa = next(i for i in _variants() if i.name == request.param)
    return CpuKernels(build_library(isa), isa)


def random_packed(ggml_type: int, n: int, k: int, seed: int = 0) -> PackedWeight:
    """Random block bytes with sane fp16 scales (mins of either sign for Q4_1)."""
    g = torch.Generator().manual_seed(seed)
    _, block_bytes, nscales = PACKED_TYPES[ggml_type]
    raw = torch.randint(0, 256, (n, k // 32, block_bytes), dtype=torch.uint8, generator=g)
    scales = torch.rand(n, k // 32, nscales, generator=g) * 0.02
    if nscales == 2:
        scales[..., 1] -= 0.01
    raw[:, :, :2 * nscales] = scales.to(torch.float16).view(torch.uint8).reshape(n, k // 32, -1)
    return PackedWeight(ggml_type, raw.reshape(n, -1))


@pytest.mark.parametrize("ggml_type", TYPES)
def test_repacked_tiles_hold_exactly_the_files_values(ggml_type):
    weight = random_packed(ggml_type, 21, 96)   # 21 rows: the last tile is padded
    expected = dequantize(weight.data.reshape(-1), ggml_type, weight.shape)
    layer = PackedLinear(weight)
    vals, d, m = unpack(layer.tiles, ggml_type, 21)
    restored = d.repeat_interleave(32, 1) * vals.float()
    if m is not None:
        restored = restored + m.repeat_interleave(32, 1)
    assert torch.equal(restored, expected)
    rows = torch.tensor([[0, 20], [7, 8]])
    assert torch.equal(layer.dequantized_rows(rows), expected[rows])
    kernels = load_cpu_kernels()
    if kernels is not None:     # the embedding lookup's kernel: the same floats
        layer.kernels = kernels
        assert torch.equal(layer.dequantized_rows(rows), expected[rows])
        with pytest.raises(ValueError, match="outside the weight"):
            layer.dequantized_rows(torch.tensor([24]))


# (out, in, rows): an even and an odd count of 8-row groups and of blocks; prompt-sized
# batches cross the AMX path's 64-row chunks and end in a short 16-row tile; a weight too
# big to unpack whole (over 2 MB a thread: an output head's path).
SHAPES = [(45, 160, (1, 2, 3, 5, 8, 17, 37)), (37, 96, (16, 64, 65, 150)), (4200, 1024, (80,))]


@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("n, k, batches", SHAPES)
def test_every_isa_variant_matches_the_pytorch_twin_bit_for_bit(variant, ggml_type, n, k, batches):
    layer = PackedLinear(random_packed(ggml_type, n, k, seed=ggml_type),
                         bias=torch.randn(n, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(max(batches), k, generator=torch.Generator().manual_seed(2)) * 3
    x[3, :32] = 0.0                               # an all-zero block: scale 0
    x[5, 40] = 200.0                              # an outlier confined to its block
    q, d, s = quant_blocks_torch(x)
    q2, d2, s2 = variant.quant_blocks(x)
    assert torch.equal(q, q2) and torch.equal(d, d2) and torch.equal(s, s2)
    twin = layer.forward_quantized(q, d, s)       # no kernels set: PyTorch
    for rows in batches:
        got = variant.packed_linear(ggml_type, layer.tiles, n, k, q[:rows], d[:rows], s[:rows],
                                    layer.bias)
        assert torch.equal(got, twin[:rows]), f"{variant.isa.name}, {rows} rows"
    # and it is the matmul it stands for, to within the activations' rounding
    weight = dequantize(layer_bytes(layer, ggml_type, n, k), ggml_type, (n, k))
    reference = x @ weight.t() + layer.bias
    keep = torch.arange(len(x)) != 5              # the outlier's row rounds coarsely
    assert (twin - reference)[keep].abs().max() < 0.02 * reference.abs().max()


def layer_bytes(layer: PackedLinear, ggml_type: int, n: int, k: int) -> torch.Tensor:
    """The GGUF bytes back from the tiles (through the numbers), for the float reference."""
    vals, d, m = unpack(layer.tiles, ggml_type, n)
    blocks = [d.to(torch.float16).view(torch.uint8).reshape(n, -1, 2)]
    if m is not None:
        blocks.append(m.to(torch.float16).view(torch.uint8).reshape(n, -1, 2))
    v = vals.reshape(n, -1, 32)
    if ggml_type == 8:
        blocks.append(v.to(torch.int8).view(torch.uint8))
    else:
        v = (v + 8 if ggml_type == 2 else v).to(torch.uint8)
        blocks.append(v[:, :, :16] | (v[:, :, 16:] << 4))
    return torch.cat(blocks, dim=2).reshape(-1)


@pytest.mark.parametrize("ggml_type", TYPES)
def test_a_rows_result_does_not_depend_on_its_batch(ggml_type):
    ops = load_cpu_kernels()
    n, k = 3 * 8 * 11 + 5, 576
    layer = PackedLinear(random_packed(ggml_type, n, k, seed=7))
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(3))
    q, d, s = ops.quant_blocks(x)
    full = ops.packed_linear(ggml_type, layer.tiles, n, k, q, d, s, None)
    for start, rows in ((0, 1), (9, 1), (4, 2), (13, 4), (1, 16), (7, 33)):
        part = ops.packed_linear(ggml_type, layer.tiles, n, k, q[start:start + rows],
                                 d[start:start + rows], s[start:start + rows], None)
        assert torch.equal(part, full[start:start + rows])


def test_fused_norm_and_activation_quantizers_match_pytorch():
    ops = load_cpu_kernels()
    g = torch.Generator().manual_seed(5)
    x, residual, weight = (torch.randn(6, 96, generator=g), torch.randn(6, 96, generator=g),
                           torch.rand(96, generator=g) + 0.5)
    eps = 1e-5

    def close(got, want):
        assert torch.allclose(got[1], want[1], rtol=1e-5)
        assert (got[0].int() - want[0].int()).abs().max() <= 1   # a tie may round either way

    h = residual + x
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight
    r = residual.clone()
    close(ops.rms_norm_quant_blocks(x, r, weight, eps, True), quant_blocks_torch(normed))
    assert torch.equal(r, h)
    gate_up = torch.randn(6, 192, generator=g)
    act = torch.nn.functional.silu(gate_up[:, :96]) * gate_up[:, 96:]
    close(ops.act_mul_quant_blocks(gate_up, False), quant_blocks_torch(act))
    act = torch.nn.functional.gelu(gate_up[:, :96], approximate="tanh") * gate_up[:, 96:]
    close(ops.act_mul_quant_blocks(gate_up, True), quant_blocks_torch(act))


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the SiLU kernels follow glibc's expf")
def test_silu_rows_are_those_of_the_c_librarys_expf_bit_for_bit(variant):
    """The MLP's SiLU, x / (1 + expf(-x)) * up: AVX-512 builds compute glibc's expf 8 values at
    a time (common.h), the others call it; either way a row's floats, and so its quantized
    blocks, are those of the C library's expf, including its overflow and underflow ends."""
    expf = ctypes.CDLL(ctypes.util.find_library("m")).expf
    expf.restype, expf.argtypes = ctypes.c_float, [ctypes.c_float]
    g = torch.Generator().manual_seed(11)
    edges = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 87.9, 88.0, 88.5, 88.7228, 88.72284, 88.73, 89.0,
                          103.0, 103.5, 104.0, 120.0, 1e30])
    gate = torch.cat([torch.randn(4000, generator=g) * 4, torch.randn(2000, generator=g) * 40,
                      edges, -edges])
    gate = torch.cat([gate, torch.zeros(-len(gate) % 64)]).reshape(-1, 64)
    up = torch.randn(gate.shape, generator=g)
    e = torch.tensor([expf(-x) for x in gate.reshape(-1).tolist()]).reshape(gate.shape)
    want = gate / (1.0 + e) * up                  # float32, one rounding per operation
    got = variant.act_mul_quant_blocks(torch.cat([gate, up], dim=1), False)
    for a, b in zip(got, quant_blocks_torch(want)):
        assert torch.equal(a, b)


def test_the_repacked_layout_puts_four_values_of_each_row_in_one_dword():
    # 8 rows, one block; row r's element k is (r + k) % 16.
    vals = (torch.arange(8)[:, None] + torch.arange(32)[None, :]) % 16
    raw = torch.zeros(8, 18, dtype=torch.uint8)   # Q4_0: scale 0, then the nibbles
    raw[:, 2:] = (vals[:, :16] | (vals[:, 16:] << 4)).to(torch.uint8)
    tiles = repack(PackedWeight(2, raw))
    regs = tiles[0, 0, 16:].reshape(4, 8, 4)      # chunk c: registers c (low) and c + 4 (high)
    assert torch.equal((regs & 0x0F)[1, 3], vals[3, 4:8].to(torch.uint8))
    assert torch.equal((regs >> 4)[1, 3], vals[3, 20:24].to(torch.uint8))


@pytest.mark.parametrize(("arch", "qtype"), [("llama", "Q4_0"), ("qwen2", "Q4_1"),
                                              ("llama", "Q8_0")])
def test_the_packed_recipe_runs_a_tiny_gguf_close_to_exact_mode(tmp_path, arch, qtype):
    from shoal import LLM, SamplingParams

    path = tmp_path / f"tiny-{arch}.{qtype}.gguf"
    tiny_models.write_gguf_model(path, arch, weight_type=getattr(tiny_models.GGMLQuantizationType, qtype))
    packed = LLM(str(path), compute="fast", fast_weights="packed")
    exact = LLM(str(path), compute="exact")
    assert packed.info.fast_weights == "packed"
    assert isinstance(packed.engine.runner.model.lm_head, PackedLinear)
    ids = list(range(3, 40))
    lp, le = (llm.engine.runner.model.compute_logits(
        forward_single_sequence(llm.engine.runner.model, ids)) for llm in (packed, exact))
    assert (lp.argmax(-1) == le.argmax(-1)).float().mean() > 0.9
    # batched with others or alone, the same greedy tokens
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = packed.generate([ids[:9]], params)[0].outputs[0].token_ids
    together = packed.generate([ids[5:30], ids[:9], ids[2:5]], params)[1].outputs[0].token_ids
    assert alone == together
    # without the C++ kernels (SHOAL_CPU_KERNELS=0), the PyTorch twin gives the same logits
    model = packed.engine.runner.model
    with_kernels = model.compute_logits(forward_single_sequence(model, ids))
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    saved = [m.kernels for m in layers]
    try:
        for m in layers:
            m.kernels = None
        assert torch.equal(model.compute_logits(forward_single_sequence(model, ids)), with_kernels)
    finally:
        for m, k in zip(layers, saved):
            m.kernels = k


def test_smollm2_packed_greedy_answers_do_not_depend_on_the_batch(smollm2_path):
    from shoal import LLM, SamplingParams

    llm = LLM(str(smollm2_path), compute="fast", fast_weights="packed", max_num_seqs=8)
    assert llm.info.fast_weights == "packed" and llm.info.quantization == "Q4_1"
    linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, PackedLinear)]
    assert {m.type_name for m in linears} == {"Q4_1", "Q8_0"}   # the tied head is Q8_0
    params = SamplingParams(temperature=0, max_tokens=16)
    chats = [[{"role": "user", "content": q}] for q in
             ("What is the capital of France?", "Name three rivers.", "Describe a cat.",
              "Why is the sky blue?", "What is 12 times 12?")]
    together = [r.outputs[0].token_ids for r in llm.chat(chats, params)]
    for i in (0, 3):
        assert llm.chat(chats[i], params)[0].outputs[0].token_ids == together[i]
    assert llm.chat(chats[1:3], params)[1].outputs[0].token_ids == together[2]


def test_the_recipe_setting_is_checked_and_read_from_the_environment():
    from shoal.core.config import EngineConfig
    from shoal.core.errors import InvalidParameterError

    assert EngineConfig().fast_weights == "packed"
    assert EngineConfig.from_env({"SHOAL_FAST_WEIGHTS": "int8"}).fast_weights == "int8"
    with pytest.raises(InvalidParameterError, match="fast_weights"):
        EngineConfig(fast_weights="q4")


def test_packed_linears_keep_the_kernels_when_attention_runs_in_pytorch(tiny_llama_gguf):
    from shoal import LLM, SamplingParams

    llm = LLM(str(tiny_llama_gguf), compute="fast", attention_backend="torch")
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, PackedLinear)]
    assert llm.info.fast_weights == "packed" and layers
    assert all(m.kernels is not None for m in layers)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], params)[0].outputs[0].token_ids
    assert llm.generate([[9, 9, 9, 9, 9], [5, 6, 7]], params)[1].outputs[0].token_ids == alone


@pytest.mark.parametrize("ggml_type", TYPES)
def test_the_cpp_repacking_is_the_pytorch_one(ggml_type):
    weight = random_packed(ggml_type, 29, 96, seed=11)
    tiles = repack(weight)
    assert torch.equal(load_cpu_kernels().packed_repack(ggml_type, weight.data, *tiles.shape), tiles)


@pytest.mark.parametrize(("arch", "qtype", "kv_dtype"), [
    ("llama", "Q4_0", "auto"), ("qwen2", "Q4_1", "auto"), ("llama", "Q8_0", "auto"),
    ("llama", "Q4_1", "float16"), ("llama", "Q4_1", "float32")])
def test_the_one_call_layer_stack_is_the_per_op_path_bit_for_bit(tmp_path, arch, qtype, kv_dtype):
    """decoder_stack.cpp runs every layer in one C++ call; its logits (here: every returned
    log-probability) and tokens equal the Python-driven per-op path's, prefill and decode,
    alone and batched (qwen2: the QKV bias too), whichever KV cache type the server stores
    (a float16 cache once made the stack refuse to start)."""
    from shoal import LLM, SamplingParams

    path = tmp_path / f"tiny-{arch}.{qtype}.gguf"
    tiny_models.write_gguf_model(path, arch, weight_type=getattr(tiny_models.GGMLQuantizationType, qtype))
    llm = LLM(str(path), compute="fast", fast_weights="packed", kv_cache_dtype=kv_dtype)
    model = llm.engine.runner.model
    assert model.stack is not None and model.stack.kind == "packed"
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=5)
    prompts = [list(range(3, 40)), [5, 6, 7], list(range(11, 30))]

    def run(batch):
        return [(o.outputs[0].token_ids, [(lp.logprob, lp.top) for lp in o.outputs[0].logprobs])
                for o in llm.generate(batch, params)]

    stacked, alone = run(prompts), run(prompts[1:2])
    stack, model.stack = model.stack, None
    try:
        per_op = run(prompts)
    finally:
        model.stack = stack
    assert stacked == per_op
    assert alone[0] == stacked[1]


def test_the_int8_recipe_keeps_the_per_op_path(tiny_llama_gguf):
    from shoal import LLM

    llm = LLM(str(tiny_llama_gguf), compute="fast", fast_weights="int8")
    assert llm.engine.runner.model.fused and llm.engine.runner.model.stack is None


@pytest.mark.parametrize("ggml_type", TYPES)
def test_the_work_pool_gives_openmps_bits_and_shares_itself_between_threads(ggml_type):
    """Decode-sized batches run on the work pool (csrc/pool.h): the same bits as the OpenMP
    split; and threads calling at once (one runs its job alone) get their own results."""
    from concurrent.futures import ThreadPoolExecutor

    ops = load_cpu_kernels()
    n, k = 2056, 192      # 257 groups: chunks of several groups and a short last one
    layer = PackedLinear(random_packed(ggml_type, n, k, seed=5))
    x = torch.randn(8, k)
    q, d, s = ops.quant_blocks(x)

    def run(rows: int) -> torch.Tensor:
        return ops.packed_linear(ggml_type, layer.tiles, n, k, q[:rows], d[:rows], s[:rows], None)

    pooled = [run(rows) for rows in range(1, 9)]
    ops.set_work_pool(False)
    try:
        assert all(torch.equal(run(rows), p) for rows, p in zip(range(1, 9), pooled))
    finally:
        ops.set_work_pool(True)
    with ThreadPoolExecutor(4) as threads:
        for _ in range(5):
            got = list(threads.map(run, [1, 2, 3, 8] * 8))
            assert all(torch.equal(g, pooled[rows - 1]) for g, rows in zip(got, [1, 2, 3, 8] * 8))


def test_a_threads_openmp_team_size_is_its_own():
    """omp_threads_in_this_thread (ModelRunner.step_threads) sizes the OpenMP team of the
    calling thread only: torch's ops started elsewhere keep the process's team."""
    import threading

    ops = load_cpu_kernels()
    process_threads = torch.get_num_threads()
    seen = {}

    def engine_thread() -> None:
        ops.omp_threads_in_this_thread(1)
        seen["inside"] = torch.get_num_threads()
        ops.omp_threads_in_this_thread(process_threads)
        seen["restored"] = torch.get_num_threads()

    def other_thread() -> None:
        ops.omp_threads_in_this_thread(1)
        seen["other"] = torch.get_num_threads()

    for target in (engine_thread, other_thread):
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    assert seen == {"inside": 1, "restored": process_threads, "other": 1}
    assert torch.get_num_threads() == process_threads


def test_a_step_keeps_torchs_ops_on_the_engine_thread(tiny_llama_gguf):
    """With the one-call stack, a step's torch ops run on the engine thread alone (its OpenMP
    team is 1: no worker to wake, none left spinning on the pool's core), and the thread's
    team is back after the step; without the stack, the usual team. Same tokens either way."""
    from shoal import LLM, SamplingParams

    llm = LLM(str(tiny_llama_gguf), compute="fast", fast_weights="packed")
    model = llm.engine.runner.model
    assert model.stack is not None
    teams = []
    compute_logits = model.compute_logits

    def noting_the_team(hidden):
        teams.append(torch.get_num_threads())
        return compute_logits(hidden)

    model.compute_logits = noting_the_team
    process_team = torch.get_num_threads()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    stacked = llm.generate([[5, 6, 7]], params)[0].outputs[0].token_ids
    assert set(teams) == {1} and torch.get_num_threads() == process_team
    teams.clear()
    stack, model.stack = model.stack, None
    try:
        per_op = llm.generate([[5, 6, 7]], params)[0].outputs[0].token_ids
    finally:
        model.stack = stack
    assert per_op == stacked
    assert set(teams) == {process_team}
