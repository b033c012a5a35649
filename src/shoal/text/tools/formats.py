"""The tool-call formats shoal reads and writes, and which one a chat template uses.

  hermes       <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>   (Hermes, Qwen 2/2.5/3)
  llama3_json  {"name": "f", "parameters": {...}}, optionally after <|python_tag|>; several
               calls separated by "; "                                        (Llama 3.1-3.3)
  mistral      [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]          (Mistral v3 templates)
  builtin      hermes' format, for templates that render no tools: shoal writes the tools
               into the system message itself (prompt.py) and reads the calls back.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ToolFormat:
    name: str
    start: str            # the marker a call (or a list of calls) opens with
    end: str              # the marker closing each call ("" = none)
    args_key: str         # the key the arguments go under in the call's JSON
    native: bool          # the template renders the tools itself

    @property
    def markers(self) -> tuple[str, ...]:
        return tuple(m for m in (self.start, self.end) if m)


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>", "arguments", native=True)
LLAMA3_JSON = ToolFormat("llama3_json", "<|python_tag|>", "", "parameters", native=True)
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", "", "arguments", native=True)
BUILTIN = ToolFormat("builtin", "<tool_call>", "</tool_call>", "arguments", native=False)

FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL, BUILTIN)}


def detect_format(template: str | None) -> ToolFormat:
    """The call format a chat template (Jinja or Go) renders tools in; BUILTIN when it renders
    none, or none shoal knows (its own prompt is then used instead of the template's)."""
    text = template or ""
    if "tools" not in text.lower() and ".Tools" not in text:
        return BUILTIN
    if "[TOOL_CALLS]" in text:
        return MISTRAL
    if "<tool_call>" in text:
        return HERMES
    if "<|python_tag|>" in text or ('"parameters"' in text and "<|start_header_id|>" in text):
        return LLAMA3_JSON
    return BUILTIN
