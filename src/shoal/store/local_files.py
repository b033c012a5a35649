"""Reading a create's FROM / ADAPTER paths on the server's own disk, narrowly.

What a caller names is copied into the store (and a push sends it anywhere), so:

* a named file (a GGUF, an adapter) must be a regular file; a symlink to it is followed (the
  caller named it), a FIFO or device is never opened for reading (it could block or act);
* of a named directory only the file names a model format needs are read (hf_files), and each
  must be a regular file of that directory itself: not a symlink (it could point anywhere,
  `/proc/self/environ` included), not one of several hard links to a file elsewhere, not a
  device or FIFO. Such a file fails the create; it is never skipped silently.

Each file is opened once (relative to the opened directory, O_NOFOLLOW) and read through that
descriptor, so swapping it after the check changes nothing.
"""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


class LocalFileError(Exception):
    """A path the server will not read; the message says why (for admins and logs only)."""


def _describe(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "no such file or directory"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or type(exc).__name__


def open_file(path: Path) -> BinaryIO:
    """The named file, opened for reading: a regular file (symlinks to it followed)."""
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK | _CLOEXEC)
    except OSError as exc:
        raise LocalFileError(_describe(exc)) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise LocalFileError("not a regular file")
    return os.fdopen(fd, "rb")


def open_directory(directory: Path, select: Callable[[list[str]], list[str]]) -> dict[str, BinaryIO]:
    """The files `select` keeps of the directory's entry names, each opened for reading;
    LocalFileError when one of them is not a plain file of the directory itself."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    except OSError as exc:
        raise LocalFileError(_describe(exc)) from None
    opened: dict[str, BinaryIO] = {}
    try:
        for name in select(os.listdir(dir_fd)):
            opened[name] = _open_member(dir_fd, name)
    except BaseException:
        for file in opened.values():
            file.close()
        raise
    finally:
        os.close(dir_fd)
    return opened


def _open_member(dir_fd: int, name: str) -> BinaryIO:
    hint = ("; copy the files into a directory of their own (or run `shoal create` on the "
            "machine that has them: it uploads them)")
    try:
        # NOTE: lstat first, so a FIFO or device is refused without being opened.
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        raise LocalFileError(f"{name}: {_describe(exc)}") from None
    if stat.S_ISLNK(st.st_mode):
        raise LocalFileError(f"{name} is a symbolic link; model directories may hold only "
                             f"regular files{hint}")
    if not stat.S_ISREG(st.st_mode):
        raise LocalFileError(f"{name} is not a regular file")
    try:
        fd = os.open(name, os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):
            raise LocalFileError(f"{name} is a symbolic link; model directories may hold only "
                                 f"regular files{hint}") from None
        raise LocalFileError(f"{name}: {_describe(exc)}") from None
    opened = os.fstat(fd)
    if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise LocalFileError(f"{name} changed while it was being read")
    if opened.st_nlink > 1:
        os.close(fd)
        raise LocalFileError(f"{name} has other hard links (it may be a file from elsewhere)"
                             f"{hint}")
    return os.fdopen(fd, "rb")
