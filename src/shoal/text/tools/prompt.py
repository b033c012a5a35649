"""The built-in tool prompt: tools for a model whose chat template renders none.

The tools are written into the system message (a new one first, or appended to the
request's), and the history's tool traffic is rewritten into plain turns the template can
render: an assistant's calls become <tool_call> blocks in its content, a tool result becomes
a user turn holding a <tool_response> block. The model answers in the same <tool_call> format
(formats.BUILTIN), which the grammar enforces and the parser reads back.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from shoal.text.tools.spec import FunctionTool

TOOL_PROMPT_HEAD = (
    "You can call functions to help answer. These are the functions, one JSON object per line:\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call a function, write only this, with the function's name and its arguments as a "
    "JSON object:\n"
    "<tool_call>\n{{\"name\": \"<function name>\", \"arguments\": {{<arguments>}}}}\n</tool_call>\n")
ONE_CALL = "Call at most one function.\n"
MANY_CALLS = "To call several functions, write one <tool_call> block for each.\n"
RESULTS = ("Function results come back inside <tool_response></tool_response> tags. "
           "When you need no function, answer normally.")


def tool_prompt(tools: Sequence[FunctionTool], parallel: bool) -> str:
    lines = "\n".join(json.dumps(t.as_openai()["function"], ensure_ascii=False) for t in tools)
    return TOOL_PROMPT_HEAD.format(tools=lines) + (MANY_CALLS if parallel else ONE_CALL) + RESULTS


def call_block(name: str, arguments: Any) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def rewrite_history(messages: Sequence[Mapping[str, Any]], prompt: str | None) -> list[dict[str, Any]]:
    """The messages with tool calls and results as text, and `prompt` in the system message."""
    out: list[dict[str, Any]] = []
    for message in messages:
        entry = dict(message)
        role = entry.get("role")
        calls = entry.pop("tool_calls", None)
        if role == "assistant" and calls:
            blocks = []
            for call in calls:
                function = call.get("function", {}) if isinstance(call, Mapping) else {}
                blocks.append(call_block(str(function.get("name", "")), function.get("arguments", {})))
            text = entry.get("content") or ""
            entry["content"] = "\n".join(([text] if text else []) + blocks)
        elif role == "tool":
            content = entry.get("content")
            if not isinstance(content, str):
                content = json.dumps(content, ensure_ascii=False)
            entry = {"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"}
        out.append(entry)
    if prompt:
        if out and out[0].get("role") in ("system", "developer") and isinstance(out[0].get("content"), str):
            first = out[0]["content"]
            out[0] = {**out[0], "content": f"{first}\n\n{prompt}" if first else prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out
