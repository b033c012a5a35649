"""Gemma 3 (gemma3:270m-pt, Q4_K_M GGUF) in shoal's engine.

The reference is transformers' Gemma3ForCausalLM holding the same dequantized weights
(float32, eager attention). Exact mode must match its logits within 2e-3, as the Llama
reference tests require, on prompts longer than the sliding window. To keep the default
run short the windowed tests shrink the window (the model does not care which window
it is told); a slow test repeats the comparison with the file's own window of 512.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shoal import LLM, SamplingParams
from shoal.core.config import EngineConfig
from shoal.engine.kv.tensors import allocate_kv_caches
from shoal.engine.model_runner import DirectWork, ModelRunner, TokenSequence
from shoal.model.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig
from shoal.model.decoder import CausalLM
from shoal.model.kernels.cpu import load_cpu_kernels
from shoal.model.layers.attention import AttentionMetadata, PrefillChunk, paged_attention
from shoal.model.loader import model_class_for, open_model

EXACT_ATOL = 2e-3
SMALL_WINDOW = 48
ops = load_cpu_kernels()
needs_kernels = pytest.mark.skipif(ops is None, reason="C++ kernels could not be built here")


# ----- the reference ------------------------------------------------------------------------

def _no_init_weights() -> Any:
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def reference_model(config: ModelConfig, weights) -> torch.nn.Module:
    """transformers' Gemma3ForCausalLM with `config`'s hyper-parameters and these weights."""
    from transformers import Gemma3ForCausalLM as HFGemma3, Gemma3TextConfig

    rope = {FULL_ATTENTION: {"rope_type": "default", **(config.rope_scaling or {}),
                             "rope_theta": config.rope_theta},
            SLIDING_ATTENTION: {"rope_type": "default", "rope_theta": config.rope_local_theta}}
    scalar = config.query_pre_attn_scalar
    hf_config = Gemma3TextConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings, rope_parameters=rope,
        query_pre_attn_scalar=int(scalar) if scalar == int(scalar) else scalar,
        sliding_window=config.sliding_window, layer_types=list(config.layer_types),
        final_logit_softcapping=config.final_logit_softcapping, tie_word_embeddings=True,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=0)
    hf_config._attn_implementation = "eager"
    with _no_init_weights():
        model = HFGemma3(hf_config).to(torch.float32).eval()
    model.tie_weights()
    params = model.state_dict()
    loaded = set()
    with torch.no_grad():
        for name, weight in weights:
            params[name].copy_(weight)
            loaded.add(name)
    missing = {n for n in set(params) - loaded if n != "lm_head.weight"}
    assert not missing, sorted(missing)
    return model


@torch.no_grad()
def reference_logits(model: torch.nn.Module, token_ids: list[int], rows: list[int]) -> torch.Tensor:
    """Logits [len(rows), vocab] at the given positions (the head only where needed)."""
    hidden = model.model(input_ids=torch.tensor([token_ids]), use_cache=False).last_hidden_state[0]
    logits = model.lm_head(hidden[rows]).float()
    cap = model.config.final_logit_softcapping
    return torch.tanh(logits / cap) * cap if cap else logits


@contextlib.contextmanager
def _window(model: CausalLM, window: int) -> Iterator[None]:
    """Temporarily gives every sliding layer of a shoal model another window."""
    saved = [layer.window for layer in model.layers]
    for layer in model.layers:
        layer.window = window if layer.window else 0
    try:
        yield
    finally:
        for layer, old in zip(model.layers, saved):
            layer.window = old


class _Blocks:
    def __init__(self) -> None:
        self.next = 1

    def take(self, num_tokens: int) -> list[int]:
        n = (num_tokens + 15) // 16
        ids = list(range(self.next, self.next + n))
        self.next += n
        return ids


def _runner(model: torch.nn.Module, backend: str, num_blocks: int = 96) -> ModelRunner:
    kernel = backend == "kernel"
    if kernel and ops is None:
        pytest.skip("C++ kernels could not be built here")
    caches = allocate_kv_caches(model.config, num_blocks, 16, torch.float32, torch.device("cpu"),
                                blocked=kernel)
    return ModelRunner(model, caches, 16, torch.device("cpu"), use_kernels=kernel)


def _check_against_reference(runner: ModelRunner, reference: torch.nn.Module, vocab: int,
                             long_len: int, chunks: tuple[int, ...], decode_steps: int) -> None:
    """A long prompt prefilled in `chunks` (beside a short prompt that decodes meanwhile),
    then decoded; every sampled row's logits against the reference."""
    g = torch.Generator().manual_seed(5)
    low = 300 if vocab > 1000 else 3
    long_ids = [2] + torch.randint(low, vocab - 1, (long_len - 1,), generator=g).tolist()
    short_ids = [2] + torch.randint(low, vocab - 1, (30,), generator=g).tolist()
    blocks = _Blocks()
    seqs = {"long": TokenSequence(list(long_ids)), "short": TokenSequence(list(short_ids))}
    tables = {"long": blocks.take(long_len + decode_steps + 1),
              "short": blocks.take(len(short_ids) + len(chunks) + decode_steps + 1)}
    checked: dict[str, list[tuple[int, torch.Tensor]]] = {"long": [], "short": []}

    def run(works: list[DirectWork]) -> None:
        logits, sampling = runner.execute(works)
        for work, row in zip(sampling, logits):
            name = "long" if work.request is seqs["long"] else "short"
            checked[name].append((len(work.request.all_token_ids) - 1, row))
            work.request.all_token_ids.append(int(row.argmax()))

    # the short prompt is prefilled with the first chunk and decodes beside the others
    start = 0
    for i, n in enumerate(chunks):
        works = [DirectWork(seqs["long"], n, tables["long"], start)]
        short = seqs["short"]
        if i == 0:
            works.append(DirectWork(short, len(short_ids), tables["short"], 0))
        else:
            works.append(DirectWork(short, 1, tables["short"], len(short.all_token_ids) - 1))
        seqs["long"].all_token_ids[:] = long_ids[: start + n] if start + n < long_len else long_ids
        run(works)
        start += n
    assert start == long_len
    for _ in range(decode_steps):
        run([DirectWork(s, 1, tables[k], len(s.all_token_ids) - 1) for k, s in seqs.items()])
    for name, seq in seqs.items():
        rows = [pos for pos, _ in checked[name]]
        expected = reference_logits(reference, seq.all_token_ids[: rows[-1] + 1], rows)
        for (pos, got), ref in zip(checked[name], expected):
            assert torch.allclose(got, ref, atol=EXACT_ATOL), (name, pos, (got - ref).abs().max())


# ----- the real file: config, weights, tokenizer -------------------------------------------

@pytest.fixture(scope="module")
def gemma_source(gemma3_path: Path):
    source = open_model(gemma3_path)
    yield source
    source.close()


def test_gguf_config_and_weights_are_read_as_gemma3(gemma_source) -> None:
    cfg = gemma_source.config
    assert cfg.architecture == "gemma3" and model_class_for(cfg.architecture) is CausalLM
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        640, 18, 4, 1, 256)
    assert cfg.vocab_size == 262144 and cfg.tie_word_embeddings
    assert cfg.sliding_window == 512 and cfg.query_pre_attn_scalar == 256
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling) == (1_000_000.0, 10_000.0, None)
    # every 6th layer is global
    assert [i for i, t in enumerate(cfg.layer_types) if t == FULL_ATTENTION] == [5, 11, 17]
    assert [cfg.layer_window(i) for i in (0, 4, 5, 6)] == [512, 512, 0, 512]
    names = gemma_source.gguf_names
    assert names["model.layers.3.pre_feedforward_layernorm.weight"] == "blk.3.ffn_norm.weight"
    assert names["model.layers.3.post_attention_layernorm.weight"] == "blk.3.post_attention_norm.weight"
    assert names["model.layers.3.post_feedforward_layernorm.weight"] == "blk.3.post_ffw_norm.weight"
    assert names["model.layers.3.self_attn.q_norm.weight"] == "blk.3.attn_q_norm.weight"
    # llama.cpp stores Gemma's norm weights as 1 + w; the source yields HF's w
    info = gemma_source.header.tensors["blk.0.attn_k_norm.weight"]
    with open(gemma_source.path, "rb") as f:
        f.seek(info.offset)
        stored = torch.from_numpy(np.frombuffer(f.read(info.nbytes), "<f4").copy())
    assert torch.equal(gemma_source.get_weight("model.layers.0.self_attn.k_norm.weight"), stored - 1)
    # Q/K are not permuted for Gemma (NEOX RoPE): q_proj is the stored matrix as is
    q = gemma_source.get_weight("model.layers.0.self_attn.q_proj.weight")
    assert q.shape == (1024, 640)


def test_gguf_gemma3_metadata_variants(gemma_source) -> None:
    """The keys newer converters may write, and llama.cpp's defaults where they are absent."""
    from shoal.core.errors import CorruptModelError, UnsupportedModelError

    meta = dict(gemma_source.metadata)

    def config(**changes: Any) -> ModelConfig:
        return ModelConfig.from_gguf_metadata({**meta, **{f"gemma3.{k}": v for k, v in
                                                          changes.items()}}, "m.gguf")

    pattern = [i % 3 != 2 for i in range(18)]          # True = sliding, per layer
    cfg = config(**{"attention.sliding_window_pattern": pattern, "rope.freq_base_swa": 20_000.0,
                    "attention.scale": 0.125, "rope.scaling.type": "linear",
                    "rope.scaling.factor": 8.0})
    assert [t == SLIDING_ATTENTION for t in cfg.layer_types] == pattern
    assert cfg.rope_local_theta == 20_000.0 and cfg.query_pre_attn_scalar == 64.0
    assert cfg.attention_scale == 0.125 and cfg.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert config(**{"attention.sliding_window_pattern": 4}).layer_types.count(FULL_ATTENTION) == 4
    # the 27B model (62 layers) scales by hidden / heads, as llama.cpp does
    assert config(block_count=62).query_pre_attn_scalar == 640 / 4
    with pytest.raises(UnsupportedModelError, match="soft-capping"):
        config(attn_logit_softcapping=50.0)
    with pytest.raises(CorruptModelError, match="sliding_window_pattern has 3 entries"):
        config(**{"attention.sliding_window_pattern": [True, False, True]})
    del meta["gemma3.attention.sliding_window"]
    with pytest.raises(CorruptModelError, match="sliding_window"):
        config()


def test_tokenizer_bos_turn_tokens_and_chat_template(gemma_llm) -> None:
    tok = gemma_llm.tokenizer     # Tokenizer.from_gguf_metadata of the file (no template in it)
    assert tok.encode("Hello world")[0] == 2 == tok.bos_token_id
    start, end = tok.token_to_id("<start_of_turn>"), tok.token_to_id("<end_of_turn>")
    assert (start, end) == (105, 106)
    assert {1, end} <= tok.eos_token_ids
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": " Hi "},
                                    {"role": "assistant", "content": "Hello."},
                                    {"role": "user", "content": "Bye"}])
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                    "<start_of_turn>model\nHello.<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[:3] == [2, start, tok.token_to_id("user")] and ids.count(end) == 3


# ----- exact mode against transformers ------------------------------------------------------

@pytest.fixture(scope="module")
def small_window(gemma_source):
    """(config with a 48-key window, shoal model, transformers reference) on the real weights."""
    config = dataclasses.replace(gemma_source.config, sliding_window=SMALL_WINDOW)
    weights = dict(gemma_source.iter_weights())    # dequantized once for both models
    model = CausalLM(config, weights.items())
    model.eval()
    reference = reference_model(config, weights.items())
    return config, model, reference


@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_exact_logits_match_transformers_beyond_the_sliding_window(small_window, backend) -> None:
    """160 prompt tokens (3x the window) in chunks of 70 + 50 + 40 that cross window and
    block edges, a short prompt decoding beside them, then 4 decode steps each."""
    config, model, reference = small_window
    runner = _runner(model, backend)
    _check_against_reference(runner, reference, config.vocab_size, long_len=160,
                             chunks=(70, 50, 40), decode_steps=4)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["kernel", "torch"])
def test_exact_engine_matches_transformers_with_the_real_window(gemma3_path, gemma_source, backend):
    """The file's own window (512): a 700-token prompt through build_engine_core."""
    from shoal.engine.builder import build_engine_core

    core, _ = build_engine_core(EngineConfig(model=str(gemma3_path), compute="exact",
                                             kv_cache_bytes=128 << 20, attention_backend=backend))
    reference = reference_model(gemma_source.config, gemma_source.iter_weights())
    _check_against_reference(core.runner, reference, gemma_source.config.vocab_size,
                             long_len=700, chunks=(300, 256, 144), decode_steps=3)


# ----- the engine: batch invariance, fast mode, chat ------------------------------------------

@pytest.fixture(scope="module")
def gemma_llm(gemma3_path):
    """Fast mode (the CPU default) with small step budgets, so long prompts are chunked."""
    return LLM(config=EngineConfig(model=str(gemma3_path), compute="fast", kv_cache_bytes=96 << 20,
                                   max_num_batched_tokens=96, max_batched_tokens_while_decoding=40))


def test_greedy_answers_are_identical_alone_and_in_a_mixed_batch(gemma_llm) -> None:
    """A 540-token prompt decodes past the 512-key window; alone, beside three other
    requests (different chunking and step company), and again from the prefix cache."""
    g = torch.Generator().manual_seed(9)
    vocab = gemma_llm.engine.vocab_size
    prompts = [[2] + torch.randint(300, vocab - 1, (n,), generator=g).tolist()
               for n in (539, 250, 17, 3)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = gemma_llm.generate([{"prompt_token_ids": prompts[0]}], params)[0].outputs[0].token_ids
    second = gemma_llm.generate([{"prompt_token_ids": prompts[1]}], params)[0].outputs[0].token_ids
    batch = gemma_llm.generate([{"prompt_token_ids": p} for p in reversed(prompts)], params)
    together = {len(r.prompt_token_ids): r.outputs[0].token_ids for r in batch}
    assert together[540] == alone
    assert together[251] == second
    again = gemma_llm.generate([{"prompt_token_ids": prompts[0]}], params)[0].outputs[0].token_ids
    assert again == alone
    assert gemma_llm.engine.scheduler.kv.num_used_blocks == 0


def test_chat_stops_at_end_of_turn_with_a_sensible_answer(gemma_llm) -> None:
    """gemma3:270m-pt is Google's *pretrained* (base) checkpoint: it knows the turn format only
    from context and puts <end_of_turn> ~10 logits below its top choice where a turn ends
    (transformers computes the same logits). A +12 logit bias on <end_of_turn> lets it end
    the turn there, which shows the stop path; the answer itself is the model's."""
    end = gemma_llm.tokenizer.token_to_id("<end_of_turn>")
    conversation = [{"role": "user", "content": "What is the capital of Italy?"},
                    {"role": "assistant", "content": "The capital of Italy is Rome."},
                    {"role": "user", "content": "What is the capital of France?"}]
    result = gemma_llm.chat(conversation, SamplingParams(temperature=0, max_tokens=30,
                                                         logit_bias={end: 12.0}))[0]
    out = result.outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == end
    assert out.text.strip() == "The capital of France is Paris."
    assert result.prompt_token_ids[:2] == [2, gemma_llm.tokenizer.token_to_id("<start_of_turn>")]


def test_fast_mode_tracks_exact_and_fused_ops_match_unfused(gemma_llm, small_window) -> None:
    """Fast mode (int8, calibrated) against exact logits, and the fused C++ Gemma ops
    (norm + add + norm + quantize, q/k-norm + RoPE, GELU * up) against the Int8Linear
    modules."""
    from shoal.model.full_sequence import forward_single_sequence

    _, exact_model, _ = small_window
    core = gemma_llm.engine
    model = core.runner.model
    text = ("The lighthouse keeper climbed the stairs each evening to light the lamp. Ships "
            "passing the rocky coast relied on its beam to find the harbour safely. One stormy "
            "night the power failed, and he lit the old oil lamp by hand, as his father had "
            "done. def area(radius):\n    return 3.14159 * radius ** 2\n")
    ids = core.tokenizer.encode(text)
    assert SMALL_WINDOW < len(ids) < 512
    with torch.inference_mode(), _window(exact_model, 512):
        exact = exact_model.compute_logits(forward_single_sequence(exact_model, ids))
        unfused = model.compute_logits(forward_single_sequence(model, ids))
    agreement = (unfused.argmax(-1) == exact.argmax(-1)).float().mean().item()
    kl = (exact.softmax(-1) * (exact.log_softmax(-1) - unfused.log_softmax(-1))).sum(-1).mean()
    assert agreement >= 0.85, agreement
    assert kl < 0.04, kl
    if not model.fused:
        pytest.skip("C++ kernels unavailable: no fused path to compare")
    runner = _runner(model, "kernel", num_blocks=1 + (len(ids) + 15) // 16)  # float32 KV
    fused, _ = runner.execute([DirectWork(TokenSequence(list(ids)), len(ids),
                                          list(range(1, 1 + (len(ids) + 15) // 16)), 0)])
    diff = (fused[0] - unfused[-1]).abs()
    # NOTE: both quantize activations to int8; differently ordered float sums round a few
    # elements the other way (observed: mean 0.22, max 1.2 on logits up to ~40). A wrong
    # fused op differs by far more.
    assert int(fused[0].argmax()) == int(unfused[-1].argmax())
    assert diff.mean() < 0.35 and diff.max() < 2.5, (diff.mean(), diff.max())


# ----- kernels ------------------------------------------------------------------------------

BS, KV, GROUP, HD = 16, 2, 2, 64


def _sdpa_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int,
                 window: int, scale: float) -> torch.Tensor:
    """q: [n, H, hd] at positions first_pos.., k/v: [KV, L, hd] keys 0..L-1."""
    n, length = q.shape[0], k.shape[1]
    pos = torch.arange(first_pos, first_pos + n)[:, None]
    key = torch.arange(length)[None, :]
    mask = (key <= pos) & (key > pos - window if window else True)
    return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None],
                                          attn_mask=mask, scale=scale,
                                          enable_gqa=True)[0].transpose(0, 1)


def _random_blocked(num_blocks: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_blocks, KV, HD, BS, generator=g).to(dtype),
            torch.randn(num_blocks, KV, BS, HD, generator=g).to(dtype))


def _contiguous(kc, vc, table, length):
    k = kc[table].float().permute(1, 0, 3, 2).reshape(KV, len(table) * BS, HD)[:, :length]
    v = vc[table].float().permute(1, 0, 2, 3).reshape(KV, len(table) * BS, HD)[:, :length]
    return k, v


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [1, 5, 16, 23, 40, 200])
def test_sliding_window_kernel_matches_sdpa(dtype, window) -> None:
    kc, vc = _random_blocked(40, dtype, seed=window)
    table = [7, 3, 19, 30, 2, 11]
    past, n = 37, 50                                    # a chunk after cached context
    q = torch.randn(n, KV * GROUP, HD)
    out = ops.paged_attention(q, kc, vc, torch.tensor([table]), torch.tensor([0, n]),
                              torch.tensor([past]), 0.125, window)
    k, v = _contiguous(kc, vc, table, past + n)
    assert torch.allclose(out, _sdpa_window(q, k, v, past, window, 0.125), atol=1e-5)
    # decode queries of several sequences at different lengths
    lengths = [1, 17, 64, 90]
    tables = torch.tensor([[5, 0, 0, 0, 0, 0], [8, 9, 0, 0, 0, 0], [12, 13, 14, 15, 0, 0],
                           [20, 21, 22, 23, 24, 25]])
    qd = torch.randn(len(lengths), KV * GROUP, HD)
    out = ops.paged_attention(qd, kc, vc, tables, torch.arange(len(lengths) + 1),
                              torch.tensor([n - 1 for n in lengths]), 0.125, window)
    for i, length in enumerate(lengths):
        k, v = _contiguous(kc, vc, tables[i].tolist(), length)
        ref = _sdpa_window(qd[i:i + 1], k, v, length - 1, window, 0.125)
        assert torch.allclose(out[i:i + 1], ref, atol=1e-5), (i, window)


@needs_kernels
def test_sliding_window_kernel_is_batch_and_chunk_invariant() -> None:
    kc, vc = _random_blocked(40, torch.bfloat16, seed=3)
    table = [3, 7, 11, 12, 13, 14]
    q = torch.randn(90, KV * GROUP, HD)
    whole = ops.paged_attention(q, kc, vc, torch.tensor([table]), torch.tensor([0, 90]),
                                torch.tensor([0]), 0.125, 24)
    other = torch.randn(5, KV * GROUP, HD)
    first = ops.paged_attention(torch.cat([other, q[:29]]), kc, vc,
                                torch.tensor([[20, 21, 0, 0, 0, 0], table]),
                                torch.tensor([0, 5, 34]), torch.tensor([17, 0]), 0.125, 24)
    second = ops.paged_attention(q[29:61], kc, vc, torch.tensor([table]), torch.tensor([0, 32]),
                                 torch.tensor([29]), 0.125, 24)
    decodes = [ops.paged_attention(q[i:i + 1], kc, vc, torch.tensor([table]),
                                   torch.tensor([0, 1]), torch.tensor([i]), 0.125, 24)
               for i in range(61, 90)]
    assert torch.equal(torch.cat([first[5:], second, *decodes]), whole)
    # window 0 is no window at all, and a window wider than the context changes nothing
    full = ops.paged_attention(q, kc, vc, torch.tensor([table]), torch.tensor([0, 90]),
                               torch.tensor([0]), 0.125)
    assert torch.equal(full, ops.paged_attention(q, kc, vc, torch.tensor([table]),
                                                 torch.tensor([0, 90]), torch.tensor([0]),
                                                 0.125, 0))
    assert torch.equal(full, ops.paged_attention(q, kc, vc, torch.tensor([table]),
                                                 torch.tensor([0, 90]), torch.tensor([0]),
                                                 0.125, 1000))


@needs_kernels
@pytest.mark.parametrize("window", [0, 6, 40])
def test_kernel_and_pytorch_fallback_attend_alike(window) -> None:
    """paged_attention() through both backends: decodes, a first chunk and a continuation."""
    from shoal.model.layers.attention import prepare_decode_gather

    g = torch.Generator().manual_seed(window)
    heads, nb = KV * GROUP, 12
    blocked = (torch.zeros(nb, KV, HD, BS), torch.zeros(nb, KV, BS, HD))
    flat = (torch.zeros(nb * BS, KV, HD), torch.zeros(nb * BS, KV, HD))
    tables = {"a": [1, 2, 3, 4], "b": [5, 6, 7], "c": [8, 9, 10]}
    lengths = {"a": 0, "b": 0, "c": 0}

    def step(parts: list[tuple[str, int]]):
        """parts: (sequence, new tokens), decodes (1 token) first."""
        total = sum(n for _, n in parts)
        q, k, v = (torch.randn(total, h, HD, generator=g) for h in (heads, KV, KV))
        slots, starts, first = [], [0], []
        for name, n in parts:
            start = lengths[name]
            slots += [tables[name][p // BS] * BS + p % BS for p in range(start, start + n)]
            starts.append(starts[-1] + n)
            first.append(start)
        width = max(len(t) for t in tables.values())
        bt = torch.tensor([tables[name] + [0] * (width - len(tables[name])) for name, _ in parts])
        kmeta = AttentionMetadata(slot_mapping=torch.tensor(slots), kernels=ops, block_tables=bt,
                                  query_start=torch.tensor(starts), first_pos=torch.tensor(first))
        fmeta = AttentionMetadata(slot_mapping=torch.tensor(slots))
        decodes = [(name, n) for name, n in parts if n == 1]
        if decodes:
            prepare_decode_gather(fmeta, bt[: len(decodes)],
                                  torch.tensor([lengths[name] + 1 for name, _ in decodes]))
        offset = len(decodes)
        for name, n in parts[len(decodes):]:
            start = lengths[name]
            ctx = None
            if start:
                ctx = torch.tensor([tables[name][p // BS] * BS + p % BS for p in range(start + n)])
            fmeta.prefills.append(PrefillChunk(offset, n, start + n, ctx))
            offset += n
        out_k = paged_attention(q, k, v, *blocked, kmeta, 0.125, window)
        out_f = paged_attention(q, k, v, *flat, fmeta, 0.125, window)
        assert torch.allclose(out_k, out_f, atol=1e-5), (parts, (out_k - out_f).abs().max())
        for name, n in parts:
            lengths[name] += n

    step([("a", 30), ("b", 9)])
    step([("b", 1), ("a", 25), ("c", 44)])
    step([("a", 1), ("b", 1), ("c", 1)])


@needs_kernels
def test_fused_gemma_ops_match_pytorch() -> None:
    from shoal.model.layers.norm import RMSNorm
    from shoal.model.layers.rotary import RotaryEmbedding

    torch.manual_seed(0)
    eps = 1e-6
    x, residual = torch.randn(5, 640) * 30, torch.randn(5, 640) * 100
    x_norm = RMSNorm(torch.randn(640) * 0.5, eps, unit_offset=True)
    weight = torch.rand(640) + 0.5
    updated = residual.clone()
    q, scale = ops.rms_norm_add_norm_quant(x, updated, x_norm.weight, weight, eps)
    h = residual + x_norm(x)
    assert torch.allclose(updated, h, rtol=1e-5, atol=1e-4)
    expected = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight
    expected_scale = expected.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(scale, expected_scale, rtol=1e-5)
    expected_q = torch.round(expected / expected_scale).clamp(-127, 127)
    assert (q.float() - expected_q).abs().max() <= 1 and (q.float() != expected_q).float().mean() < 0.01

    gate_up, inv = torch.randn(4, 2 * 96) * 3, torch.rand(96) + 0.5
    q2, scale2 = ops.gelu_tanh_mul_quant(gate_up, inv)
    e2 = F.gelu(gate_up[:, :96], approximate="tanh") * gate_up[:, 96:] * inv
    es2 = e2.abs().amax(1, keepdim=True) / 127
    assert torch.allclose(scale2, es2, rtol=1e-5)
    assert (q2.float() - torch.round(e2 / es2)).abs().max() <= 1

    heads, kv, hd = 4, 1, 256
    rope = RotaryEmbedding(hd, 128, 10000.0, None)
    qkv = torch.randn(3, (heads + 2 * kv) * hd) * 5
    positions = torch.tensor([0, 77, 127])
    q_norm = RMSNorm(torch.randn(hd) * 0.3, eps, unit_offset=True)
    k_norm = RMSNorm(torch.randn(hd) * 0.3, eps, unit_offset=True)
    q3, k3, v3 = ops.qk_norm_rope_split(qkv, positions, rope.cos, rope.sin, q_norm.weight,
                                        k_norm.weight, eps, heads, kv, hd)
    cos, sin = rope.tables(positions)
    q_ref = rope.apply(q_norm(qkv[:, : heads * hd].view(3, heads, hd)), cos, sin)
    k_ref = rope.apply(k_norm(qkv[:, heads * hd:(heads + kv) * hd].view(3, kv, hd)), cos, sin)
    assert torch.allclose(q3, q_ref, atol=1e-5) and torch.allclose(k3, k_ref, atol=1e-5)
    assert torch.equal(v3, qkv[:, (heads + kv) * hd:].reshape(3, kv, hd))


# ----- a tiny random Gemma 3 from a Hugging Face directory ----------------------------------

def _tiny_hf_gemma3(path: Path) -> None:
    from transformers import Gemma3ForCausalLM as HFGemma3, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        query_pre_attn_scalar=24, sliding_window=8, sliding_window_pattern=2,
        final_logit_softcapping=30.0, rope_theta=50_000.0, rope_local_base_freq=1_000.0,
        rope_scaling={"rope_type": "linear", "factor": 4.0})
    torch.manual_seed(0)
    model = HFGemma3(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else 0.15))
    model.save_pretrained(path)


def test_tiny_hf_gemma3_directory_matches_transformers(tmp_path: Path) -> None:
    """HF config parsing (layer types, per-type RoPE with linear scaling on global layers,
    query_pre_attn_scalar, final soft-capping) and the model on random weights."""
    from transformers import AutoModelForCausalLM

    _tiny_hf_gemma3(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["architectures"] == ["Gemma3ForCausalLM"]
    source = open_model(tmp_path)
    cfg = source.config
    assert cfg.architecture == "gemma3" and cfg.sliding_window == 8
    assert cfg.layer_types == (SLIDING_ATTENTION, FULL_ATTENTION) * 2
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.query_pre_attn_scalar) == (50_000.0, 1_000.0, 24)
    assert cfg.final_logit_softcapping == 30.0
    model = CausalLM(cfg, source.iter_weights())
    source.close()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                     dtype=torch.float32).eval()
    for backend in ("kernel", "torch") if ops is not None else ("torch",):
        runner = _runner(model, backend, num_blocks=24)
        _check_against_reference(runner, reference, cfg.vocab_size, long_len=45,
                                 chunks=(20, 13, 12), decode_steps=3)
    # the transformers 4.x spelling of the same config (as google/gemma-3-270m ships it):
    # rope_theta / rope_local_base_freq / rope_scaling, a pattern instead of layer types,
    # tie_word_embeddings left to its default
    old_style = {k: v for k, v in raw.items()
                 if k not in ("rope_parameters", "layer_types", "tie_word_embeddings")}
    old_style.update(rope_theta=50_000.0, rope_local_base_freq=1_000.0, sliding_window_pattern=2,
                     rope_scaling={"rope_type": "linear", "factor": 4.0})
    (tmp_path / "config.json").write_text(json.dumps(old_style))
    with open_model(tmp_path) as old_source:
        assert old_source.config == cfg
