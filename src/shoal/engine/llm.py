"""LLM: the offline Python API (`LLM(model).generate(prompts, params)`)."""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Union

from shoal.core.config import EngineConfig
from shoal.core.errors import InvalidParameterError
from shoal.core.sampling_params import SamplingParams
from shoal.engine.builder import build_engine_core
from shoal.engine.outputs import CompletionOutput, GenerationResult, RequestOutput
from shoal.engine.structured.grammar import check_structured_output

Prompt = Union[str, list[int], dict[str, Any]]
Messages = list[dict[str, Any]]


class LLM:
    """Loads one model and runs batches of prompts or chats to completion.

    All prompts of one call are submitted together, so they share steps through
    continuous batching exactly as concurrent server requests would.
    """

    def __init__(self, model: str | None = None, *, compute: str | None = None,
                 config: EngineConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = EngineConfig.from_env(model=model, compute=compute, **overrides)
        self.config = config
        self.engine, self.info = build_engine_core(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 priority: Sequence[int] | None = None) -> list[GenerationResult]:
        """Generates for each prompt: text, a list of token ids, or {"prompt_token_ids": [...]}."""
        batch = self._as_batch(prompts)
        encoded = [self._encode(p) for p in batch]
        return self._run(encoded, sampling_params, priority)

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True, tools: list[dict] | None = None
             ) -> list[GenerationResult]:
        """Renders each conversation with the model's chat template, then generates."""
        conversations: list[Messages]
        if messages and isinstance(messages[0], dict):
            conversations = [messages]  # type: ignore[list-item]
        else:
            conversations = list(messages)  # type: ignore[arg-type]
        encoded = []
        for conversation in conversations:
            text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                      tools=tools)
            # NOTE: the template already wrote BOS if the model wants one.
            encoded.append((text, self.tokenizer.encode(text, add_special_tokens=False)))
        return self._run(encoded, sampling_params, None)

    # ---- helpers -----------------------------------------------------------------
    @staticmethod
    def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        if isinstance(prompts, (str, dict)):
            return [prompts]
        if isinstance(prompts, Sequence) and prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]  # type: ignore[arg-type]
        return list(prompts)  # type: ignore[arg-type]

    def _encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return None, list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], self.tokenizer.encode(prompt["prompt"])
            raise InvalidParameterError("prompt", "a dict prompt needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, list):
            return None, list(prompt)
        raise InvalidParameterError("prompt", f"unsupported prompt type {type(prompt).__name__}")

    def _run(self, encoded: list[tuple[str | None, list[int]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None,
             priority: Sequence[int] | None) -> list[GenerationResult]:
        if sampling_params is None:
            params_list = [SamplingParams()] * len(encoded)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(encoded)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(encoded):
                raise InvalidParameterError("sampling_params", "need one per prompt")
        results: dict[str, GenerationResult] = {}
        order: list[str] = []
        # Validate everything before queueing anything, so a bad prompt leaves no work behind.
        for (_text, ids), params in zip(encoded, params_list):
            self.engine.limits.validate(ids, params)
            check_structured_output(params.structured)
        for i, ((text, ids), params) in enumerate(zip(encoded, params_list)):
            request_id = f"offline-{next(self._ids)}"
            self.engine.add_request(request_id, ids, params,
                                    priority=priority[i] if priority else 0)
            results[request_id] = GenerationResult(
                request_id, text, ids,
                [CompletionOutput(index=k, text="", token_ids=[], finish_reason=None,
                              logprobs=[] if params.logprobs is not None else None)
                 for k in range(params.n)])
            order.append(request_id)
        try:
            while self.engine.has_unfinished_requests():
                if not self.engine.has_work_ready():
                    self.engine.structured.wait(0.1)
                    continue
                for out in self.engine.step():
                    self._accumulate(results[out.request_id], out)
        except BaseException:
            # NOTE: e.g. a grammar that timed out: the batch's other requests go with it.
            for request_id in order:
                self.engine.abort_request(request_id)
            raise
        return [results[r] for r in order]

    @staticmethod
    def _accumulate(result: GenerationResult, out: RequestOutput) -> None:
        sample = result.outputs[out.index]
        sample.text += out.text
        sample.token_ids.extend(out.token_ids)
        if out.logprobs and sample.logprobs is not None:
            sample.logprobs.extend(out.logprobs)
        if out.finished:
            sample.finish_reason = out.finish_reason
            sample.stop_reason = out.stop_reason
            result.num_cached_tokens = max(result.num_cached_tokens, out.num_cached_tokens)
