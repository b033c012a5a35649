"""ModelRunner: turns a scheduler step into tensors, runs the model, returns logits."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from shoal.model.kernels.cpu import load_cpu_kernels
from shoal.model.layers.attention import AttentionMetadata, PrefillChunk, prepare_decode_gather


class ScheduledWork(Protocol):
    """What the runner needs of one scheduled request (see engine.scheduler)."""

    request: object
    num_new_tokens: int
    block_ids: list[int]
    start_pos: int


@dataclass(slots=True)
class TokenSequence:
    """Just the token ids of a sequence: what the runner reads of a request."""

    all_token_ids: list[int]


@dataclass(slots=True)
class DirectWork:
    """A hand-built chunk of work for the runner, without a scheduler (tests, benchmarks).

    The caller owns `block_ids` and must not share them with a live engine's requests.
    """

    request: TokenSequence
    num_new_tokens: int
    block_ids: list[int]
    start_pos: int


@dataclass(slots=True)
class PromptLogits:
    """A run of one request's prompt positions: row i is position first + i and predicts
    prompt token first + i + 1. Holds the hidden states; `logits` makes them in slices."""

    work: ScheduledWork
    first: int
    hidden: torch.Tensor
    compute_logits: Callable[[torch.Tensor], torch.Tensor]

    def logits(self, rows_per_slice: int = 128) -> Iterator[tuple[int, torch.Tensor]]:
        """(first position, logits of up to rows_per_slice positions from there), in order."""
        with torch.inference_mode():
            for start in range(0, self.hidden.shape[0], rows_per_slice):
                yield self.first + start, self.compute_logits(self.hidden[start:start + rows_per_slice])


@dataclass(slots=True)
class StepResult:
    """One step's results: logits of the sampling rows, and finished embeddings."""

    logits: torch.Tensor                       # [R, vocab]
    sampling: list[ScheduledWork]              # the R sampling requests, in row order
    embeddings: dict[str, torch.Tensor]        # request id -> last prompt row's hidden state
    prompt_logits: list[PromptLogits]          # prompt positions of requests wanting prompt_logprobs


def kernel_supported(device: torch.device, dtype: torch.dtype, block_size: int,
                     head_dim: int) -> bool:
    """Whether the C++ attention kernel serves this configuration (it then needs a blocked cache)."""
    return (device.type == "cpu" and dtype == torch.float32 and block_size == 16
            and head_dim % 16 == 0 and load_cpu_kernels() is not None)


class ModelRunner:
    """Owns the KV cache tensors and executes one flat batch per engine step."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 block_size: int, device: torch.device, use_kernels: bool = True) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        # NOTE: the C++ attention kernel reads float32 KV straight from the blocks; other
        # devices and dtypes take the gather + SDPA path.
        self.kernels = load_cpu_kernels() if use_kernels else None
        if self.kernels is not None and kv_caches and kv_caches[0][0].dim() != 4:
            raise ValueError("the attention kernel needs a blocked KV cache (kernel_supported)")

    @contextmanager
    def step_threads(self) -> Iterator[None]:
        """Around a step, on the thread that runs it: torch's own ops on this thread alone
        when the layers run in one C++ call; the thread's team is restored after.

        NOTE: the stack's layers run on the kernels' work pool, and torch's ops around them are
        small (embedding rows, the final norm, sampling). As OpenMP regions, each woke torch's
        OpenMP worker, which then spun (GOMP_SPINCOUNT, which the `shoal` command sets so that
        the encoder's back-to-back regions find their worker awake) on the core the pool's
        worker needed: one stream decoded ~4% slower. The setting is this thread's only."""
        if self.kernels is None or getattr(self.model, "stack", None) is None:
            yield
            return
        with self.kernels.torch_alone_in_this_thread():
            yield

    def execute(self, scheduled: Sequence[ScheduledWork]) -> tuple[torch.Tensor, list[ScheduledWork]]:
        """Computes the step; returns (logits [R, vocab], the R sampling requests in order)."""
        result = self.execute_step(scheduled)
        return result.logits, result.sampling

    @torch.inference_mode()
    def execute_step(self, scheduled: Sequence[ScheduledWork]) -> StepResult:
        """Computes the step: the sampling rows' logits; the final hidden state of each
        embedding request whose prompt ends in this step (its last token: the pooling
        llama.cpp and Ollama use for decoder models); and the prompt positions of requests
        that want their logits (`skip_prefix_cache` set: prompt_logprobs), each row p
        predicting prompt token p + 1."""
        # Decodes first, then prefill chunks (the fallback batches the decodes together).
        ordered = sorted(scheduled, key=lambda w: w.num_new_tokens > 1)
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampling: list[ScheduledWork] = []
        prompt_rows: list[int] = []
        prompt_works: list[tuple[ScheduledWork, int, int]] = []     # (work, first position, rows)
        embed_rows: list[int] = []
        embedding: list[ScheduledWork] = []
        bs = self.block_size
        for work in ordered:
            start, n = work.start_pos, work.num_new_tokens
            all_ids = work.request.all_token_ids  # type: ignore[attr-defined]
            if getattr(work.request, "skip_prefix_cache", False):
                # positions whose next token is still a prompt token
                last = min(start + n, len(work.request.prompt_token_ids) - 1)  # type: ignore[attr-defined]
                if last > start:
                    prompt_works.append((work, start, last - start))
                    prompt_rows.extend(range(len(token_ids), len(token_ids) + last - start))
            token_ids.extend(all_ids[start:start + n])
            table = work.block_ids
            positions.extend(range(start, start + n))
            slots.extend(table[pos // bs] * bs + pos % bs for pos in range(start, start + n))
            if start + n == len(all_ids):
                if getattr(work.request, "embed", False):
                    embed_rows.append(len(token_ids) - 1)
                    embedding.append(work)
                else:
                    sample_rows.append(len(token_ids) - 1)
                    sampling.append(work)
        dev = self.device
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
                                 block_size=bs)
        if self.kernels is not None:
            self._kernel_metadata(meta, ordered)
        else:
            self._fallback_metadata(meta, ordered)
        hidden = self.model(torch.tensor(token_ids, dtype=torch.long, device=dev),
                            torch.tensor(positions, dtype=torch.long, device=dev),
                            self.kv_caches, meta)
        prompt_logits: list[PromptLogits] = []
        if prompt_rows:
            # NOTE: hidden states, not logits: a 1024-token chunk's logits over a 49k vocabulary
            # are 200 MB; PromptLogits.logits makes them a slice at a time.
            rows = torch.tensor(prompt_rows, dtype=torch.long, device=dev)
            prompt_hidden = hidden.index_select(0, rows)
            offset = 0
            for work, first, count in prompt_works:
                prompt_logits.append(PromptLogits(work, first, prompt_hidden[offset:offset + count],
                                                  self.model.compute_logits))
                offset += count
        embeddings = {}
        if embedding:
            rows = torch.tensor(embed_rows, dtype=torch.long, device=dev)
            vectors = hidden.index_select(0, rows).float().cpu()
            embeddings = {w.request.request_id: vectors[i]  # type: ignore[attr-defined]
                          for i, w in enumerate(embedding)}
        if not sampling:
            return StepResult(hidden.new_empty((0, 0)), [], embeddings, prompt_logits)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=dev)
        return StepResult(self.model.compute_logits(hidden.index_select(0, rows)), sampling,
                          embeddings, prompt_logits)

    def _padded_tables(self, works: Sequence[ScheduledWork]) -> torch.Tensor:
        bs = self.block_size
        needed = [(w.start_pos + w.num_new_tokens + bs - 1) // bs for w in works]
        width = max(needed)
        rows = [w.block_ids[:n] + [0] * (width - n) for w, n in zip(works, needed)]
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    def _kernel_metadata(self, meta: AttentionMetadata, ordered: Sequence[ScheduledWork]) -> None:
        starts = [0]
        for work in ordered:
            starts.append(starts[-1] + work.num_new_tokens)
        meta.kernels = self.kernels
        meta.block_tables = self._padded_tables(ordered)
        meta.query_start = torch.tensor(starts, dtype=torch.long)
        meta.first_pos = torch.tensor([w.start_pos for w in ordered], dtype=torch.long)

    def _fallback_metadata(self, meta: AttentionMetadata, ordered: Sequence[ScheduledWork]) -> None:
        decodes = [w for w in ordered if w.num_new_tokens == 1]
        if decodes:
            lengths = torch.tensor([w.start_pos + 1 for w in decodes], dtype=torch.long,
                                   device=self.device)
            prepare_decode_gather(meta, self._padded_tables(decodes), lengths)
        offset = len(decodes)
        for work in ordered[len(decodes):]:
            start, n = work.start_pos, work.num_new_tokens
            context_slots = self._slots_for(work.block_ids, start + n) if start > 0 else None
            meta.prefills.append(PrefillChunk(offset, n, start + n, context_slots))
            offset += n

    def _slots_for(self, block_ids: list[int], length: int) -> torch.Tensor:
        bs = self.block_size
        blocks = torch.tensor(block_ids[: (length + bs - 1) // bs], dtype=torch.long, device=self.device)
        return (blocks[:, None] * bs + torch.arange(bs, device=self.device)).flatten()[:length]
