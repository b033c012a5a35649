"""The tools a request declares and its tool_choice, checked (errors name the field)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.core.echo import clip
from shoal.core.errors import InvalidParameterError

# What parameters mean when a function declares none (OpenAI: a function without arguments).
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class FunctionTool:
    """One callable function: its name, description and JSON-schema parameters."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    field: str                        # e.g. "tools[1]": where errors about it point

    def as_openai(self) -> dict[str, Any]:
        """The OpenAI tool object templates and the built-in prompt render."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": dict(self.parameters)}}


def check_tools(tools: Any, field: str = "tools") -> list[FunctionTool]:
    """The request's tools; InvalidParameterError naming e.g. tools[0].function.name."""
    if tools is None:
        return []
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise InvalidParameterError(field, "must be a list of tool objects")
    out: list[FunctionTool] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"{field}[{i}]"
        if not isinstance(tool, Mapping):
            raise InvalidParameterError(where, "must be an object")
        kind = tool.get("type", "function")
        if kind != "function":
            raise InvalidParameterError(
                f"{where}.type", f"tool type '{clip(str(kind))}' is not supported; only 'function'")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise InvalidParameterError(f"{where}.function", "is required and must be an object")
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InvalidParameterError(f"{where}.function.name", "is required and must be a non-empty string")
        if len(name) > 64 or any(c.isspace() or c in '"<>' for c in name):
            raise InvalidParameterError(
                f"{where}.function.name", f"'{clip(name)}' must be at most 64 characters, with no "
                                          "spaces, quotes or angle brackets")
        if name in seen:
            raise InvalidParameterError(f"{where}.function.name", f"'{clip(name)}' is declared twice")
        seen.add(name)
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise InvalidParameterError(f"{where}.function.description", "must be a string")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = EMPTY_PARAMETERS
        if not isinstance(parameters, Mapping):
            raise InvalidParameterError(f"{where}.function.parameters", "must be a JSON schema object")
        kind = parameters.get("type", "object")
        if kind != "object":
            raise InvalidParameterError(
                f"{where}.function.parameters", f"must describe an object (type 'object'), "
                                                f"got type {clip(repr(kind))}")
        out.append(FunctionTool(name, description, dict(parameters), where))
    return out


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """What the request allows: "none", "auto", "required", or one named function."""

    mode: str                         # "none" | "auto" | "required" | "function"
    name: str | None = None


def check_tool_choice(choice: Any, tools: Sequence[FunctionTool],
                      field: str = "tool_choice") -> ToolChoice:
    """OpenAI's tool_choice (absent: "auto" with tools, "none" without) checked against the tools."""
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidParameterError(
                field, f"'{clip(choice)}' is not one of none, auto, required, or "
                       '{"type": "function", "function": {"name": ...}}')
        if choice != "none" and not tools:
            raise InvalidParameterError(field, f"'{choice}' needs at least one tool in 'tools'")
        return ToolChoice(choice)
    if not isinstance(choice, Mapping):
        raise InvalidParameterError(field, "must be a string or an object")
    if choice.get("type", "function") != "function":
        raise InvalidParameterError(f"{field}.type", f"'{clip(str(choice.get('type')))}' is not "
                                                     "supported; only 'function'")
    function = choice.get("function")
    # NOTE: the Responses API's flat form {"type": "function", "name": ...} is accepted too.
    name = function.get("name") if isinstance(function, Mapping) else choice.get("name")
    if not isinstance(name, str):
        raise InvalidParameterError(f"{field}.function.name", "is required and must be a string")
    if name not in {t.name for t in tools}:
        raise InvalidParameterError(
            f"{field}.function.name", f"names '{clip(name)}', which is not among the request's tools")
    return ToolChoice("function", name)
