"""Manifests: one JSON file per model name, `<root>/manifests/<registry>/<namespace>/<name>/<tag>`.

The shape is the OCI / Docker v2 image manifest Ollama uses: `schemaVersion` 2, the Docker
manifest media type, a `config` descriptor (a JSON blob describing the model) and `layers`,
each a descriptor `{mediaType, digest, size[, annotations]}` naming a blob. A model's digest
is the sha256 of its manifest file's bytes, as in Ollama's /api/tags.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.core.errors import CorruptModelError
from shoal.store.blobs import _fsync_dir, is_digest
from shoal.store.errors import InvalidModelNameError
from shoal.store.names import ModelName, parse_name

log = logging.getLogger(__name__)

MANIFESTS_DIR = "manifests"
SCHEMA_VERSION = 2
MANIFEST_MEDIA_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"

MEDIA_MODEL = "application/vnd.ollama.image.model"
MEDIA_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_SYSTEM = "application/vnd.ollama.image.system"
MEDIA_PARAMS = "application/vnd.ollama.image.params"
MEDIA_MESSAGES = "application/vnd.ollama.image.messages"
MEDIA_ADAPTER = "application/vnd.ollama.image.adapter"
MEDIA_LICENSE = "application/vnd.ollama.image.license"
# shoal's own: one file of a Hugging Face (safetensors) model directory; its file name is the
# layer's org.opencontainers.image.title annotation.
MEDIA_MODEL_FILE = "application/vnd.shoal.image.model.file"

ANNOTATION_TITLE = "org.opencontainers.image.title"
ANNOTATION_ADAPTER_FORMAT = "org.shoal.adapter.format"
ANNOTATION_ADAPTER_CONFIG = "org.shoal.adapter.config"

KNOWN_MEDIA_TYPES = frozenset({
    MEDIA_MODEL, MEDIA_TEMPLATE, MEDIA_SYSTEM, MEDIA_PARAMS, MEDIA_MESSAGES, MEDIA_ADAPTER,
    MEDIA_LICENSE, MEDIA_MODEL_FILE})


@dataclass(frozen=True, slots=True)
class Layer:
    """One descriptor: what a blob is (`media_type`), which (`digest`) and how big."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict, compare=True, hash=False)

    @property
    def title(self) -> str | None:
        return self.annotations.get(ANNOTATION_TITLE)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest,
                               "size": self.size}
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @classmethod
    def from_json(cls, data: Any, source: str) -> Layer:
        if not isinstance(data, dict):
            raise CorruptModelError(source, "a manifest descriptor is not a JSON object")
        media_type, digest, size = data.get("mediaType"), data.get("digest"), data.get("size")
        if not isinstance(media_type, str) or not media_type:
            raise CorruptModelError(source, "a manifest descriptor has no mediaType")
        if not isinstance(digest, str) or not is_digest(digest):
            raise CorruptModelError(source, f"a manifest descriptor has a bad digest {digest!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise CorruptModelError(source, f"a manifest descriptor has a bad size {size!r}")
        annotations = data.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
            raise CorruptModelError(source, "manifest annotations must map strings to strings")
        return cls(media_type, "sha256:" + digest[7:], size, dict(annotations))


@dataclass(frozen=True, slots=True)
class Manifest:
    config: Layer
    layers: tuple[Layer, ...]

    def to_bytes(self) -> bytes:
        data = {"schemaVersion": SCHEMA_VERSION, "mediaType": MANIFEST_MEDIA_TYPE,
                "config": self.config.to_json(), "layers": [layer.to_json() for layer in self.layers]}
        return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "manifest") -> Manifest:
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptModelError(source, f"manifest is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise CorruptModelError(source, "manifest is not a JSON object")
        if obj.get("schemaVersion") != SCHEMA_VERSION:
            raise CorruptModelError(
                source, f"manifest schemaVersion is {obj.get('schemaVersion')!r}, expected 2")
        layers = obj.get("layers")
        if not isinstance(layers, list):
            raise CorruptModelError(source, "manifest has no layers list")
        return cls(Layer.from_json(obj.get("config"), source),
                   tuple(Layer.from_json(layer, source) for layer in layers))

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.to_bytes()).hexdigest()

    @property
    def size(self) -> int:
        """Bytes of every blob it names (config included), as Ollama's /api/tags reports."""
        return self.config.size + sum(layer.size for layer in self.layers)

    def digests(self) -> set[str]:
        return {self.config.digest, *(layer.digest for layer in self.layers)}

    def layers_of(self, media_type: str) -> list[Layer]:
        return [layer for layer in self.layers if layer.media_type == media_type]


def _children(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if not p.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


class ManifestStore:
    """The manifests of one store root. Writes are atomic; lookups ignore case."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.dir = self.root / MANIFESTS_DIR

    def find(self, name: ModelName) -> Path | None:
        """The manifest file of `name` (exact case first, else any case), or None."""
        def walk(path: Path, parts: tuple[str, ...]) -> Path | None:
            if not parts:
                return path if path.is_file() else None
            part, rest = parts[0], parts[1:]
            exact = path / part
            candidates = [exact] if exact.exists() else []
            folded = part.casefold()
            candidates += [p for p in _children(path) if p.name.casefold() == folded and p != exact]
            for candidate in candidates:
                found = walk(candidate, rest)
                if found is not None:
                    return found
            return None
        return walk(self.dir, name.parts)

    def path_for(self, name: ModelName) -> Path:
        """Where `name`'s manifest is or would be written: an existing manifest, else the
        existing folders' spellings (any case) for as much of the path as exists."""
        found = self.find(name)
        if found is not None:
            return found
        path = self.dir
        for part in name.parts:
            exact = path / part
            if exact.exists():
                path = exact
                continue
            folded = part.casefold()
            path = next((p for p in _children(path) if p.name.casefold() == folded), exact)
        return path

    def read(self, name: ModelName) -> tuple[Manifest, bytes, Path] | None:
        path = self.find(name)
        if path is None:
            return None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return Manifest.from_bytes(data, str(path)), data, path

    def write(self, name: ModelName, manifest: Manifest | bytes) -> str:
        """Writes (replaces) `name`'s manifest atomically; returns the manifest digest."""
        data = manifest.to_bytes() if isinstance(manifest, Manifest) else manifest
        path = self.path_for(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return "sha256:" + hashlib.sha256(data).hexdigest()

    def delete(self, name: ModelName) -> bool:
        """Removes `name`'s manifest and any folders left empty; False if there was none."""
        path = self.find(name)
        if path is None:
            return False
        path.unlink(missing_ok=True)
        parent = path.parent
        while parent != self.dir and self.dir in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
        return True

    def files(self) -> Iterator[Path]:
        """Every manifest file (four levels below `manifests/`), whatever its name."""
        for registry in _children(self.dir):
            for namespace in _children(registry):
                for model in _children(namespace):
                    for tag in _children(model):
                        if tag.is_file():
                            yield tag

    def names(self) -> Iterator[tuple[ModelName, Path]]:
        """Every stored (name, manifest path); files whose path is not a valid name are skipped."""
        for path in self.files():
            registry, namespace, model, tag = path.parts[-4:]
            try:
                name = parse_name(f"{registry}/{namespace}/{model}:{tag}")
            except InvalidModelNameError:
                log.warning("ignoring %s: not a valid model name", path)
                continue
            if name.registry != registry:
                # NOTE: an alias spelling (huggingface.co) on disk; keep the disk's.
                name = ModelName(registry, name.namespace, name.name, name.tag)
            yield name, path

    def referenced_digests(self) -> set[str]:
        """Every digest any manifest names. Raises CorruptModelError if one cannot be read:
        a caller about to delete unreferenced blobs must not guess."""
        digests: set[str] = set()
        for path in self.files():
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            digests |= Manifest.from_bytes(data, str(path)).digests()
        return digests
