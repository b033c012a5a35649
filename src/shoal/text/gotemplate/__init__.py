"""Go text/template, the language Ollama's Modelfile TEMPLATEs are written in.

    render(source, data)            run a Go template over Python data
    compile_template(source)        the parsed template (cached per text): .render(data)
    TemplateError                   any parse or execution problem (an InvalidParameterError
                                    on the "template" field, naming line and column)

It follows Go's lexer, parser and evaluator (text/template/parse and exec.go) closely:

  * actions `{{ }}` with `{{- ` / ` -}}` trimming (a dash *and* a space: `{{-3}}` is the number
    -3), comments `{{/* */}}`, newlines inside actions;
  * `if` / `else if` / `else` / `end`, `with` / `else with` / `else`, `range` over slices, maps
    (sorted keys) and integers, with `$x :=` / `$i, $x :=` / `=` forms, `else`, `break`,
    `continue`; `define`, `template` and `block`;
  * variables (`$x := ...`, `$x = ...`, `$` the data), field chains (`.A.B`, `$x.A`, `$.A`,
    `(pipeline).A`), pipelines with `|` (the previous value is the last argument), parentheses;
  * literals: strings with Go escapes, raw strings, character constants, numbers (ints, floats,
    hex/octal/binary, `_` separators), true/false/nil;
  * Go's builtins (and or not len index slice print printf println eq ne lt le gt ge html js
    urlquery call) with Go's lazy and/or and type rules, plus Ollama's functions (json,
    currentDate, yesterdayDate, toTypeScriptType);
  * Go truthiness: false, 0, nil, "" and empty slices/maps are false; structs are true.

Data are Python values (see gofmt: None/bool/int/float/str/list/dict, and GoStruct/GoSlice/
GoMap for typed Go values). A missing map key is nil, like Go's missingkey=zero over
map[string]any. By default nil prints as "" and a field of nil is nil (lenient, for plain
dicts); `strict=True` is Go exactly: nil prints "<no value>" and a field of a nil read from a
map is an error (render_chat runs strict, as Ollama does). A field a GoStruct does not have is
always an error, as in Go: `can't evaluate field X in type T`.

Not supported: method calls on data (`.Method arg`), function values and `call` on them,
complex numbers, custom delimiters, and html/template's contextual escaping. A `slice` of a
string that cuts a UTF-8 sequence prints U+FFFD where Go would print the raw bytes.

Every problem, at parse or at execution time, is a TemplateError naming the line and column.
Execution is bounded (exec.MAX_STEPS, MAX_SECONDS and MAX_CHARS: steps, time and characters
made) so that a template from a request cannot run for minutes or fill the memory.

The modules, each importing only those above it:

    errors      TemplateError and line/column of an offset
    gofmt       Go values in Python and how Go prints them (fmt, strconv quoting, json, escapers)
    lexer       source text to tokens
    literals    string, character and number literals to values
    nodes       the parse tree
    parser      tokens to the tree
    funcs       the functions a template may call, and Go's truth of a value
    exec        the evaluator: a tree run over data
    template    GoTemplate (parse, compile_template, render)

Ollama's chat algorithm over these templates is shoal.text.ollama_template.
"""
from shoal.text.gotemplate.errors import TemplateError
from shoal.text.gotemplate.gofmt import Field, GoMap, GoSlice, GoStruct, StructType
from shoal.text.gotemplate.template import GoTemplate, compile_template, parse, render

__all__ = ["Field", "GoMap", "GoSlice", "GoStruct", "GoTemplate", "StructType",
           "TemplateError", "compile_template", "parse", "render"]
