"""StructuredOutputManager: the engine core's one door to constrained decoding.

It holds constrained requests while their grammar compiles (outside the scheduler, so a
compile never holds up a step), hands them back with a matcher per sample once it is ready,
refuses them if it fails or times out, and runs each step's masks beside the forward pass.
"""
from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass

import torch

from shoal.core.errors import InvalidParameterError, UnsupportedFeatureError
from shoal.core.structured_output import StructuredOutput
from shoal.engine.request import Request, RequestStatus
from shoal.engine.structured.compiler import CompiledGrammar, GrammarCompiler
from shoal.engine.structured.grammar import mask_vocab_size
from shoal.engine.structured.masks import MaskFiller, SampleGrammar, apply_masks
from shoal.text.tokenizer import Tokenizer


@dataclass(slots=True)
class AwaitingGrammar:
    """A user request's samples, held out of the scheduler until `future` is done."""

    user_request_id: str
    requests: list[Request]
    structured: StructuredOutput
    future: Future[CompiledGrammar]


@dataclass(slots=True)
class MaskJob:
    """One step's masks being filled: the constrained samples in mask-row order."""

    request_ids: list[str]
    future: Future[torch.Tensor]


class StructuredOutputManager:
    """Compiles, holds and masks the constrained requests of one engine."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: frozenset[int], *,
                 compile_timeout: float = 10.0, cache_size: int = 128,
                 device: torch.device | None = None) -> None:
        width = mask_vocab_size(tokenizer, vocab_size)
        self.compiler = GrammarCompiler(tokenizer, width, cache_size=cache_size)
        self.masks = MaskFiller(width, unpack_on_host=device is None or device.type == "cpu")
        self.eos_token_ids = eos_token_ids
        self.compile_timeout = compile_timeout
        self._awaiting: list[AwaitingGrammar] = []

    # ---- requests waiting for their grammar ---------------------------------------------
    def hold(self, user_request_id: str, requests: list[Request], structured: StructuredOutput) -> None:
        """Starts compiling; the samples wait here, their arrival time keeping their place."""
        self._awaiting.append(AwaitingGrammar(user_request_id, requests, structured,
                                              self.compiler.submit(structured)))

    def take_settled(self) -> tuple[list[tuple[Request, SampleGrammar]],
                                    list[tuple[str, InvalidParameterError]]]:
        """Requests whose compile has ended: (each sample with its new matcher, in arrival
        order) and (user request id, error) for those refused."""
        ready: list[tuple[Request, SampleGrammar]] = []
        failed: list[tuple[str, InvalidParameterError]] = []
        waiting = []
        for entry in self._awaiting:
            if entry.future.done():
                error = entry.future.exception()
                if error is None:
                    compiled = entry.future.result()
                    ready.extend((r, SampleGrammar(compiled.new_matcher(), self.eos_token_ids))
                                 for r in entry.requests)
                else:
                    failed.append((entry.user_request_id, compile_failure(entry.structured, error)))
            elif self._timed_out(entry):
                failed.append((entry.user_request_id, InvalidParameterError(
                    entry.structured.field, f"the {entry.structured.kind.value} did not compile "
                    f"within {self.compile_timeout:g} s")))
            else:
                waiting.append(entry)
        self._awaiting = waiting
        return ready, failed

    def abort(self, user_request_id: str) -> list[Request]:
        """Drops a held request; returns its samples, marked aborted."""
        dropped = [e for e in self._awaiting if e.user_request_id == user_request_id]
        self._awaiting = [e for e in self._awaiting if e.user_request_id != user_request_id]
        requests = [r for e in dropped for r in e.requests]
        for request in requests:
            request.status = RequestStatus.FINISHED_ABORTED
        return requests

    def has_held(self) -> bool:
        return bool(self._awaiting)

    def has_settled(self) -> bool:
        """Whether take_settled() would hand back or refuse something now."""
        return any(e.future.done() or self._timed_out(e) for e in self._awaiting)

    def wait(self, timeout: float) -> None:
        """Blocks until a held request's compile ends, or `timeout` seconds."""
        if self._awaiting:
            wait([e.future for e in self._awaiting], timeout, return_when=FIRST_COMPLETED)

    @property
    def num_held(self) -> int:
        """Sequences waiting for their grammar (queued, not yet in the scheduler's queue)."""
        return sum(len(e.requests) for e in self._awaiting)

    def _timed_out(self, entry: AwaitingGrammar) -> bool:
        # NOTE: the compile's own time counts, not its wait behind other compiles.
        return self.compiler.seconds_compiling(entry.structured, time.monotonic()) >= self.compile_timeout

    # ---- one step's masks ---------------------------------------------------------------
    def start_masks(self, constrained: list[tuple[str, SampleGrammar]]) -> MaskJob | None:
        """Starts filling the masks of the samples that sample this step (none: None)."""
        if not constrained:
            return None
        return MaskJob([request_id for request_id, _ in constrained],
                       self.masks.submit([grammar for _, grammar in constrained]))

    def apply_masks(self, job: MaskJob, logits: torch.Tensor, row_ids: list[str]) -> None:
        """Waits for the job and masks the logits; row_ids names each logits row's sample."""
        disallowed = self.masks.wait(job.future)
        row_of = {request_id: row for row, request_id in enumerate(row_ids)}
        apply_masks(logits, [row_of[request_id] for request_id in job.request_ids], disallowed)

    def close(self) -> None:
        self.compiler.close()
        self.masks.close()


def compile_failure(structured: StructuredOutput, error: BaseException) -> InvalidParameterError:
    """The error a request gets for its failed compile, naming its own field (requests that
    shared one compile may have named the constraint differently)."""
    if type(error) in (InvalidParameterError, UnsupportedFeatureError):
        return type(error)(structured.field, error.message)  # type: ignore[attr-defined]
    if isinstance(error, InvalidParameterError):
        return error
    # NOTE: not the user's constraint but this model's vocabulary (llguidance could not
    # read the tokenizer): still the request's refusal, not an engine failure.
    return UnsupportedFeatureError(
        structured.field, f"constrained decoding is not available for this model: {error}")
