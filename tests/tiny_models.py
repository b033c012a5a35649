"""Writers of tiny random llama-family models (HF directories and GGUF files) for tests.

Sizes: hidden 64, 2 layers, 4 heads / 2 KV heads (head_dim 16), intermediate 128, and a
~300-token byte-level BPE vocabulary with ChatML specials. Every writer returns the
float32 weights, in HF naming and layout, that a correct loader must yield back.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, quants
from safetensors.torch import save_file

HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
MAX_POSITIONS = 256
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID = 1, 2
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# character pairs merged in this order (GPT-2 byte-level alphabet: "Ġ" is a space)
_MERGES = [
    ("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"), ("Ġt", "he"),
    ("r", "e"), ("Ġ", "s"), ("a", "t"), ("e", "n"), ("o", "r"), ("Ġ", "w"), ("Ġ", "c"),
    ("i", "s"), ("l", "l"), ("Ġ", "o"), ("e", "s"), ("i", "t"), ("Ġ", "f"), ("a", "n"),
    ("Ġ", "p"), ("a", "r"), ("o", "u"), ("Ġ", "b"), ("Ġ", "m"), ("e", "d"), ("Ġ", "i"),
    ("Ġo", "f"), ("in", "g"), ("Ġ", "h"), ("l", "e"), ("Ġ", "d"), ("a", "l"), ("Ġ", "I"),
    ("Ġc", "a"), ("Ġca", "p"), ("Ġw", "h"), ("Ġwh", "at"), ("Ġ", "F"),
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """(tokens, merges as "a b", GGUF token types): specials, 256 bytes, then merges."""
    tokens = list(SPECIAL_TOKENS)
    tokens += [bytes_to_unicode()[b] for b in range(256)]
    tokens += [a + b for a, b in _MERGES]
    types = [3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS))
    return tokens, [f"{a} {b}" for a, b in _MERGES], types


VOCAB_SIZE = len(tiny_vocab()[0])


def hf_config(arch: str = "llama", *, tied: bool = True, **overrides: Any) -> dict[str, Any]:
    """A config.json dict for a tiny model of `arch` ("llama", "mistral" or "qwen2")."""
    classes = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM"}
    config: dict[str, Any] = {
        "architectures": [classes.get(arch, arch)],
        "model_type": arch,
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": MAX_POSITIONS,
        "tie_word_embeddings": tied,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": "float32",
    }
    if arch == "mistral":
        config["sliding_window"] = None
    if arch == "qwen2":
        # NOTE: a window smaller than the context that must be ignored (use_sliding_window).
        config.update(use_sliding_window=False, sliding_window=64, max_window_layers=LAYERS)
    config.update(overrides)
    return config


def random_weights(config: Mapping[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 weights in HF naming for a tiny `config` (qwen2 gets q/k/v biases)."""
    gen = torch.Generator().manual_seed(seed)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    bias = config["model_type"] == "qwen2"

    def rand(*shape: int, scale: float = 0.15, base: float = 0.0) -> torch.Tensor:
        return base + scale * torch.randn(*shape, generator=gen)

    w = {"model.embed_tokens.weight": rand(v, h, scale=1.0)}
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w[p + "self_attn.q_proj.weight"] = rand(q, h)
        w[p + "self_attn.k_proj.weight"] = rand(kv, h)
        w[p + "self_attn.v_proj.weight"] = rand(kv, h)
        w[p + "self_attn.o_proj.weight"] = rand(h, q)
        if bias:
            w[p + "self_attn.q_proj.bias"] = rand(q, scale=0.1)
            w[p + "self_attn.k_proj.bias"] = rand(kv, scale=0.1)
            w[p + "self_attn.v_proj.bias"] = rand(kv, scale=0.1)
        w[p + "mlp.gate_proj.weight"] = rand(i, h)
        w[p + "mlp.up_proj.weight"] = rand(i, h)
        w[p + "mlp.down_proj.weight"] = rand(h, i)
        w[p + "input_layernorm.weight"] = rand(h, scale=0.1, base=1.0)
        w[p + "post_attention_layernorm.weight"] = rand(h, scale=0.1, base=1.0)
    w["model.norm.weight"] = rand(h, scale=0.1, base=1.0)
    if not config["tie_word_embeddings"]:
        w["lm_head.weight"] = rand(v, h, scale=0.5)
    return w


def _write_hf_tokenizer(directory: Path, extra_tokens: Sequence[tuple[str, bool]] = (),
                       chat_template: str = CHATML_TEMPLATE) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, merges, _ = tiny_vocab()
    vocab = {tok: idx for idx, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    # (text, special) pairs after the base vocabulary: ids VOCAB_SIZE, VOCAB_SIZE + 1, ...
    tokenizer.add_tokens([AddedToken(text, special=special, normalized=False)
                          for text, special in extra_tokens])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": SPECIAL_TOKENS[BOS_ID], "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[EOS_ID], "add_bos_token": False,
        "chat_template": chat_template, "tokenizer_class": "PreTrainedTokenizerFast",
    }, indent=1))


def write_hf_model(directory: str | Path, arch: str = "llama", *, tied: bool = True,
                   shards: int = 1, dtype: torch.dtype = torch.float32, seed: int = 0,
                   with_tokenizer: bool = True, config_overrides: Mapping[str, Any] | None = None,
                   extra_tokens: Sequence[tuple[str, bool]] = (), chat_template: str = CHATML_TEMPLATE,
                   ) -> dict[str, torch.Tensor]:
    """Writes config.json + safetensors (sharded when shards > 1) into `directory`.

    Returns the weights as a loader must yield them (stored dtype, widened to float32).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # NOTE: weights follow the plain config, so overrides can make config.json inconsistent.
    vocab = {"vocab_size": VOCAB_SIZE + len(extra_tokens)}
    weights = {n: t.to(dtype).contiguous()
               for n, t in random_weights(hf_config(arch, tied=tied, **vocab), seed).items()}
    config = hf_config(arch, tied=tied, **{**vocab, **dict(config_overrides or {})})
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    names = list(weights)
    if shards <= 1:
        save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        per_shard = math.ceil(len(names) / shards)
        weight_map = {}
        for s in range(shards):
            shard_name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: weights[n] for n in names[s * per_shard:(s + 1) * per_shard]}
            save_file(part, str(directory / shard_name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, shard_name))
        total = sum(t.numel() * t.element_size() for t in weights.values())
        (directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    if with_tokenizer:
        _write_hf_tokenizer(directory, extra_tokens, chat_template)
    return {n: t.to(torch.float32) for n, t in weights.items()}


# HF name suffix -> GGUF name suffix, written out independently of the loader's tables.
_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
                "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    """HF weight name -> llama.cpp tensor name."""
    if hf_name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_GGUF_LAYER[rest]}"


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The Q/K row permutation llama.cpp's converter applies (HF half-split -> interleaved)."""
    rows = weight.shape[0]
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf_model(path: str | Path, arch: str = "llama", *, tied: bool = True,
                     weight_type: GGMLQuantizationType = GGMLQuantizationType.F32,
                     type_overrides: Mapping[str, GGMLQuantizationType] | None = None,
                     seed: int = 0, with_tokenizer: bool = True,
                     skip_tensors: Iterable[str] = (),
                     extra_metadata: Mapping[str, Any] | None = None,
                     omit_metadata: Sequence[str] = (),
                     extra_tensors: Mapping[str, np.ndarray] | None = None,
                     ) -> dict[str, torch.Tensor]:
    """Writes a tiny GGUF the way llama.cpp's converter would (Q/K permuted for llama).

    2-D weights use `weight_type` (any type gguf can quantize: F32, F16, BF16, Q8_0,
    Q4_0, Q4_1, Q5_0, Q5_1) unless `type_overrides` (GGUF tensor name -> type) says
    otherwise; an override to a type gguf cannot quantize gets random bytes. Norms and
    biases stay F32; `extra_tensors` are written as F32 after the model's own.
    Returns what the loader must yield: dequant(quant(w)) in HF layout.
    """
    path = Path(path)
    config = hf_config("qwen2" if arch == "qwen2" else "llama", tied=tied)
    weights = random_weights(config, seed)
    overrides = dict(type_overrides or {})
    skip = set(skip_tensors)
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), arch)
    omit = set(omit_metadata)

    def put(key: str, adder: Any, value: Any) -> None:
        if key not in omit:
            adder(key, value)

    put("general.name", writer.add_string, f"tiny-{arch}")
    put(f"{arch}.context_length", writer.add_uint32, MAX_POSITIONS)
    put(f"{arch}.embedding_length", writer.add_uint32, HIDDEN)
    put(f"{arch}.feed_forward_length", writer.add_uint32, INTERMEDIATE)
    put(f"{arch}.block_count", writer.add_uint32, LAYERS)
    put(f"{arch}.attention.head_count", writer.add_uint32, HEADS)
    put(f"{arch}.attention.head_count_kv", writer.add_uint32, KV_HEADS)
    put(f"{arch}.rope.dimension_count", writer.add_uint32, HEAD_DIM)
    put(f"{arch}.rope.freq_base", writer.add_float32, 10000.0)
    put(f"{arch}.attention.layer_norm_rms_epsilon", writer.add_float32, 1e-5)
    put(f"{arch}.vocab_size", writer.add_uint32, VOCAB_SIZE)
    if with_tokenizer:
        tokens, merges, types = tiny_vocab()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(BOS_ID)
        writer.add_eos_token_id(EOS_ID)
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHATML_TEMPLATE)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_string(key, str(value))

    expected: dict[str, torch.Tensor] = {}
    for hf_name, tensor in weights.items():
        name = gguf_name(hf_name)
        if name in skip:
            continue
        data = tensor.numpy()
        qtype = overrides.get(name, weight_type if data.ndim == 2 else GGMLQuantizationType.F32)
        if arch != "qwen2" and (".attn_q." in name or ".attn_k." in name):
            data = llama_cpp_permute(data, HEADS if ".attn_q." in name else KV_HEADS)
        if qtype == GGMLQuantizationType.F32:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
            expected[hf_name] = tensor.clone()
            continue
        try:
            packed = quants.quantize(data, qtype)
        except NotImplementedError:
            block, size = GGML_QUANT_SIZES[qtype]
            packed = rng.integers(0, 256, (data.shape[0], data.shape[1] // block * size),
                                  dtype=np.uint8)
            writer.add_tensor(name, packed, raw_dtype=qtype)
            continue
        if qtype == GGMLQuantizationType.F16:
            writer.add_tensor(name, packed)
        else:
            writer.add_tensor(name, packed, raw_dtype=qtype)
        # NOTE: quantization blocks run along rows, so it commutes with the row permutation:
        # the expected HF-layout weight is dequant(quant(w)) of the unpermuted tensor.
        restored = quants.dequantize(quants.quantize(tensor.numpy(), qtype), qtype)
        expected[hf_name] = torch.from_numpy(np.array(restored, dtype=np.float32))
    for name, array in (extra_tensors or {}).items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def patch_tensor_type(path: str | Path, tensor_name: str, new_type_id: int) -> None:
    """Rewrites the GGML type id of one tensor in a GGUF header, in place."""
    data = bytearray(Path(path).read_bytes())
    encoded = tensor_name.encode()
    # tensor info: u64 name length, name, u32 n_dims, u64 dims[n_dims], u32 type, u64 offset
    marker = len(encoded).to_bytes(8, "little") + encoded
    start = data.index(marker) + len(marker)
    n_dims = int.from_bytes(data[start:start + 4], "little")
    type_pos = start + 4 + 8 * n_dims
    data[type_pos:type_pos + 4] = new_type_id.to_bytes(4, "little")
    Path(path).write_bytes(bytes(data))


# ---- reasoning models ------------------------------------------------------------------------

THINK_TOKENS = ("<think>", "</think>")
# Qwen3's template, cut down to what reasoning needs: earlier thinking is rendered only for
# assistant turns after the last user message (from reasoning_content, else split out of the
# content), and enable_thinking=false writes an empty closed block into the generation prompt.
QWEN3_LIKE_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{%- set content = message.content -%}{%- set reasoning = '' -%}"
    "{%- if message.reasoning_content is string -%}{%- set reasoning = message.reasoning_content -%}"
    "{%- elif '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{%- if loop.index0 > ns.last_user and reasoning -%}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- else -%}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}{%- endif -%}"
)
# DeepSeek-R1-distill style: the generation prompt opens the thinking, so the output starts
# inside it; earlier turns keep only what follows </think>; reasoning_effort is read.
R1_LIKE_TEMPLATE = (
    "{%- if reasoning_effort is defined -%}{{ '<|im_start|>system\\neffort: ' + reasoning_effort"
    " + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set content = message.content -%}"
    "{%- if message.role == 'assistant' and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1] -%}{%- endif -%}"
    "{{ '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n<think>\\n' }}{%- endif -%}"
)


def write_reasoning_model(directory: str | Path, template: str = QWEN3_LIKE_TEMPLATE,
                          seed: int = 0) -> Path:
    """A tiny llama HF model whose vocabulary adds <think> and </think> as added, non-special
    tokens (as Qwen3's and the R1 distills' do) and whose chat template is `template`."""
    directory = Path(directory)
    write_hf_model(directory, seed=seed, extra_tokens=[(t, False) for t in THINK_TOKENS], chat_template=template)
    return directory
