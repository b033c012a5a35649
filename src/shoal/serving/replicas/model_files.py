"""How a replica finds its model on its own node: the front's path, else its node's store by
digest, pulled from the front when missing there (docs/scale-out.md, "How the model reaches
each node").

The front serves the files of the models it loads through a BlobSource actor pinned to its
own node; a replica on another node asks it for a blob by digest, in chunks, and writes them
with the store's resumable, verified download (store/blobs.py): a partial pull resumes, and
bytes that do not hash to the digest never become a blob. Plain classes: cluster.py wraps
BlobSource with ray.remote, so this module loads without Ray.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.core.errors import ModelLoadError
from shoal.store.blobs import BlobStore, blob_digest, normalize_digest

log = logging.getLogger(__name__)

PULL_CHUNK = 16 << 20       # bytes per call to the source: big enough that the calls cost little


@dataclass(frozen=True, slots=True)
class ModelFile:
    """The model file as the front has it, and where a replica may fetch it by digest."""

    path: str                   # the front's path (used as is where it exists: a shared store, a copy)
    digest: str | None          # sha256 of the file (None: not a store blob; the path must exist)
    source: Any = None          # the front's BlobSource actor
    store: str | None = None    # the replica's store root (None: its node's own, $SHOAL_MODELS ...)


def model_file(path: str | Path) -> ModelFile:
    """The front's model path; a store blob (`.../blobs/sha256-<hex>`) carries its digest."""
    path = Path(path)
    return ModelFile(str(path), blob_digest(path) if path.is_file() else None)


class BlobSource:
    """Serves the front's model files by digest (only those it was given), in chunks."""

    def __init__(self, files: dict[str, str]) -> None:
        self._files = {normalize_digest(d): p for d, p in files.items()}

    def size(self, digest: str) -> int:
        return os.path.getsize(self._path(digest))

    def read(self, digest: str, offset: int, length: int) -> bytes:
        with open(self._path(digest), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def _path(self, digest: str) -> str:
        try:
            return self._files[normalize_digest(digest)]
        except KeyError:
            raise ModelLoadError(f"this front does not serve {digest}") from None


def local_model_path(model: ModelFile, node: str) -> str:
    """Where this replica's node has the model, pulling it into the node's store if needed."""
    if os.path.exists(model.path):
        return model.path
    if model.digest is None or model.source is None:
        raise ModelLoadError(f"{model.path} is not on Ray node {node}, and it is not a store blob a replica "
                             "could pull by digest: put it at the same path there (or on a shared "
                             "filesystem), or serve a model from the store")
    import ray

    from shoal.store.store import store_root_from_env

    blobs = BlobStore(model.store or store_root_from_env())
    size = ray.get(model.source.size.remote(model.digest))

    def fetch(offset: int) -> Iterator[bytes]:
        # NOTE: the next chunk is asked for before this one is written: the transfer and the
        # disk overlap
        ahead = model.source.read.remote(model.digest, offset, PULL_CHUNK)
        while offset < size:
            chunk = ray.get(ahead)
            if not chunk:
                return
            offset += len(chunk)
            ahead = model.source.read.remote(model.digest, offset, PULL_CHUNK)
            yield chunk

    if not blobs.has(model.digest):
        log.warning("pulling %s (%d bytes) from the front into %s", model.digest, size, blobs.root)
    return str(blobs.download(model.digest, fetch, size=size))
