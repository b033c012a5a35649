"""plan_tools: a request's tools, tool_choice and parallel_tool_calls, for one model -> what to
render, the constraint on the output, and the parser for it. Both dialects (and any future
endpoint) build their tool handling on this one function.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shoal.core.structured_output import StructuredOutput
from shoal.text.tokenizer import Tokenizer
from shoal.text.tools.formats import ToolFormat, detect_format
from shoal.text.tools.grammar import tool_call_grammar
from shoal.text.tools.parsing import ParsedOutput, ToolCallStream, parse_tool_calls
from shoal.text.tools.prompt import rewrite_history, tool_prompt
from shoal.text.tools.spec import FunctionTool, ToolChoice, check_tool_choice, check_tools

# End-of-turn tokens that reach the text when special tokens are kept (Llama 3's eom/eot too).
_END_TOKENS = ("<|eom_id|>", "<|eot_id|>", "</s>", "<|im_end|>", "<|end_of_text|>")


@dataclass(frozen=True, slots=True)
class ToolPlan:
    format: ToolFormat
    choice: ToolChoice
    tools: list[FunctionTool]
    parallel: bool
    structured: StructuredOutput | None     # the grammar over the answer (None: no tools in play)
    keep_special_tokens: bool               # the format's markers are special tokens: keep them
    strip: tuple[str, ...] = field(default=())

    @property
    def active(self) -> bool:
        """Calls may be made (and are parsed out of the answer)."""
        return self.choice.mode != "none"

    @property
    def render_tools(self) -> list[dict[str, Any]] | None:
        """The tools to hand the chat template (None: the template renders none)."""
        if not self.active or not self.format.native:
            return None
        return [t.as_openai() for t in self.tools]

    def messages(self, messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """The conversation to render: as given for a template that renders tools; through the
        built-in prompt otherwise (the tools in the system message, tool traffic as text)."""
        if self.format.native:
            return [dict(m) for m in messages]
        has_traffic = any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
        if not self.active and not has_traffic:
            return [dict(m) for m in messages]
        prompt = tool_prompt(self.tools, self.parallel) if self.active else None
        return rewrite_history(messages, prompt)

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self.format, self.strip)

    def parse(self, text: str) -> ParsedOutput:
        return parse_tool_calls(text, self.format, self.strip)


def token_markers(fmt: ToolFormat, tokenizer: Tokenizer) -> dict[str, int]:
    """The format's markers that are added tokens of this vocabulary -> their ids.

    NOTE: llguidance treats every added token (special or not, e.g. Qwen's <tool_call>) as a
    token of its own that no text matches, so the grammar names these by id."""
    added = tokenizer.backend.get_added_tokens_decoder()
    out = {}
    for marker in fmt.markers:
        token_id = tokenizer.token_to_id(marker)
        if token_id is not None and token_id in added:
            out[marker] = token_id
    return out


def plan_tools(tools: Any, tool_choice: Any, parallel_tool_calls: bool | None,
               template: str | None, tokenizer: Tokenizer, *,
               tools_field: str = "tools", choice_field: str = "tool_choice") -> ToolPlan:
    """InvalidParameterError (naming the field) for malformed tools or a choice that does not
    fit them. Whether each `parameters` schema compiles is the engine's check."""
    checked = check_tools(tools, tools_field)
    choice = check_tool_choice(tool_choice, checked, choice_field)
    fmt = detect_format(template)
    # NOTE: a named function is called once (OpenAI's forced call); small models asked for
    # "one or more" tend to repeat the same call until max_tokens.
    parallel = parallel_tool_calls is not False and choice.mode != "function"
    tokens = token_markers(fmt, tokenizer)
    # special tokens are dropped from the text unless kept: the parser must see the markers
    special = any(i in tokenizer.all_special_ids for i in tokens.values())
    structured = None
    if choice.mode != "none":
        structured = StructuredOutput.grammar(
            tool_call_grammar(fmt, checked, choice, parallel, tokens), field=tools_field)
    strip: tuple[str, ...] = ()
    if special:
        eos = {tokenizer.id_to_token(i) for i in tokenizer.eos_token_ids}
        strip = tuple(sorted({t for t in eos if t} | {t for t in _END_TOKENS
                                                      if tokenizer.token_to_id(t) is not None}))
    return ToolPlan(fmt, choice, checked, parallel, structured, bool(special), strip)
