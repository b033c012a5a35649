"""StructuredOutput: a constraint on what a request may generate (JSON schema, regex, ...).

The dialects translate their fields (`response_format`, vLLM's `structured_outputs` and
`guided_*`, Ollama's `format`) into one of these and put it on SamplingParams.structured;
the engine compiles it to a grammar and masks every step's logits with it
(engine/structured/). Construction checks the shape of the spec only; whether a schema,
regex or grammar compiles is the engine's check (AsyncEngine.validate), as it needs the
grammar library.
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field, replace

from shoal.core.errors import InvalidParameterError


class StructuredOutputKind(enum.StrEnum):
    JSON_SCHEMA = "json_schema"    # spec: the schema as JSON text
    JSON_OBJECT = "json_object"    # any JSON object; spec: ""
    REGEX = "regex"                # spec: the pattern (the whole output matches it)
    CHOICE = "choice"              # spec: the choices as a JSON list of strings
    GRAMMAR = "grammar"            # spec: a Lark grammar (llguidance's dialect) or GBNF


@dataclass(frozen=True, slots=True)
class ThinkingTokens:
    """The tokens around a reasoning model's thinking (StructuredOutput.after_thinking)."""

    open_id: int | None
    close_id: int
    banned_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """What the output must match. Build it with the class methods, which normalise the spec
    to text, so equal constraints are equal keys of the engine's grammar cache.

    `field` names the request parameter the constraint came from (e.g. "response_format");
    the engine's errors about it (InvalidParameterError) carry that name, so a dialect can
    answer 400 naming its own field. It is not part of the constraint's identity.

    `thinking` (set by after_thinking) lets a reasoning model think freely first: the
    constraint binds only what follows the thinking's closing token.
    """

    kind: StructuredOutputKind
    spec: str
    field: str = field(default="structured_output", compare=False)
    thinking: ThinkingTokens | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", StructuredOutputKind(self.kind))
        except ValueError:
            raise InvalidParameterError(
                self.field, f"unknown kind {self.kind!r}; one of "
                f"{', '.join(k.value for k in StructuredOutputKind)}") from None
        if not isinstance(self.spec, str):
            raise InvalidParameterError(self.field, "the spec must be text (use the class methods)")
        if self.kind is not StructuredOutputKind.JSON_OBJECT and not self.spec.strip():
            raise InvalidParameterError(self.field, f"the {self.kind.value} is empty")

    @classmethod
    def json_schema(cls, schema: object, field: str = "structured_output") -> StructuredOutput:
        """A JSON schema, as a dict (or True) or as JSON text."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidParameterError(field, f"the JSON schema is not valid JSON: {exc}") from None
        if schema is True:
            schema = {}
        if not isinstance(schema, dict):
            raise InvalidParameterError(
                field, f"a JSON schema must be an object, got {type(schema).__name__}")
        # NOTE: key order is kept: it is the order the properties are generated in.
        return cls(StructuredOutputKind.JSON_SCHEMA, _json_text(schema, field), field)

    @classmethod
    def json_object(cls, field: str = "structured_output") -> StructuredOutput:
        """Any JSON object (OpenAI's json_object mode, Ollama's format "json")."""
        return cls(StructuredOutputKind.JSON_OBJECT, "", field)

    @classmethod
    def regex(cls, pattern: object, field: str = "structured_output") -> StructuredOutput:
        if not isinstance(pattern, str):
            raise InvalidParameterError(field, f"a regex must be a string, got {type(pattern).__name__}")
        return cls(StructuredOutputKind.REGEX, pattern, field)

    @classmethod
    def choice(cls, choices: object, field: str = "structured_output") -> StructuredOutput:
        """Exactly one of `choices` (non-empty strings)."""
        if isinstance(choices, (str, bytes)) or not isinstance(choices, (list, tuple)):
            raise InvalidParameterError(field, "the choices must be a list of strings")
        if not choices:
            raise InvalidParameterError(field, "the list of choices is empty")
        for choice in choices:
            if not isinstance(choice, str) or not choice:
                raise InvalidParameterError(field, f"each choice must be a non-empty string, got {choice!r}")
        return cls(StructuredOutputKind.CHOICE, _json_text(list(choices), field), field)

    @classmethod
    def grammar(cls, text: object, field: str = "structured_output") -> StructuredOutput:
        """A context-free grammar: Lark syntax (llguidance's), or llama.cpp's GBNF."""
        if not isinstance(text, str):
            raise InvalidParameterError(field, f"a grammar must be a string, got {type(text).__name__}")
        return cls(StructuredOutputKind.GRAMMAR, text, field)

    def after_thinking(self, open_id: int | None, close_id: int,
                       banned_ids: tuple[int, ...] = ()) -> StructuredOutput:
        """This constraint applied after the model's thinking: `open_id` the token the output
        must start with (None: the prompt already opened the thinking), `close_id` the token
        that ends it, `banned_ids` tokens the thinking may not contain (end of sequence)."""
        return replace(self, thinking=ThinkingTokens(open_id, close_id, tuple(sorted(banned_ids))))

    @property
    def choices(self) -> list[str]:
        return json.loads(self.spec) if self.kind is StructuredOutputKind.CHOICE else []


def _json_text(value: object, field: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidParameterError(field, f"not representable as JSON: {exc}") from None
