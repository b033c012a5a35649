"""Tiny random models whose chat templates render tools in each call format shoal reads
(Hermes/Qwen, Llama 3.x JSON, Mistral), with those formats' marker tokens in the vocabulary:
Hermes' <tool_call> as a plain added token (as Qwen has it), <|python_tag|> and [TOOL_CALLS]
as special tokens. The templates are short stand-ins written for these tests, rendering tools,
assistant tool calls and tool results the way each family's template does."""
from __future__ import annotations

from pathlib import Path

import tiny_models

HERMES_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n{% endif %}"
    "Tools:\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\n"
    "Call a tool as <tool_call>\n{\"name\": <name>, \"arguments\": <object>}\n</tool_call><|im_end|>\n"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}{% if not tools %}<|im_start|>system\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content }}"
    "{%- for c in m.tool_calls %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>"
    "{%- endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

LLAMA3_TEMPLATE = (
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n<|python_tag|>"
    "{%- for c in m.tool_calls %}{% if not loop.first %}; {% endif %}"
    "{{ {'name': c.function.name, 'parameters': c.function.arguments} | tojson }}{% endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>ipython\n{{ m.content }}<|im_end|>\n"
    "{%- elif m.role == 'user' and loop.last and tools %}<|im_start|>user\n"
    "Answer with a call as {\"name\": function name, \"parameters\": arguments}.\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}{{ m.content }}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

MISTRAL_TEMPLATE = (
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}{% if loop.last and tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}"
    "[/AVAILABLE_TOOLS]{% endif %}[INST]{{ m.content }}[/INST]"
    "{%- elif m.role == 'assistant' and m.tool_calls %}[TOOL_CALLS]["
    "{%- for c in m.tool_calls %}{% if not loop.first %}, {% endif %}"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}{% endfor %}]<|im_end|>"
    "{%- elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]"
    "{%- elif m.role == 'assistant' %}{{ m.content }}<|im_end|>"
    "{%- else %}{{ m.content }}\n\n{% endif %}"
    "{%- endfor %}")

MODELS = {
    "hermes": (HERMES_TEMPLATE, [("<tool_call>", False), ("</tool_call>", False)]),
    "llama3_json": (LLAMA3_TEMPLATE, [("<|python_tag|>", True)]),
    "mistral": (MISTRAL_TEMPLATE, [("[TOOL_CALLS]", True)]),
}


def write_tool_model(directory: Path, fmt: str) -> Path:
    template, tokens = MODELS[fmt]
    # NOTE: a longer context than tiny_models gives: byte-level tokens make tool prompts long
    tiny_models.write_hf_model(directory, "llama", extra_tokens=tokens, chat_template=template,
                               config_overrides={"max_position_embeddings": 1024})
    return directory
