"""Chat rendering with an Ollama Modelfile TEMPLATE, as Ollama's template.Execute does it.

Ollama (template/template.go, server/routes.go) renders a chat like this:

  * The Modelfile's SYSTEM is put first as a system message when the request's first message
    is not a system message.
  * `collate`: consecutive messages of one role are merged into one (contents joined with a
    blank line; tool results are never merged); `.System` is every system message's content,
    joined with a blank line.
  * A template that reads `.Messages` anywhere is run once over
        .System .Messages .Tools .Response("") .Think .ThinkLevel .IsThinkSet
    where each message has .Role .Content .Thinking .Images .ToolCalls .ToolName .ToolCallID,
    each tool call .ID and .Function (.Index .Name .Arguments), and each tool .Type .Items and
    .Function (.Name .Description .Parameters: .Type .Defs .Items .Required .Properties).
  * Any other template is a legacy one over .System .Prompt .Response: it is run once per
    turn (a turn ends where a user or system message follows an assistant answer), and the
    last run stops where the template prints `.Response` (what the model writes next). A
    template that mentions neither `.Messages` nor `.Response` gets `{{ .Response }}` appended.

What the template sees is Ollama's data model, Go types included: a missing key of the data
map prints "<no value>" (Go's missingkey=zero over map[string]any), a field a message or tool
does not have is an error, `.Function.Arguments` and `.Tools` print as JSON, maps print and
range in sorted key order, and JSON numbers in arguments and schemas are float64.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from shoal.text.gotemplate import gofmt
from shoal.text.gotemplate.errors import TemplateError
from shoal.text.gotemplate.gofmt import Field, GoMap, GoSlice, GoStruct, StructType
from shoal.text.gotemplate.nodes import ActionNode, BranchNode, CommandNode, FieldNode, ListNode, Node, PipeNode
from shoal.text.gotemplate.template import GoTemplate, compile_template


# ---- Ollama's template data types ---------------------------------------------------------------

def _json_stringer(v: Any) -> str:
    try:
        return gofmt.go_json(v)
    except gofmt.GoFuncError:
        return ""


def _property_type_string(pt: GoSlice) -> str:
    if not pt:
        return ""
    if len(pt) == 1:
        return str(pt[0])
    return gofmt.format_v(list(pt))


def _property_type_json(pt: GoSlice) -> str:
    if len(pt) == 1:
        return gofmt.go_json(pt[0])
    return gofmt.go_json(list(pt)) if not pt.nil else "null"


MESSAGE = StructType("template.templateMessage", (
    Field("Role"), Field("Content"), Field("Thinking"), Field("Images"), Field("ToolCalls"),
    Field("ToolName"), Field("ToolCallID")), pointer=True)
TOOL_CALL = StructType("template.templateToolCall", (Field("ID"), Field("Function")))
TOOL_CALL_FUNCTION = StructType("template.templateToolCallFunction",
                                (Field("Index"), Field("Name"), Field("Arguments")))
TOOL = StructType("template.templateTool", (
    Field("Type", "type"), Field("Items", "items", True), Field("Function", "function")),
    stringer=_json_stringer)
# NOTE: Ollama's api.ToolFunction prints as JSON (its String method), which Qwen-style
# templates rely on: {"type": "function", "function": {{ .Function }}}.
TOOL_FUNCTION = StructType("template.templateToolFunction", (
    Field("Name", "name"), Field("Description", "description"), Field("Parameters", "parameters")),
    stringer=_json_stringer)
TOOL_PARAMETERS = StructType("template.templateToolFunctionParameters", (
    Field("Type", "type"), Field("Defs", "$defs", True), Field("Items", "items", True),
    Field("Required", "required", True), Field("Properties", "properties")))
TOOL_PROPERTY = StructType("api.ToolProperty", (
    Field("AnyOf", "anyOf", True), Field("Type", "type", True), Field("Items", "items", True),
    Field("Description", "description", True), Field("Enum", "enum", True),
    Field("Properties", "properties", True)))


def _go_any(v: Any) -> Any:
    """A JSON value as Go decodes it into `any`: numbers are float64, objects map[string]any."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, Mapping):
        return {str(k): _go_any(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_go_any(x) for x in v]
    return v


def _text(v: Any, where: str) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)):  # OpenAI-style content parts: the text parts, joined
        return "".join(p.get("text", "") if isinstance(p, Mapping) else str(p) for p in v)
    raise TemplateError(f"{where} must be a string, not {type(v).__name__}")


def _string_slice(v: Any, where: str) -> GoSlice:
    if v is None:
        return GoSlice(go_type="[]string", nil=True)
    if not isinstance(v, (list, tuple)):
        raise TemplateError(f"{where} must be a list of strings")
    return GoSlice([_text(x, where) for x in v], go_type="[]string")


def _property_type(v: Any, where: str) -> GoSlice:
    if isinstance(v, str):
        items: list[str] = [v]
    elif v is None:
        items = []
    elif isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        items = list(v)
    else:
        raise TemplateError(f"{where}.type must be a string or a list of strings")
    return GoSlice(items, go_type="api.PropertyType", nil=not items,
                   stringer=_property_type_string, marshal=_property_type_json)


def tool_property(schema: Any, where: str) -> GoStruct:
    """A JSON schema as api.ToolProperty (keys Ollama does not model are dropped, as Go's
    decoder drops them)."""
    if not isinstance(schema, Mapping):
        schema = {}
    any_of = schema.get("anyOf")
    nested = schema.get("properties")
    return GoStruct(
        TOOL_PROPERTY,
        AnyOf=GoSlice([tool_property(p, f"{where}.anyOf[{i}]") for i, p in enumerate(any_of)],
                      go_type="[]api.ToolProperty") if isinstance(any_of, (list, tuple)) and any_of
        else GoSlice(go_type="[]api.ToolProperty", nil=True),
        Type=_property_type(schema.get("type"), where),
        Items=_go_any(schema.get("items")),
        Description=_text(schema.get("description"), f"{where}.description"),
        Enum=GoSlice(_go_any(list(schema["enum"])), go_type="[]interface {}")
        if isinstance(schema.get("enum"), (list, tuple)) else GoSlice(nil=True),
        # nested properties keep their declaration order (api.ToolPropertiesMap)
        Properties=GoMap({str(k): tool_property(p, f"{where}.properties.{k}") for k, p in nested.items()},
                         go_type="*api.ToolPropertiesMap", ordered=True, stringer=_json_stringer)
        if isinstance(nested, Mapping) else None,
    )


def _properties_stringer(m: GoMap) -> str:
    return "{}" if m.nil else _json_stringer(m)


def tool(spec: Any, where: str = "tools[0]") -> GoStruct:
    """An OpenAI/Ollama tool definition as Ollama's templateTool."""
    if not isinstance(spec, Mapping):
        raise TemplateError(f"{where} must be an object")
    fn = spec.get("function") or {}
    if not isinstance(fn, Mapping):
        raise TemplateError(f"{where}.function must be an object")
    params = fn.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise TemplateError(f"{where}.function.parameters must be an object")
    props = params.get("properties")
    properties = GoMap(go_type="template.templateProperties", stringer=_properties_stringer,
                       nil=not isinstance(props, Mapping))
    if isinstance(props, Mapping):
        for name, schema in props.items():
            properties[str(name)] = tool_property(schema, f"{where}.function.parameters.properties.{name}")
    return GoStruct(TOOL, Type=_text(spec.get("type"), f"{where}.type"), Items=_go_any(spec.get("items")),
                    Function=GoStruct(
                        TOOL_FUNCTION, Name=_text(fn.get("name"), f"{where}.function.name"),
                        Description=_text(fn.get("description"), f"{where}.function.description"),
                        Parameters=GoStruct(
                            TOOL_PARAMETERS, Type=_text(params.get("type"), f"{where}.function.parameters.type"),
                            Defs=_go_any(params.get("$defs")), Items=_go_any(params.get("items")),
                            Required=_string_slice(params.get("required"),
                                                   f"{where}.function.parameters.required"),
                            Properties=properties)))


def _arguments(v: Any, where: str) -> GoMap:
    if isinstance(v, str):  # OpenAI sends arguments as a JSON string
        try:
            v = json.loads(v) if v.strip() else {}
        except json.JSONDecodeError as exc:
            raise TemplateError(f"{where} is not valid JSON: {exc}") from None
    if v is None:
        return GoMap(go_type="template.templateArgs", nil=True, stringer=_properties_stringer)
    if not isinstance(v, Mapping):
        raise TemplateError(f"{where} must be an object")
    return GoMap({str(k): _go_any(x) for k, x in v.items()}, go_type="template.templateArgs",
                 stringer=_properties_stringer)


def _tool_calls(v: Any, where: str) -> GoSlice:
    calls = GoSlice(go_type="[]template.templateToolCall", nil=True)
    if not v:
        return calls
    if not isinstance(v, (list, tuple)):
        raise TemplateError(f"{where} must be a list")
    for i, call in enumerate(v):
        if not isinstance(call, Mapping):
            raise TemplateError(f"{where}[{i}] must be an object")
        fn = call.get("function") or {}
        if not isinstance(fn, Mapping):
            raise TemplateError(f"{where}[{i}].function must be an object")
        index = fn.get("index", 0)
        calls.append(GoStruct(TOOL_CALL, ID=_text(call.get("id"), f"{where}[{i}].id"), Function=GoStruct(
            TOOL_CALL_FUNCTION, Index=index if isinstance(index, int) and not isinstance(index, bool) else 0,
            Name=_text(fn.get("name"), f"{where}[{i}].function.name"),
            Arguments=_arguments(fn.get("arguments"), f"{where}[{i}].function.arguments"))))
    calls.nil = False
    return calls


class _Msg:
    """A request message, before collate merges it (mutable: collate appends contents)."""
    __slots__ = ("role", "content", "thinking", "tool_calls", "tool_name", "tool_call_id")

    def __init__(self, m: Any, where: str) -> None:
        if not isinstance(m, Mapping):
            raise TemplateError(f"{where} must be an object")
        self.role = _text(m.get("role"), f"{where}.role").lower()  # Ollama lowercases roles
        self.content = _text(m.get("content"), f"{where}.content")
        self.thinking = _text(m.get("thinking"), f"{where}.thinking")
        self.tool_calls = m.get("tool_calls")
        self.tool_name = _text(m.get("tool_name"), f"{where}.tool_name")
        self.tool_call_id = _text(m.get("tool_call_id"), f"{where}.tool_call_id")


def collate(messages: Sequence[_Msg]) -> tuple[str, list[_Msg]]:
    """Ollama's collate: all system contents, and the messages with same-role runs merged."""
    system: list[str] = []
    out: list[_Msg] = []
    for m in messages:
        if m.role == "system":
            system.append(m.content)
        if out and out[-1].role == m.role and m.role != "tool":
            out[-1].content += "\n\n" + m.content
        else:
            out.append(m)
    return "\n\n".join(system), out


# ---- the template, prepared as Ollama prepares it ---------------------------------------------

class OllamaTemplate:
    """A Modelfile TEMPLATE: the parsed template, whether it reads `.Messages`, the tree run
    for each turn, and the tree cut after `.Response` for the last turn (legacy templates)."""
    __slots__ = ("template", "uses_messages", "full", "cut")

    def __init__(self, source: str) -> None:
        self.template: GoTemplate = compile_template(source)
        names = {n.lower() for n in self.template.identifiers()}
        self.uses_messages = "messages" in names
        root = self.template.root
        if not self.uses_messages and "response" not in names:
            # Ollama appends {{ .Response }} to a template that has neither
            root = ListNode(root.pos, root.nodes + [_response_action(len(source))])
        self.full = root
        self.cut = _cut_after_response(root)

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
               system: str | None = None, *, think: bool | str | None = None) -> str:
        msgs = [_Msg(m, f"messages[{i}]") for i, m in enumerate(messages)]
        if system and (not msgs or msgs[0].role != "system"):
            msgs.insert(0, _Msg({"role": "system", "content": system}, "system"))
        system_text, collated = collate(msgs)
        if think is None:
            think_values = {"Think": False, "ThinkLevel": "", "IsThinkSet": False}
        elif isinstance(think, str):
            think_values = {"Think": True, "ThinkLevel": think, "IsThinkSet": True}
        else:
            think_values = {"Think": bool(think), "ThinkLevel": "", "IsThinkSet": True}
        tmpl = self.template
        if self.uses_messages:
            tool_values = GoSlice(go_type="template.templateTools", nil=tools is None, stringer=_json_stringer)
            for i, spec in enumerate(tools or ()):
                tool_values.append(tool(spec, f"tools[{i}]"))
            message_values = GoSlice(go_type="[]*template.templateMessage", nil=True)
            for i, m in enumerate(collated):
                message_values.append(GoStruct(
                    MESSAGE, Role=m.role, Content=m.content, Thinking=m.thinking,
                    Images=GoSlice(go_type="[]api.ImageData", nil=True),
                    ToolCalls=_tool_calls(m.tool_calls, f"messages[{i}].tool_calls"),
                    ToolName=m.tool_name, ToolCallID=m.tool_call_id))
            message_values.nil = not message_values
            data = {"System": system_text, "Messages": message_values, "Tools": tool_values,
                    "Response": "", **think_values}
            return tmpl.execute(self.full, data, strict=True)

        # legacy: one run per turn, the last one cut at .Response
        out: list[str] = []
        turn = {"System": "", "Prompt": "", "Response": ""}

        def run(root: ListNode) -> None:
            out.append(tmpl.execute(root, {**turn, **think_values}, strict=True))
            turn.update(System="", Prompt="", Response="")

        for m in collated:
            if m.role == "system":
                if turn["Prompt"] or turn["Response"]:
                    run(self.full)
                turn["System"] = m.content
            elif m.role == "user":
                if turn["Response"]:
                    run(self.full)
                turn["Prompt"] = m.content
            elif m.role == "assistant":
                turn["Response"] = m.content
        run(self.cut)
        return "".join(out)


def _response_action(pos: int) -> ActionNode:
    pipe = PipeNode(pos, [], False, [CommandNode(pos, [FieldNode(pos, ("Response",))])])
    return ActionNode(pos, pipe)


def _cut_after_response(root: ListNode) -> ListNode:
    """Ollama's deleteNode: a copy of the tree without everything after the first `.Response`
    field (walking lists, branch bodies, actions and pipelines, not branch conditions)."""
    cut = False

    def gone(n: Node) -> bool:
        nonlocal cut
        if isinstance(n, FieldNode) and "Response" in n.idents:
            cut = True
            return False
        return cut

    def walk(n: Node) -> Node | None:
        if gone(n):
            return None
        if isinstance(n, ListNode):
            kept = [c for c in (walk(c) for c in n.nodes) if c is not None]
            return ListNode(n.pos, kept)
        if isinstance(n, BranchNode):
            body = walk(n.list)
            # NOTE: Ollama panics when the cut falls inside a branch that has an else; the
            # else is dropped here instead (it would be cut anyway).
            else_list = walk(n.else_list) if n.else_list is not None else None
            return BranchNode(n.pos, n.kind, n.pipe, body if isinstance(body, ListNode) else ListNode(n.pos),
                              else_list if isinstance(else_list, ListNode) or n.else_list is None
                              else ListNode(n.pos))
        if isinstance(n, ActionNode):
            pipe = walk(n.pipe)
            return None if pipe is None else ActionNode(n.pos, pipe)  # type: ignore[arg-type]
        if isinstance(n, PipeNode):
            cmds = []
            for c in n.cmds:
                args = [a for a in (walk(a) for a in c.args) if a is not None]
                if not args:
                    return None
                cmds.append(CommandNode(c.pos, args))
            return PipeNode(n.pos, n.decl, n.is_assign, cmds) if cmds else None
        return n

    result = walk(root)
    return result if isinstance(result, ListNode) else ListNode(root.pos)


@functools.lru_cache(maxsize=128)
def ollama_template(source: str) -> OllamaTemplate:
    """The prepared Modelfile TEMPLATE for `source`, cached per text."""
    if not isinstance(source, str):
        raise TemplateError("must be a string")
    return OllamaTemplate(source)


def render_chat(template_text: str, messages: Sequence[Mapping[str, Any]],
                tools: Sequence[Mapping[str, Any]] | None = None, system: str | None = None, *,
                think: bool | str | None = None) -> str:
    """The prompt Ollama builds from a Modelfile TEMPLATE for these messages.

    `messages` are Ollama/OpenAI-style dicts (role, content, and optionally thinking,
    tool_calls [{id, function: {name, arguments}}], tool_name, tool_call_id); `tools` are
    {"type": "function", "function": {name, description, parameters}} dicts; `system` is the
    Modelfile's SYSTEM; `think` is the request's think value (None: not set).
    """
    return ollama_template(template_text).render(messages, tools, system, think=think)
