"""`create`: a parsed Modelfile -> layers (blobs stored and leased) -> what the manifest holds.

FROM may be
* a stored model name: its layers are inherited; TEMPLATE / SYSTEM / MESSAGE replace the
  inherited ones, PARAMETERs are merged key by key over the inherited params, ADAPTERs and
  LICENSEs are added to the inherited ones. A name not in the store but pullable (built-in,
  hf.co/...) is pulled first, as Ollama does;
* a GGUF file: stored as the model layer;
* a Hugging Face directory (config.json + safetensors): each model file is stored as a blob
  (a `application/vnd.shoal.image.model.file` layer titled with its file name);
* `@sha256:<hex>`: a blob already in the store (a GGUF), e.g. uploaded through /api/blobs.
ADAPTER is a LoRA (a PEFT directory or file, a GGUF LoRA, or `@sha256:<hex>`), read and checked
against the base model's weights here, and stored as one file (model/lora.py).
Relative paths are relative to `base_dir` (the Modelfile's folder). Every FROM/ADAPTER problem
is a ModelfileError pointing at the value in the Modelfile.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from shoal.core.errors import ModelLoadError
from shoal.store.blobs import BlobStore, is_digest, normalize_digest
from shoal.store.errors import InvalidModelNameError, ModelfileError
from shoal.store.hf_files import model_dir_files
from shoal.store.locks import Lease
from shoal.store.manifests import (ANNOTATION_ADAPTER_CONFIG, ANNOTATION_ADAPTER_FORMAT,
                                   ANNOTATION_TITLE, CONFIG_MEDIA_TYPE, MEDIA_ADAPTER, MEDIA_LICENSE, MEDIA_MESSAGES,
                                   MEDIA_MODEL, MEDIA_MODEL_FILE, MEDIA_PARAMS, MEDIA_SYSTEM,
                                   MEDIA_TEMPLATE, Layer, Manifest, ManifestStore)
from shoal.store.modelfile import Modelfile
from shoal.store.modelinfo import ModelDetails, gguf_details, hf_dir_details, is_gguf
from shoal.store.names import ModelName, parse_name
from shoal.store.progress import ProgressCallback, Reporter

if TYPE_CHECKING:
    from shoal.model.config import ModelConfig

LAYER_ORDER = (MEDIA_MODEL, MEDIA_MODEL_FILE, MEDIA_ADAPTER, MEDIA_TEMPLATE, MEDIA_SYSTEM,
               MEDIA_PARAMS, MEDIA_MESSAGES, MEDIA_LICENSE)
_PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")
_PATH_SUFFIXES = (".gguf", ".safetensors", ".bin")


def order_layers(layers: list[Layer]) -> list[Layer]:
    rank = {media: i for i, media in enumerate(LAYER_ORDER)}
    return sorted(layers, key=lambda layer: rank.get(layer.media_type, len(rank)))


def _looks_like_path(value: str) -> bool:
    return value.startswith(_PATH_PREFIXES) or value.lower().endswith(_PATH_SUFFIXES) or \
        (os.sep != "/" and os.sep in value)


def _expand(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


class CreateSource(Protocol):
    """What a create uses of the store (ModelStore is one): its blobs and manifests, pulling a
    FROM model that is missing, and a directory view of a Hugging Face model's file layers."""

    blobs: BlobStore
    manifests: ManifestStore
    link_imports: bool

    def can_pull(self, name: ModelName) -> bool: ...

    def pull(self, name: ModelName, progress: ProgressCallback | None = None) -> Any: ...

    def model_files_dir(self, layers: list[Layer]) -> Path: ...


class Creator:
    """Builds one model's layers; `run` returns (layers, details) with every blob leased."""

    def __init__(self, store: CreateSource, modelfile: Modelfile, base_dir: Path, lease: Lease,
                 reporter: Reporter) -> None:
        self.store = store
        self.mf = modelfile
        self.base_dir = base_dir
        self.lease = lease
        self.reporter = reporter
        self._base_config: ModelConfig | None = None

    def error(self, message: str, position: tuple[int, int]) -> ModelfileError:
        return ModelfileError(message, *position)

    # -- the base ----------------------------------------------------------------------------------
    def run(self) -> tuple[list[Layer], ModelDetails]:
        layers, details = self.base_layers()
        layers = self.apply_overrides(layers)
        return order_layers(layers), details

    def base_layers(self) -> tuple[list[Layer], ModelDetails]:
        value = self.mf.base or ""
        position = self.mf.base_position
        if value.startswith("@"):
            return self.from_blob(value[1:], position)
        path = _expand(value, self.base_dir)
        if path.exists():
            return self.from_path(path, position)
        if _looks_like_path(value):
            raise self.error(f"FROM {value!r}: no such file or directory ({path})", position)
        try:
            name = parse_name(value)
        except InvalidModelNameError as exc:
            raise self.error(f"FROM {value!r} is neither an existing path nor a valid model name "
                             f"({exc.problem})", position) from None
        return self.from_model(name, position)

    def from_blob(self, digest: str, position: tuple[int, int]) -> tuple[list[Layer], ModelDetails]:
        if not is_digest(digest):
            raise self.error(f"FROM @{digest}: not a sha256 digest", position)
        digest = normalize_digest(digest)
        size = self.store.blobs.claim(digest, self.lease.add_one)
        if size is None:
            raise self.error(f"FROM @{digest}: no such blob in the store", position)
        path = self.store.blobs.path(digest)
        if not is_gguf(path):
            raise self.error(f"FROM @{digest}: the blob is not a GGUF file", position)
        self.validate_weights(path, position)
        return [Layer(MEDIA_MODEL, digest, size)], self.details(gguf_details, path, position)

    def from_path(self, path: Path, position: tuple[int, int]) -> tuple[list[Layer], ModelDetails]:
        if path.is_dir():
            files = model_dir_files(path)
            if not files:
                raise self.error(f"FROM {path}: not a model directory (it needs config.json and "
                                 "*.safetensors files)", position)
            self.validate_weights(path, position)
            layers = []
            for file in files:
                info = self.import_file(file)
                layers.append(Layer(MEDIA_MODEL_FILE, info.digest, info.size,
                                    {ANNOTATION_TITLE: file.name}))
            return layers, self.details(hf_dir_details, path, position)
        if not is_gguf(path):
            raise self.error(f"FROM {path}: not a GGUF file (a Hugging Face model is imported "
                             "from its directory)", position)
        self.validate_weights(path, position)
        info = self.import_file(path)
        return [Layer(MEDIA_MODEL, info.digest, info.size)], \
            self.details(gguf_details, self.store.blobs.path(info.digest), position)

    def from_model(self, name: ModelName, position: tuple[int, int]
                   ) -> tuple[list[Layer], ModelDetails]:
        found = self.store.manifests.read(name)
        if found is None:
            if not self.store.can_pull(name):
                raise self.error(f"FROM {name.display}: no such model in the store (and it "
                                 "cannot be pulled)", position)
            def forward(event: dict[str, Any]) -> None:
                if event.get("status") != "success":     # the create is not done yet
                    self.reporter.emit(event)
            self.store.pull(name, progress=forward)
            found = self.store.manifests.read(name)
            if found is None:
                raise self.error(f"FROM {name.display}: the model vanished after its pull",
                                 position)
        manifest = found[0]
        self.keep(manifest.digests())
        config = self.store.blobs.read_json(manifest.config.digest, default={})
        return list(manifest.layers), ModelDetails.from_config(config if isinstance(config, dict)
                                                               else {})

    def keep(self, digests: set[str]) -> None:
        """Leases blobs this model reuses; a missing one is an error now, not a broken model."""
        for digest in sorted(digests):
            if self.store.blobs.claim(digest, self.lease.add_one) is None:
                raise ModelfileError(f"FROM: the base model's blob {digest} is missing from the "
                                     "store; pull or create the base model again",
                                     *self.mf.base_position)

    def validate_weights(self, path: Path, position: tuple[int, int]) -> None:
        """The loader must open it (architecture, tensors); cheap - headers and mmap only."""
        # NOTE: the model loaders import torch (seconds); only creates that read weights pay it.
        from shoal.model.loader import open_model

        try:
            open_model(path).close()
        except ModelLoadError as exc:
            raise self.error(f"FROM {path}: {exc.problem}", position) from None

    def details(self, reader: Any, path: Path, position: tuple[int, int]) -> ModelDetails:
        try:
            return reader(path)
        except ModelLoadError as exc:
            raise self.error(f"FROM {path}: {exc.problem}", position) from None

    def import_file(self, path: Path) -> Any:
        report = self.reporter.bytes(f"copying file {path.name}", None, path.stat().st_size)
        return self.store.blobs.import_file(path, link=self.store.link_imports, progress=report,
                                            on_digest=self.lease.add_one)

    # -- what the Modelfile adds or replaces ----------------------------------------------------
    def text_layer(self, media_type: str, data: bytes) -> Layer:
        info = self.store.blobs.write_bytes(data, on_digest=self.lease.add_one)
        return Layer(media_type, info.digest, info.size)

    def apply_overrides(self, layers: list[Layer]) -> list[Layer]:
        mf = self.mf

        def replace(media_type: str, new: list[Layer]) -> None:
            nonlocal layers
            layers = [layer for layer in layers if layer.media_type != media_type] + new

        if mf.template is not None:
            replace(MEDIA_TEMPLATE, [self.text_layer(MEDIA_TEMPLATE, mf.template.encode())]
                    if mf.template else [])
        if mf.system is not None:
            replace(MEDIA_SYSTEM, [self.text_layer(MEDIA_SYSTEM, mf.system.encode())]
                    if mf.system else [])
        if mf.parameters:
            params: dict[str, Any] = {}
            for layer in layers:
                if layer.media_type == MEDIA_PARAMS:
                    old = self.store.blobs.read_json(layer.digest, default={})
                    if isinstance(old, dict):
                        params.update(old)
            params.update(mf.parameters)
            data = json.dumps(params, sort_keys=True, ensure_ascii=False).encode()
            replace(MEDIA_PARAMS, [self.text_layer(MEDIA_PARAMS, data)])
        if mf.messages:
            data = json.dumps([m.to_json() for m in mf.messages], ensure_ascii=False).encode()
            replace(MEDIA_MESSAGES, [self.text_layer(MEDIA_MESSAGES, data)])
        for value, position in zip(mf.adapters, mf.adapter_positions or
                                   [mf.base_position] * len(mf.adapters)):
            layers.append(self.adapter_layer(value, position, layers))
        for text in mf.licenses:
            layers.append(self.text_layer(MEDIA_LICENSE, text.encode()))
        unique: list[Layer] = []
        for layer in layers:
            if layer not in unique:
                unique.append(layer)
        return unique

    def adapter_layer(self, value: str, position: tuple[int, int], layers: list[Layer]) -> Layer:
        """Checks the adapter against the base model in `layers` (its updates fit the base's
        weights) and stores it as one file: a GGUF as it is, a PEFT adapter as a safetensors
        file with its adapter_config.json in the header (model.lora.self_contained_peft)."""
        from shoal.model.lora import load_adapters, locate_adapter, self_contained_peft

        stored: tuple[str, int] | None = None     # an ADAPTER @sha256:... blob
        if value.startswith("@"):
            if not is_digest(value[1:]):
                raise self.error(f"ADAPTER {value}: not a sha256 digest", position)
            digest = normalize_digest(value[1:])
            size = self.store.blobs.claim(digest, self.lease.add_one)
            if size is None:
                raise self.error(f"ADAPTER {value}: no such blob in the store", position)
            stored, path = (digest, size), self.store.blobs.path(digest)
        else:
            path = _expand(value, self.base_dir)
            if not path.exists():
                raise self.error(f"ADAPTER {value!r}: no such file or directory ({path})", position)
        try:
            files = locate_adapter(path)
            load_adapters([path], self.base_config(layers))
        except ModelLoadError as exc:
            raise self.error(f"ADAPTER {value!r}: {exc.problem}", position) from None
        annotations = {ANNOTATION_ADAPTER_FORMAT: files.format}
        if stored is None:
            annotations[ANNOTATION_TITLE] = files.weights.name
        if files.peft_config is not None:
            annotations[ANNOTATION_ADAPTER_CONFIG] = json.dumps(files.peft_config, sort_keys=True)
        if files.format == "safetensors" and not files.config_embedded:
            info = self.store.blobs.write_bytes(self_contained_peft(files),
                                                on_digest=self.lease.add_one)
        elif stored is not None:
            return Layer(MEDIA_ADAPTER, *stored, annotations)
        else:
            info = self.import_file(files.weights)
        return Layer(MEDIA_ADAPTER, info.digest, info.size, annotations)

    def base_config(self, layers: list[Layer]) -> ModelConfig:
        """The config of the model whose weights `layers` name (read once per create)."""
        from shoal.model.loader import open_model

        if self._base_config is None:
            model = [layer for layer in layers if layer.media_type == MEDIA_MODEL]
            files = [layer for layer in layers if layer.media_type == MEDIA_MODEL_FILE]
            weights = (self.store.blobs.path(model[0].digest) if model
                       else self.store.model_files_dir(files))
            with open_model(weights) as source:
                self._base_config = source.config
        return self._base_config


def manifest_for(blobs: BlobStore, layers: list[Layer], details: ModelDetails,
                 lease: Lease) -> Manifest:
    """Stores the config blob for `layers` and returns the manifest naming them all."""
    config = details.to_config([layer.digest for layer in layers])
    data = json.dumps(config, sort_keys=True, ensure_ascii=False).encode()
    info = blobs.write_bytes(data, on_digest=lease.add_one)
    return Manifest(Layer(CONFIG_MEDIA_TYPE, info.digest, info.size), tuple(layers))
