"""Inter-process locks and leases for one store root.

* `store_lock` serialises the short steps that change which blobs are referenced: writing,
  copying and deleting manifests, and pruning.
* `blob_lock(digest)` serialises writers of one blob's resumable `-partial` file.
* A `Lease` names the digests an operation in progress (a pull, a create) relies on before
  its manifest exists; prune keeps them. A lease is a JSON file plus a lock its owner holds;
  a lease whose lock can be taken belongs to a dead process and is removed.

Lock files are never deleted while they could be in use (deleting a lock file another process
has open and is waiting on would let two holders in), except a lease's own lock, whose holder
deletes it only after deleting the lease file that points to it.
"""
from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

LOCKS_DIR = "locks"
LEASES_DIR = "leases"


def _hex(digest: str) -> str:
    return digest.split(":", 1)[-1].split("-", 1)[-1]


class StoreLocks:
    """The lock files of one store root (`<root>/locks/`)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.dir = self.root / LOCKS_DIR

    def _lock(self, name: str) -> FileLock:
        self.dir.mkdir(parents=True, exist_ok=True)
        # NOTE: a fresh FileLock per use: each holds its own descriptor, so the lock excludes
        # other threads of this process as well as other processes.
        return FileLock(str(self.dir / name))

    def store_lock(self) -> FileLock:
        return self._lock("store.lock")

    def blob_lock(self, digest: str) -> FileLock:
        return self._lock(f"blob-sha256-{_hex(digest)}.lock")


class Lease:
    """Keeps `digests` from being pruned while an operation runs. Use as a context manager."""

    def __init__(self, root: Path) -> None:
        self.dir = Path(root) / LEASES_DIR
        token = uuid.uuid4().hex
        self.path = self.dir / f"{token}.json"
        self._lock = FileLock(str(self.dir / f"{token}.lock"))
        self.digests: set[str] = set()

    def __enter__(self) -> Lease:
        self.dir.mkdir(parents=True, exist_ok=True)
        # NOTE: lock first, file second: a lease file whose lock is free is always stale.
        self._lock.acquire()
        self._write()
        return self

    def add(self, digests: Iterable[str]) -> None:
        """Adds digests; returns once the lease file on disk names them."""
        new = set(digests) - self.digests
        if new:
            self.digests |= new
            self._write()

    def release_all(self) -> None:
        """Forgets every digest (the manifest that references them now exists)."""
        if self.digests:
            self.digests = set()
            self._write()

    def add_one(self, digest: str) -> None:
        self.add((digest,))

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(self.digests)), encoding="utf-8")
        os.replace(tmp, self.path)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.path.unlink(missing_ok=True)
        self.path.with_suffix(".tmp").unlink(missing_ok=True)
        lock_file = Path(self._lock.lock_file)
        self._lock.release()
        lock_file.unlink(missing_ok=True)


def leased_digests(root: Path) -> set[str]:
    """Every digest a live lease names; removes the leases of dead processes on the way."""
    leases_dir = Path(root) / LEASES_DIR
    keep: set[str] = set()
    if not leases_dir.is_dir():
        return keep
    for lease_file in sorted(leases_dir.glob("*.json")):
        lock = FileLock(str(lease_file.with_suffix(".lock")))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            try:
                keep.update(json.loads(lease_file.read_text(encoding="utf-8")))
            except FileNotFoundError:
                pass            # finished between the listing and now
            except (OSError, ValueError):
                # NOTE: unreadable but alive: nothing to keep from it; its owner checks its
                # blobs again under the store lock before writing a manifest.
                pass
            continue
        try:
            lease_file.unlink(missing_ok=True)
            lease_file.with_suffix(".tmp").unlink(missing_ok=True)
        finally:
            lock.release()
            Path(lock.lock_file).unlink(missing_ok=True)
    return keep
