"""Tools for either dialect: the request's tools planned for one model (text/tools/plan.py),
each function's `parameters` schema checked to compile (a 400 naming that tool), and the
calls written out in each dialect's shape."""
from __future__ import annotations

from typing import Any

from shoal.core.errors import InvalidParameterError
from shoal.core.structured_output import StructuredOutput
from shoal.engine.structured.grammar import check_structured_output
from shoal.serving.served import ServedModel
from shoal.text.tools.parsing import ToolCall
from shoal.text.tools.plan import ToolPlan, plan_tools


def tool_plan(model: ServedModel, tools: Any, tool_choice: Any, parallel_tool_calls: bool | None,
              *, tools_field: str = "tools", choice_field: str = "tool_choice") -> ToolPlan:
    plan = plan_tools(tools, tool_choice, parallel_tool_calls, model.tool_template, model.tokenizer,
                      tools_field=tools_field, choice_field=choice_field)
    if plan.active:
        for tool in plan.tools:
            check_structured_output(StructuredOutput.json_schema(
                tool.parameters, field=f"{tool.field}.function.parameters"))
    return plan


def no_other_constraint(plan: ToolPlan, structured: StructuredOutput | None) -> None:
    """Tools in play and another output constraint: one grammar cannot enforce both, and
    dropping either would silently ignore a field."""
    if plan.active and structured is not None:
        raise InvalidParameterError(
            structured.field, "cannot be combined with tools; send tool_choice \"none\" or drop one")


def openai_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments_json}}


def ollama_call(call: ToolCall, index: int) -> dict[str, Any]:
    return {"id": call.id, "function": {"index": index, "name": call.name,
                                        "arguments": dict(call.arguments)}}
