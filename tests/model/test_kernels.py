"""The C++ CPU kernels against plain PyTorch on random data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from shoal.model.kernels.cpu import load_cpu_kernels
from shoal.model.layers.rotary import RotaryEmbedding

ops = load_cpu_kernels()
pytestmark = pytest.mark.skipif(ops is None, reason="C++ kernels could not be built here")
BS, KV, GROUP, HD = 16, 3, 3, 64


def _blocked_cache(num_blocks: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_blocks, KV, HD, BS, generator=g),
            torch.randn(num_blocks, KV, BS, HD, generator=g))


def _contiguous_kv(kc: torch.Tensor, vc: torch.Tensor, table: list[int], length: int):
    k = kc[table].permute(1, 0, 3, 2).reshape(KV, len(table) * BS, HD)[:, :length]
    v = vc[table].permute(1, 0, 2, 3).reshape(KV, len(table) * BS, HD)[:, :length]
    return k, v


def test_paged_attention_matches_sdpa_for_a_chunk_with_cached_context():
    kc, vc = _blocked_cache()
    past, n = 21, 30
    table = [5, 9, 2, 40]
    q = torch.randn(n, KV * GROUP, HD)
    out = ops.paged_attention(q, kc, vc, torch.tensor([table]), torch.tensor([0, n]),
                              torch.tensor([past]), 0.125)
    k, v = _contiguous_kv(kc, vc, table, past + n)
    mask = torch.ones(n, past + n, dtype=torch.bool).tril(past)
    ref = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask,
                                         scale=0.125, enable_gqa=True)[0].transpose(0, 1)
    assert torch.allclose(out, ref, atol=1e-5)


def test_paged_attention_result_is_independent_of_batch_and_chunking():
    kc, vc = _blocked_cache(seed=1)
    table = [3, 7, 11]
    q = torch.randn(40, KV * GROUP, HD)
    whole = ops.paged_attention(q, kc, vc, torch.tensor([table]), torch.tensor([0, 40]),
                                torch.tensor([0]), 0.125)
    # The same queries split into chunks of 13 + 27, batched with an unrelated sequence.
    other_q = torch.randn(5, KV * GROUP, HD)
    batch_q = torch.cat([other_q, q[:13]])
    first = ops.paged_attention(batch_q, kc, vc, torch.tensor([[20, 21, 0], table]),
                                torch.tensor([0, 5, 18]), torch.tensor([17, 0]), 0.125)
    second = ops.paged_attention(q[13:], kc, vc, torch.tensor([table]), torch.tensor([0, 27]),
                                 torch.tensor([13]), 0.125)
    assert torch.equal(torch.cat([first[5:], second]), whole)


@pytest.mark.parametrize("window", [0, 21])
def test_a_long_prompt_attends_like_sdpa_and_each_query_as_if_decoded_alone(window):
    """Many tiles and blocks (the row-group and partial-block paths, the vector softmax),
    a sliding window or none; a NaN in a slot no query may see yet must not leak."""
    kc, vc = _blocked_cache(num_blocks=16, seed=4)
    n, table = 150, [12, 3, 7, 0, 9, 14, 1, 5, 2, 10]
    kc[table[n // BS], :, :, n % BS + 1] = float("nan")   # slots past the last query
    vc[table[n // BS], :, n % BS + 1, :] = float("nan")
    q = torch.randn(n, KV * GROUP, HD, generator=torch.Generator().manual_seed(5))
    whole = ops.paged_attention(q, kc, vc, torch.tensor([table]), torch.tensor([0, n]),
                                torch.tensor([0]), 0.125, window)
    k, v = _contiguous_kv(kc, vc, table, n)
    pos = torch.arange(n)
    mask = pos[None, :] <= pos[:, None]
    if window:
        mask &= pos[None, :] > pos[:, None] - window
    ref = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], attn_mask=mask,
                                         scale=0.125, enable_gqa=True)[0].transpose(0, 1)
    assert torch.allclose(whole, ref, atol=1e-5)
    for i in (0, 15, 16, 47, 100, 149):   # as a decode step: one query, its position
        one = ops.paged_attention(q[i:i + 1], kc, vc, torch.tensor([table]), torch.tensor([0, 1]),
                                  torch.tensor([i]), 0.125, window)
        assert torch.equal(one, whole[i:i + 1])


def test_write_kv_places_rows_in_the_blocked_layout():
    kc, vc = torch.zeros(8, KV, HD, BS), torch.zeros(8, KV, BS, HD)
    k, v = torch.randn(3, KV, HD), torch.randn(3, KV, HD)
    slots = torch.tensor([2 * BS + 5, 7 * BS + 0, 1 * BS + 15])
    ops.write_kv(k, v, kc, vc, slots)
    for i, slot in enumerate(slots.tolist()):
        block, offset = divmod(slot, BS)
        assert torch.equal(kc[block, :, :, offset], k[i])
        assert torch.equal(vc[block, :, offset, :], v[i])


@pytest.mark.parametrize("rows", [1, 2, 3, 7])
def test_small_int8_matmul_is_bit_identical_to_int_mm(rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randint(-127, 128, (rows, 576), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (1000, 576), dtype=torch.int8, generator=g)
    assert torch.equal(ops.int8_matmul_small(x, w), torch._int_mm(x, w.t()))


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True])
def test_the_fused_small_linear_is_bit_identical_to_its_two_steps(rows, with_bias):
    g = torch.Generator().manual_seed(7 + rows)
    x = torch.randint(-127, 128, (rows, 576), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (1000, 576), dtype=torch.int8, generator=g)
    xs, ws = torch.rand(rows, 1, generator=g), torch.rand(1000, generator=g)
    bias = torch.randn(1000, generator=g) if with_bias else torch.empty(0)
    two_steps = ops.dequant_rows(ops.int8_matmul_small(x, w), xs, ws, bias)
    assert torch.equal(ops.int8_linear_small(x, xs, w, ws, bias), two_steps)


def _reference_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(x / scale).clamp(-127, 127).to(torch.int8), scale


def test_fused_norm_quantize_silu_and_dequantize_match_pytorch():
    torch.manual_seed(0)
    x, residual = torch.randn(5, 576), torch.randn(5, 576)
    weight = torch.rand(576) + 0.5
    updated = residual.clone()
    q, scale = ops.rms_norm_quant(x, updated, weight, 1e-5, True)
    h = residual + x
    expected_q, expected_scale = _reference_quant(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * weight)
    assert torch.allclose(updated, h)
    assert torch.allclose(scale, expected_scale, rtol=1e-5)
    assert (q.int() - expected_q.int()).abs().max() <= 1 and (q != expected_q).float().mean() < 0.01
    gate_up, inv = torch.randn(4, 2 * 96), torch.rand(96) + 0.5
    q2, scale2 = ops.silu_mul_quant(gate_up, inv)
    eq2, es2 = _reference_quant(F.silu(gate_up[:, :96]) * gate_up[:, 96:] * inv)
    assert torch.allclose(scale2, es2, rtol=1e-5) and (q2.int() - eq2.int()).abs().max() <= 1
    acc = torch.randint(-5000, 5000, (4, 30), dtype=torch.int32)
    xs, ws, bias = torch.rand(4, 1), torch.rand(30), torch.randn(30)
    assert torch.allclose(ops.dequant_rows(acc, xs, ws, bias), acc.float() * xs * ws + bias, atol=1e-3)


def test_rope_split_matches_the_python_rotary_embedding():
    rope = RotaryEmbedding(HD, 128, 10000.0, None)
    heads = KV * GROUP
    qkv = torch.randn(4, (heads + 2 * KV) * HD)
    positions = torch.tensor([0, 5, 77, 127])
    q, k, v = ops.rope_split(qkv, positions, rope.cos, rope.sin, heads, KV, HD)
    cos, sin = rope.tables(positions)
    assert torch.allclose(q, rope.apply(qkv[:, : heads * HD].view(4, heads, HD), cos, sin), atol=1e-6)
    assert torch.allclose(k, rope.apply(qkv[:, heads * HD:(heads + KV) * HD].view(4, KV, HD), cos, sin), atol=1e-6)
    assert torch.equal(v, qkv[:, (heads + KV) * HD:].reshape(4, KV, HD))


@pytest.mark.parametrize("settings", [
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
    dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.0),
    dict(temperature=0.7, top_k=0, top_p=0.95, min_p=0.0),
    dict(temperature=1.3, top_k=0, top_p=1.0, min_p=0.05),
    dict(temperature=0.5, top_k=3, top_p=0.5, min_p=0.2),
])
@pytest.mark.parametrize("shape", ["random", "vocabulary-sized"])
def test_cpp_row_sampler_draws_what_the_pytorch_sampler_draws(settings, shape):
    """Random logits, and rows of a real vocabulary's size shaped as a model's (a few likely
    tokens over a long tail): at 0.7 / 0.95 the nucleus is found among the tokens near the
    likeliest (most rows), in the top 1,024 (the last row) or over the whole row (rows 12-14)."""
    from shoal.engine.sampling.filters import RandomRowParams, sample_random

    g = torch.Generator().manual_seed(11)
    if shape == "random":
        logits = torch.randn(16, 5000, generator=g) * 3
    else:
        logits = torch.randn(16, 49152, generator=g)
        for r in range(15):
            logits[r, torch.randint(0, 49152, (3 + 40 * r,), generator=g)] += 12.0 - 0.6 * r
        # one likely token, and 800 each 2^-13 as likely (at 0.7) that top_p 0.95 needs
        logits[15, :800] = 7.7
        logits[15, 900] = 14.0
    rows = 16
    params = RandomRowParams([settings["temperature"]] * rows, [settings["top_k"]] * rows,
                             [settings["top_p"]] * rows, [settings["min_p"]] * rows,
                             torch.randint(0, 1 << 31, (rows,), generator=g).tolist())
    expected = sample_random(logits, params)
    got = ops.sample_rows(logits, torch.tensor(params.temperatures), torch.tensor(params.top_ks),
                          torch.tensor(params.top_ps, dtype=torch.float64),
                          torch.tensor(params.min_ps), torch.tensor(params.random_bits))
    assert torch.equal(got, expected)


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """PyTorch's causal attention of one sequence: q [n, H, hd], k and v [n, KV, hd]."""
    return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                          v.transpose(0, 1)[None], is_causal=True, scale=scale,
                                          enable_gqa=True)[0].transpose(0, 1)


def test_bfloat16_cache_round_trips_and_attends_like_sdpa_on_rounded_values():
    kc = torch.zeros(8, KV, HD, BS, dtype=torch.bfloat16)
    vc = torch.zeros(8, KV, BS, HD, dtype=torch.bfloat16)
    n = 20
    k, v = torch.randn(n, KV, HD), torch.randn(n, KV, HD)
    table = [3, 5]
    slots = torch.tensor([table[t // BS] * BS + t % BS for t in range(n)])
    ops.write_kv(k, v, kc, vc, slots)
    assert torch.equal(kc[3, :, :, 4], k[4].to(torch.bfloat16))   # round to nearest even
    q = torch.randn(n, KV * GROUP, HD)
    out = ops.paged_attention(q, kc, vc, torch.tensor([table]), torch.tensor([0, n]),
                              torch.tensor([0]), 0.125)
    kr, vr = k.to(torch.bfloat16).float(), v.to(torch.bfloat16).float()
    ref = _causal_sdpa(q, kr, vr, 0.125)
    assert torch.allclose(out, ref, atol=1e-5)


def test_float16_cache_round_trips_and_attends_like_sdpa_on_rounded_values():
    kc = torch.zeros(8, KV, HD, BS, dtype=torch.float16)
    vc = torch.zeros(8, KV, BS, HD, dtype=torch.float16)
    n = 37
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(n, KV, HD, generator=g), torch.randn(n, KV, HD, generator=g)
    # Values float16 cannot hold exactly (ties, subnormals, beyond its range) round as torch's
    k[0, 0, :4] = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 3e-6, 7e4])
    table = [3, 5, 6]
    slots = torch.tensor([table[t // BS] * BS + t % BS for t in range(n)])
    ops.write_kv(k, v, kc, vc, slots)
    assert torch.equal(kc[3, :, :, 4], k[4].to(torch.float16))
    assert torch.equal(kc[3, 0, :4, 0], k[0, 0, :4].to(torch.float16))   # round to nearest even
    assert torch.equal(vc[6, :, n - 33], v[n - 1].to(torch.float16))
    k[0, 0, 3] = 0.5                                    # keep the reference finite below
    ops.write_kv(k[:1], v[:1], kc, vc, slots[:1])
    q = torch.randn(n, KV * GROUP, HD, generator=g)
    out = ops.paged_attention(q, kc, vc, torch.tensor([table]), torch.tensor([0, n]),
                              torch.tensor([0]), 0.125)
    kr, vr = k.to(torch.float16).float(), v.to(torch.float16).float()
    ref = _causal_sdpa(q, kr, vr, 0.125)
    assert torch.allclose(out, ref, atol=1e-5)
    # A float32 cache holding the same rounded values gives the same bits: float16 is only
    # widened on load.
    kf, vf = kc.float(), vc.float()
    assert torch.equal(ops.paged_attention(q, kf, vf, torch.tensor([table]), torch.tensor([0, n]),
                                           torch.tensor([0]), 0.125), out)


@pytest.mark.parametrize(("name", "flags", "needs"), [
    ("x86-64-v4-vnni", ("-march=x86-64-v4", "-mavx512vnni"), {"avx512bw", "avx512vl", "avx512_vnni"}),
    ("x86-64-v3", ("-march=x86-64-v3",), {"avx2", "f16c", "fma", "bmi2"}),    # F16C
    ("x86-64-v2", ("-march=x86-64-v2",), {"sse4_2"}),                         # software
])
def test_every_isa_build_stores_float16_as_torch_does_and_widens_it_exactly(name, flags, needs):
    from shoal.model.kernels.cpu import CpuKernels, Isa, _cpu_flags, build_library

    if not needs <= _cpu_flags():
        pytest.skip(f"this CPU cannot run {name}")
    build = Isa(name, flags)
    kernels = CpuKernels(build_library(build), build)
    g = torch.Generator().manual_seed(4)
    n = 40
    k, v = torch.randn(n, KV, HD, generator=g) * 30, torch.randn(n, KV, HD, generator=g) * 1e-4
    kc = torch.zeros(8, KV, HD, BS, dtype=torch.float16)
    vc = torch.zeros(8, KV, BS, HD, dtype=torch.float16)
    table = [7, 1, 4]
    slots = torch.tensor([table[t // BS] * BS + t % BS for t in range(n)])
    kernels.write_kv(k, v, kc, vc, slots)
    assert torch.equal(kc[1, :, :, 3], k[19].to(torch.float16))
    assert torch.equal(vc[4, :, 7], v[39].to(torch.float16))     # subnormals among them
    q = torch.randn(n, KV * GROUP, HD, generator=g)
    args = (torch.tensor([table]), torch.tensor([0, n]), torch.tensor([0]), 0.125)
    assert torch.equal(kernels.paged_attention(q, kc, vc, *args),
                       kernels.paged_attention(q, kc.float(), vc.float(), *args))


def test_a_killed_build_leaves_nothing_the_next_start_trusts(tmp_path) -> None:
    """A first-run build killed half-way (Ctrl-C) leaves a lock file and a half-built
    directory; the next start must neither wait for the lock nor load the half-built library."""
    import subprocess
    import sys

    from shoal.model.kernels import cpu as cpu_kernels

    if cpu_kernels.load_cpu_kernels() is None:
        pytest.skip("no C++ toolchain: the kernels are not built here")
    cache = tmp_path / "kernels"
    target = cpu_kernels.cache_root()   # this process's cache; the child gets an empty one
    env = {**os.environ, "SHOAL_KERNEL_CACHE": str(cache)}
    code = ("from shoal.model.kernels import cpu; import sys; "
            "print(cpu._library_path(cpu._compiler(), cpu.select_isa()))")
    lib = Path(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, check=True).stdout.strip())
    cache.mkdir()
    lib.with_suffix(".lock").touch()
    (cache / ".build-killed").mkdir()
    (cache / ".build-killed" / "lib.so").write_bytes(b"half a library")
    code = ("from shoal.model.kernels.cpu import load_cpu_kernels, kernel_status; "
            "assert load_cpu_kernels() is not None, kernel_status()")
    result = subprocess.run([sys.executable, "-c", code], env=env, timeout=300,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert lib.exists() and target != cache


@pytest.mark.parametrize(("flags", "expected"), [
    ({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "bmi1", "bmi2",
      "movbe", "f16c", "avx512_vnni"}, ("x86-64-v4-vnni", "-march=x86-64-v4")),
    ({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma", "bmi1", "bmi2",
      "movbe", "f16c", "avx512_vnni", "amx_tile", "amx_int8"}, ("x86-64-v4-amx", "-march=x86-64-v4")),
    ({"avx2", "fma", "bmi1", "bmi2", "movbe", "f16c", "sse4_2", "ssse3", "popcnt"},
     ("x86-64-v3", "-march=x86-64-v3")),
    # AVX-VNNI without AVX-512 (Alder Lake and later): a 256-bit VNNI variant of its own
    ({"avx2", "fma", "bmi1", "bmi2", "movbe", "f16c", "avx_vnni"},
     ("x86-64-v3-avxvnni", "-march=x86-64-v3")),
    ({"sse4_2", "ssse3", "popcnt"}, ("x86-64-v2", "-march=x86-64-v2")),
    (set(), ("x86-64", "-march=x86-64")),
])
def test_the_instruction_set_follows_the_cpu_that_runs_and_never_native(flags, expected) -> None:
    from shoal.model.kernels.cpu import select_isa

    isa = select_isa(flags, "x86_64")
    assert (isa.name, isa.flags[0]) == expected
    assert not any("native" in flag for flag in isa.flags)
    # An AVX2 machine sharing a cache with an AVX-512 one gets a library of its own.
    assert select_isa(set(), "aarch64").flags == ()


def test_the_variant_this_cpu_got_runs_here() -> None:
    from shoal.model.kernels.cpu import kernel_status, select_isa

    assert kernel_status().state == "ready"
    assert kernel_status().isa == select_isa().name
    assert ops.path.name.startswith(f"shoal_cpu_{select_isa().name}_")


def test_argmax_rows_answers_as_torch_argmax():
    """The sampler's C++ argmax: the first maximum on ties, the first NaN when there is one,
    -inf rows, and widths that are not a multiple of its 16 lanes."""
    ops = load_cpu_kernels()
    g = torch.Generator().manual_seed(3)
    for width in (1, 7, 16, 33, 49152):
        x = torch.randn(9, width, generator=g)
        if width > 1:
            x[1, :] = 0.5                                   # all equal: index 0
            x[2, width // 2] = x[2, -1] = 100.0             # a tie: the first one
            x[3, :] = -torch.inf
            x[4, width - 1] = torch.nan                     # NaN wins, as torch's argmax
            x[5, min(3, width - 1)] = torch.nan
            x[5, width - 1] = torch.nan
            x[6] = torch.randint(0, 3, (width,), generator=g).float()   # many ties
        assert torch.equal(ops.argmax_rows(x), x.argmax(dim=1)), width


# ----- the encoder's pass on the work pool (encoder_ops.cpp) ----------------------------

@pytest.mark.skipif(ops is None or not ops.int8_gemm_ready, reason="no AMX on this CPU")
@pytest.mark.parametrize(("rows", "k", "n"), [(1, 384, 1152), (15, 384, 384), (17, 64, 16),
                                              (400, 384, 1536), (413, 1536, 48)])
def test_amx_int8_gemm_gives_the_integers_int_mm_gives(rows, k, n):
    """Every row count (short last tiles included), one and two tiles across: exact sums."""
    g = torch.Generator().manual_seed(rows + n)
    x = torch.randint(-128, 128, (rows, k), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    assert torch.equal(ops.int8_gemm(x, ops.int8_gemm_pack(w)).long(), x.long() @ w.long().t())


def test_int8_gemm_refuses_what_its_tiles_cannot_hold():
    with pytest.raises(ValueError, match="multiple of 16"):
        ops.int8_gemm_pack(torch.zeros(20, 64, dtype=torch.int8))
    with pytest.raises(ValueError, match="multiple of 16, K of 64"):
        ops.int8_gemm_pack(torch.zeros(16, 100, dtype=torch.int8))
    if not ops.int8_gemm_ready:
        with pytest.raises(ValueError, match="no AMX"):
            ops.int8_gemm(torch.zeros(4, 64, dtype=torch.int8), ops.int8_gemm_pack(
                torch.zeros(16, 64, dtype=torch.int8)))


def test_encoder_attention_matches_sdpa_per_input():
    H, D = 12, 32
    lengths = [3, 3, 5, 9, 9, 9, 17, 130]
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(sum(lengths), 3 * H * D, generator=g)
    runs, first = [], 0
    for length in lengths:
        if runs and runs[-1][2] == length:
            runs[-1][1] += 1
        else:
            runs.append([first, 1, length])
        first += length
    got = ops.encoder_attention(qkv, [tuple(r) for r in runs], H, D, D ** -0.5)
    row = 0
    for length in lengths:
        heads = qkv[row:row + length].view(length, 3, H, D).permute(1, 2, 0, 3)
        want = F.scaled_dot_product_attention(heads[0], heads[1], heads[2])
        torch.testing.assert_close(got[row:row + length], want.transpose(0, 1).reshape(length, H * D),
                                   atol=5e-6, rtol=1e-5)
        row += length
    with pytest.raises(ValueError, match="cover the rows"):
        ops.encoder_attention(qkv, [(0, 2, 3)], H, D, 1.0)


def test_add_layer_norm_matches_torch_and_works_in_place():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(37, 384, generator=g) * 3, torch.randn(37, 384, generator=g)
    weight, bias = torch.rand(384, generator=g) + 0.5, torch.randn(384, generator=g)
    want = F.layer_norm(x + y, (384,), weight, bias, 1e-12)
    out = ops.add_layer_norm(x, y, weight, bias, 1e-12)
    assert out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
