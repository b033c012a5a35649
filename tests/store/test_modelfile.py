"""The Modelfile parser: every instruction, quoting, exact error positions, render round-trip."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.core.errors import InvalidParameterError
from shoal.store.errors import ModelfileError
from shoal.store.modelfile import (PARAMETERS, Message, Modelfile, check_parameters,
                                   format_parameters, is_representable, parse_modelfile, quote,
                                   render_modelfile)

FULL = '''# a comment
FROM ./models/base.gguf
adapter ./lora.gguf
ADAPTER "./second lora.safetensors"
Parameter num_ctx 4096
PARAMETER temperature 0.7
PARAMETER top_k 40
PARAMETER top_p 0.9
PARAMETER min_p 0.05
PARAMETER seed -1
PARAMETER stop "<|im_end|>"
PARAMETER stop <|im_start|>
PARAMETER num_predict -2
PARAMETER repeat_penalty 1.1
PARAMETER repeat_last_n -1
PARAMETER presence_penalty -0.5
PARAMETER frequency_penalty 1e-3
TEMPLATE """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ .Prompt }}"""
   system You are Mario from "Super Mario Bros".
MESSAGE user "Is it you?"
message Assistant """Yes,
it's-a me!"""
LICENSE """MIT License
Copyright"""
LICENSE Apache-2.0
'''


def test_every_instruction() -> None:
    mf = parse_modelfile(FULL)
    assert mf.base == "./models/base.gguf"
    assert mf.adapters == ["./lora.gguf", "./second lora.safetensors"]
    assert mf.adapter_positions == [(3, 9), (4, 9)]
    assert mf.base_position == (2, 6)
    assert mf.parameters == {
        "num_ctx": 4096, "temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.05,
        "seed": -1, "stop": ["<|im_end|>", "<|im_start|>"], "num_predict": -2,
        "repeat_penalty": 1.1, "repeat_last_n": -1, "presence_penalty": -0.5,
        "frequency_penalty": 0.001}
    assert set(mf.parameters) == set(PARAMETERS)
    assert isinstance(mf.parameters["num_ctx"], int)
    assert isinstance(mf.parameters["temperature"], float)
    assert mf.template == ("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n"
                           "{{ end }}{{ .Prompt }}")
    assert mf.system == 'You are Mario from "Super Mario Bros".'
    assert mf.messages == [Message("user", "Is it you?"), Message("assistant", "Yes,\nit's-a me!")]
    assert mf.licenses == ["MIT License\nCopyright", "Apache-2.0"]


def test_quoting_details() -> None:
    mf = parse_modelfile('FROM x\r\nSYSTEM "  padded  "\r\nTEMPLATE """\n"""\n'
                         'LICENSE "two\nlines"\nLICENSE ""\nMESSAGE user\t""""quoted"""\n')
    assert mf.system == "  padded  "
    assert mf.template == "\n"
    assert mf.licenses == ["two\nlines", ""]
    assert mf.messages == [Message("user", '"quoted')]
    # bare values run to the end of the line, trailing blanks dropped, '#' kept
    mf = parse_modelfile("\ufeffFROM  smollm2:135m   \nSYSTEM be terse # not a comment \t\n")
    assert mf.base == "smollm2:135m" and mf.system == "be terse # not a comment"
    # an empty TEMPLATE / SYSTEM is "clear it", distinct from "not given"
    assert parse_modelfile('FROM x\nSYSTEM ""').system == ""
    assert parse_modelfile("FROM x").system is None


@pytest.mark.parametrize("text, line, column, fragment", [
    ("", 1, 1, "no FROM"),
    ("# only a comment\n", 1, 1, "no FROM"),
    ("FROM x\nFRM y\n", 2, 1, "unknown instruction 'FRM'"),
    ("FROM x\n  DRAFT y\n", 2, 3, "DRAFT is an Ollama instruction"),
    ("FROM x\nSYSTEM\n", 2, 7, "SYSTEM needs a value"),
    ("FROM\n", 1, 5, "FROM needs a value"),
    ('FROM ""\n', 1, 7, "FROM needs a model name"),
    ("FROM x\nFROM y\n", 2, 1, "FROM is given twice (first on line 1)"),
    ("FROM x\nPARAMETER temperature hot\n", 2, 23, "temperature must be a number, got 'hot'"),
    ("FROM x\nPARAMETER num_ctx 4096.5\n", 2, 19, "num_ctx must be an integer"),
    ("FROM x\nPARAMETER num_ctx 0\n", 2, 19, "num_ctx must be at least 1"),
    ("FROM x\nPARAMETER top_p 1.5\n", 2, 17, "top_p must be at most 1"),
    ("FROM x\nPARAMETER temperature nan\n", 2, 23, "must be a number"),
    ("FROM x\nPARAMETER temperature 1e999\n", 2, 23, "finite"),
    ('FROM x\nPARAMETER temperature "0.5\n', 2, 23, 'unterminated " string'),
    ("FROM x\nPARAMETER temprature 1\n", 2, 11, "unknown parameter 'temprature'"),
    ("FROM x\nPARAMETER num_gpu 1\n", 2, 11, "Ollama parameter shoal does not support"),
    ("FROM x\nPARAMETER te-mp 1\n", 2, 11, "invalid parameter name"),
    ("FROM x\nPARAMETER temperature\n", 2, 22, "PARAMETER temperature needs a value"),
    ("FROM x\nPARAMETER top_k 1\nPARAMETER top_k 2\n", 3, 1, "given twice (first on line 2)"),
    ('FROM x\nPARAMETER stop ""\n', 2, 17, "stop must not be empty"),
    ("FROM x\nMESSAGE robot hi\n", 2, 9, "message role must be one of"),
    ("FROM x\nMESSAGE user\n", 2, 13, "MESSAGE user needs a value"),
    ('FROM x\n\nTEMPLATE """{{ .Prompt }}\n\n', 3, 10, 'unterminated """ string'),
    ('FROM x\nSYSTEM "hi" there\n', 2, 13, "unexpected text after the closing quote"),
    ('FROM x\nSYSTEM """a\nb"""  extra\n', 3, 7, "unexpected text after the closing quote"),
    ("FROM x\nSYSTEM a\nSYSTEM b\n", 3, 1, "SYSTEM is given twice"),
    ("FROM x\nTEMPLATE a\ntemplate b\n", 3, 1, "TEMPLATE is given twice"),
])
def test_errors_name_line_and_column(text, line, column, fragment) -> None:
    with pytest.raises(ModelfileError) as info:
        parse_modelfile(text)
    err = info.value
    assert (err.line, err.column) == (line, column), str(err)
    assert fragment in str(err)
    assert str(err).startswith(f"modelfile: line {line}, column {column}: ")
    assert isinstance(err, InvalidParameterError) and err.field == "modelfile"


def test_round_trip_of_the_full_example() -> None:
    mf = parse_modelfile(FULL)
    text = render_modelfile(mf, header="generated\nfor a test")
    assert text.startswith("# generated\n# for a test\n\nFROM ./models/base.gguf\n")
    assert parse_modelfile(text) == mf
    assert parse_modelfile(render_modelfile(parse_modelfile(text))) == mf


def test_quote_choices() -> None:
    assert quote("plain text") == "plain text"
    assert quote("") == '""'
    assert quote(" lead") == '" lead"'
    assert quote("two\nlines") == '"""two\nlines"""'
    assert quote('"starts quoted') == '""""starts quoted"""'
    assert quote('multi\nwith "quotes" inside') == '"""multi\nwith "quotes" inside"""'
    assert quote('ends with a quote"') == 'ends with a quote"'
    assert quote('\n ends with a quote"') is None       # no quoting can hold it
    assert not is_representable('has """ and ends"\n"')
    assert not is_representable("carriage\rreturn")


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r"),
                max_size=40)
_name = st.from_regex(r"[A-Za-z0-9_./~-]{1,20}", fullmatch=True).filter(lambda s: s.strip() == s)


@settings(max_examples=150, deadline=None)
@given(base=_name, template=st.none() | _text, system=st.none() | _text,
       stops=st.lists(_text.filter(bool), max_size=3),
       temperature=st.none() | st.floats(0, 5, allow_nan=False),
       seed=st.none() | st.integers(-2**40, 2**40),
       messages=st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), _text),
                         max_size=3),
       licenses=st.lists(_text, max_size=2),
       adapters=st.lists(_name, max_size=2))
def test_render_parse_round_trip(base, template, system, stops, temperature, seed, messages,
                                 licenses, adapters) -> None:
    values = [v for v in [template, system, *stops, *(m[1] for m in messages), *licenses]
              if v is not None]
    if not all(is_representable(v) for v in values):
        return
    params: dict = {}
    if stops:
        params["stop"] = stops
    if temperature is not None:
        params["temperature"] = temperature
    if seed is not None:
        params["seed"] = seed
    mf = Modelfile(base=base, parameters=params, template=template, system=system,
                   messages=[Message(r, c) for r, c in messages], adapters=adapters,
                   licenses=licenses)
    assert parse_modelfile(render_modelfile(mf)) == mf


def test_format_parameters_like_ollama() -> None:
    text = format_parameters({"stop": ["<|im_end|>", "a\"b"], "temperature": 0.7, "num_ctx": 8})
    assert text.splitlines() == ['num_ctx     8', 'temperature 0.7', 'stop        "<|im_end|>"',
                                 'stop        "a\\"b"']
    assert format_parameters({}) == ""


def test_check_parameters_for_json_requests() -> None:
    assert check_parameters({"temperature": 1, "stop": "x", "num_ctx": "2048"}) == \
        {"temperature": 1.0, "stop": ["x"], "num_ctx": 2048}
    for bad in ({"temperature": "hot"}, {"nope": 1}, {"num_ctx": 1.5}, {"top_k": True},
                {"temperature": [1, 2]}, {"stop": [None]}):
        with pytest.raises(InvalidParameterError):
            check_parameters(bad)


def test_parses_what_ollama_show_writes() -> None:
    text = '''# Modelfile generated by "ollama show"
# To build a new Modelfile based on this, replace FROM with:
# FROM llama3.2:latest

FROM /home/u/.ollama/models/blobs/sha256-dde5aa3fc5ffc17176b5e8bdc82f587b24b2678c6c66101bf7da77af9f7ccdff
TEMPLATE """<|start_header_id|>system<|end_header_id|>

Cutting Knowledge Date: December 2023
{{ if .System }}{{ .System }}
{{- end }}<|eot_id|>"""
PARAMETER stop <|start_header_id|>
PARAMETER stop <|end_header_id|>
PARAMETER stop <|eot_id|>
LICENSE "LLAMA 3.2 COMMUNITY LICENSE AGREEMENT
Llama 3.2 Version Release Date: September 25, 2024
"
'''
    mf = parse_modelfile(text)
    assert mf.base.endswith("sha256-dde5aa3fc5ffc17176b5e8bdc82f587b24b2678c6c66101bf7da77af9f7ccdff")
    assert mf.template.startswith("<|start_header_id|>system<|end_header_id|>\n\nCutting")
    assert mf.template.endswith("{{- end }}<|eot_id|>")
    assert mf.parameters == {"stop": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    assert mf.licenses == ["LLAMA 3.2 COMMUNITY LICENSE AGREEMENT\n"
                           "Llama 3.2 Version Release Date: September 25, 2024\n"]
