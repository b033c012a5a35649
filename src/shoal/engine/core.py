"""EngineCore: one step = schedule -> run the model -> sample -> update -> report."""
from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from shoal.core.errors import InvalidParameterError
from shoal.core.sampling_params import SamplingParams
from shoal.engine.limits import EngineLimits
from shoal.engine.model_runner import ModelRunner, StepResult
from shoal.engine.outputs import RequestOutput, TokenLogprob
from shoal.engine.prompt_logprobs import PromptLogprobs
from shoal.engine.request import Request, RequestStatus
from shoal.engine.sampling.row import SamplingRow
from shoal.engine.sampling.sampler import Sampler
from shoal.engine.scheduler import Scheduler, SchedulerOutput
from shoal.engine.stats import EngineStats
from shoal.engine.structured.manager import MaskJob, StructuredOutputManager
from shoal.engine.structured.masks import SampleGrammar
from shoal.text.detokenizer import IncrementalDetokenizer
from shoal.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _SampleState:
    """The engine's bookkeeping of one of a user request's n samples: its sequence, seed and
    detokenizer."""

    request: Request
    user_request_id: str
    index: int
    seed: int
    detokenizer: IncrementalDetokenizer
    grammar: SampleGrammar | None = None     # the sample's own matcher, when constrained
    prompt_logprobs: PromptLogprobs | None = None   # sample 0 of a prompt_logprobs request


class EngineCore:
    """Owns the scheduler, the model runner and the sampler of one loaded model."""

    def __init__(self, runner: ModelRunner, scheduler: Scheduler, sampler: Sampler,
                 tokenizer: Tokenizer, max_model_len: int, vocab_size: int,
                 eos_token_ids: frozenset[int], cache_salt: int = 0,
                 grammar_compile_timeout: float = 10.0, grammar_cache_size: int = 128) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.cache_salt = cache_salt
        self.limits = EngineLimits(
            max_model_len=max_model_len, max_num_seqs=scheduler.config.max_num_seqs,
            vocab_size=vocab_size, kv_cache_tokens=scheduler.kv.num_blocks * scheduler.kv.block_size)
        self._samples: dict[str, _SampleState] = {}        # engine request id -> sample
        self._by_user_id: dict[str, list[str]] = {}         # user request id -> engine ids
        self._seed_source = random.Random()
        # Constrained requests wait there, outside the scheduler, while their grammar compiles.
        self.structured = StructuredOutputManager(tokenizer, vocab_size, eos_token_ids,
                                                  compile_timeout=grammar_compile_timeout,
                                                  cache_size=grammar_cache_size,
                                                  device=runner.device)
        # Called from step() with a user request id and the error that refused it (a grammar
        # that failed to compile or timed out); None: step() raises it.
        self.on_request_failed: Callable[[str, BaseException], None] | None = None
        # Called from step() with the user request ids the scheduler took for the first time
        # (AsyncEngine uses it to tell a waiting caller its request left the queue).
        self.on_first_scheduled: Callable[[list[str]], None] | None = None
        # Cumulative counts for /metrics (read from other threads; ints, so no lock).
        self.num_prompt_tokens_total = 0       # prompt tokens of requests whose prefill finished
        self.num_generation_tokens_total = 0

    # ---- requests in -------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    priority: int = 0, arrival_time: float | None = None, *, batch: bool = False,
                    batch_aging_s: float = math.inf) -> None:
        """Queues a request (n samples); raises a typed error if it can never run.

        `batch` puts it in the batch class, behind interactive requests until it has waited
        `batch_aging_s` seconds (see Scheduler)."""
        if request_id in self._by_user_id:
            raise InvalidParameterError("request_id", f"{request_id!r} is already running")
        # NOTE: callers validate first to refuse before queueing anything; this check is the
        # engine thread's own, where every request enters (and it resolves max_tokens).
        max_tokens = self.limits.validate(prompt_token_ids, params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        base_seed = params.seed if params.seed is not None else self._seed_source.getrandbits(62)
        leader: Request | None = None
        ids: list[str] = []
        requests: list[Request] = []
        for index in range(params.n):
            engine_id = request_id if params.n == 1 else f"{request_id}#{index}"
            request = Request(
                request_id=engine_id, prompt_token_ids=list(prompt_token_ids),
                sampling_params=params, eos_token_ids=self.eos_token_ids, max_tokens=max_tokens,
                priority=priority, arrival_time=arrival, batch=batch, batch_aging_s=batch_aging_s,
                group_id=request_id if params.n > 1 else None, group_leader=leader,
                cache_salt=self.cache_salt)
            leader = leader or request
            prompt_lps = None
            if params.prompt_logprobs is not None and index == 0:
                # NOTE: the prompt's logits exist only where it is computed, so this sample
                # skips the prefix cache until every prompt position has been seen.
                prompt_lps = PromptLogprobs(len(prompt_token_ids), params.prompt_logprobs)
                request.skip_prefix_cache = not prompt_lps.complete
            detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                           skip_special_tokens=params.skip_special_tokens,
                                           stop=params.stop,
                                           include_stop_str_in_output=params.include_stop_str_in_output)
            self._samples[engine_id] = _SampleState(request, request_id, index, base_seed + index, detok,
                                                    prompt_logprobs=prompt_lps)
            ids.append(engine_id)
            requests.append(request)
        if params.structured is None:
            for request in requests:
                self.scheduler.add_request(request)
        else:
            self.structured.hold(request_id, requests, params.structured)
        self._by_user_id[request_id] = ids

    def add_embedding_request(self, request_id: str, inputs: list[list[int]], priority: int = 0,
                              arrival_time: float | None = None, *, batch: bool = False,
                              batch_aging_s: float = math.inf) -> None:
        """Queues one prefill-only request per input (index i = inputs[i]); each ends with
        its last token's final hidden state when its prompt is computed."""
        if request_id in self._by_user_id:
            raise InvalidParameterError("request_id", f"{request_id!r} is already running")
        for ids in inputs:
            self.limits.validate_embedding(ids)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        params = SamplingParams(max_tokens=1)
        engine_ids = []
        for index, ids in enumerate(inputs):
            engine_id = f"{request_id}#e{index}"
            request = Request(request_id=engine_id, prompt_token_ids=list(ids),
                              sampling_params=params, max_tokens=1, priority=priority,
                              arrival_time=arrival, batch=batch, batch_aging_s=batch_aging_s,
                              cache_salt=self.cache_salt, embed=True)
            # NOTE: a detokenizer is never fed; the sample state keeps the bookkeeping shared.
            self._samples[engine_id] = _SampleState(request, request_id, index, 0, None)  # type: ignore[arg-type]
            engine_ids.append(engine_id)
            self.scheduler.add_request(request)
        self._by_user_id[request_id] = engine_ids

    def stats(self) -> EngineStats:
        """The engine's state and counters now (read without locks, for metrics)."""
        scheduler = self.scheduler
        return EngineStats(
            running=scheduler.num_running, waiting=self.num_waiting,
            kv_usage=scheduler.kv.usage, prefix_queries=scheduler.kv.prefix_cache_queries,
            prefix_hits=scheduler.kv.prefix_cache_hits,
            preemptions=scheduler.num_preemptions_total,
            prompt_tokens=self.num_prompt_tokens_total,
            generation_tokens=self.num_generation_tokens_total)

    def abort_request(self, request_id: str) -> list[RequestOutput]:
        """Aborts every sample of a user request; returns their final outputs."""
        ids = self._by_user_id.get(request_id, [])
        aborted = self.scheduler.abort_requests(ids) + self.structured.abort(request_id)
        return [self._final_output(self._samples[r.request_id], "", [], None) for r in aborted
                if r.request_id in self._samples]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self.structured.has_held()

    def has_work_ready(self) -> bool:
        """Whether step() has something to do now: False while every unfinished request
        waits for its grammar to compile (StructuredOutputManager.wait waits for one)."""
        return self.scheduler.has_unfinished_requests() or self.structured.has_settled()

    @property
    def num_waiting(self) -> int:
        """Sequences waiting to run: in the scheduler's queue or for their grammar."""
        return self.scheduler.num_waiting + self.structured.num_held

    def close(self) -> None:
        """Stops the grammar threads (the engine is not used afterwards)."""
        self.structured.close()

    # ---- one step ----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self._start_compiled()
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.first_scheduled and self.on_first_scheduled is not None:
            # the leader (sample 0) stands for the user request: siblings follow its prefill
            self.on_first_scheduled([self._samples[r.request_id].user_request_id
                                     for r in scheduler_output.first_scheduled
                                     if r.request_id in self._samples
                                     and self._samples[r.request_id].index == 0])
        if not scheduler_output.scheduled:
            return []
        # NOTE: masks fill on their thread while the model computes the logits they mask.
        mask_job = self.structured.start_masks(self._constrained(scheduler_output))
        with self.runner.step_threads():
            sampled, logprobs, computed = self._compute_and_sample(scheduler_output, mask_job)
        updated = self.scheduler.update_from_output(scheduler_output, sampled)
        for request in updated:
            sample = self._samples.get(request.request_id)
            if sample is not None and sample.grammar is not None and sample.grammar.ended \
                    and not request.is_finished:
                # NOTE: the grammar allows nothing after its EOS, whatever ignore_eos says.
                self.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED,
                                              request.output_token_ids[-1])
        return [self._embedding_output(r, computed.embeddings.get(r.request_id)) if r.embed
                else self._output_for(r, logprobs.get(r.request_id)) for r in updated
                if r.request_id in self._samples]

    def _compute_and_sample(self, scheduler_output: SchedulerOutput, mask_job: MaskJob | None
                            ) -> tuple[dict[str, int], dict[str, TokenLogprob], StepResult]:
        """The model's step and the sampled tokens (with their logprobs, where asked)."""
        computed = self.runner.execute_step(scheduler_output.scheduled)
        logits, sampling = computed.logits, computed.sampling
        if computed.prompt_logits:
            self._take_prompt_logits(computed.prompt_logits)
        if mask_job is not None:
            self.structured.apply_masks(mask_job, logits, [w.request.request_id for w in sampling])
        sampled: dict[str, int] = {}
        logprobs: dict[str, TokenLogprob] = {}
        if sampling:
            rows = []
            for work in sampling:
                sample = self._samples[work.request.request_id]
                request = sample.request
                rows.append(SamplingRow(params=request.sampling_params,
                                        prompt_token_ids=request.prompt_token_ids,
                                        output_token_ids=request.output_token_ids,
                                        seed=sample.seed, eos_token_ids=request.eos_token_ids))
            result = self.sampler(logits, rows)
            for work, token, lp in zip(sampling, result.token_ids, result.logprobs):
                sampled[work.request.request_id] = self._advance_grammar(work.request.request_id, token)
                if lp is not None:
                    logprobs[work.request.request_id] = TokenLogprob(lp.token_id, lp.logprob,
                                                                     list(lp.top))
        return sampled, logprobs, computed

    def _take_prompt_logits(self, prompt_logits: list) -> None:
        for part in prompt_logits:
            sample = self._samples.get(part.work.request.request_id)
            if sample is None or sample.prompt_logprobs is None:
                continue
            for first, logits in part.logits():
                sample.prompt_logprobs.add(first, logits, sample.request.prompt_token_ids)
            if sample.prompt_logprobs.complete:
                # a recompute after preemption may use the prefix cache again
                sample.request.skip_prefix_cache = False

    # ---- constrained decoding ------------------------------------------------------
    def _start_compiled(self) -> None:
        """Hands requests whose grammar is ready to the scheduler, each sample with its own
        matcher; refuses those whose grammar failed or timed out."""
        if not self.structured.has_held():
            return
        ready, failed = self.structured.take_settled()
        for request, grammar in ready:
            self._samples[request.request_id].grammar = grammar
            self.scheduler.add_request(request)
        for user_request_id, error in failed:
            for engine_id in self._by_user_id.pop(user_request_id, []):
                self._samples.pop(engine_id, None)
            if self.on_request_failed is None:
                raise error
            self.on_request_failed(user_request_id, error)

    def _constrained(self, output: SchedulerOutput) -> list[tuple[str, SampleGrammar]]:
        """The constrained requests that sample this step, with their matchers."""
        pairs = []
        for entry in output.scheduled:
            sample = self._samples.get(entry.request.request_id)
            if entry.samples and sample is not None and sample.grammar is not None:
                pairs.append((entry.request.request_id, sample.grammar))
        return pairs

    def _advance_grammar(self, request_id: str, token: int) -> int:
        """Feeds a sampled token to the sample's matcher; returns the token to append.

        A masked row only yields an allowed token, unless min_tokens banned the only ones
        (EOS where the grammar is complete): then the sample ends with EOS instead."""
        grammar = self._samples[request_id].grammar
        if grammar is None or grammar.accept(token):
            return token
        log.warning("request %s: token %d outside its grammar (%s); ending it", request_id, token,
                    grammar.error() or "no allowed token")
        if self.tokenizer.eos_token_id in self.eos_token_ids:
            return self.tokenizer.eos_token_id
        return min(self.eos_token_ids, default=token)

    def _output_for(self, request: Request, logprob: TokenLogprob | None) -> RequestOutput:
        sample = self._samples[request.request_id]
        token = request.output_token_ids[-1]
        self.num_generation_tokens_total += 1
        if request.num_output_tokens == 1 and sample.index == 0:
            # n samples share one prompt: count it once, as vLLM does.
            self.num_prompt_tokens_total += request.num_prompt_tokens
        step = sample.detokenizer.add_tokens([token])
        text = step.text_delta
        if step.stop_string is not None and not request.is_finished:
            self.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED, step.stop_string)
        lps = [logprob] if logprob is not None else None
        if request.is_finished:
            if step.stop_string is None:
                text += sample.detokenizer.flush().text_delta
            return self._final_output(sample, text, [token], lps)
        return self._make_output(sample, text, [token], lps)

    def _embedding_output(self, request: Request, vector) -> RequestOutput:
        self.num_prompt_tokens_total += request.num_prompt_tokens
        output = self._final_output(self._samples[request.request_id], "", [], None)
        output.embedding = None if vector is None else vector.float().cpu().numpy()
        return output

    def _make_output(self, sample: _SampleState, text: str, token_ids: list[int],
                     logprobs: list[TokenLogprob] | None) -> RequestOutput:
        request = sample.request
        prompt_logprobs = None
        if sample.prompt_logprobs is not None and sample.prompt_logprobs.complete:
            prompt_logprobs = sample.prompt_logprobs.entries     # once, on the first update
            sample.prompt_logprobs = None
        return RequestOutput(
            request_id=sample.user_request_id, index=sample.index, text=text, token_ids=token_ids,
            finished=request.is_finished, finish_reason=request.status.finish_reason,
            stop_reason=request.stop_reason, logprobs=logprobs,
            num_prompt_tokens=request.num_prompt_tokens, num_cached_tokens=request.num_cached_tokens,
            num_output_tokens=request.num_output_tokens, num_preemptions=request.num_preemptions,
            timings=request.timings, produced_at=time.monotonic(), prompt_logprobs=prompt_logprobs)

    def _final_output(self, sample: _SampleState, text: str, token_ids: list[int],
                      logprobs: list[TokenLogprob] | None) -> RequestOutput:
        output = self._make_output(sample, text, token_ids, logprobs)
        engine_id = sample.request.request_id
        self._samples.pop(engine_id, None)
        siblings = self._by_user_id.get(sample.user_request_id)
        if siblings is not None:
            if engine_id in siblings:
                siblings.remove(engine_id)
            if not siblings:
                del self._by_user_id[sample.user_request_id]
        return output
