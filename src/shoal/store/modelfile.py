"""The Modelfile: Ollama's recipe format, parsed with exact error positions, and rendered back.

Grammar (one instruction per line; instruction words are case-insensitive):

    FROM <model name | path | @sha256:<hex>>
    PARAMETER <name> <value>          (stop may repeat)
    TEMPLATE <text>      SYSTEM <text>      LICENSE <text> (may repeat)
    MESSAGE <system|user|assistant> <text>
    ADAPTER <path | @sha256:<hex>>    (may repeat)
    # a comment (only as the first thing on a line)

A value is the rest of the line (trailing blanks dropped), or a `"..."` or `\"\"\"...\"\"\"`
string, which may span lines and keeps its text verbatim (no escapes, as in Ollama).
Errors are ModelfileError with the 1-based line and column of the offending text.
"""
from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shoal.core.errors import InvalidParameterError
from shoal.store.errors import ModelfileError

INSTRUCTIONS = ("FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "MESSAGE", "ADAPTER", "LICENSE")
# NOTE: instructions newer Ollama versions know and shoal does not do; named in the error.
OLLAMA_ONLY_INSTRUCTIONS = ("DRAFT", "RENDERER", "PARSER", "REQUIRES")
ROLES = ("system", "user", "assistant")

_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_PARAM_NAME_RE = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True, slots=True)
class ParameterSpec:
    name: str
    kind: str                     # "int" | "float" | "str"
    repeatable: bool = False
    minimum: float | None = None
    maximum: float | None = None
    meaning: str = ""

    def convert(self, text: str) -> int | float | str:
        """The typed value of `text`; raises ValueError with a message for people."""
        if self.kind == "str":
            if text == "":
                raise ValueError(f"{self.name} must not be empty")
            return text
        if self.kind == "int":
            if not _INT_RE.fullmatch(text):
                raise ValueError(f"{self.name} must be an integer, got {text!r}")
            value: int | float = int(text)
        else:
            if not _FLOAT_RE.fullmatch(text):
                raise ValueError(f"{self.name} must be a number, got {text!r}")
            value = float(text)
            if not math.isfinite(value):
                raise ValueError(f"{self.name} must be a finite number, got {text!r}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{self.name} must be at least {_num(self.minimum)}, got {text}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"{self.name} must be at most {_num(self.maximum)}, got {text}")
        return value


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


PARAMETERS: dict[str, ParameterSpec] = {spec.name: spec for spec in (
    ParameterSpec("num_ctx", "int", minimum=1, meaning="context window, in tokens"),
    ParameterSpec("temperature", "float", minimum=0, meaning="sampling temperature"),
    ParameterSpec("top_k", "int", minimum=0, meaning="sample from the k most likely tokens"),
    ParameterSpec("top_p", "float", minimum=0, maximum=1, meaning="nucleus sampling mass"),
    ParameterSpec("min_p", "float", minimum=0, maximum=1,
                  meaning="drop tokens below min_p x the top token's probability"),
    ParameterSpec("seed", "int", meaning="random seed"),
    ParameterSpec("stop", "str", repeatable=True, meaning="a stop sequence"),
    ParameterSpec("num_predict", "int", minimum=-2,
                  meaning="most tokens to generate (-1: no limit, -2: fill the context)"),
    ParameterSpec("repeat_penalty", "float", minimum=0, meaning="penalty for repeated tokens"),
    ParameterSpec("repeat_last_n", "int", minimum=-1,
                  meaning="how far back repeat_penalty looks (-1: num_ctx)"),
    ParameterSpec("presence_penalty", "float", meaning="OpenAI-style presence penalty"),
    ParameterSpec("frequency_penalty", "float", meaning="OpenAI-style frequency penalty"),
)}
# NOTE: Ollama knows these; shoal rejects them by name rather than as unknown.
OLLAMA_ONLY_PARAMETERS = frozenset({
    "num_keep", "typical_p", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread",
    "numa", "penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock",
    "mirostat", "mirostat_tau", "mirostat_eta", "tfs_z"})


def check_parameters(params: dict[str, Any], field_name: str = "parameters") -> dict[str, Any]:
    """Validates an already-typed parameter dict (e.g. from /api/create JSON); returns a copy
    with values converted to their kinds (stop always a list)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        spec = PARAMETERS.get(key)
        if spec is None:
            raise InvalidParameterError(field_name, _unknown_parameter_message(key))
        values = value if isinstance(value, list) else [value]
        if not spec.repeatable and isinstance(value, list):
            raise InvalidParameterError(field_name, f"{key} takes one value, not a list")
        converted = []
        for item in values:
            if isinstance(item, bool) or not isinstance(item, (int, float, str)):
                raise InvalidParameterError(field_name, f"{key}: {item!r} is not a valid value")
            try:
                converted.append(spec.convert(item if isinstance(item, str) else _num_text(item)))
            except ValueError as exc:
                raise InvalidParameterError(field_name, str(exc)) from None
        out[key] = converted if spec.repeatable else converted[0]
    return out


def _num_text(x: int | float) -> str:
    return repr(x) if isinstance(x, float) else str(x)


def _unknown_parameter_message(name: str) -> str:
    if name.lower() in OLLAMA_ONLY_PARAMETERS:
        return f"parameter {name!r} is an Ollama parameter shoal does not support"
    return f"unknown parameter {name!r} (known: {', '.join(PARAMETERS)})"


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str

    def to_json(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(slots=True)
class Modelfile:
    """A parsed Modelfile. `None` means "not given" (inherit); "" for TEMPLATE/SYSTEM clears."""

    base: str | None = None                       # FROM
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    messages: list[Message] = field(default_factory=list)
    adapters: list[str] = field(default_factory=list)
    licenses: list[str] = field(default_factory=list)
    # where FROM / each ADAPTER value starts (line, column), for errors found later (create)
    base_position: tuple[int, int] = field(default=(1, 1), compare=False, repr=False)
    adapter_positions: list[tuple[int, int]] = field(default_factory=list, compare=False,
                                                     repr=False)

    def render(self, header: str | None = None) -> str:
        return render_modelfile(self, header)


class _Positions:
    """Offset -> (line, column), both 1-based."""

    def __init__(self, text: str) -> None:
        self.starts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]

    def at(self, offset: int) -> tuple[int, int]:
        line = bisect.bisect_right(self.starts, offset)
        return line, offset - self.starts[line - 1] + 1


def parse_modelfile(text: str) -> Modelfile:
    """Parses Modelfile text; raises ModelfileError(line, column) at the first problem."""
    return _Parser(text).parse()


class _Parser:
    def __init__(self, text: str) -> None:
        if text.startswith("\ufeff"):
            text = text[1:]
        self.text = text.replace("\r\n", "\n").replace("\r", "\n")
        self.n = len(self.text)
        self.pos = _Positions(self.text)
        self.result = Modelfile()
        self.seen: dict[str, tuple[int, int]] = {}

    def error(self, offset: int, message: str) -> ModelfileError:
        line, column = self.pos.at(min(offset, self.n))
        return ModelfileError(message, line, column)

    def skip_blanks(self, i: int) -> int:
        while i < self.n and self.text[i] in " \t":
            i += 1
        return i

    def word(self, i: int) -> int:
        while i < self.n and self.text[i] not in " \t\n":
            i += 1
        return i

    def parse(self) -> Modelfile:
        text, i = self.text, 0
        while i < self.n:
            i = self.skip_blanks(i)
            if i >= self.n:
                break
            if text[i] == "\n":
                i += 1
                continue
            if text[i] == "#":
                end = text.find("\n", i)
                i = self.n if end < 0 else end + 1
                continue
            i = self.instruction(i)
        if self.result.base is None:
            raise ModelfileError("the Modelfile has no FROM instruction", 1, 1)
        return self.result

    def instruction(self, start: int) -> int:
        end = self.word(start)
        word = self.text[start:end]
        keyword = word.upper()
        if keyword not in INSTRUCTIONS:
            if keyword in OLLAMA_ONLY_INSTRUCTIONS:
                raise self.error(start, f"{keyword} is an Ollama instruction shoal does not support")
            raise self.error(start, f"unknown instruction {word!r} (expected one of "
                                    f"{', '.join(INSTRUCTIONS)})")
        i = self.skip_blanks(end)
        if i >= self.n or self.text[i] == "\n":
            raise self.error(i, f"{keyword} needs a value")
        handler: Callable[[int, int], int] = getattr(self, "do_" + keyword.lower())
        return handler(start, i)

    def value(self, i: int, what: str) -> tuple[str, int, int]:
        """Reads a value at `i`: (text, offset where its text starts, offset after the line)."""
        text = self.text
        if i >= self.n or text[i] == "\n":
            raise self.error(i, f"{what} needs a value")
        if text.startswith('"""', i):
            close = text.find('"""', i + 3)
            if close < 0:
                raise self.error(i, 'unterminated """ string (no closing """)')
            value, body, after = text[i + 3:close], i + 3, close + 3
        elif text[i] == '"':
            close = text.find('"', i + 1)
            if close < 0:
                raise self.error(i, 'unterminated " string (no closing ")')
            value, body, after = text[i + 1:close], i + 1, close + 1
        else:
            end = text.find("\n", i)
            end = self.n if end < 0 else end
            return text[i:end].rstrip(" \t"), i, end
        rest = self.skip_blanks(after)
        if rest < self.n and text[rest] != "\n":
            raise self.error(rest, f"unexpected text after the closing quote of {what}")
        return value, body, rest

    def once(self, keyword: str, start: int) -> None:
        if keyword in self.seen:
            line, _ = self.seen[keyword]
            raise self.error(start, f"{keyword} is given twice (first on line {line})")
        self.seen[keyword] = self.pos.at(start)

    def do_from(self, start: int, i: int) -> int:
        self.once("FROM", start)
        value, body, end = self.value(i, "FROM")
        if not value.strip():
            raise self.error(body, "FROM needs a model name or a path")
        self.result.base = value.strip()
        self.result.base_position = self.pos.at(i)
        return end

    def do_adapter(self, start: int, i: int) -> int:
        value, body, end = self.value(i, "ADAPTER")
        if not value.strip():
            raise self.error(body, "ADAPTER needs a path")
        self.result.adapters.append(value.strip())
        self.result.adapter_positions.append(self.pos.at(i))
        return end

    def do_template(self, start: int, i: int) -> int:
        self.once("TEMPLATE", start)
        self.result.template, _, end = self.value(i, "TEMPLATE")
        return end

    def do_system(self, start: int, i: int) -> int:
        self.once("SYSTEM", start)
        self.result.system, _, end = self.value(i, "SYSTEM")
        return end

    def do_license(self, start: int, i: int) -> int:
        value, _, end = self.value(i, "LICENSE")
        self.result.licenses.append(value)
        return end

    def do_message(self, start: int, i: int) -> int:
        role_end = self.word(i)
        role = self.text[i:role_end]
        if role.lower() not in ROLES:
            raise self.error(i, f"message role must be one of {', '.join(ROLES)}, got {role!r}")
        j = self.skip_blanks(role_end)
        content, _, end = self.value(j, f"MESSAGE {role.lower()}")
        self.result.messages.append(Message(role.lower(), content))
        return end

    def do_parameter(self, start: int, i: int) -> int:
        name_end = self.word(i)
        name = self.text[i:name_end]
        if not _PARAM_NAME_RE.fullmatch(name):
            raise self.error(i, f"invalid parameter name {name!r}")
        spec = PARAMETERS.get(name.lower())
        if spec is None:
            raise self.error(i, _unknown_parameter_message(name))
        j = self.skip_blanks(name_end)
        raw, body, end = self.value(j, f"PARAMETER {spec.name}")
        try:
            value = spec.convert(raw.strip() if spec.kind != "str" else raw)
        except ValueError as exc:
            raise self.error(body, str(exc)) from None
        params = self.result.parameters
        if spec.repeatable:
            params.setdefault(spec.name, []).append(value)
        else:
            key = "PARAMETER " + spec.name
            self.once(key, start)
            params[spec.name] = value
        return end


# -- rendering ----------------------------------------------------------------------------------

def is_representable(value: str) -> bool:
    """True if some quoting makes the parser give back exactly `value`."""
    return quote(value) is not None


def quote(value: str) -> str | None:
    """The value as Modelfile text (bare, "..." or \"\"\"...\"\"\"), None if it cannot be written."""
    if value == "":
        return '""'
    if "\r" in value:
        return None              # the parser reads every line ending as "\n"
    multiline = "\n" in value
    padded = value[0] in " \t" or value[-1] in " \t"
    if not multiline and not padded and not value.startswith('"'):
        return value
    if multiline and '"""' not in value and not value.endswith('"'):
        return f'"""{value}"""'
    if '"' not in value:
        return f'"{value}"'
    if '"""' not in value and not value.endswith('"'):
        return f'"""{value}"""'
    return None


def _quote_lossy(value: str) -> str:
    quoted = quote(value)
    if quoted is not None:
        return quoted
    # NOTE: no Modelfile quoting can hold a value containing \"\"\" that also ends in a quote;
    # write it anyway (as Ollama does) - it will not parse back verbatim.
    return f'"""{value}"""'


def format_parameter_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return _quote_lossy(value)
    return _quote_lossy(json.dumps(value))


def _ordered_params(params: dict[str, Any]) -> list[tuple[str, Any]]:
    order = {name: i for i, name in enumerate(PARAMETERS)}
    items: list[tuple[str, Any]] = []
    for key in sorted(params, key=lambda k: (order.get(k, len(order)), k)):
        value = params[key]
        for item in (value if isinstance(value, list) else [value]):
            items.append((key, item))
    return items


def render_modelfile(modelfile: Modelfile, header: str | None = None) -> str:
    """Modelfile text that parses back to `modelfile` (for every representable value)."""
    lines: list[str] = []
    if header:
        lines += ["# " + line if line else "#" for line in header.splitlines()]
        lines.append("")
    if modelfile.base is not None:
        lines.append(f"FROM {_quote_lossy(modelfile.base)}")
    for adapter in modelfile.adapters:
        lines.append(f"ADAPTER {_quote_lossy(adapter)}")
    if modelfile.template is not None:
        lines.append(f"TEMPLATE {_quote_lossy(modelfile.template)}")
    if modelfile.system is not None:
        lines.append(f"SYSTEM {_quote_lossy(modelfile.system)}")
    for key, value in _ordered_params(modelfile.parameters):
        lines.append(f"PARAMETER {key} {format_parameter_value(value)}")
    for message in modelfile.messages:
        lines.append(f"MESSAGE {message.role} {_quote_lossy(message.content)}")
    for text in modelfile.licenses:
        lines.append(f"LICENSE {_quote_lossy(text)}")
    return "\n".join(lines) + "\n"


def format_parameters(params: dict[str, Any]) -> str:
    """Ollama's /api/show "parameters" text: one `name value` line per value, names padded,
    strings JSON-quoted."""
    items = _ordered_params(params)
    if not items:
        return ""
    width = max(len(key) for key, _ in items)
    out = []
    for key, value in items:
        text = json.dumps(value, ensure_ascii=False) if isinstance(value, str) else \
            format_parameter_value(value)
        out.append(f"{key:<{width}} {text}")
    return "\n".join(out)
