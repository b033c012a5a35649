"""The OpenAI dialect's structured-output fields -> one StructuredOutput.

Four spellings of the same thing reach this dialect: OpenAI's `response_format`, vLLM's
`structured_outputs` object and its older `guided_*` fields. Each becomes a constraint that
names the field it came from, so a schema that does not compile is a 400 naming that field.
Two constraints at once is a 400 too: picking one would silently ignore the other.
"""
from __future__ import annotations

from typing import Any

from shoal.core.echo import clip
from shoal.core.errors import InvalidParameterError
from shoal.core.structured_output import StructuredOutput
from shoal.http.openai.protocol import SamplingFields

# vLLM's backend names; every one is served by llguidance (the only backend shoal has), as
# the output a constraint allows does not depend on which library enforces it.
GUIDED_BACKENDS = ("auto", "llguidance", "guidance", "xgrammar", "outlines", "lm-format-enforcer")

_STRUCTURED_OUTPUTS_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def structured_output(req: SamplingFields) -> StructuredOutput | None:
    """The request's one constraint, or None; InvalidParameterError for a malformed or
    doubled one."""
    backend = req.guided_decoding_backend
    if backend is not None and backend not in GUIDED_BACKENDS:
        raise InvalidParameterError(
            "guided_decoding_backend",
            f"unknown backend '{clip(backend)}'; one of {', '.join(GUIDED_BACKENDS)}")
    found: list[StructuredOutput] = []
    if req.response_format is not None:
        found += _response_format(req.response_format)
    if req.guided_json is not None:
        found.append(StructuredOutput.json_schema(req.guided_json, field="guided_json"))
    if req.guided_regex is not None:
        found.append(StructuredOutput.regex(req.guided_regex, field="guided_regex"))
    if req.guided_choice is not None:
        found.append(StructuredOutput.choice(req.guided_choice, field="guided_choice"))
    if req.guided_grammar is not None:
        found.append(StructuredOutput.grammar(req.guided_grammar, field="guided_grammar"))
    if req.structured_outputs is not None:
        found += _structured_outputs(req.structured_outputs)
    if len(found) > 1:
        raise InvalidParameterError(
            found[1].field, f"only one structured-output constraint per request; "
            f"got {', '.join(s.field for s in found)}")
    return found[0] if found else None


def _response_format(fmt: Any) -> list[StructuredOutput]:
    if fmt.type == "text":
        return []
    if fmt.type == "json_object":
        if fmt.schema_ is not None:     # a schema given beside json_object is enforced, not dropped
            return [StructuredOutput.json_schema(fmt.schema_, field="response_format.schema")]
        return [StructuredOutput.json_object(field="response_format")]
    if fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise InvalidParameterError("response_format.json_schema",
                                        "is required when type is 'json_schema'")
        if fmt.schema_ is not None:
            raise InvalidParameterError("response_format.schema", "give the schema in "
                                        "response_format.json_schema.schema when type is 'json_schema'")
        schema = fmt.json_schema.schema_
        return [StructuredOutput.json_schema({} if schema is None else schema,
                                             field="response_format.json_schema.schema")]
    raise InvalidParameterError(
        "response_format.type", f"unknown type '{clip(fmt.type)}'; one of text, json_object, json_schema")


def _structured_outputs(spec: dict[str, Any]) -> list[StructuredOutput]:
    out = []
    for key, value in spec.items():
        field = f"structured_outputs.{key}"
        if key not in _STRUCTURED_OUTPUTS_KEYS:
            # NOTE: refused, not skipped: vLLM's other keys (structural_tag, whitespace_pattern,
            # ...) change the output, and shoal does not implement them.
            raise InvalidParameterError(
                field, f"is not supported; one of {', '.join(_STRUCTURED_OUTPUTS_KEYS)}")
        if value is None or value is False:
            continue
        if key == "json":
            out.append(StructuredOutput.json_schema(value, field=field))
        elif key == "regex":
            out.append(StructuredOutput.regex(value, field=field))
        elif key == "choice":
            out.append(StructuredOutput.choice(value, field=field))
        elif key == "grammar":
            out.append(StructuredOutput.grammar(value, field=field))
        elif value is True:
            out.append(StructuredOutput.json_object(field=field))
        else:
            raise InvalidParameterError(field, "must be true or false")
    return out
