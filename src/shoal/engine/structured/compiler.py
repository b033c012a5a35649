"""GrammarCompiler: constraints compiled to ready matchers on a worker thread, with an LRU cache.

The engine thread only submits and polls: a compile (milliseconds for most schemas, up to the
timeout for hostile ones) never stalls the steps of running requests. One compiler serves one
engine, hence one tokenizer: the cache's key is (constraint, this compiler's tokenizer).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import torch

from shoal.core.errors import InvalidParameterError
from shoal.core.structured_output import StructuredOutput
from shoal.engine.structured.grammar import (bitmask_words, build_llg_tokenizer, fill_bitmask,
                                             grammar_text)
from shoal.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CompiledGrammar:
    """A compiled constraint: a matcher in its start state, copied for each sample."""

    structured: StructuredOutput
    template: llguidance.LLMatcher
    compile_seconds: float

    def new_matcher(self) -> llguidance.LLMatcher:
        # NOTE: a copy shares the lexer states the template built (its first mask), so a
        # sample's first step is as fast as its others.
        return self.template.deep_copy()


class GrammarCompiler:
    """Compiles StructuredOutputs for one tokenizer on its own thread; caches the results."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, *, cache_size: int = 128) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cache_size = max(1, cache_size)
        self._cache: OrderedDict[StructuredOutput, CompiledGrammar] = OrderedDict()
        self._inflight: dict[StructuredOutput, Future[CompiledGrammar]] = {}
        self._started: dict[StructuredOutput, float] = {}   # compiles running: since when
        self._lock = threading.Lock()
        self._llg_tokenizer: llguidance.LLTokenizer | None = None
        self._pool: ThreadPoolExecutor | None = None
        # Called on the compile thread after each compile ends (AsyncEngine: wake the loop).
        self.on_done: Callable[[], None] | None = None
        self.compile_seconds: deque[float] = deque(maxlen=10_000)   # each compile's, for benchmarks

    def submit(self, structured: StructuredOutput) -> Future[CompiledGrammar]:
        """A future of the compiled constraint: done at once on a cache hit; one compile
        serves every request that asks for the same constraint meanwhile."""
        with self._lock:
            hit = self._cache.get(structured)
            if hit is not None:
                self._cache.move_to_end(structured)
                future: Future[CompiledGrammar] = Future()
                future.set_result(hit)
                return future
            future = self._inflight.get(structured)
            if future is None:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, thread_name_prefix="shoal-grammar-compile")
                future = self._pool.submit(self._compile, structured)
                self._inflight[structured] = future
                future.add_done_callback(lambda _f, key=structured: self._finished(key))
            return future

    def seconds_compiling(self, structured: StructuredOutput, now: float) -> float:
        """How long the compile of `structured` has run (0 while it waits for the thread or
        for the vocabulary, which is built once, on the first compile)."""
        started = self._started.get(structured)
        return 0.0 if started is None else now - started

    def compile_now(self, structured: StructuredOutput) -> CompiledGrammar:
        """Compiles on the calling thread (tests, benchmarks), through the cache."""
        return self.submit(structured).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- the compile thread ------------------------------------------------------------------
    def _compile(self, structured: StructuredOutput) -> CompiledGrammar:
        if self._llg_tokenizer is None:
            started = time.perf_counter()
            self._llg_tokenizer = build_llg_tokenizer(self.tokenizer, self.vocab_size)
            log.info("grammar vocabulary built in %.2f s", time.perf_counter() - started)
        started = time.perf_counter()
        self._started[structured] = time.monotonic()
        matcher = llguidance.LLMatcher(self._llg_tokenizer, grammar_text(structured))
        # NOTE: the first mask builds most of the lexer lazily; computing it here keeps that
        # cost in the compile, off the engine's steps, and counts it against the timeout.
        scratch = torch.empty((1, bitmask_words(self._llg_tokenizer.vocab_size)), dtype=torch.int32)
        if not matcher.is_error():
            fill_bitmask(matcher, scratch, 0)
        if matcher.is_error():
            raise InvalidParameterError(structured.field,
                                        f"invalid {structured.kind.value}: {matcher.get_error().strip()}")
        seconds = time.perf_counter() - started
        self.compile_seconds.append(seconds)
        compiled = CompiledGrammar(structured, matcher, seconds)
        with self._lock:
            self._cache[structured] = compiled
            self._cache.move_to_end(structured)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _finished(self, structured: StructuredOutput) -> None:
        with self._lock:
            self._inflight.pop(structured, None)
            self._started.pop(structured, None)
        if self.on_done is not None:
            self.on_done()
