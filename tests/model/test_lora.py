"""LoRA adapters merged at load (model/lora.py): PEFT and GGUF formats, the Modelfile ADAPTER
through the store, the CLI and a real server.

The adapters are random low-rank updates written here with `safetensors` and gguf's
GGUFWriter; every expected value (the merged delta, the reference logits) is computed in this
file from the tensors the test drew, independently of shoal's reader.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from gguf import GGUFWriter
from safetensors.torch import save_file

from reference import build_reference_model, reference_logits
from shoal.core.config import EngineConfig
from shoal.core.errors import ModelLoadError
from shoal.engine.builder import build_engine_core
from shoal.model.full_sequence import forward_single_sequence
from shoal.model.loader import open_model
from shoal.model.lora import merge_adapters, read_adapter
from shoal.store import ModelStore
from shoal.store.create import GENERIC_PATH_PROBLEM
from shoal.store.errors import ModelfileError

EXACT_ATOL = 2e-3
TEXT = ("The old lighthouse keeper wrote in his logbook every night: the wind, the ships that "
        "passed, and the colour of the sea at dusk.")
# HF module -> llama.cpp tensor name (blk.N.<name>.weight)
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}

HEARTBEAT = re.compile(r"\[\d+ s\]$")   # the CLI's progress line while a step runs


@dataclass
class Lora:
    """A random adapter as the test drew it: HF weight name -> (A [r, in], B [out, r])."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    r: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def delta(self, name: str) -> torch.Tensor:
        """scale * B @ A, computed in float64."""
        a, b = self.pairs[name]
        return (self.scale * (b.double() @ a.double())).float()


def random_lora(shapes: dict[str, tuple[int, int]], modules: list[str], layers: int, *, r: int,
                alpha: float, seed: int, a_std: float = 0.05, b_std: float = 0.07) -> Lora:
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for layer in range(layers):
        for module in modules:
            name = f"model.layers.{layer}.{module}.weight"
            out_features, in_features = shapes[name]
            pairs[name] = (torch.randn(r, in_features, generator=g) * a_std,
                           torch.randn(out_features, r, generator=g) * b_std)
    return Lora(pairs, r, alpha)


def write_peft(directory: Path, lora: Lora, **config: object) -> Path:
    """PEFT's layout: adapter_model.safetensors + adapter_config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in lora.pairs.items():
        module = name.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous()
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    modules = sorted({name.split(".")[-2] for name in lora.pairs})
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.r, "lora_alpha": lora.alpha,
         "target_modules": modules, "lora_dropout": 0.0, "bias": "none", **config}))
    return directory


def llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's converter's Q/K row order (HF half-split RoPE -> interleaved pairs)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf_lora(path: Path, lora: Lora, arch: str, *, heads: int = 0, kv_heads: int = 0,
                    extra: dict[str, np.ndarray] | None = None, adapter_type: str = "lora") -> Path:
    """As llama.cpp's convert_lora_to_gguf writes it (lora_b of Q/K permuted when `heads`)."""
    writer = GGUFWriter(str(path), arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", adapter_type)
    writer.add_float32("adapter.lora.alpha", lora.alpha)
    for name, (a, b) in lora.pairs.items():
        layer, module = name.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
        target = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
        if heads and module == "self_attn.q_proj":
            b = llama_cpp_permute(b, heads)
        elif heads and module == "self_attn.k_proj":
            b = llama_cpp_permute(b, kv_heads)
        writer.add_tensor(target + ".lora_a", a.numpy())
        writer.add_tensor(target + ".lora_b", b.contiguous().numpy())
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def all_position_logits(core, token_ids: list[int]) -> torch.Tensor:
    model = core.runner.model
    with torch.inference_mode():
        return model.compute_logits(forward_single_sequence(model, token_ids))


def add_deltas(reference: torch.nn.Module, *loras: Lora) -> None:
    params = reference.state_dict()
    with torch.no_grad():
        for lora in loras:
            for name in lora.pairs:
                params[name].add_(lora.delta(name))


# -- the real SmolLM2 --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_lora(smollm2_source) -> Lora:
    shapes = smollm2_source.config.hf_weight_shapes()
    return random_lora(shapes, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                "self_attn.o_proj", "mlp.down_proj"],
                       smollm2_source.config.num_layers, r=8, alpha=16, seed=1)


@pytest.fixture(scope="module")
def smol_peft(smol_lora: Lora, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_peft(tmp_path_factory.mktemp("smol-peft") / "adapter", smol_lora)


def test_exact_mode_matches_the_reference_with_the_merged_delta(smollm2_path, smollm2_source,
                                                                smol_lora, smol_peft) -> None:
    """Shoal's exact-mode logits with the adapter = transformers on (dequantized base + the
    delta computed here) within 2e-3, and clearly not the base model's logits."""
    core, _ = build_engine_core(EngineConfig(model=str(smollm2_path), compute="exact",
                                             kv_cache_bytes=32 << 20, adapters=[smol_peft]))
    ids = core.tokenizer.encode(TEXT)
    ours = all_position_logits(core, ids)
    del core
    reference = build_reference_model(smollm2_source)
    base = reference_logits(reference, ids)
    add_deltas(reference, smol_lora)
    adapted = reference_logits(reference, ids)
    assert (ours - adapted).abs().max() < EXACT_ATOL
    assert (adapted - base).abs().max() > 1.0
    assert (adapted.argmax(-1) != base.argmax(-1)).float().mean() > 0.2


def test_gguf_lora_gives_the_same_merged_weights_as_peft(smollm2_source, smol_lora, smol_peft,
                                                         tmp_path: Path) -> None:
    config = smollm2_source.config
    gguf_path = write_gguf_lora(tmp_path / "smol-lora.gguf", smol_lora, "llama",
                                heads=config.num_heads, kv_heads=config.num_kv_heads)
    peft, gguf = read_adapter(smol_peft, config), read_adapter(gguf_path, config)
    assert set(peft.pairs) == set(gguf.pairs) == set(smol_lora.pairs)
    names = sorted(smol_lora.pairs)[:12]     # every module kind, both permuted ones included
    assert {name.split(".")[-2] for name in names} >= {"q_proj", "k_proj", "v_proj", "o_proj"}
    base = {name: smollm2_source.get_weight(name) for name in names}
    from_peft = dict(merge_adapters(base.items(), [peft]))
    from_gguf = dict(merge_adapters(base.items(), [gguf]))
    for name in names:
        assert torch.equal(from_peft[name], from_gguf[name]), name
        assert torch.allclose(from_peft[name], base[name] + smol_lora.delta(name), atol=1e-6)
        assert not torch.allclose(from_peft[name], base[name], atol=1e-3)


# -- through the product: shoal create, a real server -----------------------------------------

def shoal_cli(*args: str, url: str, home: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SHOAL_HOST": url, "SHOAL_HOME": str(home), "SHOAL_NO_AUTOSTART": "1",
           "TERM": "dumb"}
    return subprocess.run([sys.executable, "-m", "shoal", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=240, stdin=subprocess.DEVNULL)


def greedy_completion(url: str, model: str, prompt: list[int], n: int) -> str:
    reply = httpx.post(f"{url}/v1/completions", timeout=240, json={
        "model": model, "prompt": prompt, "max_tokens": n, "temperature": 0})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def test_create_with_adapter_then_serve_the_adapted_model(shoal_server, smollm2_path, smol_peft,
                                                          tmp_path: Path) -> None:
    """`shoal create` (Modelfile FROM the GGUF + ADAPTER ./dir), then the server answers with
    the adapted weights: greedy output differs from the base model's and equals an in-process
    engine (same compute mode) built with the same adapter."""
    from shoal import LLM, SamplingParams

    url, home = shoal_server.url, tmp_path / "home"
    folder = tmp_path / "tuned"
    folder.mkdir()
    (folder / "adapter").symlink_to(smol_peft, target_is_directory=True)
    (folder / "Modelfile").write_text(f"FROM {smollm2_path}\nADAPTER ./adapter\n")
    created = shoal_cli("create", "smol-lora", url=url, home=home, cwd=folder)
    assert created.returncode == 0, created.stderr
    try:
        shown = httpx.post(f"{url}/api/show", json={"model": "smol-lora"}, timeout=30).json()
        assert "ADAPTER " in shown["modelfile"]
        llm = LLM(str(smollm2_path), compute="fast", kv_cache_bytes=32 << 20,
                  adapters=[str(smol_peft)])
        prompt = llm.tokenizer.encode("The three most important rivers of Europe are")
        expected = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16))[0]
        del llm
        adapted = greedy_completion(url, "smol-lora", prompt, 16)
        base = greedy_completion(url, "smollm2", prompt, 16)
        assert adapted == expected.outputs[0].text
        assert adapted != base
    finally:
        removed = shoal_cli("rm", "smol-lora", url=url, home=home, cwd=folder)
        assert removed.returncode == 0, removed.stderr


@pytest.mark.parametrize("adapter, fragment", [
    ("wrong-shapes", "made for another base model"),
    ("./missing-dir", "no such file or directory"),
    ("garbage.safetensors", "neither a GGUF nor a safetensors file"),
])
def test_create_with_a_bad_adapter_fails_on_its_line(shoal_server, smollm2_path, tmp_path: Path,
                                                     adapter: str, fragment: str) -> None:
    """Exit 1 with one error line (after the progress lines) naming the Modelfile line; no
    model is added."""
    url, home = shoal_server.url, tmp_path / "home"
    write_peft(tmp_path / "wrong-shapes", random_lora(
        {"model.layers.0.self_attn.q_proj.weight": (64, 64)}, ["self_attn.q_proj"], 1, r=4,
        alpha=8, seed=2))
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(300))
    (tmp_path / "Modelfile").write_text(f"FROM {smollm2_path}\n# the adapter\nADAPTER {adapter}\n")
    before = httpx.get(f"{url}/api/tags", timeout=30).json()["models"]
    result = shoal_cli("create", "smol-bad", url=url, home=home, cwd=tmp_path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    # NOTE: a step slower than a second (a busy machine) adds a "shoal: ... [1 s]" heartbeat
    errors = [line for line in lines if line.startswith("shoal: ") and not HEARTBEAT.search(line)]
    assert errors == lines[-1:], result.stderr
    assert "Traceback" not in result.stderr
    assert "line 3, column 9" in lines[-1] and fragment in lines[-1], lines[-1]
    # NOTE: named by path over HTTP, the server reads the adapter itself; a caller who is not
    # an admin learns only that the path cannot be used (issue 13), on the same line.
    reply = httpx.post(f"{url}/api/create", timeout=120, json={
        "model": "smol-bad", "modelfile": (tmp_path / "Modelfile").read_text(),
        "path": str(tmp_path / "Modelfile"), "stream": False})
    error = reply.json()["error"]
    assert reply.status_code == 400 and "line 3, column 9" in error, reply.text
    assert GENERIC_PATH_PROBLEM in error and fragment not in error
    assert httpx.get(f"{url}/api/tags", timeout=30).json()["models"] == before


# -- tiny models: several adapters, the store's layout, every refusal --------------------------

@pytest.fixture(scope="module")
def tiny_config(tiny_llama_dir: Path):
    with open_model(tiny_llama_dir) as source:
        return source.config


def test_several_adapters_merge_in_order_on_a_safetensors_model(tiny_qwen2_dir: Path,
                                                                tmp_path: Path) -> None:
    """A PEFT and a GGUF adapter (overlapping on q_proj) on an HF Qwen2 directory (biases,
    untied head): exact-mode logits = the reference with both deltas added."""
    with open_model(tiny_qwen2_dir) as source:
        shapes, layers = source.config.hf_weight_shapes(), source.config.num_layers
        reference = build_reference_model(source)
    first = random_lora(shapes, ["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj"],
                        layers, r=4, alpha=8, seed=3, a_std=0.3, b_std=0.3)
    second = random_lora(shapes, ["self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj"],
                         layers, r=2, alpha=6, seed=4, a_std=0.3, b_std=0.3)
    peft = write_peft(tmp_path / "first", first)
    gguf = write_gguf_lora(tmp_path / "second.gguf", second, "qwen2")
    core, _ = build_engine_core(EngineConfig(model=str(tiny_qwen2_dir), compute="exact",
                                             kv_cache_bytes=8 << 20, adapters=[peft, gguf]))
    ids = list(range(40, 90))
    ours = all_position_logits(core, ids)
    base = reference_logits(reference, ids)
    add_deltas(reference, first, second)
    adapted = reference_logits(reference, ids)
    assert (ours - adapted).abs().max() < EXACT_ATOL
    assert (adapted - base).abs().max() > 0.05


def test_scales_follow_peft_and_llama_cpp(tiny_config, tmp_path: Path) -> None:
    lora = random_lora(tiny_config.hf_weight_shapes(), ["self_attn.v_proj"], 1, r=4, alpha=8,
                       seed=5)
    name = "model.layers.0.self_attn.v_proj.weight"
    assert read_adapter(write_peft(tmp_path / "plain", lora), tiny_config).pairs[name].scale == 2.0
    rs = read_adapter(write_peft(tmp_path / "rs", lora, use_rslora=True), tiny_config)
    assert rs.pairs[name].scale == 4.0                   # lora_alpha / sqrt(r)
    no_alpha = Lora(lora.pairs, lora.r, 0.0)             # llama.cpp: alpha 0 means scale 1
    gguf = read_adapter(write_gguf_lora(tmp_path / "a.gguf", no_alpha, "llama"), tiny_config)
    assert gguf.pairs[name].scale == 1.0
    # keys that kept PEFT's adapter name ("default") read the same
    folder = write_peft(tmp_path / "named", lora)
    a, b = lora.pairs[name]
    save_file({"base_model.model.model.layers.0.self_attn.v_proj.lora_A.default.weight": a,
               "base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight": b},
              str(folder / "adapter_model.safetensors"))
    named = read_adapter(folder, tiny_config).pairs[name]
    assert torch.equal(named.a, a) and torch.equal(named.b, b)


def test_the_store_keeps_one_self_contained_file(tiny_llama_gguf: Path, tiny_config,
                                                 tmp_path: Path) -> None:
    """A PEFT directory is stored as one safetensors blob carrying its config: the blob alone
    reads as the adapter, and `show --modelfile` (ADAPTER <blob>) re-creates the same model."""
    store = ModelStore(tmp_path / "store")
    lora = random_lora(tiny_config.hf_weight_shapes(), ["self_attn.q_proj"], 2, r=4, alpha=8,
                       seed=6)
    write_peft(tmp_path / "peft", lora)
    store.create("tuned", f"FROM {tiny_llama_gguf}\nADAPTER ./peft\n", base_dir=tmp_path)
    (adapter,) = store.resolve("tuned").adapters
    assert adapter.format == "safetensors" and adapter.config["lora_alpha"] == 8
    alone = read_adapter(adapter.path, tiny_config)       # no adapter_config.json beside it
    assert set(alone.pairs) == set(lora.pairs) and alone.pairs[next(iter(lora.pairs))].scale == 2.0
    store.create("again", store.show("tuned").modelfile)
    assert [a.path for a in store.resolve("again").adapters] == [adapter.path]
    # an adapter for another model: the error points at the line, nothing is stored
    other = write_peft(tmp_path / "other", random_lora(
        {"model.layers.0.self_attn.q_proj.weight": (32, 32)}, ["self_attn.q_proj"], 1, r=2,
        alpha=4, seed=7))
    before = store.blobs.digests()
    with pytest.raises(ModelfileError) as info:
        store.create("wrong", f"FROM {tiny_llama_gguf}\nADAPTER {other}\n")
    assert (info.value.line, info.value.column) == (2, 9)
    assert "is 64x64 in this model but the adapter's update is 32x32" in str(info.value)
    assert [m.name for m in store.list()] == ["again:latest", "tuned:latest"]
    assert store.blobs.digests() == before


def test_a_mismatched_adapter_fails_the_load_with_a_clear_error(tiny_llama_gguf: Path,
                                                                 tmp_path: Path) -> None:
    other = write_peft(tmp_path / "other", random_lora(
        {"model.layers.0.mlp.down_proj.weight": (64, 96)}, ["mlp.down_proj"], 1, r=2,
        alpha=4, seed=8))
    with pytest.raises(ModelLoadError, match="made for another base model"):
        build_engine_core(EngineConfig(model=str(tiny_llama_gguf), compute="exact",
                                       kv_cache_bytes=8 << 20, adapters=[other]))


def _bad_adapter(kind: str, tmp_path: Path, tiny_llama_gguf: Path, shapes) -> Path:
    """Writes one malformed or foreign adapter; returns the path to give ADAPTER."""
    lora = random_lora(shapes, ["self_attn.q_proj"], 1, r=4, alpha=8, seed=9)
    a, b = lora.pairs["model.layers.0.self_attn.q_proj.weight"]
    folder = tmp_path / kind
    if kind == "absent-layer":
        moved = {"model.layers.7.self_attn.q_proj.weight": (a, b)}
        return write_peft(folder, Lora(moved, 4, 8))
    if kind == "unknown-gguf-target":
        return write_gguf_lora(tmp_path / "x.gguf", lora, "llama", extra={
            "blk.0.attn_qkv.weight.lora_a": a.numpy(), "blk.0.attn_qkv.weight.lora_b": b.numpy()})
    if kind == "rank-mismatch":
        return write_peft(folder, Lora({"model.layers.0.self_attn.q_proj.weight": (a, b[:, :3])},
                                       4, 8))
    if kind == "half-missing":
        write_peft(folder, lora)
        save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a},
                  str(folder / "adapter_model.safetensors"))
        return folder
    if kind == "modules-to-save":
        write_peft(folder, lora)
        save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": a,
                   "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": b,
                   "base_model.model.lm_head.modules_to_save.default.weight": torch.zeros(4, 4)},
                  str(folder / "adapter_model.safetensors"))
        return folder
    if kind == "dora":
        return write_peft(folder, lora, use_dora=True)
    if kind == "ia3":
        return write_peft(folder, lora, peft_type="IA3")
    if kind == "no-alpha":
        return write_peft(folder, lora, lora_alpha=None)
    if kind == "r-mismatch":
        return write_peft(folder, lora, r=8)
    if kind == "other-architecture":
        return write_gguf_lora(tmp_path / "x.gguf", lora, "gemma3")
    if kind == "control-vector":
        return write_gguf_lora(tmp_path / "x.gguf", lora, "llama", adapter_type="control_vector")
    if kind == "loose-safetensors":
        write_peft(folder, lora)
        (folder / "adapter_config.json").unlink()
        return folder / "adapter_model.safetensors"
    if kind == "pickled-only":
        folder.mkdir()
        (folder / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
        (folder / "adapter_config.json").write_text("{}")
        return folder
    if kind == "truncated":
        data = (write_peft(folder, lora) / "adapter_model.safetensors").read_bytes()
        (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
        return folder
    assert kind == "full-model"
    return tiny_llama_gguf


@pytest.mark.parametrize("kind, fragment", [
    ("absent-layer", "does not have: model.layers.7.self_attn.q_proj.weight"),
    ("unknown-gguf-target", "does not have: blk.0.attn_qkv.weight"),
    ("rank-mismatch", "lora_A [4, 64] and lora_B [64, 3] do not form a rank-r pair"),
    ("half-missing", "lora_A without its other half"),
    ("modules-to-save", "unexpected tensor 'base_model.model.lm_head.modules_to_save"),
    ("dora", "DoRA adapters are not supported"),
    ("ia3", "peft_type 'IA3' is not supported"),
    ("no-alpha", "lora_alpha must be a number, got None"),
    ("r-mismatch", "the tensors have rank 4 but adapter_config.json says r = 8"),
    ("other-architecture", "the adapter is for 'gemma3' models, this model is 'llama'"),
    ("control-vector", "adapter.type 'control_vector' is not supported"),
    ("loose-safetensors", "no adapter_config.json beside this safetensors adapter"),
    ("pickled-only", "adapter_model.bin is pickled"),
    ("truncated", "neither a GGUF nor a safetensors file"),
    ("full-model", "this GGUF is not a LoRA adapter"),
])
def test_refusals_name_the_problem(kind: str, fragment: str, tiny_llama_gguf: Path, tiny_config,
                                   tmp_path: Path) -> None:
    path = _bad_adapter(kind, tmp_path, tiny_llama_gguf, tiny_config.hf_weight_shapes())
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelfileError) as info:
        store.create("bad", f"FROM {tiny_llama_gguf}\nADAPTER {path}\n")
    assert (info.value.line, info.value.column) == (2, 9)
    assert fragment in str(info.value), str(info.value)
    assert store.list() == [] and store.blobs.digests() == []
