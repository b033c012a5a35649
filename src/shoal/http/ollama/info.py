"""What /api/tags, /api/show and /api/ps say about a served model, in Ollama's terms."""
from __future__ import annotations

import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from shoal.http.ollama.protocol import timestamp
from shoal.serving.catalog import ModelSpec
from shoal.serving.served import ServedModel

# GGUF metadata per (path, mtime): read once (the token list is large), then served from memory.
_metadata_cache: dict[tuple[str, int], dict[str, Any]] = {}
_metadata_lock = threading.Lock()

# Ollama leaves these out of model_info (the name is in the reply; the template has its own field).
_HIDDEN_KEYS = ("general.name", "tokenizer.chat_template")


def _weights_path(model: ServedModel) -> Path:
    path = Path(model.info.model_path)
    return path / "config.json" if path.is_dir() else path


def modified_at(model: ServedModel) -> str:
    """When the weights last changed (Ollama reports when the model was pulled or created)."""
    try:
        mtime = _weights_path(model).stat().st_mtime
    except OSError:
        mtime = model.loaded_at
    return timestamp(datetime.fromtimestamp(mtime, timezone.utc))


def model_format(model: ServedModel) -> str:
    # NOTE: Ollama calls Hugging Face weights "safetensors".
    return "gguf" if model.info.model_format == "gguf" else "safetensors"


def details(model: ServedModel) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": model_format(model),
        "family": model.family,
        "families": [model.family],
        "parameter_size": model.parameter_size,
        "quantization_level": model.info.quantization,
    }


def spec_details(spec: ModelSpec) -> dict[str, Any]:
    """details for a model that is not loaded, from its GGUF header (no weights read)."""
    path = Path(spec.path)
    meta = metadata_of(path) or {}
    family = str(meta.get("general.architecture", ""))
    file_type = meta.get("general.file_type")
    quantization = ""
    if file_type is not None:
        try:
            import gguf

            quantization = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")
        except (ValueError, ImportError):
            quantization = str(file_type)
    return {
        "parent_model": "",
        "format": "safetensors" if path.is_dir() else "gguf",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": str(meta.get("general.size_label", "")),
        "quantization_level": quantization,
    }


def spec_modified_at(spec: ModelSpec) -> str:
    mtime = spec.modified_at
    if mtime is None:
        try:
            mtime = Path(spec.path).stat().st_mtime
        except OSError:
            mtime = 0.0
    return timestamp(datetime.fromtimestamp(mtime, timezone.utc))


def capabilities(model: ServedModel) -> list[str]:
    caps = ["completion"]
    if model.supports_tools():
        caps.append("tools")
    return caps


def _gguf_metadata(model: ServedModel) -> dict[str, Any] | None:
    if model.info.model_format != "gguf":
        return None
    return metadata_of(Path(model.info.model_path))


def metadata_of(path: Path) -> dict[str, Any] | None:
    """A GGUF file's metadata (cached per file version); None for anything else."""
    if path.is_dir():
        return None
    try:
        key = (str(path), path.stat().st_mtime_ns)
    except OSError:
        return None
    with _metadata_lock:
        cached = _metadata_cache.get(key)
        if cached is None:
            from shoal.model.loader import open_model

            source = open_model(path)
            try:
                cached = dict(source.metadata)
            finally:
                source.close()
            _metadata_cache[key] = cached
        return cached


def _synthesized_info(model: ServedModel) -> dict[str, Any]:
    """GGUF-style keys for a model loaded from a Hugging Face directory."""
    cfg = model.info.model_config
    arch = cfg.architecture
    return {
        "general.architecture": arch,
        f"{arch}.context_length": cfg.max_position_embeddings,
        f"{arch}.embedding_length": cfg.hidden_size,
        f"{arch}.feed_forward_length": cfg.intermediate_size,
        f"{arch}.block_count": cfg.num_layers,
        f"{arch}.attention.head_count": cfg.num_heads,
        f"{arch}.attention.head_count_kv": cfg.num_kv_heads,
        f"{arch}.attention.key_length": cfg.head_dim,
        f"{arch}.attention.value_length": cfg.head_dim,
        f"{arch}.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps,
        f"{arch}.rope.freq_base": cfg.rope_theta,
        f"{arch}.vocab_size": cfg.vocab_size,
    }


def info_map(model: ServedModel, verbose: bool) -> dict[str, Any]:
    """model_info: the GGUF metadata as Ollama shows it (long arrays emptied unless verbose)."""
    metadata = _gguf_metadata(model)
    if metadata is None:
        info = _synthesized_info(model)
    else:
        info = {}
        for key, value in metadata.items():
            if key in _HIDDEN_KEYS:
                continue
            if isinstance(value, (list, tuple)):
                value = list(value) if verbose or len(value) <= 5 else []
            info[key] = value
    info["general.parameter_count"] = int(model.info.num_parameters)
    return dict(sorted(info.items()))


def _format_parameter(value: Any) -> str:
    # Go's %#v: strings quoted, numbers and booleans bare.
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parameters(model: ServedModel) -> str:
    """The model's default options, one per line, as Ollama lists a Modelfile's PARAMETERs."""
    lines = []
    for name, value in model.default_options.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            lines.append(f"{name:<30} {_format_parameter(item)}")
    return "\n".join(lines)


def modelfile(model: ServedModel) -> str:
    lines = [f"# Modelfile generated by shoal for {model.name}",
             "# The chat template is the model's own Jinja template (see \"template\"),",
             "# not an Ollama Go template, so it is not repeated here as TEMPLATE.",
             f"FROM {model.info.model_path}"]
    for name, value in model.default_options.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            lines.append(f"PARAMETER {name} {_format_parameter(item)}")
    return "\n".join(lines) + "\n"


def show(model: ServedModel, verbose: bool) -> dict[str, Any]:
    return {
        "modelfile": modelfile(model),
        "parameters": parameters(model),
        "template": model.tokenizer.chat_template or "",
        "details": details(model),
        "model_info": info_map(model, verbose),
        "capabilities": capabilities(model),
        "modified_at": modified_at(model),
    }


def show_stored(store, name: str) -> dict[str, Any]:
    """/api/show for a stored model that is not loaded (the store knows it all)."""
    shown = store.show(name).to_json()
    template = shown.get("template") or ""
    if not template:
        meta = metadata_of(Path(store.resolve(name).weights)) or {}
        template = str(meta.get("tokenizer.chat_template", ""))
    # every model takes tools: its template's own format, or the built-in tool prompt
    shown["capabilities"] = ["completion", "tools"]
    return shown
