"""Blobs: atomic, verified writes; resumable downloads (also after kill -9); concurrent writers."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from shoal.core.errors import InvalidParameterError, ModelNotFoundError
from shoal.store.blobs import BlobStore, blob_filename, normalize_digest
from shoal.store.errors import DigestMismatchError, PullError

DATA = bytes(range(256)) * 4096 + b"tail"          # ~1 MiB, not a multiple of the chunk
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


def chunks_from(data: bytes, offset: int, size: int = 65536):
    for i in range(offset, len(data), size):
        yield data[i:i + size]


class CountingSource:
    """A fake registry: serves DATA from an offset, counts what it sent, can fail mid-way."""

    def __init__(self, data: bytes = DATA, fail_after: int | None = None, delay: float = 0.0):
        self.data, self.fail_after, self.delay = data, fail_after, delay
        self.sent = 0
        self.offsets: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, offset: int):
        with self.lock:
            self.offsets.append(offset)
        for chunk in chunks_from(self.data, offset):
            if self.fail_after is not None and self.sent + len(chunk) > self.fail_after:
                raise ConnectionError("network went away")
            if self.delay:
                time.sleep(self.delay)
            with self.lock:
                self.sent += len(chunk)
            yield chunk


def leftovers(store: BlobStore) -> list[str]:
    return sorted(p.name for p in store.dir.iterdir()) if store.dir.exists() else []


def test_digest_forms() -> None:
    hexd = "ab" * 32
    assert normalize_digest(f"sha256:{hexd}") == normalize_digest(f"sha256-{hexd}") == f"sha256:{hexd}"
    assert blob_filename(f"sha256:{hexd}") == f"sha256-{hexd}"
    for bad in ("sha256:" + "AB" * 32, "sha256:abc", "md5:" + hexd, "", None):
        with pytest.raises(InvalidParameterError):
            normalize_digest(bad)  # type: ignore[arg-type]


def test_write_is_atomic_and_content_addressed(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    info = store.write_stream(chunks_from(DATA, 0))
    assert info.digest == DIGEST and info.size == len(DATA)
    assert store.path(DIGEST).read_bytes() == DATA
    assert leftovers(store) == [blob_filename(DIGEST)]       # no temp files
    assert store.digests() == [DIGEST] and store.verify(DIGEST)
    assert b"".join(store.open_range(DIGEST, 1000)) == DATA[1000:]
    again = store.write_bytes(DATA)                            # idempotent
    assert again == info and leftovers(store) == [blob_filename(DIGEST)]


def test_wrong_digest_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(DigestMismatchError) as info:
        store.write_stream(chunks_from(DATA, 0), digest=wrong)
    assert info.value.actual == DIGEST
    assert leftovers(store) == []
    # a download whose bytes do not match drops its partial too (resuming cannot fix it)
    with pytest.raises(DigestMismatchError):
        store.download(wrong, CountingSource(), size=len(DATA))
    assert leftovers(store) == [] and not store.has(wrong)
    # more bytes than the promised size: stopped early, nothing kept
    with pytest.raises(DigestMismatchError):
        store.download(DIGEST, CountingSource(), size=len(DATA) - 10)
    assert leftovers(store) == []


def test_failing_stream_leaves_nothing(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)

    def broken():
        yield DATA[:1000]
        raise OSError("disk on fire")

    with pytest.raises(OSError):
        store.write_stream(broken())
    assert leftovers(store) == []


def test_interrupted_download_resumes_from_partial(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    first = CountingSource(fail_after=300_000)
    with pytest.raises(ConnectionError):
        store.download(DIGEST, first, size=len(DATA))
    assert not store.has(DIGEST)
    kept = store.partial_size(DIGEST)
    assert kept == first.sent and 0 < kept <= 300_000
    assert store.partial_path(DIGEST).read_bytes() == DATA[:kept]

    second = CountingSource()
    seen = []
    path = store.download(DIGEST, second, size=len(DATA),
                          progress=lambda done, total: seen.append((done, total)))
    assert second.offsets == [kept]                     # asked only for the rest
    assert second.sent == len(DATA) - kept              # and got only the rest
    assert path.read_bytes() == DATA
    assert seen[0] == (kept, len(DATA)) and seen[-1] == (len(DATA), len(DATA))
    assert not store.partial_path(DIGEST).exists()
    # already there: nothing fetched at all
    third = CountingSource()
    store.download(DIGEST, third, size=len(DATA))
    assert third.offsets == [] and third.sent == 0


def test_short_source_keeps_partial_for_resume(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    truncated = CountingSource(data=DATA[:5000])
    with pytest.raises(PullError, match="ended after 5000"):
        store.download(DIGEST, truncated, size=len(DATA))
    assert store.partial_size(DIGEST) == 5000
    source = CountingSource()
    store.download(DIGEST, source, size=len(DATA))
    assert source.offsets == [5000] and store.verify(DIGEST)


def test_corrupt_partial_is_dropped_then_download_succeeds(tmp_path: Path) -> None:
    """A partial with garbage (as after a power cut) fails verification once, never lands."""
    store = BlobStore(tmp_path)
    store.dir.mkdir(parents=True)
    store.partial_path(DIGEST).write_bytes(b"\0" * 4096)
    with pytest.raises(DigestMismatchError):
        store.download(DIGEST, CountingSource(), size=len(DATA))
    assert not store.has(DIGEST) and store.partial_size(DIGEST) == 0
    store.download(DIGEST, CountingSource(), size=len(DATA))
    assert store.verify(DIGEST)


_KILLED_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from shoal.store.blobs import BlobStore
    root, digest, data_path, marker = sys.argv[1:5]
    data = Path(data_path).read_bytes()

    def fetch(offset):
        sent = 0
        for i in range(offset, len(data), 65536):
            yield data[i:i + 65536]
            sent += 65536
            if sent >= 262144:
                Path(marker).write_text(str(sent))
                time.sleep(600)              # killed here, mid-stream

    BlobStore(root).download(digest, fetch, size=len(data))
""")


def test_kill_9_mid_download_leaves_no_blob_and_resumes(tmp_path: Path) -> None:
    root, data_file, marker = tmp_path / "store", tmp_path / "data.bin", tmp_path / "marker"
    data_file.write_bytes(DATA)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(root), DIGEST,
                             str(data_file), str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "writer exited early"
            assert time.monotonic() < deadline, "writer never got going"
            time.sleep(0.05)
        time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    store = BlobStore(root)
    assert not store.has(DIGEST)                       # no blob, so none can be corrupt
    kept = store.partial_size(DIGEST)
    assert kept >= 262144
    source = CountingSource()
    store.download(DIGEST, source, size=len(DATA))     # the dead writer's lock is free
    assert source.offsets == [kept] and source.sent == len(DATA) - kept
    assert store.verify(DIGEST)
    assert store.path(DIGEST).read_bytes() == DATA


def test_two_threads_download_the_same_blob(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    source = CountingSource(delay=0.002)
    results, errors = [], []

    def pull() -> None:
        try:
            results.append(store.download(DIGEST, source, size=len(DATA)))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(results) == 2
    assert store.verify(DIGEST)
    assert source.sent == len(DATA)                    # the second waited, then found it


_PROCESS_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from shoal.store.blobs import BlobStore
    root, digest, data_path = sys.argv[1:4]
    data = Path(data_path).read_bytes()

    def fetch(offset):
        for i in range(offset, len(data), 65536):
            time.sleep(0.002)
            yield data[i:i + 65536]

    BlobStore(root).download(digest, fetch, size=len(data))
    print("ok")
""")


def test_two_processes_download_the_same_blob(tmp_path: Path) -> None:
    root, data_file = tmp_path / "store", tmp_path / "data.bin"
    data_file.write_bytes(DATA)
    procs = [subprocess.Popen([sys.executable, "-c", _PROCESS_WRITER, str(root), DIGEST,
                               str(data_file)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outputs == ["ok\n", "ok\n"]
    store = BlobStore(root)
    assert store.verify(DIGEST) and store.partial_size(DIGEST) == 0
    assert leftovers(store) == [blob_filename(DIGEST)]


def test_two_threads_write_the_same_content(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    barrier = threading.Barrier(4)
    infos, errors = [], []

    def write() -> None:
        try:
            barrier.wait()
            infos.append(store.write_stream(chunks_from(DATA, 0, 4096)))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and {i.digest for i in infos} == {DIGEST}
    assert store.verify(DIGEST) and leftovers(store) == [blob_filename(DIGEST)]


def test_imports_are_private_read_only_copies(tmp_path: Path) -> None:
    """An imported file is copied, never hard-linked: editing the original in place later
    cannot change the blob other models (and pulls) trust. Blobs are read-only."""
    src = tmp_path / "model.gguf"
    src.write_bytes(DATA)
    store = BlobStore(tmp_path / "a")
    info = store.import_file(src)
    blob = store.path(DIGEST)
    assert info.digest == DIGEST
    assert blob.stat().st_ino != src.stat().st_ino and blob.stat().st_nlink == 1
    assert blob.stat().st_mode & 0o777 == 0o444
    with open(src, "r+b") as f:                       # the owner of the file edits it in place
        f.write(b"EVIL")
    assert blob.read_bytes() == DATA and store.verify(DIGEST)
    assert store.write_bytes(b"small").size == 5
    assert all(p.stat().st_mode & 0o777 == 0o444 for p in store.dir.iterdir())
    # symlinks are followed (a download cache's); a known digest is checked
    link = tmp_path / "link.gguf"
    link.symlink_to(tmp_path / "copy.gguf")
    (tmp_path / "copy.gguf").write_bytes(DATA)
    assert BlobStore(tmp_path / "c").import_file(link, digest=DIGEST).digest == DIGEST
    with pytest.raises(DigestMismatchError) as info_:
        BlobStore(tmp_path / "d").import_file(src, digest="sha256:" + "1" * 64)
    assert str(tmp_path) not in str(info_.value)     # digests only, no paths
    assert leftovers(BlobStore(tmp_path / "d")) == []
    with pytest.raises(ModelNotFoundError):
        store.import_file(tmp_path / "missing.gguf")
    assert store.remove(DIGEST) and not blob.exists()  # read-only blobs still go


def test_a_changed_blob_is_not_trusted_and_is_replaced(tmp_path: Path) -> None:
    """A blob whose bytes changed on disk (same size) is not taken as present by a download:
    the bytes are fetched again and replace it."""
    store = BlobStore(tmp_path)
    store.download(DIGEST, CountingSource(), size=len(DATA))
    blob = store.path(DIGEST)
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.write(b"EVIL")
    assert store.claim_verified(DIGEST, None) is None
    source = CountingSource()
    store.download(DIGEST, source, size=len(DATA))
    assert source.sent == len(DATA)                    # fetched again
    assert blob.read_bytes() == DATA and blob.stat().st_mode & 0o777 == 0o444


def test_a_verified_blob_is_hashed_once(tmp_path: Path) -> None:
    """Stamped when written; an unstamped (older store's) blob is hashed once, then trusted
    while its file is unchanged; a chmod or write makes the next claim hash it again."""
    store = BlobStore(tmp_path)
    store.write_bytes(DATA)
    hashed: list[int] = []
    assert store.claim_verified(DIGEST, None, lambda done, total: hashed.append(done)) == len(DATA)
    assert hashed == []
    for stamp in store.verified_dir.iterdir():         # as a store written by an older shoal
        stamp.unlink()
    assert store.claim_verified(DIGEST, None, lambda done, total: hashed.append(done)) == len(DATA)
    assert hashed[-1] == len(DATA)
    hashed.clear()
    assert store.claim_verified(DIGEST, None, lambda done, total: hashed.append(done)) == len(DATA)
    assert hashed == []
    os.chmod(store.path(DIGEST), 0o644)
    assert store.claim_verified(DIGEST, None, lambda done, total: hashed.append(done)) == len(DATA)
    assert hashed[-1] == len(DATA)


def test_a_hard_linked_blob_becomes_a_private_copy(tmp_path: Path) -> None:
    """A blob an older shoal hard-linked from a user's file shares its inode: claiming it
    replaces it with a copy the store alone owns."""
    store = BlobStore(tmp_path / "store")
    user_file = tmp_path / "model.gguf"
    user_file.write_bytes(DATA)
    store.dir.mkdir(parents=True)
    os.link(user_file, store.path(DIGEST))
    assert store.claim_verified(DIGEST, None) == len(DATA)
    assert store.path(DIGEST).stat().st_ino != user_file.stat().st_ino
    assert store.path(DIGEST).stat().st_nlink == 1 and user_file.stat().st_nlink == 1
    user_file.write_bytes(b"X" * len(DATA))
    assert store.verify(DIGEST) and store.is_verified(DIGEST)


_KILLED_UPLOAD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from shoal.store.blobs import BlobStore
    writer = BlobStore(sys.argv[1]).writer()
    writer.write(b"x" * 100000)
    writer.scratch.file.flush()
    Path(sys.argv[2]).write_text("writing")
    time.sleep(600)                          # killed here, mid-upload
""")


def test_scratch_files_of_killed_writers_are_removed_live_ones_kept(tmp_path: Path,
                                                                    monkeypatch) -> None:
    root, marker = tmp_path / "store", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_UPLOAD, str(root), str(marker)])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        store = BlobStore(root)
        live = store.writer()                           # this process's, in progress
        monkeypatch.setattr("shoal.core.scratch.GRACE_SECONDS", 0.0)
        assert store.remove_abandoned_scratch() == []   # the other writer is alive too
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    dead = [p for p in store.dir.iterdir() if p != live.scratch.path]
    assert len(dead) == 1 and dead[0].name.startswith(".tmp-")
    assert store.remove_abandoned_scratch() == dead
    assert leftovers(store) == [live.scratch.path.name]
    live.write(DATA)
    assert live.commit(DIGEST).digest == DIGEST and store.verify(DIGEST)


def test_remove(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.write_bytes(DATA)
    assert store.remove(DIGEST) and not store.remove(DIGEST)
    assert store.digests() == []
