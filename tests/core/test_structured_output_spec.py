"""StructuredOutput: the constraint a dialect puts on SamplingParams, normalised and checked
for shape when built (whether it compiles is the engine's check)."""
from __future__ import annotations

import pytest

from shoal.core.errors import InvalidParameterError
from shoal.core.sampling_params import SamplingParams
from shoal.core.structured_output import StructuredOutput, StructuredOutputKind


def test_equal_constraints_are_equal_keys_whatever_field_named_them():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    one = StructuredOutput.json_schema(schema, field="response_format")
    two = StructuredOutput.json_schema('{"type": "object", "properties": {"b": {"type": "integer"},'
                                       ' "a": {"type": "string"}}}', field="guided_json")
    assert one == two and hash(one) == hash(two)
    assert one.field == "response_format" and two.field == "guided_json"
    # the property order is the order the model writes them in: kept, not sorted
    assert one.spec.index('"b"') < one.spec.index('"a"')
    assert StructuredOutput.json_schema(True).spec == "{}"


def test_each_kind_has_a_constructor():
    assert StructuredOutput.json_object().kind is StructuredOutputKind.JSON_OBJECT
    assert StructuredOutput.regex("[0-9]+").spec == "[0-9]+"
    assert StructuredOutput.choice(["yes", "no"]).choices == ["yes", "no"]
    assert StructuredOutput.grammar('start: "a"+').kind == "grammar"
    params = SamplingParams(structured=StructuredOutput.regex("[a-z]+"))
    assert params.structured is not None and params.structured.kind == "regex"


@pytest.mark.parametrize("build, message", [
    (lambda: StructuredOutput.json_schema("{not json", field="guided_json"), "not valid JSON"),
    (lambda: StructuredOutput.json_schema([1, 2], field="guided_json"), "must be an object"),
    (lambda: StructuredOutput.json_schema({"x": float("nan")}, field="guided_json"), "JSON"),
    (lambda: StructuredOutput.choice([], field="guided_json"), "empty"),
    (lambda: StructuredOutput.choice("yes", field="guided_json"), "list of strings"),
    (lambda: StructuredOutput.choice(["yes", 3], field="guided_json"), "non-empty string"),
    (lambda: StructuredOutput.regex("", field="guided_json"), "empty"),
    (lambda: StructuredOutput.regex(5, field="guided_json"), "must be a string"),
    (lambda: StructuredOutput.grammar(None, field="guided_json"), "must be a string"),
    (lambda: StructuredOutput("yaml", "x", field="guided_json"), "unknown kind"),
])
def test_malformed_specs_name_their_field(build, message):
    with pytest.raises(InvalidParameterError, match=message) as info:
        build()
    assert info.value.field == "guided_json"


def test_sampling_params_refuse_anything_else_as_a_constraint():
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(structured={"type": "object"})  # type: ignore[arg-type]
    assert info.value.field == "structured"
