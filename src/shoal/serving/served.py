"""A loaded model: its engine, and what the APIs report and render with it."""
from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.engine.async_engine import AsyncEngine
from shoal.engine.builder import EngineInfo
from shoal.serving.catalog import ModelSpec, path_size
from shoal.text.reasoning import ReasoningFormat, detect_reasoning
from shoal.text.tokenizer import Tokenizer


@dataclass(slots=True)
class ServedModel:
    """One loaded model and what the API reports about it."""

    name: str
    engine: AsyncEngine
    info: EngineInfo
    aliases: tuple[str, ...] = ()
    loaded_at: float = field(default_factory=time.time)
    spec: ModelSpec | None = None     # where it came from: files, Modelfile defaults, prompt parts
    load_seconds: float = 0.0         # how long the last load took (Ollama's load_duration)
    _digest: str | None = None

    @property
    def default_options(self) -> dict[str, Any]:
        """Sampling defaults of the model (a Modelfile's PARAMETERs, in Ollama's names)."""
        return self.spec.options if self.spec is not None else {}

    @property
    def size_in_memory(self) -> int:
        """Weights plus the reserved KV cache, in bytes (what /api/ps reports)."""
        return self.info.weights_bytes + self.info.kv_cache_bytes

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.limits.max_model_len

    @property
    def family(self) -> str:
        return self.info.model_config.architecture

    @property
    def size_bytes(self) -> int:
        return path_size(Path(self.info.model_path))

    @property
    def digest(self) -> str:
        """sha256 of the weights file (of config.json for a directory), computed once."""
        if self._digest is None:
            path = Path(self.info.model_path)
            target = path / "config.json" if path.is_dir() else path
            h = hashlib.sha256()
            with open(target, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            self._digest = h.hexdigest()
        return self._digest

    @property
    def parameter_size(self) -> str:
        """Ollama's style: '135M', '1.2B'."""
        n = self.info.num_parameters
        if n >= 1e9:
            return f"{n / 1e9:.1f}B"
        return f"{round(n / 1e6)}M"

    def conversation(self, messages: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """The messages the model sees: its Modelfile MESSAGEs first, then the request's, with
        its Modelfile SYSTEM in front when the request brings no system message (as Ollama)."""
        spec = self.spec
        if spec is None or (not spec.messages and not spec.system):
            return list(messages)
        conversation: list[Mapping[str, Any]] = [*spec.messages, *messages]
        if spec.system and not any(m.get("role") == "system" for m in conversation):
            conversation.insert(0, {"role": "system", "content": spec.system})
        return conversation

    def render_chat(self, messages: Sequence[Mapping[str, Any]],
                    tools: Sequence[Mapping[str, Any]] | None = None,
                    add_generation_prompt: bool = True, *, think: bool | str | None = None,
                    template_kwargs: Mapping[str, Any] | None = None) -> tuple[str, list[int]]:
        """The chat as prompt text (the model's template) and its token ids.

        `think` is Ollama's (None: not set): a Go template reads it as .Think, a Jinja one as
        its thinking switch (Qwen3's enable_thinking); `template_kwargs` are extra Jinja
        variables (OpenAI's chat_template_kwargs, reasoning_effort)."""
        if self.spec is not None and self.spec.template:
            # A Modelfile TEMPLATE (Go): rendered as Ollama renders it, which places the
            # Modelfile SYSTEM itself; the tokenizer adds BOS as the model asks.
            from shoal.text.ollama_template import render_chat

            text = render_chat(self.spec.template, [*self.spec.messages, *messages], tools,
                               system=self.spec.system, think=think)
            return text, self.tokenizer.encode(text, add_special_tokens=True)
        conversation = self.conversation(messages)
        variables = dict(template_kwargs or {})
        reasoning = self.reasoning
        if think is not None and reasoning is not None and reasoning.switch:
            variables.setdefault(reasoning.switch, bool(think))
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                  tools=tools or None, **variables)
        # NOTE: the template writes BOS itself when the model wants one.
        return text, self.tokenizer.encode(text, add_special_tokens=False)

    @property
    def chat_template_text(self) -> str:
        """The template chats are rendered with: a Modelfile TEMPLATE, else the model's own."""
        return (self.spec.template if self.spec is not None and self.spec.template
                else self.tokenizer.chat_template) or ""

    @property
    def reasoning(self) -> ReasoningFormat | None:
        """How the model writes its thinking; None for a model that does not reason."""
        return detect_reasoning(self.chat_template_text, self.tokenizer.token_to_id)

    @property
    def tool_template(self) -> str | None:
        """The template that renders a chat with tools (its call format is read from it)."""
        if self.spec is not None and self.spec.template:
            return self.spec.template
        return self.tokenizer.tool_use_template or self.tokenizer.chat_template

    def supports_tools(self) -> bool:
        """Every model takes tools: in its template's own call format, or through shoal's
        built-in tool prompt (text/tools/prompt.py) when the template renders none."""
        return True
