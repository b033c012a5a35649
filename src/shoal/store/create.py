"""`create`: a parsed Modelfile -> layers (blobs stored and leased) -> what the manifest holds.

FROM may be
* a stored model name: its layers are inherited; TEMPLATE / SYSTEM / MESSAGE replace the
  inherited ones, PARAMETERs are merged key by key over the inherited params, ADAPTERs and
  LICENSEs are added to the inherited ones. A name not in the store but pullable (built-in,
  hf.co/...) is pulled first, as Ollama does;
* a GGUF file: stored as the model layer;
* a Hugging Face directory (config.json + safetensors): each model file is stored as a blob
  (a `application/vnd.shoal.image.model.file` layer titled with its file name);
* `@sha256:<hex>`: a blob already in the store (a GGUF), e.g. uploaded through /api/blobs;
* a key of `uploads` (a set of uploaded blobs by file name, as `shoal create` sends a local
  GGUF or model directory; Ollama's `files`): one GGUF, or a model directory's files.
ADAPTER is a LoRA (a PEFT directory or file, a GGUF LoRA, `@sha256:<hex>`, or a key of
`uploads`), read and checked against the base model's weights here, and stored as one file
(model/lora.py).

Paths are on the server's disk (relative ones relative to `base_dir`, the Modelfile's folder);
`LocalPaths` says whether they may be read at all and how much a failure may say. Files are
read through local_files.py (no symlinks or hard links inside directories, only the names a
model needs), copied into a staging folder and checked there: the loader never opens the
caller's path itself. Every FROM/ADAPTER problem is a ModelfileError pointing at the value in
the Modelfile.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from shoal.core.errors import ModelLoadError, PermissionDeniedError
from shoal.store.blobs import (DIRS_DIR, BlobInfo, BlobStore, StagedFile, Staging, blob_digest,
                               is_digest, normalize_digest)
from shoal.store.errors import InvalidModelNameError, ModelfileError
from shoal.store.hf_files import (is_safe_title, module_folders, select_adapter_files,
                                  select_model_files)
from shoal.store.local_files import LocalFileError, open_directory, open_file
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

log = logging.getLogger(__name__)
T = TypeVar("T")

LAYER_ORDER = (MEDIA_MODEL, MEDIA_MODEL_FILE, MEDIA_ADAPTER, MEDIA_TEMPLATE, MEDIA_SYSTEM,
               MEDIA_PARAMS, MEDIA_MESSAGES, MEDIA_LICENSE)
_PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")
_PATH_SUFFIXES = (".gguf", ".safetensors", ".bin")
# NOTE: the same words for every path problem, so a caller learns nothing about which files
# exist on the server or where it runs (finer reasons go to the log, and to admins).
GENERIC_PATH_PROBLEM = ("cannot be used: it is not a GGUF file or model directory the server "
                        "may read")
_ECHO_LIMIT = 200


@dataclass(frozen=True, slots=True)
class LocalPaths:
    """What a create may do with FROM / ADAPTER paths on the server's disk.

    refusal: why they are not read at all (None: they are). detailed: a path problem says what
    is wrong (missing, not a GGUF, a symlink...); otherwise every one gets GENERIC_PATH_PROBLEM.
    The CLI and library callers get the defaults; the HTTP API decides per caller."""

    refusal: str | None = None
    detailed: bool = True


def _shown(value: str) -> str:
    return value if len(value) <= _ECHO_LIMIT else value[:_ECHO_LIMIT] + "..."


def order_layers(layers: list[Layer]) -> list[Layer]:
    rank = {media: i for i, media in enumerate(LAYER_ORDER)}
    return sorted(layers, key=lambda layer: rank.get(layer.media_type, len(rank)))


def looks_like_path(value: str) -> bool:
    return value.startswith(_PATH_PREFIXES) or value.lower().endswith(_PATH_SUFFIXES) or \
        (os.sep != "/" and os.sep in value)


def expand_path(value: str, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


class CreateSource(Protocol):
    """What a create uses of the store (ModelStore is one): its blobs and manifests, pulling a
    FROM model that is missing, and a directory view of a Hugging Face model's file layers."""

    blobs: BlobStore
    manifests: ManifestStore

    def can_pull(self, name: ModelName) -> bool: ...

    def pull(self, name: ModelName, progress: ProgressCallback | None = None) -> Any: ...

    def model_files_dir(self, layers: list[Layer]) -> Path: ...


class Creator:
    """Builds one model's layers; `run` returns (layers, details) with every blob leased."""

    def __init__(self, store: CreateSource, modelfile: Modelfile, base_dir: Path, lease: Lease,
                 reporter: Reporter, paths: LocalPaths | None = None,
                 uploads: dict[str, dict[str, str]] | None = None) -> None:
        self.store = store
        self.mf = modelfile
        self.base_dir = base_dir
        self.lease = lease
        self.reporter = reporter
        self.paths = paths or LocalPaths()
        self.uploads = uploads or {}
        self._base_config: ModelConfig | None = None

    def error(self, message: str, position: tuple[int, int]) -> ModelfileError:
        return ModelfileError(message, *position)

    def path_problem(self, keyword: str, value: str, detail: str,
                     position: tuple[int, int]) -> ModelfileError:
        if self.paths.detailed:
            return self.error(f"{keyword} {_shown(value)!r}: {detail}", position)
        log.info("create: %s %r refused: %s", keyword, _shown(value), detail)
        return self.error(f"{keyword} {_shown(value)!r}: {GENERIC_PATH_PROBLEM}", position)

    def local_path(self, keyword: str, value: str, position: tuple[int, int],
                   always: bool) -> Path | None:
        """The path on the server's disk `value` names (None: it is a model name).

        Detailed callers get the old rule (an existing path wins over a name); for the others
        it is decided by spelling alone (`/`, `./`, `~`, a .gguf suffix...), so a name that
        happens to exist on the server does not answer differently. ADAPTER (`always`) takes
        paths only."""
        if self.paths.refusal is None and self.paths.detailed:
            path = expand_path(value, self.base_dir)
            if always or path.exists():
                return path
            if looks_like_path(value):
                raise self.path_problem(keyword, value, f"no such file or directory ({path})",
                                        position)
            return None
        if not (always or looks_like_path(value)):
            return None
        if self.paths.refusal is not None:
            raise PermissionDeniedError(f"{keyword} {_shown(value)!r}: {self.paths.refusal}",
                                        code="local_paths_refused")
        return expand_path(value, self.base_dir)

    @staticmethod
    def local_check(check: Callable[[Path], T], path: Path) -> T:
        """`check` on a staged copy of the caller's files; its failures are path problems."""
        try:
            return check(path)
        except ModelLoadError as exc:
            raise LocalFileError(exc.problem) from None

    def store_check(self, check: Callable[[Path], T], path: Path, label: str,
                    position: tuple[int, int]) -> T:
        """`check` on blobs of the store; failures say what is wrong (no server path)."""
        try:
            return check(path)
        except ModelLoadError as exc:
            raise self.error(f"{label}: {exc.problem}", position) from None

    def copy_in(self, stage: Staging, file: Any, name: str, shown_name: str) -> StagedFile:
        total = os.fstat(file.fileno()).st_size
        report = self.reporter.bytes(f"copying file {shown_name}", None, total)
        return stage.copy_in(file, name, report, total)

    def copy_all_in(self, stage: Staging, files: dict[str, Any]) -> dict[str, StagedFile]:
        """Copies open files (name -> file) into the staging folder, closing every one of them."""
        try:
            return {name: self.copy_in(stage, file, name, name) for name, file in files.items()}
        finally:
            for file in files.values():
                file.close()

    # -- the base ----------------------------------------------------------------------------------
    def run(self) -> tuple[list[Layer], ModelDetails]:
        layers, details = self.base_layers()
        layers = self.apply_overrides(layers)
        return order_layers(layers), details

    def base_layers(self) -> tuple[list[Layer], ModelDetails]:
        value = self.mf.base or ""
        position = self.mf.base_position
        if value in self.uploads:
            return self.from_uploads(value, self.uploads[value], position)
        if value.startswith("@"):
            return self.from_blob(value[1:], position)
        path = self.local_path("FROM", value, position, always=False)
        if path is not None:
            return self.from_path(path, value, position)
        try:
            name = parse_name(value)
        except InvalidModelNameError as exc:
            raise self.error(f"FROM {_shown(value)!r} is neither an existing path nor a valid "
                             f"model name ({exc.problem})", position) from None
        return self.from_model(name, position)

    def from_blob(self, digest: str, position: tuple[int, int]) -> tuple[list[Layer], ModelDetails]:
        if not is_digest(digest):
            raise self.error(f"FROM @{_shown(digest)}: not a sha256 digest", position)
        digest = normalize_digest(digest)
        size = self.store.blobs.claim(digest, self.lease.add_one)
        if size is None:
            raise self.error(f"FROM @{digest}: no such blob in the store", position)
        path = self.store.blobs.path(digest)
        if not is_gguf(path):
            raise self.error(f"FROM @{digest}: the blob is not a GGUF file", position)
        self.store_check(_open_weights, path, f"FROM @{digest}", position)
        details = self.store_check(gguf_details, path, f"FROM @{digest}", position)
        return [Layer(MEDIA_MODEL, digest, size)], details

    def from_path(self, path: Path, value: str, position: tuple[int, int]
                  ) -> tuple[list[Layer], ModelDetails]:
        own = self.store_files(path)
        if own is not None:
            return self.from_uploads(value, own, position)
        try:
            with self.store.blobs.staging() as stage:
                if path.is_dir():
                    return self.from_directory(path, stage)
                return self.from_gguf_file(path, stage)
        except LocalFileError as exc:
            raise self.path_problem("FROM", value, str(exc), position) from None

    def store_files(self, path: Path) -> dict[str, str] | None:
        """{file name: digest} when `path` is the store's own: a blob, or a model folder that
        resolve built (symlinks into blobs/), as `show --modelfile` writes them."""
        blobs_dir = self.store.blobs.dir.resolve()
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        digest = blob_digest(real)
        if real.parent == blobs_dir and digest is not None:
            return {real.name: digest}
        if not (real.is_dir() and real.parent == (self.store.blobs.root / DIRS_DIR).resolve()):
            return None
        files = {}
        for entry in real.iterdir():
            target = entry.resolve()
            digest = blob_digest(target)
            if target.parent != blobs_dir or digest is None:
                return None
            files[entry.name] = digest
        return files

    def from_directory(self, path: Path, stage: Staging) -> tuple[list[Layer], ModelDetails]:
        files = open_directory(path, select_model_files)
        if not files:
            raise LocalFileError("not a model directory (it needs config.json and "
                                 "*.safetensors files)")
        if "modules.json" in files:
            files.update(open_module_files(path, files["modules.json"]))
        staged = {}
        staged.update(self.copy_all_in(stage, files))
        self.local_check(_open_weights, stage.dir)
        details = self.local_check(hf_dir_details, stage.dir)
        layers = []
        for name, file in staged.items():
            info = stage.commit(file, self.lease.add_one)
            layers.append(Layer(MEDIA_MODEL_FILE, info.digest, info.size, {ANNOTATION_TITLE: name}))
        return layers, details

    def from_gguf_file(self, path: Path, stage: Staging) -> tuple[list[Layer], ModelDetails]:
        with open_file(path) as file:
            if file.read(4) != b"GGUF":
                raise LocalFileError("not a GGUF file (a Hugging Face model is imported from its "
                                     "directory)")
            file.seek(0)
            staged = self.copy_in(stage, file, "model.gguf", path.name)
        self.local_check(_open_weights, staged.path)
        details = self.local_check(gguf_details, staged.path)
        info = stage.commit(staged, self.lease.add_one)
        return [Layer(MEDIA_MODEL, info.digest, info.size)], details

    def claim_uploads(self, keyword: str, value: str, files: dict[str, str],
                      position: tuple[int, int]) -> dict[str, BlobInfo]:
        claimed = {}
        for name, digest in files.items():
            if not is_digest(digest):
                raise self.error(f"{keyword} {_shown(value)!r}: {_shown(name)!r}: "
                                 f"{_shown(digest)!r} is not a sha256 digest", position)
            digest = normalize_digest(digest)
            size = self.store.blobs.claim(digest, self.lease.add_one)
            if size is None:
                raise self.error(f"{keyword} {_shown(value)!r}: {_shown(name)!r}: blob {digest} "
                                 "has not been uploaded", position)
            claimed[name] = BlobInfo(digest, size)
        return claimed

    def from_uploads(self, value: str, files: dict[str, str], position: tuple[int, int]
                     ) -> tuple[list[Layer], ModelDetails]:
        """One uploaded GGUF, or the uploaded files of a model directory (others ignored)."""
        kept = select_model_files(list(files))
        if not kept:
            if len(files) == 1:
                return self.from_blob(next(iter(files.values())), position)
            raise self.error(f"FROM {_shown(value)!r}: the uploaded files are not a model (one "
                             "GGUF file, or config.json and *.safetensors files)", position)
        claimed = self.claim_uploads("FROM", value, {n: files[n] for n in kept}, position)
        label = f"FROM {_shown(value)!r}"
        with self.store.blobs.staging() as stage:
            for name, info in claimed.items():
                stage.link_in(name, info.digest)
            self.store_check(_open_weights, stage.dir, label, position)
            details = self.store_check(hf_dir_details, stage.dir, label, position)
        return [Layer(MEDIA_MODEL_FILE, info.digest, info.size, {ANNOTATION_TITLE: name})
                for name, info in claimed.items()], details

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
        details = ModelDetails.from_config(config if isinstance(config, dict) else {})
        details.parent_model = name.display   # what `show` reports as details.parent_model
        return list(manifest.layers), details

    def keep(self, digests: set[str]) -> None:
        """Leases blobs this model reuses; a missing one is an error now, not a broken model."""
        for digest in sorted(digests):
            if self.store.blobs.claim(digest, self.lease.add_one) is None:
                raise ModelfileError(f"FROM: the base model's blob {digest} is missing from the "
                                     "store; pull or create the base model again",
                                     *self.mf.base_position)

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

        with self.store.blobs.staging() as stage:
            stored: dict[str, BlobInfo] = {}       # file name -> a blob already in the store
            staged: dict[str, StagedFile] = {}     # file name -> a copy of the caller's file
            local = False
            if value in self.uploads:
                stored = self.claim_uploads("ADAPTER", value, {
                    name: digest for name, digest in self.uploads[value].items()
                    if is_safe_title(name)}, position)
                if not stored:
                    raise self.error(f"ADAPTER {_shown(value)!r}: no uploaded files", position)
                for name, info in stored.items():
                    stage.link_in(name, info.digest)
                target = stage.dir / next(iter(stored)) if len(stored) == 1 else stage.dir
            elif value.startswith("@"):
                if not is_digest(value[1:]):
                    raise self.error(f"ADAPTER {_shown(value)}: not a sha256 digest", position)
                digest = normalize_digest(value[1:])
                size = self.store.blobs.claim(digest, self.lease.add_one)
                if size is None:
                    raise self.error(f"ADAPTER {value}: no such blob in the store", position)
                stored = {"": BlobInfo(digest, size)}
                target = self.store.blobs.path(digest)
            else:
                local = True
                path = self.local_path("ADAPTER", value, position, always=True)
                assert path is not None
                try:
                    target, staged = self.stage_adapter(path, stage)
                except LocalFileError as exc:
                    raise self.path_problem("ADAPTER", value, str(exc), position) from None
            try:
                files = locate_adapter(target)
                load_adapters([target], self.base_config(layers))
            except ModelLoadError as exc:
                if local:
                    raise self.path_problem("ADAPTER", value, exc.problem, position) from None
                raise self.error(f"ADAPTER {_shown(value)!r}: {exc.problem}", position) from None
            annotations = {ANNOTATION_ADAPTER_FORMAT: files.format}
            if "" not in stored:
                annotations[ANNOTATION_TITLE] = files.weights.name
            if files.peft_config is not None:
                annotations[ANNOTATION_ADAPTER_CONFIG] = json.dumps(files.peft_config,
                                                                    sort_keys=True)
            if files.format == "safetensors" and not files.config_embedded:
                info = self.store.blobs.write_bytes(self_contained_peft(files),
                                                    on_digest=self.lease.add_one)
            elif local:
                info = stage.commit(staged[files.weights.name], self.lease.add_one)
            else:
                info = stored.get(files.weights.name) or stored[""]
        return Layer(MEDIA_ADAPTER, info.digest, info.size, annotations)

    def stage_adapter(self, path: Path, stage: Staging) -> tuple[Path, dict[str, StagedFile]]:
        """Copies a local adapter into `stage`: a PEFT directory's two files, or one file (with
        the adapter_config.json beside a safetensors file). Returns what to read, and the copies."""
        staged: dict[str, StagedFile] = {}
        if path.is_dir():
            files = open_directory(path, _select_peft_files)
            target = stage.dir
        else:
            with open_file(path) as file:
                gguf = file.read(4) == b"GGUF"
                file.seek(0)
                name = path.name if is_safe_title(path.name) and \
                    path.name != "adapter_config.json" else "adapter_model.safetensors"
                staged[name] = self.copy_in(stage, file, name, path.name)
            target = stage.dir / name
            files = {} if gguf else open_directory(
                path.parent, lambda names: [n for n in ("adapter_config.json",) if n in names])
        staged.update(self.copy_all_in(stage, files))
        return target, staged

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


def open_module_files(path: Path, modules_json: Any) -> dict[str, Any]:
    """The config.json of each sentence-transformers module folder (its Pooling), opened as
    strictly as the directory's own files, under the flat name the store keeps."""
    folders = module_folders(modules_json.read())
    modules_json.seek(0)
    opened: dict[str, Any] = {}
    for folder in folders:
        if not (path / folder).is_dir():
            continue        # e.g. Normalize keeps no files
        inner = open_directory(path / folder,
                               lambda names: ["config.json"] if "config.json" in names else [])
        if "config.json" in inner:
            opened[f"{folder}.config.json"] = inner["config.json"]
    return opened


def _open_weights(path: Path) -> None:
    """The loader must open it (architecture, tensors); cheap - headers and mmap only."""
    # NOTE: the model loaders import torch (seconds); only creates that read weights pay it.
    from shoal.model.encoder_loader import check_encoder, is_encoder_model
    from shoal.model.loader import open_model

    if is_encoder_model(path):
        check_encoder(path)
        return
    open_model(path).close()


def manifest_for(blobs: BlobStore, layers: list[Layer], details: ModelDetails,
                 lease: Lease) -> Manifest:
    """Stores the config blob for `layers` and returns the manifest naming them all."""
    config = details.to_config([layer.digest for layer in layers])
    data = json.dumps(config, sort_keys=True, ensure_ascii=False).encode()
    info = blobs.write_bytes(data, on_digest=lease.add_one)
    return Manifest(Layer(CONFIG_MEDIA_TYPE, info.digest, info.size), tuple(layers))


def _select_peft_files(names: list[str]) -> list[str]:
    """A PEFT directory's files; one that has only the pickled weights is named as such (they
    are never read: unpickling runs code)."""
    kept = select_adapter_files(names)
    if "adapter_model.safetensors" not in kept and "adapter_model.bin" in names:
        raise LocalFileError("not a PEFT adapter directory: it has no adapter_model.safetensors "
                             "(adapter_model.bin is pickled and not read: save the adapter with "
                             "safetensors)")
    return kept
