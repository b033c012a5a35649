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
* Importing a local file copies it: a hard link would share the inode with a file the store
  does not own, whose owner could change the blob's bytes later. The digest is computed from
  the bytes written. Blobs are read-only (0444) once in place.
* An existing blob is trusted only once its bytes are known to hash to its name: hashed as it
  was written, or re-hashed the first time a pull or import finds it (`claim_verified`). A
  stamp in `verified/` records the file as it was then (device, inode, size, mtime, ctime), so
  later finds cost a stat; any change to the file (a write, chmod, truncate) changes its ctime
  and the next find hashes it again. A blob that fails is replaced by a fresh copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Self

from shoal.core.errors import CorruptModelError, InvalidParameterError, ModelNotFoundError
from shoal.core.scratch import ScratchFile, remove_abandoned, scratch_dir
from shoal.store.errors import DigestMismatchError, PullError
from shoal.store.locks import StoreLocks

CHUNK = 1 << 20
BLOBS_DIR = "blobs"
VERIFIED_DIR = "verified"
DIRS_DIR = "dirs"           # safetensors models as folders of symlinks into blobs/ (store.py)
PARTIAL_SUFFIX = "-partial"
TMP_PREFIX = ".tmp-"
READ_ONLY = 0o444
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


def blob_digest(path: Path) -> str | None:
    """The digest a blob file's name says (None: not a blob's name)."""
    return "sha256:" + path.name[7:] if _BLOB_NAME_RE.fullmatch(path.name) else None


def is_digest(text: str) -> bool:
    return isinstance(text, str) and _DIGEST_RE.fullmatch(text) is not None


def blob_filename(digest: str) -> str:
    return "sha256-" + normalize_digest(digest)[7:]


def file_chunks(path: str | Path, sent: Callable[[int], Any] | None = None,
                chunk: int = CHUNK) -> Iterator[bytes]:
    """A file's bytes in chunks, for a request body; `sent` hears the running byte count after
    each chunk is taken (an upload's progress)."""
    done = 0
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(chunk), b""):
            yield piece
            done += len(piece)
            if sent is not None:
                sent(done)


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
    with open(path, "rb") as f:
        return _copy(f, None, progress, total)


def _copy(src: BinaryIO, out: BinaryIO | None, progress: ByteProgress | None = None,
          total: int | None = None) -> tuple[hashlib._Hash, int]:
    """Reads `src` to its end, writing it to `out` (if any); the hash is of the bytes read."""
    hasher = hashlib.sha256()
    size = 0
    for chunk in iter(lambda: src.read(CHUNK), b""):
        if out is not None:
            out.write(chunk)
        hasher.update(chunk)
        size += len(chunk)
        if progress:
            progress(size, total)
    return hasher, size


def _identity(st: os.stat_result) -> list[int]:
    """What a verified stamp records of a blob's file: any write, truncate or chmod changes it."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


@dataclass(frozen=True, slots=True)
class BlobInfo:
    digest: str   # sha256:<hex>
    size: int


class BlobStore:
    """The blobs of one store root. Safe to share between threads and processes."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.dir = self.root / BLOBS_DIR
        self.verified_dir = self.root / VERIFIED_DIR
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

    # -- trust -------------------------------------------------------------------------------
    def _stamp_path(self, digest: str) -> Path:
        return self.verified_dir / blob_filename(digest)

    def _stamp(self, digest: str, st: os.stat_result | None = None) -> None:
        """Records that the blob's file (as `st` describes it; default: as it is now) holds
        bytes that hash to `digest`."""
        try:
            st = st or os.stat(self.path(digest))
            self.verified_dir.mkdir(parents=True, exist_ok=True)
            stamp = self._stamp_path(digest)
            tmp = stamp.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}")
            tmp.write_text(json.dumps(_identity(st)), encoding="utf-8")
            os.replace(tmp, stamp)
        except OSError:
            pass            # NOTE: without a stamp the blob is only hashed again next time

    def is_verified(self, digest: str) -> bool:
        """True when the blob's file is the one a stamp says was verified, unchanged since,
        and not shared with a file outside the store (a hard link)."""
        try:
            st = os.stat(self.path(digest))
            recorded = json.loads(self._stamp_path(digest).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return st.st_nlink == 1 and recorded == _identity(st)

    def claim_verified(self, digest: str, on_digest: OnDigest | None,
                       progress: ByteProgress | None = None) -> int | None:
        """`claim`, trusting an existing blob only if its bytes hash to `digest`: a stamped,
        unchanged file is trusted at once; any other is hashed now (and stamped when right).
        None when there is no blob or it is wrong: the caller fetches the bytes again, and
        its commit replaces the wrong file. A blob sharing its inode with another file (a
        hard link an older shoal made on import) is replaced by a private copy."""
        digest = normalize_digest(digest)
        size = self.claim(digest, on_digest)
        if size is None or self.is_verified(digest):
            return size
        with self._locks.blob_lock(digest):
            if self.is_verified(digest):
                return self.size(digest)
            return self._verify_and_stamp(digest, progress)

    def _verify_and_stamp(self, digest: str, progress: ByteProgress | None) -> int | None:
        try:
            src = open(self.path(digest), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return None
        with src:
            return self._verify_open(src, digest, progress)

    def _verify_open(self, src: BinaryIO, digest: str, progress: ByteProgress | None) -> int | None:
        st = os.fstat(src.fileno())
        if st.st_nlink == 1:
            hasher, size = _copy(src, None, progress, st.st_size)
            if "sha256:" + hasher.hexdigest() != digest:
                return None
            self._stamp(digest, st)
            return size
        scratch = ScratchFile(self.dir, TMP_PREFIX)
        try:
            hasher, size = _copy(src, scratch.file, progress, st.st_size)
            if "sha256:" + hasher.hexdigest() != digest:
                return None
            self._commit(scratch, digest, None, replace=True)
            return size
        finally:
            scratch.discard()

    # -- writing -----------------------------------------------------------------------------
    def claim(self, digest: str, on_digest: OnDigest | None) -> int | None:
        """Under the store lock: tells `on_digest` about `digest`, then returns the size of
        an existing blob (None if there is none). Serialised with prune, so a blob found here
        is not removed afterwards while the caller's lease names it. The bytes are not
        checked: see `claim_verified`."""
        with self._locks.store_lock():
            if on_digest is not None:
                on_digest(digest)
            return self.size(digest)

    def _commit(self, tmp: ScratchFile | Path, digest: str, on_digest: OnDigest | None = None,
                replace: bool = False) -> Path:
        """Makes a file whose bytes hash to `digest` (flushed, not yet fsynced) the blob:
        read-only, fsynced, renamed into place (an existing verified blob of the same size is
        kept instead, unless `replace`), stamped. Under the store lock, so a concurrent prune
        sees either the lease or the new blob."""
        final = self.path(digest)
        path = tmp.path if isinstance(tmp, ScratchFile) else tmp
        if isinstance(tmp, ScratchFile):
            tmp.file.flush()
            os.fsync(tmp.file.fileno())
        os.chmod(path, READ_ONLY)
        with self._locks.store_lock():
            if on_digest is not None:
                on_digest(digest)
            # NOTE: a blob of another size, or one not known to be right, was damaged on disk
            # (or hard-linked by an older shoal); the verified bytes replace it, so "pull or
            # create it again" repairs it.
            if not replace and self.is_verified(digest) and \
                    self.size(digest) == path.stat().st_size:
                path.unlink(missing_ok=True)
            else:
                # NOTE: renamed while the scratch file is still open (and held), so a clean-up
                # of abandoned scratch files never sees it unheld.
                os.replace(path, final)
                _fsync_dir(self.dir)
                self._stamp(digest)
        return final

    def download(self, digest: str, fetch: Fetch, *, size: int | None = None,
                 progress: ByteProgress | None = None, on_digest: OnDigest | None = None) -> Path:
        """Stores the blob `digest`, resuming a partial download; returns its path.

        `fetch(offset)` must yield the blob's bytes starting at `offset`. If it raises, the
        bytes received so far stay in the partial file for the next call. Raises
        DigestMismatchError (and drops the partial) when the bytes do not hash to `digest`,
        PullError when the source ends before `size` bytes (the partial is kept). A blob that
        is already there is used only if its bytes are right (`claim_verified`).
        """
        digest = normalize_digest(digest)
        final = self.path(digest)
        have = self.claim_verified(digest, on_digest)
        if have is not None:
            if progress:
                progress(have, size if size is not None else have)
            return final
        self.dir.mkdir(parents=True, exist_ok=True)
        with self._locks.blob_lock(digest):
            if self.is_verified(digest):          # another writer finished while we waited
                have = self.size(digest) or 0
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
                                raise DigestMismatchError(digest, f"more than {size} bytes")
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
                raise DigestMismatchError(digest, actual)
            self._commit(partial, digest, on_digest, replace=True)
        return final

    def writer(self) -> BlobWriter:
        """A blob written piece by piece (an upload); see BlobWriter."""
        return BlobWriter(self)

    def write_stream(self, chunks: Iterable[bytes], *, digest: str | None = None,
                     progress: ByteProgress | None = None, total: int | None = None,
                     on_digest: OnDigest | None = None) -> BlobInfo:
        """Stores a stream whose digest may be unknown; nothing remains if it fails."""
        expected = normalize_digest(digest) if digest is not None else None
        with self.writer() as writer:
            for chunk in chunks:
                writer.write(chunk)
                if progress:
                    progress(writer.size, total)
            return writer.commit(expected, on_digest)

    def write_bytes(self, data: bytes, on_digest: OnDigest | None = None) -> BlobInfo:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if self.claim_verified(digest, on_digest) is not None:
            return BlobInfo(digest, len(data))
        return self.write_stream([data], digest=digest, on_digest=on_digest)

    def import_file(self, path: str | Path, *, digest: str | None = None,
                    progress: ByteProgress | None = None,
                    on_digest: OnDigest | None = None) -> BlobInfo:
        """Stores a copy of a local file the server trusts (a download cache's; symlinks
        followed). A known `digest` already verified in the store is not copied again."""
        expected = normalize_digest(digest) if digest is not None else None
        try:
            f = open(Path(path).expanduser(), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise ModelNotFoundError(str(path), "no such file") from None
        with f:
            return self._import_checked(f, path, expected, progress, on_digest)

    def _import_checked(self, f: BinaryIO, path: str | Path, expected: str | None,
                        progress: ByteProgress | None, on_digest: OnDigest | None) -> BlobInfo:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ModelNotFoundError(str(path), "not a regular file")
        if expected is not None and self.claim_verified(expected, on_digest) == st.st_size:
            if progress:
                progress(st.st_size, st.st_size)
            return BlobInfo(expected, st.st_size)
        return self.import_open_file(f, digest=expected, progress=progress,
                                     total=st.st_size, on_digest=on_digest)

    def import_open_file(self, src: BinaryIO, *, digest: str | None = None,
                         progress: ByteProgress | None = None, total: int | None = None,
                         on_digest: OnDigest | None = None) -> BlobInfo:
        """Stores a copy of what `src` reads from its current position to its end."""
        with self.writer() as writer:
            writer.copy_from(src, progress, total)
            return writer.commit(digest, on_digest)

    @contextmanager
    def staging(self) -> Iterator[Staging]:
        """A private folder for files copied in from outside, checked by name (a model
        directory's layout) before they become blobs; removed, with what was not committed,
        when the block ends."""
        with scratch_dir(self.dir, TMP_PREFIX) as folder:      # (mode 0700, as mkdtemp makes it)
            yield Staging(self, folder)

    def remove_abandoned_scratch(self) -> list[Path]:
        """Scratch files and staging folders left by killed processes (never a live one's)."""
        removed = remove_abandoned(self.dir, TMP_PREFIX + "*")
        removed += remove_abandoned(self.verified_dir, TMP_PREFIX + "*")
        if self.verified_dir.is_dir():
            for stamp in self.verified_dir.iterdir():
                if _BLOB_NAME_RE.fullmatch(stamp.name) and not (self.dir / stamp.name).exists():
                    stamp.unlink(missing_ok=True)
        return removed

    def remove(self, digest: str, keep_partial: bool = False) -> bool:
        """Deletes the blob and (unless `keep_partial`) any partial of it; True if the blob
        existed."""
        if not keep_partial:
            self.partial_path(digest).unlink(missing_ok=True)
        self._stamp_path(digest).unlink(missing_ok=True)
        try:
            # NOTE: read-only (0444) is no obstacle: unlinking needs the folder writable.
            self.path(digest).unlink()
        except FileNotFoundError:
            return False
        return True


class BlobWriter:
    """One blob written piece by piece into a scratch file held by this process, hashed as it
    is written, committed only if it hashes to what was promised. Use as a context manager:
    leaving without a commit removes the scratch file."""

    def __init__(self, blobs: BlobStore) -> None:
        self.blobs = blobs
        self.scratch = ScratchFile(blobs.dir, TMP_PREFIX)
        self._hasher = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.scratch.file.write(chunk)
        self._hasher.update(chunk)
        self.size += len(chunk)

    def copy_from(self, src: BinaryIO, progress: ByteProgress | None = None,
                  total: int | None = None) -> None:
        for chunk in iter(lambda: src.read(CHUNK), b""):
            self.write(chunk)
            if progress:
                progress(self.size, total)

    @property
    def digest(self) -> str:
        return "sha256:" + self._hasher.hexdigest()

    def commit(self, expected: str | None = None, on_digest: OnDigest | None = None) -> BlobInfo:
        """Makes it the blob of its digest; DigestMismatchError (nothing kept) when that is
        not `expected`. The error names digests only, never a file."""
        actual = self.digest
        if expected is not None and actual != normalize_digest(expected):
            raise DigestMismatchError(normalize_digest(expected), actual)
        self.blobs._commit(self.scratch, actual, on_digest)
        return BlobInfo(actual, self.size)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.scratch.discard()


@dataclass(frozen=True, slots=True)
class StagedFile:
    path: Path
    digest: str
    size: int


class Staging:
    """See BlobStore.staging."""

    def __init__(self, blobs: BlobStore, folder: Path) -> None:
        self.blobs = blobs
        self.dir = folder

    def copy_in(self, src: BinaryIO, name: str, progress: ByteProgress | None = None,
                total: int | None = None) -> StagedFile:
        """Copies what `src` reads into the folder as `name` (read-only; hashed on the way)."""
        path = self.dir / name
        with open(path, "xb") as out:
            hasher, size = _copy(src, out, progress, total)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(path, READ_ONLY)
        return StagedFile(path, "sha256:" + hasher.hexdigest(), size)

    def link_in(self, name: str, digest: str) -> Path:
        """A symlink `name` to a blob already in the store (a file of an uploaded set)."""
        path = self.dir / name
        os.symlink(self.blobs.path(digest), path)
        return path

    def commit(self, staged: StagedFile, on_digest: OnDigest | None = None) -> BlobInfo:
        """Moves a staged file into the store as its blob (no second copy)."""
        self.blobs._commit(staged.path, staged.digest, on_digest)
        return BlobInfo(staged.digest, staged.size)
