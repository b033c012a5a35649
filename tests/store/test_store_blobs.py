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


def test_import_hardlinks_on_the_same_filesystem_else_copies(tmp_path: Path) -> None:
    src = tmp_path / "model.gguf"
    src.write_bytes(DATA)
    linked_store = BlobStore(tmp_path / "a")
    info = linked_store.import_file(src)
    assert info.digest == DIGEST
    assert linked_store.path(DIGEST).stat().st_ino == src.stat().st_ino
    copied_store = BlobStore(tmp_path / "b")
    copied_store.import_file(src, link=False)
    assert copied_store.path(DIGEST).stat().st_ino != src.stat().st_ino
    assert copied_store.verify(DIGEST)
    # symlinks are followed; a known digest is checked
    link = tmp_path / "link.gguf"
    link.symlink_to(src)
    assert BlobStore(tmp_path / "c").import_file(link, digest=DIGEST).digest == DIGEST
    with pytest.raises(DigestMismatchError):
        BlobStore(tmp_path / "d").import_file(src, digest="sha256:" + "1" * 64)
    assert leftovers(BlobStore(tmp_path / "d")) == []
    with pytest.raises(ModelNotFoundError):
        linked_store.import_file(tmp_path / "missing.gguf")


def test_remove(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.write_bytes(DATA)
    assert store.remove(DIGEST) and not store.remove(DIGEST)
    assert store.digests() == []
