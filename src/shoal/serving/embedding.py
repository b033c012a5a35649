"""Embedding requests, shared by both dialects: inputs to token lists (truncated as asked),
the request run through GenerationService.start_embedding (same quotas, queues, residency,
metrics as generation), and the vectors cut to `dimensions` and normalised.

Pooling is the model's: an encoder pools and normalises as its own files say
(model/encoder_config.py); a decoder model answers with its last token's final hidden state
(after the final norm), the pooling llama.cpp gives a model with no pooling type and Ollama
serves for such models. The dialects normalise on top of that as their servers do: /api/embed
and /v1/embeddings always (Ollama's and vLLM's defaults), the legacy /api/embeddings never.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shoal.core.errors import InvalidParameterError, ServerShuttingDownError
from shoal.core.sampling_params import SamplingParams
from shoal.serving.generate import GenerationService
from shoal.serving.request import GenerateRequest, new_request_id
from shoal.serving.served import ServedModel


@dataclass(slots=True)
class EmbeddingResult:
    vectors: list[np.ndarray]        # float32, one per input
    num_prompt_tokens: int
    started: float                 # monotonic: the request's arrival
    finished: float


def tokenize_inputs(model: ServedModel, items: Sequence[str | list[int]], *, truncate: bool,
                    keep_last: int | None = None, context: int | None = None,
                    field: str = "input") -> list[list[int]]:
    """Token ids of each input: a text is encoded as the model encodes prompts (its special
    tokens included), a token list is taken as it is. Longer than the context: cut to fit
    (keeping a text's special tokens at both ends) when `truncate`, else 400. `keep_last`
    (vLLM's truncate_prompt_tokens) keeps only an input's last tokens; `context` (Ollama's
    num_ctx) lowers the limit."""
    limit = model.max_model_len if context is None else min(context, model.max_model_len)
    tokenizer = model.tokenizer
    out: list[list[int]] = []
    tail: int | None = None
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = tokenizer.encode(item)
            if not ids:
                raise InvalidParameterError(field, f"input {i} is empty (it has no tokens)")
        else:
            ids = list(item)
            if not ids:
                raise InvalidParameterError(field, f"input {i} is an empty list of token ids")
            model.engine.limits.check_token_ids(ids, field)
        if keep_last is not None and len(ids) > keep_last:
            ids = ids[-keep_last:]
        if len(ids) > limit:
            if not truncate:
                raise InvalidParameterError(
                    field, f"input {i} has {len(ids)} tokens, more than the model's context of "
                           f"{limit} (and truncate is false)")
            if isinstance(item, str):
                # the leading specials survive a cut from the end; the trailing ones are put back
                tail = tokenizer.special_affixes()[1] if tail is None else tail
                ids = ids[:limit - tail] + ids[len(ids) - tail:] if tail else ids[:limit]
            else:
                ids = ids[:limit]
        out.append(ids)
    return out


def check_dimensions(model: ServedModel, dimensions: int | None, field: str = "dimensions") -> None:
    """`dimensions` must be positive and a size the model can be cut to: its own, or one of a
    Matryoshka model's sizes; anything else would be a different, untrained embedding."""
    if dimensions is None:
        return
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions <= 0:
        raise InvalidParameterError(field, f"must be a positive integer, got {dimensions!r}")
    config = model.info.model_config
    native = config.hidden_size
    allowed = {native, *getattr(config, "matryoshka_dimensions", ())}
    if dimensions not in allowed:
        sizes = ", ".join(str(d) for d in sorted(allowed, reverse=True))
        raise InvalidParameterError(field, f"{model.name} makes embeddings of {sizes} dimensions; "
                                           f"it cannot give {dimensions}")


def finish_vector(vector: np.ndarray, *, normalize: bool, dimensions: int | None) -> np.ndarray:
    """The float32 vector cut to `dimensions`, then L2-normalised if asked (a cut one always
    is); the norm is summed in float64 so a renormalised vector's length is 1 to float32's
    precision."""
    if dimensions is not None and dimensions < len(vector):
        vector = vector[:dimensions]
        normalize = True
    if not normalize:
        return vector
    norm = float(np.sqrt(np.dot(vector.astype(np.float64), vector.astype(np.float64))))
    return (vector / norm).astype(np.float32) if norm > 0 else vector


async def embed(service: GenerationService, model: ServedModel, inputs: list[list[int]], *,
                dialect: str, keep_alive: float | None = None,
                arrival: float | None = None) -> EmbeddingResult:
    """Runs one embedding request to the end; the vectors come back in input order."""
    started = time.monotonic() if arrival is None else arrival
    req = GenerateRequest(model=model, prompt_token_ids=[t for ids in inputs for t in ids],
                          params=SamplingParams(max_tokens=1), dialect=dialect,
                          request_id=new_request_id("embd"), arrival_time=started,
                          keep_alive=keep_alive, embed_inputs=inputs)
    vectors: list[np.ndarray | None] = [None] * len(inputs)
    stream = service.start_embedding(req)
    try:
        async for batch in stream:
            for out in batch:
                if out.embedding is not None:
                    vectors[out.index] = out.embedding
    finally:
        await stream.aclose()
    if any(v is None for v in vectors):
        raise ServerShuttingDownError()     # aborted (by the drain) before every input was done
    return EmbeddingResult(vectors=vectors, num_prompt_tokens=len(req.prompt_token_ids),  # type: ignore[arg-type]
                           started=started, finished=time.monotonic())
