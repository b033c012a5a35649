"""`ModelStore`: the one object the server, the CLI and residency use to manage models.

    store = ModelStore.from_env()                    # $SHOAL_MODELS or ~/.shoal/models
    store.pull("smollm2", progress=print)            # Ollama-shaped progress events
    store.push("localhost:5000/team/mario:v1")       # to an OCI registry (store/registry.py)
    store.create("mario", modelfile_text, base_dir=Path("."))
    model = store.resolve("mario")                   # weights path, template, system, params...
    store.list(); store.show("mario"); store.copy("mario", "luigi"); store.delete("mario")

Layout under the root: `blobs/` (content), `manifests/` (one JSON per name), `locks/`,
`leases/` (operations in progress), `dirs/` (safetensors models as directories of symlinks
into `blobs/`, built on first resolve). docs/store.md describes it all.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from shoal.core.errors import CorruptModelError, UnknownModelError
from shoal.core.scratch import hold, remove_abandoned
from shoal.model.builtin import not_builtin_hint
from shoal.store.blobs import DIRS_DIR, BlobStore
from shoal.store.create import Creator, LocalPaths, manifest_for
from shoal.store.errors import PullError, RegistryError
from shoal.store.hf_files import is_safe_title
from shoal.store.locks import Lease, StoreLocks, leased_digests
from shoal.store.manifests import (ANNOTATION_ADAPTER_CONFIG, ANNOTATION_ADAPTER_FORMAT,
                                   MEDIA_ADAPTER, MEDIA_LICENSE, MEDIA_MESSAGES, MEDIA_MODEL,
                                   MEDIA_MODEL_FILE, MEDIA_PARAMS, MEDIA_SYSTEM, MEDIA_TEMPLATE,
                                   Layer, Manifest, ManifestStore)
from shoal.store.modelfile import Message, Modelfile, format_parameters, parse_modelfile, \
    render_modelfile
from shoal.store.modelinfo import ModelDetails, model_info
from shoal.store.names import DEFAULT_REGISTRY, ModelName, parse_name
from shoal.store.progress import ProgressCallback, Reporter
from shoal.store.registry import RegistryClient
from shoal.store.sources.builtin import BuiltinSource
from shoal.store.sources.huggingface import HuggingFaceSource

log = logging.getLogger(__name__)

DEFAULT_ROOT = "~/.shoal/models"


def store_root_from_env() -> Path:
    """This process's store: $SHOAL_MODELS, else $SHOAL_HOME/models, else ~/.shoal/models."""
    home = os.environ.get("SHOAL_HOME")
    default = str(Path(home).expanduser() / "models") if home else DEFAULT_ROOT
    return Path(os.environ.get("SHOAL_MODELS") or default).expanduser()


@dataclass(slots=True)
class StoredModel:
    """One entry of `list()` (Ollama's /api/tags item)."""

    name: str                 # display name, e.g. "smollm2:latest"
    model: ModelName
    digest: str               # sha256 of the manifest file, bare hex (as /api/tags shows it)
    size: int                 # bytes of every blob the manifest names
    modified_at: datetime     # the manifest's mtime, UTC
    details: ModelDetails = field(default_factory=ModelDetails)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.name,
                "modified_at": self.modified_at.isoformat(), "size": self.size,
                "digest": self.digest, "details": self.details.to_json()}


@dataclass(slots=True)
class ResolvedAdapter:
    path: Path
    format: str                       # "gguf" | "safetensors" | "" (unknown)
    config: dict[str, Any] | None     # PEFT adapter_config.json, when it was beside the file


@dataclass(slots=True)
class ResolvedModel:
    """What the loader and the request path need to serve a stored model."""

    name: str                          # display name
    model: ModelName
    digest: str                        # manifest digest, bare hex
    weights: Path                      # a GGUF blob file, or a directory (safetensors)
    format: str                        # "gguf" | "safetensors"
    template: str | None = None        # TEMPLATE text (None: use the model's own chat template)
    system: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)
    adapters: list[ResolvedAdapter] = field(default_factory=list)
    licenses: list[str] = field(default_factory=list)
    details: ModelDetails = field(default_factory=ModelDetails)
    modified_at: datetime | None = None

    @property
    def adapter_paths(self) -> list[Path]:
        return [adapter.path for adapter in self.adapters]


@dataclass(slots=True)
class ModelShow:
    """What `shoal show` and /api/show report."""

    name: str
    modelfile: str
    parameters: str
    template: str
    system: str
    license: str
    details: ModelDetails
    model_info: dict[str, Any]
    messages: list[dict[str, str]]
    modified_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"modelfile": self.modelfile, "parameters": self.parameters,
                               "template": self.template, "details": self.details.to_json(),
                               "model_info": self.model_info}
        if self.system:
            out["system"] = self.system
        if self.license:
            out["license"] = self.license
        if self.messages:
            out["messages"] = self.messages
        if self.modified_at is not None:
            out["modified_at"] = self.modified_at.isoformat()
        return out


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


class ModelStore:
    """Models on disk under `root`. Thread- and process-safe; every method is synchronous
    (run pull/create in a worker thread from async code)."""

    def __init__(self, root: str | Path, *, builtin: BuiltinSource | None = None,
                 huggingface: HuggingFaceSource | None = None,
                 registry: RegistryClient | None = None) -> None:
        self.root = Path(root).expanduser()
        self.blobs = BlobStore(self.root)
        self.manifests = ManifestStore(self.root)
        self.locks = StoreLocks(self.root)
        self.builtin = builtin if builtin is not None else BuiltinSource()
        self.huggingface = huggingface if huggingface is not None else HuggingFaceSource()
        self.registry = registry if registry is not None else RegistryClient()

    @classmethod
    def from_env(cls, **kwargs: Any) -> ModelStore:
        """The store at $SHOAL_MODELS (default $SHOAL_HOME/models, SHOAL_HOME being ~/.shoal)."""
        return cls(store_root_from_env(), **kwargs)

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _name(name: str | ModelName) -> ModelName:
        return name if isinstance(name, ModelName) else parse_name(name)

    def _read(self, name: ModelName) -> tuple[Manifest, bytes, Path]:
        found = self.manifests.read(name)
        if found is None:
            raise UnknownModelError(name.display, [m.name for m in self.list()])
        return found

    def _details(self, manifest: Manifest) -> ModelDetails:
        config = self.blobs.read_json(manifest.config.digest, default={})
        return ModelDetails.from_config(config if isinstance(config, dict) else {})

    def _stored(self, name: ModelName, manifest: Manifest, data: bytes, path: Path) -> StoredModel:
        mtime = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc)
        # NOTE: shown as spelled on disk (a lookup may differ in case)
        on_disk = ModelName(*path.parts[-4:])
        name = on_disk if on_disk == name else name
        return StoredModel(name.display, name, hashlib.sha256(data).hexdigest(), manifest.size, mtime,
                           self._details(manifest))

    def _write_manifest(self, name: ModelName, manifest: Manifest, lease: Lease,
                        data: bytes | None = None) -> None:
        """Writes the manifest (`data`: its bytes as a registry sent them) once every blob it
        names is there (under the store lock); the blobs only the replaced manifest (if any)
        used are pruned, as Ollama does."""
        with self.locks.store_lock():
            missing = [d for d in sorted(manifest.digests()) if not self.blobs.has(d)]
            if missing:
                raise PullError(f"blob {missing[0]} disappeared before {name.display}'s manifest "
                                "was written (removed by hand?); run the command again")
            try:
                old = self.manifests.read(name)
            except CorruptModelError:
                old = None
            self.manifests.write(name, manifest if data is None else data)
            if old is not None:
                lease.release_all()
                self._prune_locked(old[0].digests() - manifest.digests())

    # -- queries -------------------------------------------------------------------------------
    def exists(self, name: str | ModelName) -> bool:
        return self.manifests.find(self._name(name)) is not None

    def list(self) -> list[StoredModel]:
        """Every stored model, newest first."""
        models = []
        for name, path in self.manifests.names():
            try:
                data = path.read_bytes()
                manifest = Manifest.from_bytes(data, str(path))
            except FileNotFoundError:
                continue
            except (OSError, CorruptModelError) as exc:
                log.warning("skipping %s: %s", path, exc)
                continue
            models.append(self._stored(name, manifest, data, path))
        models.sort(key=lambda m: (m.modified_at, m.name), reverse=True)
        return models

    def get(self, name: str | ModelName) -> StoredModel:
        model = self._name(name)
        manifest, data, path = self._read(model)
        return self._stored(model, manifest, data, path)

    def resolve(self, name: str | ModelName) -> ResolvedModel:
        """Everything needed to load and prompt `name`; UnknownModelError (404) if it is not
        stored, CorruptModelError if a blob it needs is missing or has the wrong size."""
        model = self._name(name)
        manifest, data, path = self._read(model)
        stored = self._stored(model, manifest, data, path)
        if manifest.layers_of(MEDIA_MODEL):
            weights, fmt = self._checked_blob(manifest.layers_of(MEDIA_MODEL)[0]), "gguf"
        elif manifest.layers_of(MEDIA_MODEL_FILE):
            weights, fmt = self.model_files_dir(manifest.layers_of(MEDIA_MODEL_FILE)), "safetensors"
        else:
            raise CorruptModelError(str(path), "the manifest has no model layer")

        def last_text(media_type: str) -> str | None:
            layers = manifest.layers_of(media_type)
            return _text(self.blobs.read_bytes(layers[-1].digest)) if layers else None

        params: dict[str, Any] = {}
        for layer in manifest.layers_of(MEDIA_PARAMS):
            value = self.blobs.read_json(layer.digest, default={})
            if isinstance(value, dict):
                params.update(value)
        messages: list[dict[str, str]] = []
        for layer in manifest.layers_of(MEDIA_MESSAGES):
            value = self.blobs.read_json(layer.digest, default=[])
            if isinstance(value, list):
                messages = [{"role": str(m.get("role", "")), "content": str(m.get("content", ""))}
                            for m in value if isinstance(m, dict)]
        adapters = []
        for layer in manifest.layers_of(MEDIA_ADAPTER):
            config_text = layer.annotations.get(ANNOTATION_ADAPTER_CONFIG)
            try:
                config = json.loads(config_text) if config_text else None
            except json.JSONDecodeError:
                config = None
            adapters.append(ResolvedAdapter(self._checked_blob(layer),
                                            layer.annotations.get(ANNOTATION_ADAPTER_FORMAT, ""),
                                            config if isinstance(config, dict) else None))
        licenses = [_text(self.blobs.read_bytes(layer.digest))
                    for layer in manifest.layers_of(MEDIA_LICENSE)]
        return ResolvedModel(stored.name, stored.model, stored.digest, weights, fmt,
                             template=last_text(MEDIA_TEMPLATE), system=last_text(MEDIA_SYSTEM),
                             params=params, messages=messages, adapters=adapters,
                             licenses=licenses, details=stored.details,
                             modified_at=stored.modified_at)

    def _checked_blob(self, layer: Layer) -> Path:
        path = self.blobs.path(layer.digest)
        size = self.blobs.size(layer.digest)
        if size is None:
            raise CorruptModelError(str(path), "blob is missing from the store; pull or create "
                                               "the model again")
        if size != layer.size:
            raise CorruptModelError(str(path), f"blob has {size} bytes, the manifest says "
                                               f"{layer.size} (was an imported file changed in "
                                               "place?); pull or create the model again")
        return path

    @staticmethod
    def _tree_key(layers: list[Layer]) -> str:
        entries = sorted((layer.title or "", layer.digest) for layer in layers)
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()

    def model_files_dir(self, layers: list[Layer]) -> Path:
        """A directory of symlinks named by the layers' titles, pointing at their blobs."""
        titles = [layer.title or "" for layer in layers]
        for title in titles:
            if not is_safe_title(title):
                raise CorruptModelError(str(self.root), f"model file layer has an unsafe name "
                                                        f"{title!r}")
        if len(set(titles)) != len(titles):
            raise CorruptModelError(str(self.root), "model file layers repeat a file name")
        blob_paths = {layer.title: self._checked_blob(layer) for layer in layers}
        target = self.root / DIRS_DIR / self._tree_key(layers)
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        held = os.open(tmp, os.O_RDONLY)
        try:
            hold(held)      # NOTE: so remove_leftovers knows it is being built
            for title, blob in blob_paths.items():
                os.symlink(os.path.relpath(blob, target), tmp / str(title))
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            os.close(held)
        return target

    def show(self, name: str | ModelName) -> ModelShow:
        resolved = self.resolve(name)
        modelfile = Modelfile(base=str(resolved.weights), parameters=dict(resolved.params),
                              template=resolved.template, system=resolved.system,
                              messages=[Message(m["role"], m["content"])
                                        for m in resolved.messages],
                              adapters=[str(p) for p in resolved.adapter_paths],
                              licenses=list(resolved.licenses))
        header = (f'Modelfile generated by "shoal show"\n'
                  f"To build a new Modelfile based on this, replace FROM with:\n"
                  f"FROM {resolved.name}")
        info = model_info(resolved.weights) if resolved.format == "gguf" else {}
        return ModelShow(resolved.name, render_modelfile(modelfile, header),
                         format_parameters(resolved.params), resolved.template or "",
                         resolved.system or "", "\n".join(resolved.licenses), resolved.details,
                         info, resolved.messages, resolved.modified_at)

    def verify(self, name: str | ModelName) -> list[str]:
        """Re-hashes every blob of `name`; returns the digests that are missing or changed."""
        manifest, _, _ = self._read(self._name(name))
        return [d for d in sorted(manifest.digests()) if not self.blobs.verify(d)]

    # -- changes -------------------------------------------------------------------------------
    @contextmanager
    def _cleanup_on_failure(self, lease: Lease) -> Iterator[None]:
        """If the operation fails, the blobs it stored that nothing else uses are removed
        (a partial download is not a blob: it stays, for the retry to resume)."""
        try:
            yield
        except BaseException:
            digests = set(lease.digests)
            try:
                with self.locks.store_lock():
                    lease.release_all()
                    self._prune_locked(digests, keep_partials=True)
            except Exception as exc:  # noqa: BLE001 - the original error matters more
                log.warning("could not clean up after a failed operation: %s", exc)
            raise

    def can_pull(self, name: str | ModelName) -> bool:
        """True for names a Modelfile FROM may pull: built-in, hf.co/..., and names that
        spell out a registry host (a plain unknown name is a typo more often than a wish
        to reach Ollama's registry)."""
        model = self._name(name)
        return self.builtin.find(model) is not None or self.huggingface.handles(model) or \
            model.registry.lower() != DEFAULT_REGISTRY

    def check_destination(self, name: str | ModelName, insecure: bool = False) -> None:
        """Raises EgressRefusedError when pulling or pushing `name` would connect where the
        registry client's egress policy forbids (the connection checks again); built-in,
        hf.co and plain names go to fixed hosts and are not checked here."""
        model = self._name(name)
        if model.registry.lower() != DEFAULT_REGISTRY and not self.huggingface.handles(model):
            self.registry.check_destination(model, insecure)

    def pull(self, name: str | ModelName, progress: ProgressCallback | None = None,
             insecure: bool = False) -> StoredModel:
        """Fetches a built-in model, hf.co/<owner>/<repo>[:quant], or any other name from its
        OCI registry (plain names: Ollama's) into the store; `insecure` allows plain http.

        Emits Ollama's /api/pull events through `progress`. Raises UnknownModelError for a
        name its source does not have, PullError when a source cannot be reached or
        misbehaves (RegistryError for registries); the store is then as it was (a partial
        download stays, for the next pull to resume)."""
        model = self._name(name)
        reporter = Reporter(progress)
        reporter.status("pulling manifest")
        with Lease(self.root) as lease, self._cleanup_on_failure(lease):
            data = None
            if self.huggingface.handles(model) or self.builtin.find(model) is not None:
                source = self.huggingface if self.huggingface.handles(model) else self.builtin
                pulled = source.pull(model, self.blobs, lease, reporter)
                manifest = manifest_for(self.blobs, pulled.layers, pulled.details, lease)
            else:
                try:
                    manifest, data = self.registry.pull(model, self.blobs, lease, reporter,
                                                        insecure=insecure)
                except (UnknownModelError, PullError) as exc:
                    hint = not_builtin_hint(model.display)
                    if hint:   # e.g. gemma3:270m: say which built-in model is meant
                        exc.args = (f"{exc.args[0] if exc.args else exc}; {hint}",)
                    raise
            reporter.status("writing manifest")
            self._write_manifest(model, manifest, lease, data)
        reporter.status("success")
        return self.get(model)

    def push(self, name: str | ModelName, progress: ProgressCallback | None = None,
             insecure: bool = False) -> None:
        """Uploads a stored model to the registry its name names (plain names: Ollama's);
        `insecure` allows plain http. Emits Ollama's /api/push events ("retrieving
        manifest", "pushing <digest>" with byte counts, "pushing manifest", "success")."""
        model = self._name(name)
        if model.is_huggingface:
            raise RegistryError(f"{model.display}: Hugging Face is a source to pull from; "
                                "pushing to it is not supported")
        reporter = Reporter(progress)
        reporter.status("retrieving manifest")
        with Lease(self.root) as lease:
            # NOTE: leased under the store lock, so an rm running meanwhile keeps the blobs.
            with self.locks.store_lock():
                manifest, data, _ = self._read(model)
                lease.add(manifest.digests())
            self.registry.push(model, manifest, data, self.blobs, reporter, insecure=insecure)
        reporter.status("success")

    def create(self, name: str | ModelName, modelfile: str | Modelfile,
               base_dir: str | Path | None = None,
               progress: ProgressCallback | None = None, *,
               paths: LocalPaths | None = None,
               uploads: dict[str, dict[str, str]] | None = None) -> StoredModel:
        """Builds `name` from a Modelfile (text or parsed); relative paths in it are relative
        to `base_dir` (default: the current directory). `paths` limits what FROM / ADAPTER
        paths may read (default: anything a model needs, with detailed errors); `uploads`
        maps a FROM / ADAPTER value to uploaded blobs (file name -> digest) that stand for it.
        Emits Ollama-style /api/create events."""
        model = self._name(name)
        reporter = Reporter(progress)
        reporter.status("parsing modelfile")
        parsed = parse_modelfile(modelfile) if isinstance(modelfile, str) else modelfile
        base = Path(base_dir).expanduser() if base_dir is not None else Path.cwd()
        with Lease(self.root) as lease, self._cleanup_on_failure(lease):
            layers, details = Creator(self, parsed, base, lease, reporter, paths, uploads).run()
            manifest = manifest_for(self.blobs, layers, details, lease)
            reporter.status("writing manifest")
            self._write_manifest(model, manifest, lease)
        reporter.status("success")
        return self.get(model)

    def copy(self, source: str | ModelName, destination: str | ModelName) -> StoredModel:
        """`shoal cp`: the destination gets the source's manifest (same bytes, same digest)."""
        src, dst = self._name(source), self._name(destination)
        with self.locks.store_lock():
            found = self.manifests.read(src)
            if found is None:
                raise UnknownModelError(src.display, [m.name for m in self.list()])
            try:
                replaced = self.manifests.read(dst)
            except CorruptModelError:
                replaced = None
            self.manifests.write(dst, found[1])
            if replaced is not None:
                self._prune_locked(replaced[0].digests() - found[0].digests())
        return self.get(dst)

    def delete(self, name: str | ModelName) -> list[str]:
        """`shoal rm`: removes the name, then the blobs it used that no manifest references
        any more (never one another model or an operation in progress uses). Returns them."""
        model = self._name(name)
        with self.locks.store_lock():
            found = self.manifests.read(model)
            if found is None:
                raise UnknownModelError(model.display, [m.name for m in self.list()])
            self.manifests.delete(model)
            return self._prune_locked(found[0].digests())

    def prune(self) -> list[str]:
        """Removes every blob no manifest references and no operation in progress needs
        (e.g. at server start, as Ollama does), stale directories, and what killed
        processes left behind (`remove_leftovers`)."""
        with self.locks.store_lock():
            removed = self._prune_locked(None)
        self.remove_leftovers()
        return removed

    def remove_leftovers(self) -> list[Path]:
        """Scratch files and folders of writes that a killed process (`kill -9`) never
        finished: blob uploads and imports, staging folders, half-built model folders, the
        built-in models' fetches in the download cache. Never those of a live process, in
        this one or another (see core/scratch.py). Cheap: `shoal serve` runs it at start."""
        removed = self.blobs.remove_abandoned_scratch()
        removed += remove_abandoned(self.root / DIRS_DIR, ".tmp-*")
        # NOTE: where an older shoal streamed uploads (`.upload-*` in the root, unheld).
        removed += remove_abandoned(self.root, ".upload-*")
        removed += self.builtin.remove_leftovers()
        return removed

    def _prune_locked(self, candidates: set[str] | None, keep_partials: bool = False) -> list[str]:
        """Removes the `candidates` (None: every blob) that nothing references or leases, and
        their partial downloads unless `keep_partials` (a failed pull's, for the retry).
        NOTE: rm prunes only what the removed manifest used, so a blob uploaded through
        /api/blobs for a create that has not happened yet survives other models' rm."""
        try:
            referenced = self.manifests.referenced_digests()
        except (OSError, CorruptModelError) as exc:
            # NOTE: an unreadable manifest may reference anything; deleting nothing is safe.
            log.warning("not pruning blobs: %s", exc)
            return []
        keep = referenced | leased_digests(self.root)
        pool = self.blobs.digests() if candidates is None else sorted(candidates)
        removed = [d for d in pool if d not in keep and self.blobs.remove(d, keep_partials)]
        self._prune_dirs()
        return removed

    def _prune_dirs(self) -> None:
        dirs = self.root / DIRS_DIR
        if not dirs.is_dir():
            return
        wanted = set()
        for path in self.manifests.files():
            try:
                manifest = Manifest.from_bytes(path.read_bytes(), str(path))
            except (OSError, CorruptModelError):
                return
            files = manifest.layers_of(MEDIA_MODEL_FILE)
            if files:
                wanted.add(self._tree_key(files))
        for entry in dirs.iterdir():
            if entry.name.startswith("."):
                continue
            if entry.name not in wanted:
                shutil.rmtree(entry, ignore_errors=True)
