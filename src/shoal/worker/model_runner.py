"""ModelRunner: turns a scheduler step into tensors, runs the model, returns logits."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from shoal.worker.attention import AttentionMetadata, PrefillChunk, prepare_decode_gather
from shoal.worker.cpu_kernels import load_cpu_kernels


class ScheduledWork(Protocol):
    """What the runner needs of one scheduled request (see engine.scheduler)."""

    request: object
    num_new_tokens: int
    block_ids: list[int]
    start_pos: int


class ModelRunner:
    """Owns the KV cache tensors and executes one flat batch per engine step."""

    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 block_size: int, device: torch.device, use_kernels: bool = True) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        # NOTE: the C++ decode kernel reads float32 KV straight from the blocks; other
        # devices and dtypes take the gather + SDPA path.
        self.kernels = None
        if device.type == "cpu" and kv_caches and kv_caches[0][0].dtype == torch.float32 \
                and use_kernels:
            self.kernels = load_cpu_kernels()

    @torch.inference_mode()
    def execute(self, scheduled: Sequence[ScheduledWork]) -> tuple[torch.Tensor, list[ScheduledWork]]:
        """Computes the step; returns (logits [R, vocab], the R sampling requests in order)."""
        decodes = [s for s in scheduled if s.num_new_tokens == 1]
        prefills = [s for s in scheduled if s.num_new_tokens > 1]
        ordered = decodes + prefills
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampling: list[ScheduledWork] = []
        bs = self.block_size
        for work in ordered:
            start, n = work.start_pos, work.num_new_tokens
            token_ids.extend(work.request.all_token_ids[start:start + n])  # type: ignore[attr-defined]
            table = work.block_ids
            for pos in range(start, start + n):
                positions.append(pos)
                slots.append(table[pos // bs] * bs + pos % bs)
            if start + n == len(work.request.all_token_ids):  # type: ignore[attr-defined]
                sample_rows.append(len(token_ids) - 1)
                sampling.append(work)
        dev = self.device
        meta = AttentionMetadata(slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
                                 block_size=bs)
        if decodes:
            self._add_decode_metadata(meta, decodes)
        offset = len(decodes)
        for work in prefills:
            start, n = work.start_pos, work.num_new_tokens
            context_slots = None
            if start > 0:
                context_slots = self._slots_for(work.block_ids, start + n)
            meta.prefills.append(PrefillChunk(offset, n, start + n, context_slots))
            offset += n
        hidden = self.model(torch.tensor(token_ids, dtype=torch.long, device=dev),
                            torch.tensor(positions, dtype=torch.long, device=dev),
                            self.kv_caches, meta)
        if not sampling:
            return hidden.new_empty((0, 0)), []
        rows = torch.tensor(sample_rows, dtype=torch.long, device=dev)
        return self.model.compute_logits(hidden.index_select(0, rows)), sampling

    def _slots_for(self, block_ids: list[int], length: int) -> torch.Tensor:
        bs = self.block_size
        blocks = torch.tensor(block_ids[: (length + bs - 1) // bs], dtype=torch.long, device=self.device)
        return (blocks[:, None] * bs + torch.arange(bs, device=self.device)).flatten()[:length]

    def _add_decode_metadata(self, meta: AttentionMetadata, decodes: list[ScheduledWork]) -> None:
        bs = self.block_size
        lengths = [w.start_pos + 1 for w in decodes]
        max_blocks = (max(lengths) + bs - 1) // bs
        table = [w.block_ids[:max_blocks] + [0] * (max_blocks - min(len(w.block_ids), max_blocks))
                 for w in decodes]
        meta.decode_block_table = torch.tensor(table, dtype=torch.long, device=self.device)
        meta.decode_context_lens = torch.tensor(lengths, dtype=torch.long, device=self.device)
        meta.num_decodes = len(decodes)
        meta.kernels = self.kernels
        if self.kernels is None:
            prepare_decode_gather(meta)
