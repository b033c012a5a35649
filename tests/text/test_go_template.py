"""shoal.text.gotemplate: Go text/template semantics, and chats rendered as Ollama renders them.

The expected strings were worked out by hand from Go's text/template rules and Ollama's
template.Execute; they agree with Go's own text/template (checked outside the suite).
"""
from __future__ import annotations

import datetime
import time
import tracemalloc

import pytest

from shoal.core.errors import InvalidParameterError
from shoal.text.gotemplate import GoSlice, TemplateError, compile_template, render
from shoal.text.gotemplate import exec as go_exec
from shoal.text.gotemplate import funcs as go_funcs
from shoal.text.gotemplate.parser import parse_tree
from shoal.text.ollama_template import ollama_template, render_chat

DATA = {
    "S": "hi", "E": "", "N": 3, "Z": 0, "F": 2.5, "B": True, "No": False, "Nil": None,
    "L": ["a", "b", "c"], "EL": [], "M": {"b": 2, "a": 1, "c": {"x": "y"}}, "EM": {},
    "U": "héllo", "H": "<a href='x'>&\"</a>",
    "Msgs": [{"Role": "user", "Content": "u1"}, {"Role": "assistant", "Content": "a1"},
             {"Role": "user", "Content": "u2"}],
}


# ---- Go semantics ------------------------------------------------------------------------------

SEMANTICS = [
    # text and trim markers: "{{- " trims whitespace before, " -}}" after; both need the space
    ("plain text", "plain text"),
    ("a  \n {{- .S -}} \n\t b", "ahib"),
    ("a  {{- .S }}  b", "ahi  b"),
    ("a {{ .S -}}  \n b", "a hib"),
    ("x {{-3}}", "x -3"),
    ("{{ 3 -}}  x", "3x"),
    ("{{- .S -}}", "hi"),
    # comments, trimmed or not, spanning lines
    ("a{{/* note */}}b", "ab"),
    ("a {{- /* note */ -}} b", "ab"),
    ("a\n{{- /* multi\nline */ -}}\nb", "ab"),
    # printing values
    ("{{ .S }}|{{ .E }}|{{ .N }}|{{ .Z }}|{{ .F }}|{{ .B }}|{{ .No }}", "hi||3|0|2.5|true|false"),
    ("{{ .L }}|{{ .EL }}|{{ .M }}|{{ .EM }}", "[a b c]|[]|map[a:1 b:2 c:map[x:y]]|map[]"),
    ("[{{ .Nil }}][{{ .Missing }}][{{ .M.zz }}][{{ .Missing.X }}]", "[][][][]"),  # lenient default
    ("{{ .M.a }}{{ .M.c.x }}{{ $.M.a }}", "1y1"),
    ("{{ 1e6 }} {{ 123456.0 }} {{ 1234567.0 }} {{ 0.0001 }} {{ 0.00001 }} {{ 3.0 }}",
     "1e+06 123456 1.234567e+06 0.0001 1e-05 3"),
    # literals
    ('{{ "a\\tb\\u00e9\\x41\\101" }}|{{ `raw\\n` }}|{{ \'a\' }}|{{ true }}', "a\tbéAA|raw\\n|97|true"),
    ("{{ 0x1F }} {{ 0o17 }} {{ 017 }} {{ 0b101 }} {{ 1_000 }} {{ 1.5e3 }} {{ .5 }} {{ -2 }} {{ +3 }}",
     "31 15 15 5 1000 1500 0.5 -2 3"),
    # truthiness: false, 0, nil, "" and empty slices/maps are false; everything else true
    ("{{ if .S }}T{{ else }}F{{ end }}{{ if .E }}T{{ else }}F{{ end }}{{ if .Z }}T{{ else }}F{{ end }}"
     "{{ if .EL }}T{{ else }}F{{ end }}{{ if .EM }}T{{ else }}F{{ end }}{{ if .Nil }}T{{ else }}F{{ end }}"
     "{{ if .M }}T{{ end }}{{ if .F }}T{{ end }}{{ if .No }}T{{ else }}F{{ end }}", "TFFFFFTTF"),
    ("{{ if .E }}1{{ else if .Z }}2{{ else if .S }}3{{ else }}4{{ end }}", "3"),
    ("{{ if .E }}1{{ else if .Z }}2{{ else }}4{{ end }}", "4"),
    ("{{ with .S }}[{{ . }}]{{ else }}none{{ end }}{{ with .E }}[{{ . }}]{{ else }}none{{ end }}", "[hi]none"),
    ("{{ with .M }}{{ .a }}{{ .c.x }}{{ end }}", "1y"),
    ("{{ with .E }}e{{ else with .S }}s={{ . }}{{ end }}", "s=hi"),
    # range: slices, maps (sorted keys), integers, else, break/continue, variables
    ("{{ range .L }}<{{ . }}>{{ end }}", "<a><b><c>"),
    ("{{ range $i, $x := .L }}{{ $i }}:{{ $x }} {{ end }}", "0:a 1:b 2:c "),
    ("{{ range $x := .L }}{{ $x }}{{ end }}", "abc"),
    ("{{ range .EL }}x{{ else }}empty{{ end }}|{{ range .Nil }}x{{ else }}nil{{ end }}", "empty|nil"),
    ("{{ range $k, $v := .M }}{{ $k }}={{ $v }};{{ end }}", "a=1;b=2;c=map[x:y];"),
    ("{{ range 3 }}{{ . }}{{ end }}", "012"),
    ('{{ range .L }}{{ if eq . "b" }}{{ break }}{{ end }}{{ . }}{{ end }}', "a"),
    ('{{ range .L }}{{ if eq . "b" }}{{ continue }}{{ end }}{{ . }}{{ end }}', "ac"),
    ("{{ range .L -}}\n  {{ . }}\n{{- end }}", "abc"),
    ("{{ range .L }}{{ range $.EL }}x{{ else }}{{ . }}{{ end }}{{ end }}", "abc"),
    # variables: declaration, assignment (also from inside range), $ is the data
    ("{{ $x := 1 }}{{ $x }}{{ $x = 2 }}{{ $x }}", "12"),
    ("{{ $x := .S }}{{ range .L }}{{ $x }}{{ $x = . }}{{ end }}{{ $x }}", "hiabc"),
    ("{{ range .L }}{{ $.S }}{{ end }}", "hihihi"),
    ("{{ with $x := .S }}{{ $x }}{{ . }}{{ end }}{{ if $y := .N }}{{ $y }}{{ end }}", "hihi3"),
    ("{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ $y := 3 }}{{ end }}{{ $x }}", "2"),
    ("{{ $m := index .Msgs 0 }}{{ $m.Role }}", "user"),
    # pipelines: the previous value is the last argument
    ('{{ .S | printf "%s!" }}', "hi!"),
    ('{{ "a" | printf "%s%s" "b" | printf "[%s]" }}', "[ba]"),
    ('{{ .N | printf "%d-%d" 5 }}', "5-3"),
    ("{{ .L | len }}{{ .M | len }}", "33"),
    # parentheses and chains
    ("{{ (len .L) }} {{ (index .Msgs 1).Content }} {{ ($.M).a }} {{ (.M).c.x }}", "3 a1 1 y"),
    ('{{ printf "%s" (printf "%d" 5) }}', "5"),
    # printf
    ('{{ printf "%v %s %d %q %x %X %5d|%-5d|%05d %t %c %o %b" .L .S 42 .S 255 255 7 7 -7 .B 65 8 5 }}',
     '[a b c] hi 42 "hi" ff FF     7|7    |-0007 true A 10 101'),
    ('{{ printf "%e %f %g %.2f %8.3f %+d %v" 1234.5678 1234.5678 1234.5678 3.14159 3.14159 5 1e6 }}',
     "1.234568e+03 1234.567800 1234.5678 3.14    3.142 +5 1e+06"),
    ('{{ printf "%6.2f|%-8s|%8s|%.2s|%x|% x|%q" 3.14159 "ab" "ab" "abc" "hi" "hi" "a\\tb" }}',
     '  3.14|ab      |      ab|ab|6869|68 69|"a\\tb"'),
    ('{{ printf "%T %T %T %T %T %T %T" .S .N .F .L .M .B .Nil }}',
     "string int float64 []interface {} map[string]interface {} bool <nil>"),
    ('{{ printf "%d" .S }}|{{ printf "%d %d" 1 }}|{{ printf "%d" 1 "x" }}|{{ printf "%s" .Nil }}|{{ printf "%v" .Nil }}',
     "%!d(string=hi)|1 %!d(MISSING)|1%!(EXTRA string=x)|%!s(<nil>)|<nil>"),
    ('{{ printf "%v|%+v" .M .Msgs }}', "map[a:1 b:2 c:map[x:y]]|[map[Content:u1 Role:user] "
                                      "map[Content:a1 Role:assistant] map[Content:u2 Role:user]]"),
    # print and println: spaces between operands when neither is a string
    ('{{ print 1 2 "a" "b" 3 .Nil .L }}|{{ println 1 "a" }}|', "1 2ab3 <nil> [a b c]|1 a\n|"),
    # comparison: eq takes several arguments; ints and floats do not compare
    ('{{ eq 1 1 }} {{ eq .S "hi" }} {{ eq .S "a" "b" "hi" }} {{ eq .S "x" "y" }} {{ ne .S "x" }} {{ eq .Nil .S }}',
     "true true true false true false"),
    ('{{ eq "a" "a" 1 }} {{ eq .N 3 }} {{ eq .F 2.5 }}', "true true true"),
    ('{{ lt 1 2 }} {{ le 2 2 }} {{ gt "b" "a" }} {{ ge 1.5 2.5 }} {{ lt .N 4 }}', "true true true false true"),
    # logic: and/or return an operand and stop early
    ('{{ and 1 2 }} {{ and 0 2 }} {{ and .S .E }}| {{ or 0 .E }}| {{ or .E .S }} {{ not .S }} {{ not .E }}',
     "2 0 | | hi false true"),
    ("{{ and .E (index .Nil 0) }}|{{ or .S (index .Nil 0) }}", "|hi"),
    ("{{ .S | and 1 }}|{{ .E | or 0 }}|", "hi||"),
    # len, index, slice (strings by bytes, as Go)
    ("{{ len .S }} {{ len .L }} {{ len .M }} {{ len .U }} {{ len .EL }}", "2 3 3 6 0"),
    ('{{ index .L 1 }} {{ index .M "a" }} [{{ index .M "zz" }}] {{ index .M "c" "x" }} {{ index .S 0 }} {{ index .Msgs 2 "Content" }}',
     "b 1 [] y 104 u2"),
    ("{{ slice .L 1 }} {{ slice .L 1 2 }} {{ slice .L }} {{ slice .S 1 }} {{ slice .U 1 3 }} {{ slice .L 0 0 }}",
     "[b c] [b] [a b c] i é []"),
    ("{{ range $i, $m := .Msgs }}{{ $last := eq (len (slice $.Msgs $i)) 1 }}{{ $m.Role }}{{ if $last }}!{{ end }} {{ end }}",
     "user assistant user! "),
    # escapers and Ollama's json (Go's encoding/json: HTML-safe, sorted keys)
    ("{{ html .H }}|{{ js .H }}|{{ urlquery .H }}",
     "&lt;a href=&#39;x&#39;&gt;&amp;&#34;&lt;/a&gt;|\\u003Ca href\\u003D\\'x\\'\\u003E\\u0026\\\"\\u003C/a\\u003E|"
     "%3Ca+href%3D%27x%27%3E%26%22%3C%2Fa%3E"),
    ("{{ json .S }} {{ json .L }} {{ json .M }} {{ json .H }} {{ json .Nil }} {{ json .F }} {{ json .U }}",
     '"hi" ["a","b","c"] {"a":1,"b":2,"c":{"x":"y"}} "\\u003ca href=\'x\'\\u003e\\u0026\\"\\u003c/a\\u003e" '
     'null 2.5 "héllo"'),
    ("{{ json 1e21 }} {{ json 1e20 }} {{ json 0.0000001 }} {{ json 3.0 }}", "1e+21 100000000000000000000 1e-7 3"),
    # define / template / block
    ('{{ define "t" }}[{{ . }}]{{ end }}{{ template "t" .S }}{{ template "t" }}{{ block "b" .N }}<{{ . }}>{{ end }}',
     "[hi][]<3>"),
    # newlines inside actions
    ('{{ .S\n| printf "%s" }}', "hi"),
]


@pytest.mark.parametrize("source, expected", SEMANTICS)
def test_go_semantics(source: str, expected: str) -> None:
    assert render(source, DATA) == expected


def test_strict_mode_is_gos_missingkey_zero() -> None:
    # Go (and Ollama, with missingkey=zero over map[string]any) prints nil as "<no value>"
    assert render("[{{ .Nil }}][{{ .Missing }}][{{ .M.zz }}]", DATA, strict=True) == \
        "[<no value>][<no value>][<no value>]"
    assert render("{{ if .Missing }}x{{ else }}y{{ end }}", DATA, strict=True) == "y"
    # html/js/urlquery format a nil operand as it prints: <no value>, escaped
    assert render("{{ html .Missing }}|{{ js .Nil }}", DATA, strict=True) == "&lt;no value&gt;|\\u003Cno value\\u003E"
    assert render("{{ html .Missing }}|{{ js .Nil }}", DATA) == "|"
    # ...and a field of a nil read from a map is an error
    with pytest.raises(TemplateError, match=r"nil pointer evaluating interface \{\}\.X"):
        render("{{ .Missing.X }}", DATA, strict=True)


def test_current_date_and_type_script_types(monkeypatch) -> None:
    monkeypatch.setattr(go_funcs, "_today", lambda: datetime.date(2025, 3, 1))
    assert render('{{ currentDate }} {{ yesterdayDate }} {{ currentDate "ignored" }}') == \
        "2025-03-01 2025-02-28 2025-03-01"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "string"}, "b": {"type": ["integer", "null"]}, "c": {"anyOf": [{"type": "boolean"},
                                                                                    {"type": "array"}]},
        "d": {"type": "object"}, "e": {}}}}}]
    source = ("{{ range .Tools }}{{ range $k, $v := .Function.Parameters.Properties }}"
              "{{ $k }}: {{ toTypeScriptType $v }}; {{ end }}{{ end }}{{ toTypeScriptType 1 }}"
              "{{ range .Messages }}{{ end }}")
    assert render_chat(source, [], tools) == \
        "a: string; b: number | null; c: boolean | any[]; d: Record<string, any>; e: any; any"


def test_compiled_templates_are_cached_and_reusable() -> None:
    source = "{{ range .L }}{{ . }}{{ end }}"
    assert compile_template(source) is compile_template(source)
    tmpl = compile_template(source)
    assert tmpl.render({"L": [1, 2]}) == "12"
    assert tmpl.render({"L": ["x"]}) == "x"
    assert ollama_template(QWEN) is ollama_template(QWEN)
    assert tmpl.identifiers() == ["L"]


def test_the_parser_knows_only_the_functions_it_is_given() -> None:
    root, defines = parse_tree('{{ define "a" }}x{{ end }}{{ f 1 | f }}', {"f": None})
    assert str(root) == "{{f 1 | f}}"
    assert {name: str(body) for name, body in defines.items()} == {"a": "x"}
    with pytest.raises(TemplateError, match='line 1, column 4: function "f" not defined'):
        parse_tree("{{ f 1 }}", {})


def test_identifiers_are_what_ollama_collects() -> None:
    tmpl = compile_template('{{ if .System }}{{ $x := 1 }}{{ end }}{{ range $i, $m := .Messages }}'
                            '{{ $m.Role }}{{ (index $.Tools 0).Function }}{{ end }}{{ template "t" .Prompt }}'
                            '{{ define "t" }}{{ .Response }}{{ end }}')
    # fields and variables, not the fields of a parenthesized chain
    assert tmpl.identifiers() == ["System", "Messages", "$m", "Role", "Prompt", "Response"]


# ---- errors ------------------------------------------------------------------------------------

PARSE_ERRORS = [
    ("ok\n  {{ .Prompt", 2, 3, "unclosed action"),
    ("{{ .Prompt | upper }}", 1, 14, 'function "upper" not defined'),
    ("line\n{{ 1 | 2 }}", 2, 8, "non executable command in pipeline stage 2"),
    ("{{ .A | | .B }}", 1, 9, 'unexpected "|" in command'),
    ("{{ if }}x{{ end }}", 1, 7, "missing value for if"),
    ("{{ if .X }}open", 1, 16, "without a matching {{end}}"),
    ("{{ end }}", 1, 4, "unexpected {{end}}"),
    ("{{ else }}", 1, 4, "unexpected {{else}}"),
    ("{{ $undefined }}", 1, 4, 'undefined variable "$undefined"'),
    ("{{ break }}", 1, 4, "{{break}} outside {{range}}"),
    ('{{ "abc }}', 1, 4, "unterminated quoted string"),
    ("{{ (.S }}", 1, 8, "unclosed left paren"),
    ("{{/* open }}", 1, 1, "unclosed comment"),
    ("{{/* c */ }}", 1, 1, "comment ends before closing delimiter"),
    ("{{ 3x }}", 1, 4, "bad number syntax"),
    ('{{ "\\q" }}', 1, 4, "invalid syntax"),
    ("{{ range $a, $b, $c := .L }}{{ end }}", 1, 16, "too many declarations in range"),
    ("{{}}", 1, 3, "missing value for command"),
]


@pytest.mark.parametrize("source, line, column, words", PARSE_ERRORS)
def test_parse_errors_name_line_and_column(source: str, line: int, column: int, words: str) -> None:
    with pytest.raises(TemplateError) as info:
        compile_template(source)
    err = info.value
    assert isinstance(err, InvalidParameterError) and err.field == "template"
    assert words in str(err)
    assert (err.line, err.column) == (line, column)
    assert f"line {line}, column {column}" in str(err)


EXEC_ERRORS = [
    ("{{ range .S }}{{ end }}", 1, 10, "range can't iterate over hi"),
    ("{{ .S | .M }}", 1, 9, "M is not a method but has arguments"),
    ("{{ len .N }}", 1, 4, "error calling len: len of type int"),
    ("x\n{{ index .L 5 }}", 2, 4, "error calling index: index out of range: 5"),
    ("{{ slice .L 2 1 }}", 1, 4, "invalid slice index: 2 > 1"),
    ('{{ eq 1 "a" }}', 1, 4, "incompatible types for comparison"),
    ("{{ eq .F 2 }}", 1, 4, "incompatible types for comparison"),
    ("{{ lt true false }}", 1, 4, "invalid type for comparison"),
    ("{{ nil }}", 1, 4, "nil is not a command"),
    ("{{ 1 2 }}", 1, 4, "can't give argument to non-function 1"),
    ("{{ . | printf }}", 1, 8, "wrong type for value; expected string; got map[string]interface {}"),
    ("{{ and }}", 1, 4, "wrong number of args for and: want at least 1 got 0"),
    ("{{ not 1 2 }}", 1, 4, "wrong number of args for not: want 1 got 2"),
    ("{{ currentDate 1 }}", 1, 16, "expected string; found 1"),
    ('{{ template "nope" }}', 1, 4, 'no such template "nope"'),
    ("{{ .S.X }}", 1, 4, "can't evaluate field X in type string"),
]


@pytest.mark.parametrize("source, line, column, words", EXEC_ERRORS)
def test_execution_errors_name_line_and_column(source: str, line: int, column: int, words: str) -> None:
    with pytest.raises(TemplateError) as info:
        render(source, DATA)
    assert words in str(info.value)
    assert (info.value.line, info.value.column) == (line, column)


def test_a_field_a_message_lacks_is_an_error_as_in_ollama() -> None:
    with pytest.raises(TemplateError, match=r"can't evaluate field Nope in type \*template.templateMessage"):
        render_chat("{{ range .Messages }}{{ .Nope }}{{ end }}", [{"role": "user", "content": "hi"}])


def test_bad_chat_input_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match="messages\\[0\\].tool_calls\\[0\\].function.arguments"):
        render_chat(QWEN, [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}])
    with pytest.raises(TemplateError, match="tools\\[0\\] must be an object"):
        render_chat(QWEN, [{"role": "user", "content": "x"}], tools=["f"])


# ---- Ollama's templates, rendered as Ollama renders them ---------------------------------------

QWEN = '''{{- if .Messages }}
{{- if or .System .Tools }}<|im_start|>system
{{- if .System }}
{{ .System }}
{{- end }}
{{- if .Tools }}

# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>
{{- end }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ if .Content }}{{ .Content }}
{{- else if .ToolCalls }}<tool_call>
{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ .Function.Arguments }}}
{{ end }}</tool_call>
{{- end }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else if eq .Role "tool" }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}
{{- else }}
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ end }}{{ .Response }}{{ if .Response }}<|im_end|>{{ end }}'''

LLAMA3 = '''{{- if or .System .Tools }}<|start_header_id|>system<|end_header_id|>
{{- if .System }}

{{ .System }}
{{- end }}
{{- if .Tools }}

You are a helpful assistant with tool calling capabilities.
{{- end }}<|eot_id|>
{{- end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>
{{- if and $.Tools $last }}

Given the following functions, respond with a JSON for a function call.

{{ range $.Tools }}
{{- . }}
{{ end }}
{{- end }}

{{ .Content }}<|eot_id|>
{{- if $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>
{{- if .ToolCalls }}

{{ range .ToolCalls }}{"name": "{{ .Function.Name }}", "parameters": {{ .Function.Arguments }}}{{ end }}
{{- else }}

{{ .Content }}
{{- end }}{{ if not $last }}<|eot_id|>{{ end }}
{{- else if eq .Role "tool" }}<|start_header_id|>ipython<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- if $last }}<|start_header_id|>assistant<|end_header_id|>

{{ end }}
{{- end }}
{{- end }}'''

GEMMA3 = '''{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if or (eq .Role "user") (eq .Role "system") }}<start_of_turn>user
{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}'''

MISTRAL = '''{{- range $index, $_ := .Messages }}
{{- if eq .Role "user" }}
{{- if and (le (len (slice $.Messages $index)) 2) $.Tools }}[AVAILABLE_TOOLS] {{ json $.Tools }}[/AVAILABLE_TOOLS]
{{- end }}[INST] {{ if and (eq (len (slice $.Messages $index)) 1) $.System }}{{ $.System }}

{{ end }}{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }}
{{- if .Content }} {{ .Content }}</s>
{{- else if .ToolCalls }}[TOOL_CALLS] [
{{- range .ToolCalls }}{"name": "{{ .Function.Name }}", "arguments": {{ json .Function.Arguments }}}
{{- end }}]</s>
{{- end }}
{{- else if eq .Role "tool" }}[TOOL_RESULTS] {"content": {{ .Content }}}[/TOOL_RESULTS]
{{- end }}
{{- end }}'''

CHATML_LEGACY = '''{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}<|im_end|>
'''

LLAMA2_LEGACY = '''[INST] {{ if .System }}<<SYS>>{{ .System }}<</SYS>>

{{ end }}{{ .Prompt }} [/INST]'''

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather for a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        # Go's decoder drops schema keys Ollama does not model ("default"); properties sort
        "unit": {"type": "string", "description": "Unit", "enum": ["c", "f"], "default": "c"},
        "city": {"type": "string", "description": "City"}}}}}
WEATHER_JSON = ('{"name":"get_weather","description":"Get the weather for a city","parameters":'
                '{"type":"object","required":["city"],"properties":{"city":{"type":"string","description":"City"},'
                '"unit":{"type":"string","description":"Unit","enum":["c","f"]}}}}')

CHAT = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "A joke?"}]
SYSTEM_CHAT = [{"role": "system", "content": "Be terse."}] + CHAT
TOOL_CHAT = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"function": {"name": "get_weather", "arguments": {"unit": "c", "city": "Paris", "days": 2}}}]},
             {"role": "tool", "content": '{"temp": 18}', "tool_name": "get_weather"}]


def test_qwen_chatml_multi_turn_with_and_without_system() -> None:
    without = ("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
               "<|im_start|>user\nA joke?<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(QWEN, CHAT) == without
    assert render_chat(QWEN, SYSTEM_CHAT) == "<|im_start|>system\nBe terse.<|im_end|>\n" + without
    # the Modelfile SYSTEM goes first unless the chat opens with its own system message
    assert render_chat(QWEN, CHAT, system="Model.") == "<|im_start|>system\nModel.<|im_end|>\n" + without
    assert render_chat(QWEN, SYSTEM_CHAT, system="Model.") == render_chat(QWEN, SYSTEM_CHAT)


def test_qwen_chatml_with_tools_and_a_tool_round_trip() -> None:
    expected = (
        "<|im_start|>system\nUse tools.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": ' + WEATHER_JSON + "}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city":"Paris","days":2,"unit":"c"}}\n'
        "</tool_call><|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"temp": 18}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n")
    assert render_chat(QWEN, TOOL_CHAT, tools=[WEATHER], system="Use tools.") == expected


def test_llama3_with_last_and_tools() -> None:
    assert render_chat(LLAMA3, CHAT, system="Be terse.") == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nA joke?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # tools are listed (each tool prints as JSON) in the last user turn only
    assert render_chat(LLAMA3, CHAT[:1], tools=[WEATHER]) == (
        "<|start_header_id|>system<|end_header_id|>\n\n"
        "You are a helpful assistant with tool calling capabilities.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
        "Given the following functions, respond with a JSON for a function call.\n\n"
        '{"type":"function","function":' + WEATHER_JSON + "}\n\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render_chat(LLAMA3, TOOL_CHAT, tools=[WEATHER]) == (
        "<|start_header_id|>system<|end_header_id|>\n\n"
        "You are a helpful assistant with tool calling capabilities.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "get_weather", "parameters": {"city":"Paris","days":2,"unit":"c"}}<|eot_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp": 18}<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_gemma3_turns() -> None:
    assert render_chat(GEMMA3, SYSTEM_CHAT) == (
        "<start_of_turn>user\nBe terse.<end_of_turn>\n"
        "<start_of_turn>user\nHi!<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nA joke?<end_of_turn>\n"
        "<start_of_turn>model\n")
    # an assistant message last is left open for the model to continue
    assert render_chat(GEMMA3, CHAT[:2]) == (
        "<start_of_turn>user\nHi!<end_of_turn>\n<start_of_turn>model\nHello!")


def test_mistral_inst_with_tools_and_system_on_the_last_turn() -> None:
    assert render_chat(MISTRAL, CHAT, system="Be terse.") == (
        "[INST] Hi![/INST] Hello!</s>[INST] Be terse.\n\nA joke?[/INST]")
    assert render_chat(MISTRAL, TOOL_CHAT, tools=[WEATHER]) == (
        "[INST] Weather in Paris?[/INST]"
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city":"Paris","days":2,"unit":"c"}}]</s>'
        '[TOOL_RESULTS] {"content": {"temp": 18}}[/TOOL_RESULTS]')
    assert render_chat(MISTRAL, CHAT[:1], tools=[WEATHER]) == (
        '[AVAILABLE_TOOLS] [{"type":"function","function":' + WEATHER_JSON + "}][/AVAILABLE_TOOLS]"
        "[INST] Hi![/INST]")


def test_legacy_templates_render_turn_by_turn_and_stop_at_response() -> None:
    assert render_chat(CHATML_LEGACY, SYSTEM_CHAT) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nA joke?<|im_end|>\n<|im_start|>assistant\n")
    # no .Response in the template: Ollama appends one, so answers follow their prompts
    assert render_chat(LLAMA2_LEGACY, SYSTEM_CHAT) == (
        "[INST] <<SYS>>Be terse.<</SYS>>\n\nHi! [/INST]Hello![INST] A joke? [/INST]")
    assert render_chat("{{ .Prompt }}", CHAT) == "Hi!Hello!A joke?"
    # a system message mid-chat starts a new turn; an assistant message last is printed
    chat = CHAT[:2] + [{"role": "system", "content": "New rules."}, {"role": "user", "content": "Go"},
                       {"role": "assistant", "content": "Sure"}]
    assert render_chat("<{{ .System }}|{{ .Prompt }}|{{ .Response }}>", chat) == "<|Hi!|Hello!><New rules.|Go|Sure"
    # legacy templates see neither .Messages nor .Tools: Go prints a missing key as <no value>
    assert render_chat("{{ .Prompt }}:{{ .Tools }}", CHAT[:1], tools=[WEATHER]) == "Hi!:<no value>"


def test_the_cut_after_response_follows_ollamas_tree_walk() -> None:
    # everything after the first .Response field goes, inside branches and pipelines too
    # (earlier turns run whole; only the last one is cut)
    assert render_chat("A{{ .Response }}B{{ .Prompt }}C", CHAT) == "AHello!BHi!C" + "A"
    # an argument after .Response goes: printf is left one operand short
    assert render_chat('{{ .Prompt }}{{ printf "%s|%s" .Response .System }}', CHAT[:1]) == "Hi!|%!s(MISSING)"
    # a later pipeline stage goes, and with it the whole action
    assert render_chat('{{ .Prompt }}{{ .Response | printf "<%s>" }}X', CHAT[:1]) == "Hi!"
    # a .Response in a condition does not cut
    assert render_chat("{{ if .Response }}R{{ end }}<{{ .Prompt }}>{{ .Response }}!", CHAT[:1]) == "<Hi!>"


def test_collate_merges_same_role_runs_except_tool_results() -> None:
    chat = [{"role": "user", "content": "one"}, {"role": "User", "content": "two"},
            {"role": "tool", "content": "t1"}, {"role": "tool", "content": "t2"},
            {"role": "system", "content": "s1"}, {"role": "system", "content": "s2"}]
    source = "{{ .System }}|{{ range .Messages }}{{ .Role }}={{ .Content }};{{ end }}"
    assert render_chat(source, chat) == "s1\n\ns2|user=one\n\ntwo;tool=t1;tool=t2;system=s1\n\ns2;"


def test_message_and_tool_fields() -> None:
    chat = [{"role": "assistant", "content": "", "thinking": "hmm", "tool_calls": [
        {"id": "call_1", "function": {"name": "f", "arguments": '{"b": [1, 2.5], "a": {"y": true}}'}}]},
        {"role": "tool", "content": "r", "tool_name": "f", "tool_call_id": "call_1"}]
    source = ("{{ range .Messages }}{{ .Role }} {{ .Thinking }} {{ .ToolName }} {{ .ToolCallID }}"
              "{{ range .ToolCalls }} {{ .ID }} {{ .Function.Index }} {{ .Function.Name }} {{ .Function.Arguments }}"
              "{{ range $k, $v := .Function.Arguments }} {{ $k }}={{ $v }}{{ end }}{{ end }};{{ end }}"
              "{{ .Think }} {{ .IsThinkSet }} {{ .ThinkLevel }}")
    assert render_chat(source, chat) == (
        'assistant hmm   call_1 0 f {"a":{"y":true},"b":[1,2.5]} a=map[y:true] b=[1 2.5];tool  f call_1;'
        "false false ")
    assert render_chat("{{ .Think }} {{ .IsThinkSet }} {{ .ThinkLevel }}{{ .Messages }}", [], think="high") == \
        "true true high[]"
    assert render_chat("{{ if .Tools }}T{{ else }}F{{ end }}{{ .Tools }} {{ json .Tools }}{{ .Messages }}", []) == \
        "Fnull null[]"
    tools = render_chat("{{ range .Tools }}{{ .Type }} {{ .Function.Name }} {{ .Function.Parameters.Required }} "
                        "{{ .Function.Parameters.Properties }}{{ end }}{{ .Messages }}", [], tools=[WEATHER])
    assert tools == ('function get_weather [city] {"city":{"type":"string","description":"City"},'
                     '"unit":{"type":"string","description":"Unit","enum":["c","f"]}}[]')


def test_go_values_model_typed_nil_slices() -> None:
    assert render("{{ . }}|{{ json . }}|{{ len . }}", GoSlice(nil=True)) == "[]|null|0"
    assert render("{{ json . }}", GoSlice()) == "[]"


# ---- guards against runaway templates (clients send templates to /api/generate) ----------------

def test_a_runaway_template_stops_with_an_error(monkeypatch) -> None:
    monkeypatch.setattr(go_exec, "MAX_STEPS", 1000)
    with pytest.raises(TemplateError, match="template runs too long"):
        render("{{ range 100000000 }}{{ end }}")
    with pytest.raises(TemplateError, match="template runs too long"):
        render("{{ range .L }}{{ range $.L }}{{ range $.L }}x{{ end }}{{ end }}{{ end }}", {"L": list(range(20))})
    assert len(render("{{ range .L }}x{{ end }}", {"L": list(range(400))})) == 400


def test_huge_widths_deep_nesting_and_recursion_are_refused() -> None:
    assert render('{{ printf "%9999999d|%.9999999f" 1 1.5 }}') == "%!(BADWIDTH)1|%!(BADPREC)1.500000"
    with pytest.raises(TemplateError, match="nests too deeply"):
        compile_template("{{ if 1 }}" * 3000 + "{{ end }}" * 3000)
    with pytest.raises(TemplateError):
        render('{{ define "a" }}{{ template "a" . }}{{ end }}{{ template "a" . }}')


# Issue 13: ten copies of a string, nine times over, made a 10^9-character string in 1.3 s.
DOUBLING = '{{ $s := "x" }}' + 9 * '{{ $s = print $s $s $s $s $s $s $s $s $s $s }}'


def _refused_quickly(template: str, data=None, **options) -> TemplateError:
    """The TemplateError `template` raises, within a second and 200 MB of allocations."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(TemplateError) as info:
            render(template, data, **options)
        elapsed = time.monotonic() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0, f"took {elapsed:.2f}s"
    assert peak < 200 << 20, f"allocated {peak >> 20} MB"
    assert len(str(info.value)) < 400           # the error quotes the template, clipped
    return info.value


@pytest.mark.parametrize("template", [
    DOUBLING,
    # the same growth through printf, json and the escapers
    '{{ $s := "xxxxxxxxxx" }}' + 9 * '{{ $s = printf "%s%s%s%s%s%s%s%s%s%s" $s $s $s $s $s $s $s $s $s $s }}',
    '{{ $s := "<<<<<<<<<<" }}' + 9 * '{{ $s = html $s $s $s $s $s $s $s $s $s $s }}',
    '{{ $s := "x" }}' + 30 * '{{ $s = json (print $s $s) }}',
    # widths: each at most a million, but many of them
    '{{ printf "' + "%999999d" * 40 + '" ' + " 1" * 40 + " }}",
    '{{ $w := printf "%999999d" 1 }}{{ range 100 }}{{ $w }}{{ end }}',
    # many big values kept in variables: their total counts, not just each one
    '{{ $w := printf "%999999d" 1 }}' + "".join(f"{{{{ $v{i} := print $w }}}}" for i in range(40)),
    # plain text, repeated
    "{{ range 1000000 }}" + "x" * 10_000 + "{{ end }}",
])
def test_templates_cannot_make_huge_strings(template: str) -> None:
    error = _refused_quickly(template)
    assert "too large" in error.detail


def test_the_size_budget_counts_characters_made_not_data_read() -> None:
    prompt = "word " * 1_000_000           # a 5 MB prompt is printed, sliced and measured as usual
    out = render('{{ .P }}{{ len .P }}{{ slice .P 0 4 }}{{ index .P 0 }}', {"P": prompt})
    assert out == prompt + "5000000word119"
    assert render("{{ . }}", "x" * 100, max_chars=100) == "x" * 100
    with pytest.raises(TemplateError, match="too large"):
        render("{{ . }}{{ . }}", "x" * 100, max_chars=150)
    with pytest.raises(TemplateError, match="too large"):
        render("{{ print . . }}", "x" * 100, max_chars=150)


def test_templates_have_a_time_budget(monkeypatch) -> None:
    monkeypatch.setattr(go_exec, "MAX_SECONDS", 0.2)
    long = "é" * 1_000_000        # not ASCII: each `len` measures its UTF-8 bytes
    started = time.monotonic()
    with pytest.raises(TemplateError, match=r"runs too long \(over 0.2s\)"):
        render("{{ range 1000000 }}{{ len $.L }}{{ end }}", {"L": long})
    assert time.monotonic() - started < 1.0


def test_a_template_error_quoting_a_huge_value_is_clipped() -> None:
    with pytest.raises(TemplateError) as info:
        render("{{ range .S }}{{ end }}", {"S": "y" * 1_000_000})
    assert len(str(info.value)) < 400
