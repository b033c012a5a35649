"""Engine configuration and the one table of SHOAL_* environment variables."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields

from shoal.core.errors import InvalidParameterError

# name -> (EngineConfig field, description). docs/operations.md mirrors this table.
ENV_VARS: dict[str, tuple[str, str]] = {
    "SHOAL_MODEL": ("model", "Model to load: a GGUF file, a Hugging Face directory, or 'default'."),
    "SHOAL_COMPUTE": ("compute", "'fast' (int8 kernels, default; the weight recipe is `SHOAL_FAST_WEIGHTS`) or "
                                "'exact' (float weights)."),
    "SHOAL_DEVICE": ("device", "'auto' (CUDA when present), 'cpu' or 'cuda[:N]'."),
    "SHOAL_DTYPE": ("dtype", "'auto' (float32 on CPU, bfloat16 on CUDA), 'float32', 'bfloat16', 'float16'."),
    "SHOAL_KV_CACHE_BYTES": ("kv_cache_bytes", "KV cache budget, e.g. '2GiB' (default: 20% of free RAM up to 4 GiB; 80% of free GPU memory)."),
    "SHOAL_BLOCK_SIZE": ("block_size", "Tokens per KV block (default 16)."),
    "SHOAL_MAX_NUM_SEQS": ("max_num_seqs", "Most sequences in one running batch (default 64)."),
    "SHOAL_MAX_BATCHED_TOKENS": ("max_num_batched_tokens", "Token budget of one engine step (default 1024)."),
    "SHOAL_MAX_BATCHED_TOKENS_DECODING": ("max_batched_tokens_while_decoding", "Step budget while streams are decoding, bounding their inter-token gap when long prompts arrive (default 128; 0 = no cap); an embedding model's passes meanwhile take half of it."),
    "SHOAL_MAX_MODEL_LEN": ("max_model_len", "Context length cap (default: the model's)."),
    "SHOAL_PREFIX_CACHING": ("enable_prefix_caching", "Reuse KV of shared prompt prefixes (default 1)."),
    "SHOAL_CHUNKED_PREFILL": ("enable_chunked_prefill", "Split long prompts across steps (default 1)."),
    "SHOAL_NUM_THREADS": ("num_threads", "Torch CPU threads (default: all cores)."),
    "SHOAL_KV_CACHE_DTYPE": ("kv_cache_dtype", "'auto' (bfloat16 for fast mode on the CPU kernel, else the model dtype), 'float32', 'bfloat16', 'float16' (3 more mantissa bits than bfloat16, as llama.cpp's KV cache; values beyond 65504 overflow)."),
    "SHOAL_KV_CACHE_COMMIT": ("kv_cache_commit", "Touch every page of the KV cache at load (CPU), so its memory is taken, or refused, at start rather than under load, and RSS is flat from the first request (default 0: pages are taken as blocks are first used, so an idle server stays small)."),
    "SHOAL_ATTENTION": ("attention_backend", "'auto' (C++ kernel on CPU when it builds), 'kernel', or 'torch'."),
    "SHOAL_GRAMMAR_COMPILE_TIMEOUT": ("grammar_compile_timeout", "Seconds a structured-output constraint (JSON schema, regex, grammar) may take to compile before its request is refused (default 10)."),
    "SHOAL_GRAMMAR_CACHE_SIZE": ("grammar_cache_size", "Compiled constraints kept for reuse, least recently used dropped first (default 128)."),
    "SHOAL_FAST_WEIGHTS": ("fast_weights", "Fast mode's weight recipe on the CPU: 'packed' (default: a GGUF whose linears are all Q4_0/Q4_1/Q8_0 keeps its blocks, with int8 activations per 32-value block; other models use int8) or 'int8' (SmoothQuant-calibrated int8 weights for every model)."),
}

FAST_WEIGHTS = ("packed", "int8")   # fast mode's weight recipes (SHOAL_FAST_WEIGHTS)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20,
          "gib": 1 << 30}


def parse_bytes(text: str | int) -> int:
    """'2GiB', '512MB', '1073741824' -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise InvalidParameterError("kv_cache_bytes", f"not a size: {text!r} (try '2GiB')")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(slots=True)
class EngineConfig:
    """Everything that shapes one loaded model's engine.

    NOTE: the engine's only defaults: the scheduler's limits are derived from these
    (SchedulerConfig.from_engine_config), never given defaults of their own."""

    model: str | None = None
    compute: str = "fast"
    device: str = "auto"
    dtype: str = "auto"
    kv_cache_bytes: int | None = None
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_batched_tokens_while_decoding: int = 128
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0
    num_threads: int | None = None
    attention_backend: str = "auto"
    kv_cache_dtype: str = "auto"
    kv_cache_commit: bool = False
    # LoRA adapters merged into the weights at load, in order (paths; see model/lora.py)
    adapters: tuple[str, ...] = ()
    grammar_compile_timeout: float = 10.0
    grammar_cache_size: int = 128
    fast_weights: str = "packed"

    def __post_init__(self) -> None:
        paths = [self.adapters] if isinstance(self.adapters, (str, os.PathLike)) else self.adapters
        self.adapters = tuple(os.fspath(path) for path in paths)
        if self.kv_cache_dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise InvalidParameterError("kv_cache_dtype",
                                        f"must be 'auto', 'float32', 'float16' or 'bfloat16', got {self.kv_cache_dtype!r}")
        if self.attention_backend not in ("auto", "kernel", "torch"):
            raise InvalidParameterError("attention_backend",
                                        f"must be 'auto', 'kernel' or 'torch', got {self.attention_backend!r}")
        if self.compute not in ("fast", "exact"):
            raise InvalidParameterError("compute", f"must be 'fast' or 'exact', got {self.compute!r}")
        if self.fast_weights not in FAST_WEIGHTS:
            raise InvalidParameterError("fast_weights", f"must be 'packed' or 'int8', got {self.fast_weights!r}")
        if self.kv_cache_bytes is not None:
            self.kv_cache_bytes = parse_bytes(self.kv_cache_bytes)
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "grammar_cache_size"):
            if int(getattr(self, name)) < 1:
                raise InvalidParameterError(name, "must be at least 1")
        if not self.grammar_compile_timeout > 0:
            raise InvalidParameterError("grammar_compile_timeout",
                                        f"must be > 0 seconds, got {self.grammar_compile_timeout!r}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> "EngineConfig":
        """Defaults, then SHOAL_* variables, then explicit overrides (None = not given)."""
        env = os.environ if environ is None else environ
        types = {f.name: f.type for f in fields(cls)}
        values: dict[str, object] = {}
        for var, (name, _doc) in ENV_VARS.items():
            if var in env and env[var] != "":
                values[name] = _convert(name, str(types[name]), env[var])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


def _convert(name: str, type_name: str, raw: str) -> object:
    if "bool" in type_name:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if name == "kv_cache_bytes":
        return parse_bytes(raw)
    if "int" in type_name:
        try:
            return int(raw)
        except ValueError:
            raise InvalidParameterError(name, f"expected an integer, got {raw!r}") from None
    if "float" in type_name:
        try:
            return float(raw)
        except ValueError:
            raise InvalidParameterError(name, f"expected a number, got {raw!r}") from None
    return raw
