"""Scratch files and folders a process owns while it works on them, and the removal of the
ones a killed process left behind.

The owner holds an advisory lock (flock) on the file or folder for as long as it uses it; the
kernel drops the lock when the process dies, however it dies (`kill -9` included). So a scratch
entry whose lock can be taken belongs to nobody and may be removed, while one a live process
works on is never touched, however old it is (a slow upload). Where flock is missing, only
entries older than a day count as abandoned.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:             # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

# NOTE: an entry this young may be one whose owner has created it and not locked it yet.
GRACE_SECONDS = 2.0
_UNLOCKED_AGE_SECONDS = 24 * 3600


def hold(fd: int) -> None:
    """Marks the open file or folder `fd` as in use until it is closed (or the process dies)."""
    if fcntl is not None:
        # NOTE: blocking: a cleaner testing the lock holds it only for an instant.
        fcntl.flock(fd, fcntl.LOCK_EX)


def is_abandoned(path: Path, now: float | None = None) -> bool:
    """True for a scratch entry no live process holds (and not created a moment ago)."""
    try:
        st = path.lstat()
    except OSError:
        return False
    age = (time.time() if now is None else now) - st.st_mtime
    if age < GRACE_SECONDS:
        return False
    if fcntl is None:
        return age > _UNLOCKED_AGE_SECONDS
    if stat.S_ISLNK(st.st_mode):
        return True             # never made by an owner: nothing to wait for
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False            # cannot tell: keep it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False            # held by its owner
    finally:
        os.close(fd)            # (drops the lock just taken)
    return True


def remove_abandoned(folder: Path, pattern: str) -> list[Path]:
    """Removes the entries of `folder` matching `pattern` that no live process holds."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for entry in sorted(folder.glob(pattern)):
        if not is_abandoned(entry, now):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                _make_writable(entry)
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
        except OSError:
            continue
        removed.append(entry)
    return removed


def _make_writable(folder: Path) -> None:
    # NOTE: removing a file needs its folder writable, not the file: only folders matter here.
    for sub, dirs, _files in os.walk(folder):
        for name in dirs:
            try:
                os.chmod(os.path.join(sub, name), 0o700)
            except OSError:
                pass


class ScratchFile:
    """A new file `<prefix><random>` in `folder` (mode 0600), held until `close()`."""

    def __init__(self, folder: Path, prefix: str = ".tmp-") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{prefix}{uuid.uuid4().hex}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     0o600)
        hold(fd)
        self.file: BinaryIO = os.fdopen(fd, "w+b")

    def close(self) -> None:
        """Releases it; the file stays unless the caller moved or removed it."""
        if not self.file.closed:
            self.file.close()

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.close()


@contextmanager
def scratch_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A new private folder in `parent`, held while the block runs, removed after it."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    fd = os.open(path, os.O_RDONLY)
    try:
        hold(fd)
        yield path
    finally:
        try:
            _make_writable(path)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
