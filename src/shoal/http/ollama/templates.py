"""The Go templates Ollama clients send in /api/generate's `template`.

A request's `template` is a Go `text/template` program, run by shoal.text.gotemplate exactly as
Ollama's GenerateHandler runs it: over the messages [system (if any), user prompt], so a
legacy `.System`/`.Prompt`/`.Response` template renders one turn and stops at `.Response`
(what follows is what the model writes next), and a `.Messages` template ranges over both.
Every Go construct shoal.text.gotemplate supports works; a template that cannot be parsed or run
raises TemplateError (an InvalidParameterError on "template", naming line and column), which
the API turns into a 400.
"""
from __future__ import annotations

from collections.abc import Mapping

from shoal.text.gotemplate import TemplateError
from shoal.text.ollama_template import render_chat

__all__ = ["TemplateError", "render"]


def render(source: str, values: Mapping[str, str]) -> str:
    """The prompt text for `source` over a generate request's System and Prompt."""
    if not isinstance(source, str):
        raise TemplateError("must be a string")
    messages = []
    if values.get("System"):
        messages.append({"role": "system", "content": values["System"]})
    # NOTE: Ollama always sends the user message, even with an empty prompt.
    messages.append({"role": "user", "content": values.get("Prompt") or ""})
    return render_chat(source, messages)
