"""Engine behaviour on the real model: batch invariance, prefix caching, preemption,
chunked prefill, sampling options, exact block accounting and typed errors."""
from __future__ import annotations

import pytest

from fake_runner import scheduler_config
from shoal import LLM, SamplingParams
from shoal.core.errors import (ContextLengthExceededError, CorruptModelError, InvalidParameterError,
                          ModelNotFoundError)
from shoal.engine.core import EngineCore
from shoal.engine.kv.manager import KVCacheManager
from shoal.engine.sampling.sampler import Sampler
from shoal.engine.scheduler import Scheduler

TOPICS = ["the ocean", "a violin", "volcanoes", "the number seven", "bread", "winter",
          "a lighthouse", "chess", "honey bees", "the moon", "rivers", "a clock", "trains",
          "mountains", "paper", "gardens"]


def _chats(llm: LLM) -> list[list[int]]:
    """16 prompts of mixed lengths (17 to ~190 tokens) through the chat template."""
    prompts = []
    for i, topic in enumerate(TOPICS):
        detail = " Please be thorough and consider history, science and everyday life." * (i % 5)
        text = llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Write two sentences about {topic}.{detail}"}])
        prompts.append(llm.tokenizer.encode(text, add_special_tokens=False))
    return prompts


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    return LLM(str(smollm2_path), compute="fast", kv_cache_bytes=96 << 20)


def _variant(llm: LLM, *, num_blocks: int | None = None, enable_prefix_caching: bool = True,
             **scheduler_overrides) -> EngineCore:
    """A fresh EngineCore on the same loaded model, with another scheduler shape."""
    base = llm.engine
    blocks = num_blocks or llm.info.num_blocks
    settings = dict(max_model_len=1024, max_num_batched_tokens=512)
    settings.update(scheduler_overrides)
    scheduler = Scheduler(scheduler_config(llm.info.block_size, **settings),
                          KVCacheManager(blocks, llm.info.block_size, enable_prefix_caching))
    return EngineCore(base.runner, scheduler, Sampler(), base.tokenizer, 1024, base.vocab_size,
                      base.eos_token_ids, cache_salt=base.cache_salt)


def _run(core: EngineCore, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
         ) -> dict[str, list[int]]:
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    for i, (ids, p) in enumerate(zip(prompts, params_list)):
        core.add_request(f"r{i}", ids, p)
    outputs: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while core.has_unfinished_requests():
        for out in core.step():
            outputs[out.request_id].extend(out.token_ids)
    assert core.scheduler.kv.num_used_blocks == 0
    core.scheduler.kv.check_integrity()
    return outputs


GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def alone(llm) -> list[list[int]]:
    """Each prompt's greedy output when it runs by itself (prefix cache off)."""
    prompts = _chats(llm)
    results = []
    for ids in prompts:
        core = _variant(llm, enable_prefix_caching=False)
        results.append(_run(core, [ids], GREEDY)["r0"])
    return results


def _as_list(outputs: dict[str, list[int]]) -> list[list[int]]:
    return [outputs[f"r{i}"] for i in range(len(outputs))]


def test_greedy_output_same_alone_and_in_a_batch_of_16_with_chunked_prefill(llm, alone):
    # A 64-token step budget forces long prompts into several chunks, mixed with decodes.
    core = _variant(llm, max_num_batched_tokens=64, enable_prefix_caching=False)
    assert _as_list(_run(core, _chats(llm), GREEDY)) == alone


def test_greedy_output_same_without_chunked_prefill(llm, alone):
    core = _variant(llm, enable_chunked_prefill=False, max_num_batched_tokens=1024,
                    enable_prefix_caching=False)
    assert _as_list(_run(core, _chats(llm), GREEDY)) == alone


def test_greedy_output_same_on_prefix_cache_hit_and_miss(llm, alone):
    core = _variant(llm)
    prompts = _chats(llm)
    first = _as_list(_run(core, prompts, GREEDY))
    hits_before = core.scheduler.kv.prefix_cache_hits
    second = _as_list(_run(core, prompts, GREEDY))
    assert core.scheduler.kv.prefix_cache_hits > hits_before  # the rerun hit the cache
    assert first == alone and second == alone


def test_greedy_output_same_after_preemption_under_a_tiny_kv_pool(llm, alone):
    core = _variant(llm, num_blocks=40)   # 40 blocks x 16 tokens cannot hold 16 requests
    assert _as_list(_run(core, _chats(llm), GREEDY)) == alone
    assert core.scheduler.num_preemptions_total > 0


def test_seeded_sampling_is_reproducible_alone_and_batched(llm):
    prompts = _chats(llm)[:6]
    params = [SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=100 + i, max_tokens=16,
                             ignore_eos=True) for i in range(6)]
    batched = _as_list(_run(_variant(llm), prompts, params))
    alone = [_run(_variant(llm), [p], [sp])["r0"] for p, sp in zip(prompts, params)]
    assert batched == alone
    other_seed = _run(_variant(llm), [prompts[0]],
                      [SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=999,
                                      max_tokens=16, ignore_eos=True)])["r0"]
    assert other_seed != alone[0]


def test_n_samples_share_the_prompt_blocks(llm):
    prompt = _chats(llm)[4]
    params = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=8)
    result = llm.generate([{"prompt_token_ids": prompt}], params)[0]
    assert len(result.outputs) == 4
    assert len({tuple(o.token_ids) for o in result.outputs}) > 1  # different seeds per sample
    full_blocks = (len(prompt) - 1) // llm.info.block_size * llm.info.block_size
    assert result.num_cached_tokens >= full_blocks > 0
    assert llm.engine.scheduler.kv.num_used_blocks == 0


def test_chat_answer_and_stop_strings(llm):
    question = [{"role": "user", "content": "Name three rivers."}]
    answer = llm.chat(question, SamplingParams(temperature=0, max_tokens=40))[0]
    words = answer.text.split()
    assert len(words) > 6
    stop = words[len(words) // 2]
    stopped = llm.chat(question, SamplingParams(temperature=0, max_tokens=40, stop=[stop]))[0]
    assert stopped.outputs[0].finish_reason == "stop"
    assert stopped.outputs[0].stop_reason == stop
    assert stopped.text == answer.text[: answer.text.index(stop)]
    kept = llm.chat(question, SamplingParams(temperature=0, max_tokens=40, stop=[stop],
                                             include_stop_str_in_output=True))[0]
    assert kept.text == answer.text[: answer.text.index(stop) + len(stop)]
    assert llm.engine.scheduler.kv.num_used_blocks == 0


def test_generation_ends_on_the_end_of_turn_token(llm):
    out = llm.chat([{"role": "user", "content": "Say hello."}],
                   SamplingParams(temperature=0, max_tokens=200))[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.stop_reason in llm.engine.eos_token_ids
    assert "<|im_end|>" not in out.text


def test_max_tokens_min_tokens_and_logprobs(llm):
    params = SamplingParams(temperature=0, max_tokens=6, min_tokens=6, logprobs=3)
    out = llm.generate(["The first planet from the Sun is"], params)[0].outputs[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"
    assert out.logprobs is not None and len(out.logprobs) == 6
    for token, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token
        assert len(lp.top) == 3
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]
        assert lp.logprob <= 0.0
        assert lp.top[0][0] == token            # greedy picks the most likely token


def test_bad_inputs_raise_typed_errors(llm, tmp_path):
    with pytest.raises(InvalidParameterError) as err:
        SamplingParams(max_tokens=-1)
    assert err.value.field == "max_tokens"
    with pytest.raises(InvalidParameterError) as err:
        SamplingParams(top_p=1.5)
    assert err.value.field == "top_p"
    with pytest.raises(InvalidParameterError) as err:
        SamplingParams(temperature=float("nan"))
    assert err.value.field == "temperature"
    with pytest.raises(ContextLengthExceededError) as err:
        llm.generate([{"prompt_token_ids": [100] * 100}],
                     SamplingParams(max_tokens=llm.info.max_model_len))
    assert str(llm.info.max_model_len) in str(err.value)
    with pytest.raises(InvalidParameterError):
        llm.generate([{"prompt_token_ids": [10**9]}])
    with pytest.raises(InvalidParameterError):
        llm.generate([{"prompt_token_ids": []}])
    assert not llm.engine.has_unfinished_requests()   # nothing half-queued after an error
    with pytest.raises(ModelNotFoundError):
        LLM(str(tmp_path / "nope.gguf"))
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(CorruptModelError) as err:
        LLM(str(corrupt))
    assert "corrupt.gguf" in str(err.value)
