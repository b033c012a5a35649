"""Embedding requests inside the engines: a decoder's are prefill-only requests in the
continuous batch (its last token's final hidden state, no KV kept), an encoder's inputs from
many requests share one forward pass."""
from __future__ import annotations

from pathlib import Path

import torch

from shoal.core.config import EngineConfig
from shoal.core.sampling_params import SamplingParams
from shoal.engine.builder import build_engine_core
from shoal.model.full_sequence import forward_single_sequence


def _run(core, limit: int = 200) -> list:
    outputs = []
    for _ in range(limit):
        if not core.has_unfinished_requests():
            break
        outputs.extend(core.step())
    return outputs


def test_decoder_embeddings_are_prefill_only_requests(tiny_llama_dir: Path) -> None:
    core, info = build_engine_core(EngineConfig(model=str(tiny_llama_dir), compute="exact",
                                                kv_cache_bytes=8 << 20,
                                                max_num_batched_tokens=16))
    assert not info.embedding_only
    texts = ["the first input, long enough to take two chunked prefill steps here", "second"]
    inputs = [core.tokenizer.encode(t) for t in texts]
    # a generation shares the batch with them
    core.add_request("gen", core.tokenizer.encode("hello"), SamplingParams(max_tokens=4))
    core.add_embedding_request("emb", inputs)
    outputs = _run(core)
    embedded = {o.index: o for o in outputs if o.request_id == "emb"}
    assert sorted(embedded) == [0, 1]
    assert all(o.finished and o.token_ids == [] for o in embedded.values())
    assert sum(len(o.token_ids) for o in outputs if o.request_id == "gen") == 4
    model = core.runner.model
    for index, ids in enumerate(inputs):
        expected = forward_single_sequence(model, ids)[-1]
        got = torch.tensor(embedded[index].embedding)
        assert embedded[index].num_prompt_tokens == len(ids)
        torch.testing.assert_close(got, expected.float(), atol=1e-4, rtol=1e-4)
    # nothing is held: every block is free again (full ones stay findable in the prefix cache)
    assert core.scheduler.kv.num_free_blocks == core.scheduler.kv.num_blocks
    assert core.scheduler.kv.usage == 0
    assert core.stats().generation_tokens == 4


def test_encoder_core_answers_many_requests_in_one_pass(minilm_dir: Path) -> None:
    core, info = build_engine_core(EngineConfig(model=str(minilm_dir), compute="exact"))
    assert info.embedding_only and info.max_model_len == 256
    tok = core.tokenizer
    calls = []
    forward = core.model.forward

    def counting(inputs):
        calls.append(len(inputs))
        return forward(inputs)

    core.model.forward = counting
    for i in range(5):
        core.add_embedding_request(f"r{i}", [tok.encode(f"sentence number {i}"), tok.encode("x")])
    core.add_embedding_request("gone", [tok.encode("aborted before it ran")])
    assert core.abort_request("gone")[0].finish_reason == "abort"
    outputs = _run(core)
    assert calls == [10]                       # ten inputs of five requests: one forward pass
    assert sorted((o.request_id, o.index) for o in outputs) == sorted(
        (f"r{i}", j) for i in range(5) for j in range(2))
    solo = core.model([tok.encode("sentence number 3")])[0]
    got = next(o for o in outputs if (o.request_id, o.index) == ("r3", 0))
    torch.testing.assert_close(torch.tensor(got.embedding), solo, atol=2e-6, rtol=0)
    assert core.stats().waiting == 0 and core.stats().prompt_tokens == sum(
        o.num_prompt_tokens for o in outputs)


def test_turns_are_first_come_first_served() -> None:
    """engine/turns.py: a thread that releases its turn cannot take the next one while
    another waits, and the holder sees that someone waits."""
    import threading
    import time

    from shoal.engine.turns import Turns

    turns = Turns()
    order: list[str] = []
    seen_waiting: list[bool] = []
    started = threading.Event()

    def other() -> None:
        started.set()
        with turns:
            order.append("other")

    with turns:
        thread = threading.Thread(target=other)
        thread.start()
        started.wait()
        time.sleep(0.2)
        seen_waiting.append(turns.others_waiting)
        order.append("first")
    with turns:                      # queued behind the waiting thread
        order.append("second")
        seen_waiting.append(turns.others_waiting)
    thread.join()
    assert order == ["first", "other", "second"]
    assert seen_waiting == [True, False]


def test_while_chat_streams_decode_a_pass_takes_half_their_budget(minilm_dir: Path) -> None:
    """Short encoder passes between a decoder's steps: at most half its while-decoding budget
    (SHOAL_MAX_BATCHED_TOKENS_DECODING), however many inputs wait; a whole pass otherwise."""
    from shoal.engine.turns import ENGINE_TURNS

    core, _ = build_engine_core(EngineConfig(model=str(minilm_dir), compute="exact",
                                             max_batched_tokens_while_decoding=40))
    decoder, last_step = object(), ENGINE_TURNS.last_decoder_seconds
    try:
        tok = core.tokenizer
        inputs = [tok.encode(f"sentence number {i}") for i in range(12)]   # 5 tokens each
        assert {len(ids) for ids in inputs} == {5}
        core.add_embedding_request("many", inputs)
        ENGINE_TURNS.decoder_busy(decoder, True)
        ENGINE_TURNS.last_decoder_seconds = 10.0          # time leaves room: the cap decides
        assert len(core.step()) == 4                       # 4 x 5 tokens <= 40 // 2 < 5 x 5
        ENGINE_TURNS.decoder_busy(decoder, False)
        assert len(core.step()) == 8                       # no streams: the rest in one pass
    finally:
        ENGINE_TURNS.decoder_busy(decoder, False)
        ENGINE_TURNS.last_decoder_seconds = last_step
        core.close()
