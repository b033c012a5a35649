"""Token masks: each constrained sample's allowed tokens, filled on a worker thread while the
model computes the step's logits, then applied to those logits before sampling.

NOTE: the overlap is what makes constrained decoding nearly free: llguidance releases the
GIL while it computes a mask, and so do torch's kernels, so the mask thread and the forward
pass run side by side; the engine thread waits only for whatever is left when the logits are
ready (vLLM's structured-output manager overlaps the same way).
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import numpy as np
import torch

from shoal.engine.structured.grammar import bitmask_words, fill_bitmask


class SampleGrammar:
    """One sample's matcher, advanced with each token the sample accepts.

    Preemption recomputes KV only: the sample's output tokens stay, so its matcher, which
    has seen exactly those tokens, stays valid."""

    __slots__ = ("matcher", "eos_token_ids", "ended")

    def __init__(self, matcher: llguidance.LLMatcher, eos_token_ids: frozenset[int]) -> None:
        self.matcher = matcher
        self.eos_token_ids = eos_token_ids
        self.ended = False          # took an EOS, or refused a token: nothing may follow

    def accept(self, token: int) -> bool:
        """Advances by `token`; False if the grammar does not allow it."""
        ok = self.matcher.consume_token(token)
        if not ok or token in self.eos_token_ids:
            self.ended = True
        return ok

    def error(self) -> str:
        return self.matcher.get_error()


class MaskFiller:
    """Fills one step's masks on its own thread; the engine thread applies them."""

    def __init__(self, vocab_size: int, *, unpack_on_host: bool = True) -> None:
        self.vocab_size = vocab_size
        # NOTE: for an accelerator the packed words cross (1 bit a token, not 8) and unpack
        # there (unpack_bitmask); a CPU engine gets them unpacked by this thread.
        self.unpack_on_host = unpack_on_host
        self._words = bitmask_words(vocab_size)
        self._bitmask = torch.empty((0, self._words), dtype=torch.int32)
        self._pool: ThreadPoolExecutor | None = None
        # Per-row fill times and the engine thread's waits for a step's masks (seconds), for
        # benchmarks; bounded so a long-running server does not grow them.
        self.fill_seconds: deque[float] = deque(maxlen=100_000)
        self.wait_seconds: deque[float] = deque(maxlen=100_000)

    def submit(self, grammars: list[SampleGrammar]) -> Future[torch.Tensor]:
        """Starts filling the masks of `grammars` (in order); the future holds a bool tensor
        [len(grammars), vocab_size], True where a token is NOT allowed (or, unpack_on_host
        False, the packed int32 bitmask, which apply_masks unpacks where the logits are).

        The matchers must not change until the future is done (the engine thread waits for
        it before it samples and advances them)."""
        if self._bitmask.shape[0] < len(grammars):
            self._bitmask = torch.empty((len(grammars), self._words), dtype=torch.int32)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="shoal-grammar-mask")
        return self._pool.submit(self._fill, list(grammars))

    def wait(self, job: Future[torch.Tensor]) -> torch.Tensor:
        started = time.perf_counter()
        disallowed = job.result()
        self.wait_seconds.append(time.perf_counter() - started)
        return disallowed

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _fill(self, grammars: list[SampleGrammar]) -> torch.Tensor:
        bitmask = self._bitmask[:len(grammars)]
        for row, grammar in enumerate(grammars):
            started = time.perf_counter()
            # NOTE: a stopped or failed matcher fills an EOS-only mask, so the sample ends.
            fill_bitmask(grammar.matcher, bitmask, row)
            self.fill_seconds.append(time.perf_counter() - started)
        if not self.unpack_on_host:
            return bitmask.clone()
        # Bit t of word t // 32 says whether token t is allowed. Unpacked with numpy rather
        # than torch: torch would start an OpenMP team on this thread against the forward pass.
        words = bitmask.numpy().astype("<i4", copy=False)
        bits = np.unpackbits(np.invert(words).view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(bits[:, :self.vocab_size]).view(torch.bool)


def unpack_bitmask(packed: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Packed int32 words [R, W] -> bool [R, vocab_size], True where a token is NOT allowed."""
    shifts = torch.arange(32, dtype=torch.int32, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return (bits == 0).flatten(1)[:, :vocab_size]


@torch.inference_mode()    # the runner's logits are inference tensors
def apply_masks(logits: torch.Tensor, rows: list[int], disallowed: torch.Tensor) -> None:
    """Sets the disallowed tokens' logits to -inf, in place, in the given rows of logits.
    `disallowed` is MaskFiller's result: bool, or the packed int32 words."""
    if not rows:
        return
    if disallowed.dtype == torch.int32:
        disallowed = unpack_bitmask(disallowed.to(logits.device, non_blocking=True), logits.shape[1])
    # NOTE: masks may be wider than the logits (a tokenizer with ids the model lacks).
    disallowed = disallowed[:, :logits.shape[1]].to(logits.device)
    if len(rows) == logits.shape[0] and rows == list(range(len(rows))):
        logits.masked_fill_(disallowed, float("-inf"))
        return
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    masked = logits.index_select(0, index).masked_fill_(disallowed, float("-inf"))
    logits.index_copy_(0, index, masked)
