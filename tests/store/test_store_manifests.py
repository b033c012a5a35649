"""Manifests (OCI shape, atomic, case-insensitive), copy, and rm's pruning of unreferenced blobs."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from shoal.core.errors import CorruptModelError, UnknownModelError
from shoal.store import ModelStore
from shoal.store.locks import Lease, leased_digests
from shoal.store.manifests import (CONFIG_MEDIA_TYPE, MANIFEST_MEDIA_TYPE, MEDIA_MODEL,
                                   MEDIA_PARAMS, Layer, Manifest, ManifestStore)
from shoal.store.names import parse_name


@pytest.fixture()
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def _create(store: ModelStore, name: str, gguf: Path, extra: str = "") -> None:
    store.create(name, f"FROM {gguf}\n{extra}")


def test_manifest_shape_on_disk(store: ModelStore, tiny_llama_gguf: Path) -> None:
    _create(store, "Alice/Tiny:v1", tiny_llama_gguf, "PARAMETER temperature 0.5\n")
    path = store.root / "manifests" / "registry.shoal.local" / "Alice" / "Tiny" / "v1"
    data = json.loads(path.read_text())
    assert data["schemaVersion"] == 2 and data["mediaType"] == MANIFEST_MEDIA_TYPE
    assert data["config"]["mediaType"] == CONFIG_MEDIA_TYPE
    assert [layer["mediaType"] for layer in data["layers"]] == [MEDIA_MODEL, MEDIA_PARAMS]
    for desc in [data["config"], *data["layers"]]:
        blob = store.root / "blobs" / desc["digest"].replace(":", "-")
        assert blob.stat().st_size == desc["size"]
    config = json.loads((store.root / "blobs" / data["config"]["digest"].replace(":", "-")).read_text())
    assert config["model_format"] == "gguf" and config["model_family"] == "llama"
    assert config["rootfs"]["diff_ids"] == [layer["digest"] for layer in data["layers"]]
    # the digest /api/tags shows is the manifest file's sha256
    import hashlib
    assert store.get("alice/tiny:V1").digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert store.get("alice/tiny:V1").name == "Alice/Tiny:v1"     # shown as stored


def test_manifest_round_trip_and_validation() -> None:
    layer = Layer(MEDIA_MODEL, "sha256:" + "a" * 64, 10, {"org.opencontainers.image.title": "x"})
    manifest = Manifest(Layer(CONFIG_MEDIA_TYPE, "sha256:" + "b" * 64, 2), (layer,))
    assert Manifest.from_bytes(manifest.to_bytes()) == manifest
    assert manifest.size == 12 and manifest.digests() == {layer.digest, manifest.config.digest}
    for bad in (b"not json", b"[]", b'{"schemaVersion": 1, "layers": []}',
                b'{"schemaVersion": 2, "config": {}, "layers": []}',
                json.dumps({"schemaVersion": 2, "config": manifest.config.to_json(),
                            "layers": [{"mediaType": MEDIA_MODEL, "digest": "sha256:xyz",
                                        "size": 1}]}).encode()):
        with pytest.raises(CorruptModelError):
            Manifest.from_bytes(bad)


def test_case_insensitive_lookup_and_overwrite(tmp_path: Path) -> None:
    manifests = ManifestStore(tmp_path)
    manifest = Manifest(Layer(CONFIG_MEDIA_TYPE, "sha256:" + "b" * 64, 2), ())
    manifests.write(parse_name("MyModel:Latest"), manifest)
    assert manifests.find(parse_name("mymodel")) is not None
    # writing under another spelling replaces the existing file instead of adding a twin
    manifests.write(parse_name("MYMODEL"), manifest)
    assert [n.display for n, _ in manifests.names()] == ["MyModel:Latest"]
    assert manifests.delete(parse_name("mymodel:LATEST"))
    assert list(manifests.names()) == []
    assert not (tmp_path / "manifests" / "registry.shoal.local").exists()   # empty dirs gone


def test_names_differing_in_case_share_folders(tmp_path: Path) -> None:
    manifests = ManifestStore(tmp_path)
    manifest = Manifest(Layer(CONFIG_MEDIA_TYPE, "sha256:" + "b" * 64, 2), ())
    manifests.write(parse_name("smollm2"), manifest)
    manifests.write(parse_name("SmolLM2:135M"), manifest)
    library = tmp_path / "manifests" / "registry.shoal.local" / "library"
    assert [p.name for p in library.iterdir()] == ["smollm2"]        # no "SmolLM2" twin
    for spelling in ("smollm2:135m", "SMOLLM2:135M", "SmolLM2", "smollm2:LATEST"):
        assert manifests.find(parse_name(spelling)) is not None, spelling
    # a twin folder made by hand (or an older tool) is still searched
    twin = library / "SMOLLM2" / "v2"
    twin.parent.mkdir()
    twin.write_bytes(manifest.to_bytes())
    assert manifests.find(parse_name("smollm2:v2")) == twin
    assert len(list(manifests.names())) == 3


def test_rm_prunes_only_unreferenced_blobs(store: ModelStore, tiny_llama_gguf: Path) -> None:
    _create(store, "one", tiny_llama_gguf, "SYSTEM first\n")
    _create(store, "two", tiny_llama_gguf, "SYSTEM second\n")
    weights = store.resolve("one").weights
    assert weights == store.resolve("two").weights                  # one shared blob
    two_only = {store.blobs.path(d) for d in
                Manifest.from_bytes(store.manifests.find(parse_name("two")).read_bytes()).digests()}
    removed = store.delete("one")
    assert weights.is_file()                                        # "two" still uses it
    assert removed and all(store.blobs.path(d) not in two_only for d in removed)
    assert store.resolve("two").system == "second"
    with pytest.raises(UnknownModelError):
        store.resolve("one")
    store.delete("two")
    assert not weights.exists()
    assert store.blobs.digests() == []                              # everything went
    with pytest.raises(UnknownModelError):
        store.delete("two")


def test_copy_shares_everything(store: ModelStore, tiny_llama_gguf: Path) -> None:
    _create(store, "orig", tiny_llama_gguf, "SYSTEM hi\n")
    copied = store.copy("orig", "alice/copy:v2")
    assert copied.digest == store.get("orig").digest and copied.name == "alice/copy:v2"
    assert sorted(m.name for m in store.list()) == ["alice/copy:v2", "orig:latest"]
    assert store.delete("orig") == []                               # the copy holds every blob
    assert store.resolve("alice/copy:v2").system == "hi"
    with pytest.raises(UnknownModelError):
        store.copy("nope", "x")


def test_prune_keeps_leased_blobs_and_clears_dead_leases(store: ModelStore) -> None:
    info = store.blobs.write_bytes(b"in flight")
    with Lease(store.root) as lease:
        lease.add_one(info.digest)
        assert store.prune() == []                                  # kept: an operation needs it
        assert store.blobs.has(info.digest)
    assert store.prune() == [info.digest]
    # a lease file whose owner died (its lock is free) is ignored and removed
    leases = store.root / "leases"
    (leases / "dead.json").write_text(json.dumps([info.digest]))
    assert leased_digests(store.root) == set()
    assert not (leases / "dead.json").exists()


def test_prune_deletes_nothing_when_a_manifest_is_unreadable(store: ModelStore,
                                                              tiny_llama_gguf: Path) -> None:
    _create(store, "good", tiny_llama_gguf)
    orphan = store.blobs.write_bytes(b"orphan").digest
    bad = store.root / "manifests" / "registry.shoal.local" / "library" / "bad" / "latest"
    bad.parent.mkdir(parents=True)
    bad.write_text("{broken")
    assert store.prune() == [] and store.blobs.has(orphan)
    assert [m.name for m in store.list()] == ["good:latest"]        # the broken one is skipped
    bad.unlink()
    assert store.prune() == [orphan]


def test_delete_while_another_thread_creates(store: ModelStore, tiny_llama_gguf: Path) -> None:
    """rm of one model racing create of another that shares its blob never breaks either."""
    for round_ in range(3):
        _create(store, "victim", tiny_llama_gguf)
        errors: list[BaseException] = []

        def make() -> None:
            try:
                _create(store, f"fresh{round_}", tiny_llama_gguf, "SYSTEM x\n")
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        thread = threading.Thread(target=make)
        thread.start()
        store.delete("victim")
        thread.join(60)
        assert errors == []
        resolved = store.resolve(f"fresh{round_}")
        assert resolved.weights.is_file() and store.verify(f"fresh{round_}") == []


def test_recreate_prunes_what_only_the_old_version_used(store: ModelStore,
                                                        tiny_llama_gguf: Path) -> None:
    _create(store, "m", tiny_llama_gguf, "SYSTEM old\n")
    old_system = store.blobs.write_bytes(b"old").digest
    _create(store, "m", tiny_llama_gguf, "SYSTEM new\n")
    assert not store.blobs.has(old_system)
    assert store.resolve("m").system == "new" and store.resolve("m").weights.is_file()


def test_rm_leaves_blobs_it_did_not_use(store: ModelStore, tiny_llama_gguf: Path) -> None:
    """A blob uploaded (/api/blobs) for a create that has not run yet survives an rm."""
    uploaded = store.blobs.write_bytes(b"GGUF waiting for /api/create").digest
    _create(store, "m", tiny_llama_gguf)
    store.delete("m")
    assert store.blobs.digests() == [uploaded]
    assert store.prune() == [uploaded]                     # a full prune collects it


def test_from_env(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SHOAL_MODELS", str(tmp_path / "elsewhere"))
    assert ModelStore.from_env().root == tmp_path / "elsewhere"
    monkeypatch.delenv("SHOAL_MODELS")
    assert ModelStore.from_env().root == Path.home() / ".shoal" / "models"


def test_copy_over_an_existing_name_prunes_what_it_replaced(store: ModelStore,
                                                            tiny_llama_gguf: Path) -> None:
    _create(store, "a", tiny_llama_gguf, "SYSTEM from a\n")
    _create(store, "b", tiny_llama_gguf, "SYSTEM from b\n")
    b_system = store.blobs.write_bytes(b"from b").digest
    store.copy("a", "B")                                   # replaces b (any case)
    assert [m.name for m in store.list() if m.name.startswith("b")] == ["b:latest"]
    assert store.resolve("b").system == "from a"
    assert not store.blobs.has(b_system)
    assert store.resolve("a").weights.is_file()
