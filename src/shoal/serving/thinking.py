"""A reasoning model's turn: whether its output starts inside the thinking, whether it may
think at all, and the parser that splits its output (both dialects use this)."""
from __future__ import annotations

from dataclasses import dataclass

from shoal.core.structured_output import StructuredOutput
from shoal.serving.served import ServedModel
from shoal.text.reasoning import ReasoningFormat, ReasoningParser, prompt_opens_thinking


@dataclass(frozen=True, slots=True)
class Thinking:
    """How one rendered prompt leaves a reasoning model."""

    fmt: ReasoningFormat
    in_thinking: bool       # the prompt opened the thinking: the output starts inside it
    active: bool            # the model may think in this turn (the prompt did not close it)
    show: bool = True       # the reply carries the thinking (False: parsed out and dropped)
    open_id: int | None = None          # the start and end tags' token ids
    close_id: int | None = None
    eos_ids: tuple[int, ...] = ()

    def parser(self) -> ReasoningParser:
        return ReasoningParser(self.fmt, self.in_thinking)

    def constrain(self, structured: StructuredOutput | None) -> StructuredOutput | None:
        """A constraint for this turn: while the model may think, it binds only the answer
        after the thinking (as vLLM does), so the thinking is neither cut nor forced."""
        if structured is None or not self.active or self.close_id is None:
            return structured
        opening = None if self.in_thinking else self.open_id
        return structured.after_thinking(opening, self.close_id, self.eos_ids)


def thinking_for(model: ServedModel, prompt_text: str | None, show: bool = True) -> Thinking | None:
    """The turn's thinking setup; None for a model that does not reason."""
    fmt = model.reasoning
    if fmt is None:
        return None
    text = prompt_text or ""
    opened = prompt_opens_thinking(text, fmt)
    # NOTE: a template whose thinking is switched off writes an empty, closed block
    # (Qwen3: "<think>\n\n</think>\n\n") at the end of the prompt.
    closed = not opened and text.rstrip().endswith(fmt.end)
    tokenizer = model.tokenizer
    return Thinking(fmt=fmt, in_thinking=opened, active=not closed, show=show,
                    open_id=tokenizer.token_to_id(fmt.start), close_id=tokenizer.token_to_id(fmt.end),
                    eos_ids=tuple(sorted(tokenizer.eos_token_ids)))
