"""Builds a ready EngineCore from an EngineConfig, in named steps: load the model, plan the
KV cache, build the scheduler."""
from __future__ import annotations

import logging
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from shoal.core.config import EngineConfig
from shoal.core.errors import ShoalError
from shoal.engine.core import EngineCore
from shoal.engine.encoder_core import EncoderCore
from shoal.engine.kv.manager import KVCacheManager
from shoal.engine.kv.tensors import (
    allocate_kv_caches,
    bytes_per_block,
    default_kv_cache_bytes,
)
from shoal.engine.model_runner import ModelRunner, kernel_supported
from shoal.engine.sampling.sampler import Sampler
from shoal.engine.scheduler import Scheduler, SchedulerConfig
from shoal.model.config import ModelConfig
from shoal.model.encoder_loader import is_encoder_model, load_encoder
from shoal.model.kernels.cpu import load_cpu_kernels
from shoal.model.layers.packed import PackedLinear
from shoal.model.layers.quantize import CALIBRATION_TEXT, quantize_model_int8
from shoal.model.loader import model_class_for, open_model, resolve_model
from shoal.model.lora import load_adapters, merge_adapters
from shoal.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class EngineInfo:
    """Facts about a built engine, for logs, /api/ps and benchmarks."""

    model_path: str
    model_format: str
    model_config: ModelConfig
    device: str
    dtype: str
    compute: str
    num_blocks: int
    block_size: int
    kv_cache_bytes: int
    max_model_len: int
    load_seconds: float
    num_parameters: int = 0
    quantization: str = ""        # the most common stored weight type, e.g. "Q4_1" or "BF16"
    weights_bytes: int = 0        # parameters and buffers as held in memory (after quantization)
    embedding_only: bool = False  # an encoder: it answers embedding requests, never generates
    fast_weights: str = ""        # fast mode on the CPU: "packed" (GGUF blocks) or "int8"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ShoalError(f"unknown device {name!r}") from None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ShoalError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass(slots=True)
class LoadedModel:
    """A model ready to run (adapters merged, int8-packed in fast mode on the CPU) and its
    tokenizer."""

    path: Path
    format: str
    config: ModelConfig
    tokenizer: Tokenizer
    model: torch.nn.Module
    num_parameters: int
    quantization: str             # the most common stored weight type
    fast_weights: str = ""        # the fast-mode recipe used on the CPU: "packed" or "int8"


@dataclass(slots=True)
class KVCachePlan:
    """How much KV cache, in what layout, and the context length it allows."""

    use_kernels: bool             # the C++ attention kernel (blocked cache layout)
    dtype: torch.dtype
    num_blocks: int
    bytes_per_block: int
    max_model_len: int

    @property
    def num_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block


def build_engine_core(config: EngineConfig) -> tuple[EngineCore | EncoderCore, EngineInfo]:
    """Loads the model, plans and allocates its KV cache, and builds the scheduler around them
    (an encoder model gets an EncoderCore: no KV cache, no scheduler)."""
    started = time.monotonic()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    path = resolve_model(config.model)
    if is_encoder_model(path):
        return build_encoder_core(config, path, device, started)
    # NOTE: in this order: the default KV budget is measured from the memory the weights left.
    loaded = load_model(config, device=device, dtype=dtype)
    plan = plan_kv_cache(config, loaded.config, device=device, dtype=dtype)
    kv_caches = allocate_kv_caches(loaded.config, plan.num_blocks, config.block_size, plan.dtype,
                                   device, blocked=plan.use_kernels, commit=config.kv_cache_commit)
    runner = ModelRunner(loaded.model, kv_caches, config.block_size, device,
                         use_kernels=plan.use_kernels)
    if plan.use_kernels and config.compute == "fast":
        loaded.model.enable_fused_int8(runner.kernels)
    elif loaded.fast_weights == "packed":
        # NOTE: attention on the PyTorch path, linears still on the C++ kernels if they built
        # (the same bits as the PyTorch twin they replace).
        for module in loaded.model.modules():
            if isinstance(module, PackedLinear):
                module.kernels = load_cpu_kernels()
    if config.compute == "exact" and device.type == "cpu":
        kernels = runner.kernels or load_cpu_kernels()
        if kernels is not None:
            loaded.model.enable_f32_kernel(kernels)
    core = EngineCore(runner=runner, scheduler=build_scheduler(config, plan), sampler=Sampler(),
                      tokenizer=loaded.tokenizer, max_model_len=plan.max_model_len,
                      vocab_size=loaded.config.vocab_size,
                      eos_token_ids=frozenset(loaded.tokenizer.eos_token_ids),
                      cache_salt=_cache_salt(loaded.path, config),
                      grammar_compile_timeout=config.grammar_compile_timeout,
                      grammar_cache_size=config.grammar_cache_size)
    info = EngineInfo(model_path=str(loaded.path), model_format=loaded.format,
                      model_config=loaded.config, device=str(device),
                      dtype=str(dtype).replace("torch.", ""), compute=config.compute,
                      num_blocks=plan.num_blocks, block_size=config.block_size,
                      kv_cache_bytes=plan.num_bytes, max_model_len=plan.max_model_len,
                      load_seconds=time.monotonic() - started,
                      num_parameters=loaded.num_parameters, quantization=loaded.quantization,
                      weights_bytes=_tensor_bytes(loaded.model), fast_weights=loaded.fast_weights)
    log.info("loaded %s%s (%s%s) on %s: %d KV blocks, context %d, %.2fs", loaded.path,
             f" + {len(config.adapters)} LoRA adapter(s)" if config.adapters else "",
             config.compute, f", {loaded.fast_weights} weights" if loaded.fast_weights else "",
             device, plan.num_blocks, plan.max_model_len, info.load_seconds)
    return core, info


def build_encoder_core(config: EngineConfig, path: Path, device: torch.device,
                       started: float) -> tuple[EncoderCore, EngineInfo]:
    """An encoder (embedding-only) model and the core that batches its inputs."""
    if config.adapters:
        raise ShoalError("LoRA adapters are not supported on encoder models")
    loaded = load_encoder(path, config.compute, device)
    max_model_len = loaded.config.max_seq_length
    if config.max_model_len:
        max_model_len = min(max_model_len, config.max_model_len)
    # NOTE: the decoder's step budget sizes the encoder's passes too: at 1024 tokens a pass
    # of MiniLM takes ~0.1 s on two cores, long enough to amortise per-call overhead and
    # short enough not to hold back the inputs that arrive meanwhile.
    core = EncoderCore(loaded.model, loaded.tokenizer, max_model_len=max_model_len,
                       max_num_seqs=max(config.max_num_seqs, 256),
                       max_batch_tokens=config.max_num_batched_tokens,
                       # NOTE: half the decoder's budget while its streams decode: a pass then
                       # shares the cores with the event loop serving the flood that fills it,
                       # and took 2-3x its quiet time. At 128 tokens 8 chat streams' ITL P99 rose
                       # 1.57-2.03x under an all-MiniLM flood, at 64 tokens 1.35-1.46x
                       # (benchmarks/embed_bench.py --only-mixed; ~15% fewer embeddings meanwhile).
                       short_pass_tokens=max(1, (config.max_batched_tokens_while_decoding or 128) // 2))
    info = EngineInfo(model_path=str(path), model_format=loaded.format,
                      model_config=loaded.config, device=str(device), dtype="float32",
                      compute=config.compute, num_blocks=0, block_size=config.block_size,
                      kv_cache_bytes=0, max_model_len=max_model_len,
                      load_seconds=time.monotonic() - started,
                      num_parameters=loaded.num_parameters, quantization=loaded.quantization,
                      weights_bytes=_tensor_bytes(loaded.model), embedding_only=True)
    log.info("loaded encoder %s (%s, %s pooling%s) on %s, context %d, %.2fs", path,
             config.compute, loaded.config.pooling,
             ", normalized" if loaded.config.normalize else "", device, max_model_len,
             info.load_seconds)
    return core, info


def load_model(config: EngineConfig, *, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Reads the weights (merging LoRA adapters), builds the architecture and, in fast mode on
    the CPU, calibrates and packs its int8 weights."""
    path = resolve_model(config.model)
    source = open_model(path)
    try:
        model_config = source.config
        if source.format == "gguf":
            tokenizer = Tokenizer.from_gguf_metadata(source.metadata, str(source.path))
        else:
            tokenizer = Tokenizer.from_hf_dir(source.path)
        model_cls = model_class_for(model_config.architecture)
        fast_weights = ""
        if config.compute == "fast" and device.type == "cpu":
            fast_weights = "int8"
            # NOTE: LoRA merges into float weights, so adapted models take the int8 recipe.
            if (config.fast_weights == "packed" and not config.adapters
                    and getattr(source, "packable", lambda: False)()):
                fast_weights = "packed"
        weights = source.iter_packed_weights() if fast_weights == "packed" else source.iter_weights()
        if config.adapters:
            # NOTE: merged into the float weights before int8 calibration and packing, so
            # both compute modes and the kernels run the adapted model at the base's speed.
            weights = merge_adapters(weights, load_adapters(config.adapters, model_config))
        model = model_cls(model_config, weights, device=device, dtype=dtype,
                          source=str(source.path))
        num_parameters = sum(p.numel() for p in model.parameters()) + sum(
            m.out_features * m.in_features for m in model.modules() if isinstance(m, PackedLinear))
        stored_types = Counter(source.weight_types.values())
        quantization = stored_types.most_common(1)[0][0] if stored_types else str(dtype)
    finally:
        source.close()   # on error too: nothing half-loaded stays referenced
    model.eval()
    if fast_weights == "int8":
        # NOTE: on CUDA, fast mode is simply the half-precision dtype chosen above; packed
        # weights need no calibration.
        calibration = tokenizer.encode(CALIBRATION_TEXT, add_special_tokens=False)
        if tokenizer.add_bos_token and tokenizer.bos_token_id is not None:
            # NOTE: prompts start with BOS, and its row carries the largest activations of
            # some models (Gemma 3: KL to exact 0.025 -> 0.017 when calibrated with it).
            calibration = [tokenizer.bos_token_id, *calibration]
        quantize_model_int8(model, calibration)
    return LoadedModel(path=path, format=source.format, config=model_config, tokenizer=tokenizer,
                       model=model, num_parameters=num_parameters, quantization=quantization,
                       fast_weights=fast_weights)


def plan_kv_cache(config: EngineConfig, model_config: ModelConfig, *, device: torch.device,
                  dtype: torch.dtype) -> KVCachePlan:
    """Chooses the attention backend and the KV dtype, sizes the cache from the budget, and
    caps the context so that one request can fill it."""
    use_kernels = config.attention_backend != "torch" and kernel_supported(
        device, dtype, config.block_size, model_config.head_dim)
    if config.attention_backend == "kernel" and not use_kernels:
        raise ShoalError("attention_backend='kernel' but the C++ kernel cannot serve this "
                         f"configuration (device {device}, dtype {dtype}, block size {config.block_size})")
    # NOTE: fast mode on the CPU kernel keeps K/V in bfloat16: half the memory traffic of
    # decode attention (the largest cost after the matmuls at 32 streams) and twice the
    # tokens per GiB. bfloat16 rather than float16 (llama.cpp's choice) for float32's range:
    # float16's 3 more mantissa bits made no measurable difference to faithfulness to exact
    # mode (docs/benchmarks.md). Exact mode keeps the model's dtype.
    if config.kv_cache_dtype != "auto":
        kv_dtype = _DTYPES[config.kv_cache_dtype]
        if use_kernels and kv_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ShoalError(f"the CPU attention kernel cannot store a {config.kv_cache_dtype} KV cache")
    else:
        kv_dtype = torch.bfloat16 if use_kernels and config.compute == "fast" else dtype
    budget = config.kv_cache_bytes or default_kv_cache_bytes(device)
    per_block = bytes_per_block(model_config, config.block_size, kv_dtype)
    num_blocks = max(2, budget // per_block)
    max_model_len = model_config.max_position_embeddings
    if config.max_model_len:
        max_model_len = min(max_model_len, config.max_model_len)
    # One request must be able to fill its whole context; cap the context otherwise.
    max_model_len = min(max_model_len, (num_blocks - 1) * config.block_size)
    return KVCachePlan(use_kernels=use_kernels, dtype=kv_dtype, num_blocks=num_blocks,
                       bytes_per_block=per_block, max_model_len=max_model_len)


def build_scheduler(config: EngineConfig, plan: KVCachePlan) -> Scheduler:
    """The scheduler and its KV block manager, for the planned cache."""
    return Scheduler(SchedulerConfig.from_engine_config(config, plan.max_model_len),
                     KVCacheManager(plan.num_blocks, config.block_size, config.enable_prefix_caching))


def _cache_salt(path: Path, config: EngineConfig) -> int:
    # NOTE: the salt keeps two models' (or two adapters') cached blocks apart even if
    # they ever share a pool.
    return zlib.crc32(f"{path}:{config.compute}:{config.fast_weights}:{':'.join(config.adapters)}"
                      .encode())


def _tensor_bytes(model: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.data_ptr() not in seen:     # tied embeddings count once
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total
