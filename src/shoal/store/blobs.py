"""Content-addressed blobs: `<root>/blobs/sha256-<hex>`, written atomically, verified always.

Guarantees:

* A file named `sha256-<hex>` only ever appears by an atomic rename of a file whose bytes
  hashed to `<hex>` as they were written (and were fsynced first). A crash, a kill or a
  wrong digest at any moment leaves no blob, never a short or corrupt one.
* A download by digest keeps what it has in `sha256-<hex>-partial` (fsynced on failure);
  the next download of that digest hashes the partial back in and asks the source only for
  the bytes after it (`fetch(offset)` - a ranged GET for a registry client).
* Writers of the same digest are serialised by a lock file, so concurrent pulls of one blob
  both succeed: the second waits and finds the blob there.
* Importing a local file hardlinks it into the store when it can (same filesystem, allowed)
  and copies it otherwise; either way the digest is computed from the stored bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.core.errors import CorruptModelError, InvalidParameterError, ModelNotFoundError
from shoal.store.errors import DigestMismatchError, PullError
from shoal.store.locks import StoreLocks

CHUNK = 1 << 20
BLOBS_DIR = "blobs"
PARTIAL_SUFFIX = "-partial"
_DIGEST_RE = re.compile(r"sha256[:-]([0-9a-f]{64})")
_BLOB_NAME_RE = re.compile(r"sha256-[0-9a-f]{64}")

# progress(completed_bytes, total_bytes_or_None)
ByteProgress = Callable[[int, int | None], None]
# fetch(offset) -> the blob's bytes from `offset` on, in chunks
Fetch = Callable[[int], Iterable[bytes]]
# called with a blob's digest just before it becomes visible (e.g. Lease.add, so a prune
# running at that moment keeps it)
OnDigest = Callable[[str], None]


def normalize_digest(digest: str) -> str:
    """`sha256:<hex>` or `sha256-<hex>` (lower-case hex) -> `sha256:<hex>`; else 400."""
    if isinstance(digest, str):
        match = _DIGEST_RE.fullmatch(digest.strip())
        if match:
            return f"sha256:{match.group(1)}"
    raise InvalidParameterError("digest", f"{digest!r} is not a sha256 digest "
                                          "('sha256:' followed by 64 lower-case hex digits)")


def is_digest(text: str) -> bool:
    return isinstance(text, str) and _DIGEST_RE.fullmatch(text) is not None


def blob_filename(digest: str) -> str:
    return "sha256-" + normalize_digest(digest)[7:]


def _fsync_dir(path: Path) -> None:
    # NOTE: makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _hash_file(path: Path, progress: ByteProgress | None = None,
               total: int | None = None) -> tuple[hashlib._Hash, int]:
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            hasher.update(chunk)
            size += len(chunk)
            if progress:
                progress(size, total)
    return hasher, size


@dataclass(frozen=True, slots=True)
class BlobInfo:
    digest: str   # sha256:<hex>
    size: int


class BlobStore:
    """The blobs of one store root. Safe to share between threads and processes."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.dir = self.root / BLOBS_DIR
        self._locks = StoreLocks(self.root)

    # -- reading -----------------------------------------------------------------------------
    def path(self, digest: str) -> Path:
        return self.dir / blob_filename(digest)

    def partial_path(self, digest: str) -> Path:
        return self.dir / (blob_filename(digest) + PARTIAL_SUFFIX)

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def size(self, digest: str) -> int | None:
        try:
            return self.path(digest).stat().st_size
        except OSError:
            return None

    def partial_size(self, digest: str) -> int:
        try:
            return self.partial_path(digest).stat().st_size
        except OSError:
            return 0

    def read_bytes(self, digest: str) -> bytes:
        try:
            return self.path(digest).read_bytes()
        except FileNotFoundError:
            raise ModelNotFoundError(str(self.path(digest)), "blob is missing") from None

    def read_json(self, digest: str, default: Any = None) -> Any:
        """A small JSON blob (config, params, messages) parsed, or `default` when it is missing or bad."""
        try:
            return json.loads(self.read_bytes(digest).decode("utf-8"))
        except (CorruptModelError, OSError, UnicodeDecodeError, json.JSONDecodeError):
            return default

    def open_range(self, digest: str, offset: int = 0, chunk: int = CHUNK) -> Iterator[bytes]:
        """The blob's bytes from `offset` on (what a registry server answers a ranged GET with)."""
        with open(self.path(digest), "rb") as f:
            f.seek(offset)
            yield from iter(lambda: f.read(chunk), b"")

    def digests(self) -> list[str]:
        """Every complete blob, as `sha256:<hex>`."""
        if not self.dir.is_dir():
            return []
        return sorted("sha256:" + p.name[7:] for p in self.dir.iterdir()
                      if _BLOB_NAME_RE.fullmatch(p.name))

    def verify(self, digest: str) -> bool:
        """Re-hashes the blob; False if it is missing or its bytes changed."""
        digest = normalize_digest(digest)
        try:
            hasher, _ = _hash_file(self.path(digest))
        except OSError:
            return False
        return "sha256:" + hasher.hexdigest() == digest

    # -- writing -----------------------------------------------------------------------------
    def _tmp_path(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir / f".tmp-{uuid.uuid4().hex}"

    def claim(self, digest: str, on_digest: OnDigest | None) -> int | None:
        """Under the store lock: tells `on_digest` about `digest`, then returns the size of
        an existing blob (None if there is none). Serialised with prune, so a blob found here
        is not removed afterwards while the caller's lease names it."""
        with self._locks.store_lock():
            if on_digest is not None:
                on_digest(digest)
            return self.size(digest)

    def _commit(self, tmp: Path, digest: str, on_digest: OnDigest | None = None) -> Path:
        """Renames a verified temp file into place (keeping an existing blob of the same size:
        same bytes). Under the store lock, so a concurrent prune sees either the lease or the
        new blob."""
        final = self.path(digest)
        with self._locks.store_lock():
            if on_digest is not None:
                on_digest(digest)
            # NOTE: a blob of another size was damaged on disk (truncated by hand, a full disk
            # elsewhere); the verified bytes replace it, so "pull or create it again" repairs it.
            if self.size(digest) == tmp.stat().st_size:
                tmp.unlink(missing_ok=True)
            else:
                os.replace(tmp, final)
                _fsync_dir(self.dir)
        return final

    def download(self, digest: str, fetch: Fetch, *, size: int | None = None,
                 progress: ByteProgress | None = None, on_digest: OnDigest | None = None) -> Path:
        """Stores the blob `digest`, resuming a partial download; returns its path.

        `fetch(offset)` must yield the blob's bytes starting at `offset`. If it raises, the
        bytes received so far stay in the partial file for the next call. Raises
        DigestMismatchError (and drops the partial) when the bytes do not hash to `digest`,
        PullError when the source ends before `size` bytes (the partial is kept).
        """
        digest = normalize_digest(digest)
        final = self.path(digest)
        have = self.claim(digest, on_digest)
        if have is not None:
            if progress:
                progress(have, size if size is not None else have)
            return final
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._locks.blob_lock(digest):
            have = self.claim(digest, None)
            if have is not None:          # another writer finished while we waited
                if progress:
                    progress(have, size if size is not None else have)
                return final
            partial = self.partial_path(digest)
            hasher = hashlib.sha256()
            offset = 0
            if partial.exists():
                if size is not None and partial.stat().st_size > size:
                    partial.unlink()
                else:
                    hasher, offset = _hash_file(partial)
            if progress:
                progress(offset, size)
            if size is None or offset < size:
                with open(partial, "ab") as out:
                    try:
                        for chunk in fetch(offset):
                            if not chunk:
                                continue
                            out.write(chunk)
                            hasher.update(chunk)
                            offset += len(chunk)
                            if size is not None and offset > size:
                                raise DigestMismatchError(
                                    digest, f"more than {size} bytes", str(partial))
                            if progress:
                                progress(offset, size)
                    except DigestMismatchError:
                        out.close()
                        partial.unlink(missing_ok=True)
                        raise
                    finally:
                        if not out.closed:
                            out.flush()
                            os.fsync(out.fileno())
            if size is not None and offset < size:
                raise PullError(f"the download of {digest} ended after {offset} of {size} bytes; "
                                "run it again to resume")
            actual = "sha256:" + hasher.hexdigest()
            if actual != digest:
                partial.unlink(missing_ok=True)
                raise DigestMismatchError(digest, actual, str(partial))
            self._commit(partial, digest, on_digest)
        return final

    def write_stream(self, chunks: Iterable[bytes], *, digest: str | None = None,
                     progress: ByteProgress | None = None, total: int | None = None,
                     on_digest: OnDigest | None = None) -> BlobInfo:
        """Stores a stream whose digest may be unknown; nothing remains if it fails."""
        expected = normalize_digest(digest) if digest is not None else None
        tmp = self._tmp_path()
        hasher = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    hasher.update(chunk)
                    size += len(chunk)
                    if progress:
                        progress(size, total)
                out.flush()
                os.fsync(out.fileno())
            actual = "sha256:" + hasher.hexdigest()
            if expected is not None and actual != expected:
                raise DigestMismatchError(expected, actual)
            self._commit(tmp, actual, on_digest)
        finally:
            tmp.unlink(missing_ok=True)
        return BlobInfo(actual, size)

    def write_bytes(self, data: bytes, on_digest: OnDigest | None = None) -> BlobInfo:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if self.claim(digest, on_digest) is not None:
            return BlobInfo(digest, len(data))
        return self.write_stream([data], digest=digest, on_digest=on_digest)

    def import_file(self, path: str | Path, *, digest: str | None = None, link: bool = True,
                    progress: ByteProgress | None = None,
                    on_digest: OnDigest | None = None) -> BlobInfo:
        """Stores a local file (symlinks followed): hardlinked if `link` and possible, else
        copied. The digest is computed from the stored inode / the copied bytes."""
        expected = normalize_digest(digest) if digest is not None else None
        src = Path(path).expanduser().resolve()
        if not src.is_file():
            raise ModelNotFoundError(str(path), "no such file")
        total = src.stat().st_size
        if expected is not None and self.claim(expected, on_digest) == total:
            if progress:
                progress(total, total)
            return BlobInfo(expected, total)
        tmp = self._tmp_path()
        try:
            linked = False
            if link:
                try:
                    os.link(src, tmp)
                    linked = True
                except OSError:
                    linked = False
            if linked:
                hasher, size = _hash_file(tmp, progress, total)
            else:
                hasher, size = hashlib.sha256(), 0
                with open(src, "rb") as f, open(tmp, "wb") as out:
                    for chunk in iter(lambda: f.read(CHUNK), b""):
                        out.write(chunk)
                        hasher.update(chunk)
                        size += len(chunk)
                        if progress:
                            progress(size, total)
                    out.flush()
                    os.fsync(out.fileno())
            actual = "sha256:" + hasher.hexdigest()
            if expected is not None and actual != expected:
                raise DigestMismatchError(expected, actual, str(src))
            self._commit(tmp, actual, on_digest)
        finally:
            tmp.unlink(missing_ok=True)
        return BlobInfo(actual, size)

    def remove(self, digest: str, keep_partial: bool = False) -> bool:
        """Deletes the blob and (unless `keep_partial`) any partial of it; True if the blob
        existed."""
        if not keep_partial:
            self.partial_path(digest).unlink(missing_ok=True)
        try:
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        return True
