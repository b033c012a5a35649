"""Go text/template, as Ollama's Modelfile TEMPLATEs use it.

    render(source, data)            run a Go template over Python data
    compile_template(source)        the parsed template (cached per text): .render(data)
    render_chat(template, messages, tools=None, system=None, think=None)
                                    the prompt Ollama builds for a chat with that TEMPLATE
    TemplateError                   any parse or execution problem (an InvalidParameterError
                                    on the "template" field, naming line and column)

go_template holds the interpreter, gofmt Go's value printing (fmt, json), ollama the chat
algorithm and Ollama's data model.
"""
from shoal.templates.go_template import GoTemplate, TemplateError, compile_template, parse, render
from shoal.templates.gofmt import Field, GoMap, GoSlice, GoStruct, StructType
from shoal.templates.ollama import OllamaTemplate, ollama_template, render_chat

__all__ = ["Field", "GoMap", "GoSlice", "GoStruct", "GoTemplate", "OllamaTemplate", "StructType",
           "TemplateError", "compile_template", "ollama_template", "parse", "render", "render_chat"]
