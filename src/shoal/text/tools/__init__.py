"""Tool calling, dialect-neutral: the tools a request declares, the call format a chat template
uses, the built-in tool prompt for templates without one, the grammar that constrains calls, and
the parsers that take calls out of the model's text (whole, or as it streams).

`plan_tools` is the one entry point a dialect needs (plan.py)."""
from __future__ import annotations

from shoal.text.tools.formats import ToolFormat, detect_format
from shoal.text.tools.parsing import ParsedOutput, ToolCall, ToolCallStream, parse_tool_calls
from shoal.text.tools.plan import ToolPlan, plan_tools
from shoal.text.tools.spec import FunctionTool, ToolChoice, check_tool_choice, check_tools

__all__ = [
    "FunctionTool", "ParsedOutput", "ToolCall", "ToolCallStream", "ToolChoice", "ToolFormat",
    "ToolPlan", "check_tool_choice", "check_tools", "detect_format", "parse_tool_calls",
    "plan_tools",
]
