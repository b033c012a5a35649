"""close_objects: objects that list properties and are silent about extra ones are closed."""
from __future__ import annotations

import copy

import jsonschema

from shoal.core.closed_objects import close_objects

PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def _valid(schema: dict, document: object) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(document)


def test_every_level_is_closed_and_the_input_is_untouched() -> None:
    schema = {"type": "object",
              "properties": {"owner": PERSON, "pets": {"type": "array", "items": PERSON},
                             "either": {"anyOf": [PERSON, {"type": "integer"}]}, "ref": {"$ref": "#/$defs/p"}},
              "$defs": {"p": PERSON}}
    before = copy.deepcopy(schema)
    closed = close_objects(schema)
    assert schema == before
    good = {"owner": {"name": "a"}, "pets": [{"name": "b"}], "either": {"name": "c"}, "ref": {"name": "d"}}
    assert _valid(closed, good)
    extra = {"name": "a", "extra": 1}
    for key in ("owner", "either", "ref"):
        assert _valid(schema, {**good, key: extra}) and not _valid(closed, {**good, key: extra}), key
    assert _valid(schema, {**good, "pets": [extra]}) and not _valid(closed, {**good, "pets": [extra]})
    assert not _valid(closed, {**good, "stray": True})


def test_a_schema_that_opens_its_objects_is_left_open() -> None:
    for opening in ({"additionalProperties": True}, {"additionalProperties": {"type": "integer"}},
                    {"patternProperties": {"^x": {}}}):
        schema = {**PERSON, **opening}
        assert close_objects(schema) == schema


def test_all_of_branches_stay_satisfiable() -> None:
    schema = {"allOf": [PERSON, {"type": "object", "properties": {"team": {"type": "string"}}}]}
    assert _valid(close_objects(schema), {"name": "a", "team": "b"})


def test_a_property_called_properties_is_not_a_keyword() -> None:
    schema = {"type": "object", "properties": {"properties": {"type": "integer"}}}
    closed = close_objects(schema)
    assert closed["properties"] == {"properties": {"type": "integer"}}
    assert _valid(closed, {"properties": 3}) and not _valid(closed, {"properties": 3, "x": 1})
