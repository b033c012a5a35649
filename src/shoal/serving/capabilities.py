"""What a model can do, in Ollama's capability names (/api/show `capabilities`).

One rule for loaded and stored models alike; extend it here (embedding models, base models)
rather than at the call sites.
"""
from __future__ import annotations

from collections.abc import Callable

from shoal.text.reasoning import detect_reasoning


def model_capabilities(chat_template: str | None, token_to_id: Callable[[str], int | None], *,
                       embedding_only: bool = False, base_model: bool = False) -> list[str]:
    """`embedding` alone for an encoder (as Ollama lists embedding models); `completion` alone
    for a base model (it continues text: it was never taught to chat); else `completion`,
    `chat` (shoal's own: what tells a base model apart), `tools` (a template without tool
    support gets shoal's built-in tool prompt) and `thinking` for reasoning templates."""
    if embedding_only:
        return ["embedding"]
    if base_model:
        return ["completion"]
    caps = ["completion", "chat", "tools"]
    if detect_reasoning(chat_template, token_to_id) is not None:
        caps.append("thinking")
    return caps
