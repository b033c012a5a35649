"""What a generate request is on its way through serving, and how it ended.

Every dialect's endpoint becomes a GenerateRequest; observers (access log, audit, per-key
metrics) learn how each admitted one ended from a GenerationEnd. The quotas, the request
records and the generate service all speak these types, so they stand on their own here.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from shoal.access.principal import Principal, current_principal
from shoal.core.sampling_params import SamplingParams
from shoal.engine.outputs import RequestOutput
from shoal.serving.served import ServedModel
from shoal.serving.thinking import Thinking
from shoal.text.tools.plan import ToolPlan


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass(slots=True)
class GenerateRequest:
    """What every dialect's endpoint becomes: a tokenized prompt and sampling parameters."""

    model: ServedModel
    prompt_token_ids: list[int]
    params: SamplingParams
    request_id: str = field(default_factory=lambda: new_request_id("req"))
    priority: int = 0
    prompt_text: str | None = None
    dialect: str = "openai"
    arrival_time: float = field(default_factory=time.monotonic)
    keep_alive: float | None = None     # seconds the model stays after this request (None: default)
    # False: the client set no max_tokens and the dialect filled in the room left (Ollama's
    # num_predict <= 0), so SHOAL_MAX_TOKENS caps it instead of refusing it
    max_tokens_given: bool = True
    # who asked (set by the auth middleware for the HTTP request that builds this one)
    principal: Principal = field(default_factory=current_principal.get)
    # a reasoning model's turn (serving/thinking.py): its output is split into thinking and
    # content; None for other models and raw prompts
    thinking: Thinking | None = None
    # an embedding request: one token list per input (prompt_token_ids is then their
    # concatenation, what quotas, queues, logs and metrics count)
    embed_inputs: list[list[int]] | None = None
    # the request's tools (text/tools/plan.py): how its answer is parsed into calls; None: no tools
    tools: ToolPlan | None = None


@dataclass(slots=True)
class GenerationEnd:
    """How one admitted request ended, for observers (access log, audit, per-key metrics)."""

    request: GenerateRequest
    final: RequestOutput | None     # the last update ("abort" when the caller left); None: refused
    num_output_tokens: int = 0      # over all samples
    texts: list[str] | None = None  # each sample's text, when GenerationService.keep_text is set


# Called when a request's stream starts (in its HTTP request's context); returns its end callback.
GenerationObserver = Callable[[GenerateRequest], Callable[[GenerationEnd], None]]
