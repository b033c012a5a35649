"""JSON schemas with their objects closed: properties a schema does not list are not generated.

JSON Schema lets an object carry any extra property unless `additionalProperties` says
otherwise, and pydantic, zod and most hand-written schemas leave it unsaid. A grammar that
follows the letter of such a schema lets the model go on inventing keys after the listed ones
until max_tokens cuts the document off, which for a small model is the common case. So, as
OpenAI's strict mode requires and xgrammar's strict mode assumes, an object schema that lists
`properties` and says nothing about extra ones is taken as closed. A schema that wants extra
properties says so (`additionalProperties: true` or a schema, `patternProperties`), and is
left alone.
"""
from __future__ import annotations

from typing import Any

# keywords whose value is one subschema, a list of them, or a name -> subschema map
_ONE = ("items", "additionalItems", "contains", "not", "if", "then", "else", "additionalProperties",
        "propertyNames", "unevaluatedItems", "unevaluatedProperties")
_LIST = ("anyOf", "oneOf", "prefixItems")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_OPENING = ("additionalProperties", "patternProperties", "unevaluatedProperties")


def close_objects(schema: Any, *, inside_all_of: bool = False) -> Any:
    """A copy of `schema` with every object that lists `properties` and is silent about
    extra ones closed. Branches of an `allOf` stay open: each lists only part of the
    properties the whole object has, so closing them would make the schema unsatisfiable."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _ONE:
            out[key] = close_objects(value)
        elif key in _LIST and isinstance(value, list):
            out[key] = [close_objects(v) for v in value]
        elif key == "allOf" and isinstance(value, list):
            out[key] = [close_objects(v, inside_all_of=True) for v in value]
        elif key in _MAP and isinstance(value, dict):
            out[key] = {name: close_objects(v) for name, v in value.items()}
        else:
            out[key] = value
    if "properties" in out and not inside_all_of and not any(k in out for k in _OPENING):
        out["additionalProperties"] = False
    return out
