"""What a model can do, in Ollama's capability names (/api/show `capabilities`).

One rule for loaded and stored models alike; extend it here (embedding models, base models)
rather than at the call sites.
"""
from __future__ import annotations

from collections.abc import Callable

from shoal.text.reasoning import detect_reasoning


def model_capabilities(chat_template: str | None, token_to_id: Callable[[str], int | None], *,
                       embedding_only: bool = False) -> list[str]:
    """`embedding` alone for an encoder (as Ollama lists embedding models); else `completion`
    for every generative model, `tools` for every model that chats (a template without tool
    support gets shoal's built-in tool prompt), `thinking` for reasoning templates."""
    if embedding_only:
        return ["embedding"]
    caps = ["completion", "tools"]
    if detect_reasoning(chat_template, token_to_id) is not None:
        caps.append("thinking")
    return caps
