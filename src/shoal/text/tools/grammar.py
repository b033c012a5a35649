"""The Lark grammar (llguidance's dialect) that constrains a request's tool calls.

With tool_choice "auto" the grammar is lazy: any text is allowed until the model writes the
format's opening marker (or, for llama3_json, opens the answer with '{'); from there the call
must be well formed: a declared function's name, then arguments that validate against its
`parameters` schema, then the closing marker. "required" and a named function start the
answer with the call itself. Without parallel calls, one call ends the answer.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from shoal.core.closed_objects import close_objects
from shoal.text.tools.formats import LLAMA3_JSON, MISTRAL, ToolFormat
from shoal.text.tools.spec import FunctionTool, ToolChoice

# Compact JSON with single spaces, as the engine writes response_format JSON (grammar.py there).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def call_schema(tool: FunctionTool, args_key: str) -> dict[str, Any]:
    """The JSON of one call to `tool`: {"name": <its name>, args_key: <its parameters>}."""
    # objects closed as for response_format (core/closed_objects.py): pydantic's schemas leave
    # extra keys unsaid, and a model would go on inventing arguments until max_tokens
    params = close_objects(dict(tool.parameters))
    # NOTE: $defs move to the root: "#/$defs/X" refs (pydantic writes them) resolve from there.
    hoisted = {key: params.pop(key) for key in ("$defs", "definitions") if key in params}
    params.pop("$schema", None)
    return {"type": "object",
            "properties": {"name": {"const": tool.name}, args_key: params},
            "required": ["name", args_key], "additionalProperties": False,
            **hoisted, "x-guidance": JSON_STYLE}


def _lark_regex(text: str) -> str:
    return re.escape(text).replace("/", "\\/")


def tool_call_grammar(fmt: ToolFormat, tools: Sequence[FunctionTool], choice: ToolChoice,
                      parallel: bool, special: Mapping[str, int]) -> str:
    """`special`: the format's markers that are tokens of their own in the vocabulary -> their
    ids (matched as that token, never as text)."""
    chosen = [t for t in tools if choice.mode != "function" or t.name == choice.name]

    def lit(marker: str) -> str:
        return f"<[{special[marker]}]>" if marker in special else json.dumps(marker)

    rules = ["%llguidance {}", "TEXT: /(.|\\n)*/"]
    rules += [f"call_{i}: %json {json.dumps(call_schema(t, fmt.args_key))}" for i, t in enumerate(chosen)]
    rules.append("call: " + " | ".join(f"call_{i}" for i in range(len(chosen))))
    free = choice.mode == "auto"
    if fmt is LLAMA3_JSON:
        # The answer is either text that does not open with '{', or calls.
        rules.append("PLAIN: /(\\s*[^{\\s](.|\\n)*)?/")
        more = ' (";" " " call)*' if parallel else ""
        rules.append(f"calls: {lit(fmt.start)}? call{more}")
        rules.insert(1, "start: PLAIN | calls" if free else "start: calls")
        return "\n".join(rules) + "\n"
    if free:
        # lazy: the shortest text that ends with the marker, then the call is enforced
        opener = ("TEXT " + lit(fmt.start)) if fmt.start in special else "head"
        if fmt.start not in special:
            rules.append(f"head[lazy]: /(.|\\n)*{_lark_regex(fmt.start)}/")
        rules.insert(1, "start: TEXT | calls")
    else:
        opener = lit(fmt.start)
        rules.insert(1, "start: calls")
    if fmt is MISTRAL:
        more = ' ("," " " call)*' if parallel else ""
        rules.append(f'calls: {opener} "[" call{more} "]"')
    else:
        one = f'"\\n" call "\\n" {lit(fmt.end)}'
        more = f' ("\\n" {lit(fmt.start)} {one})*' if parallel else ""
        rules.append(f"calls: {opener} {one}{more}")
    return "\n".join(rules) + "\n"
