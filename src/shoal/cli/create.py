"""The local half of `shoal create`: each FROM / ADAPTER of the Modelfile that names a file or
directory on this machine is read here and uploaded (POST /api/blobs/<digest>, skipped when the
server has the blob), not sent as a path for the server to open.

So the server reads nothing of its own disk for the create: it may run elsewhere, keep
SHOAL_ALLOW_LOCAL_PATHS=0, or refuse paths to a key that is not an admin's. The Modelfile's
text goes as written, with `uploads` mapping each of those values to its uploaded files, so the
server's errors still point at the Modelfile's lines. Reading here is the user's own business:
symlinks are followed (a Hugging Face cache snapshot is all symlinks).
"""
from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shoal.cli.client import CliError, Client
from shoal.store.blobs import file_chunks
from shoal.store.create import expand_path, looks_like_path
from shoal.store.errors import ModelfileError
from shoal.store.hf_files import (ADAPTER_FILE_NAMES, is_safe_title, module_folders,
                                  select_model_files)
from shoal.store.modelfile import Modelfile, parse_modelfile

_CHUNK = 1 << 20
PEFT_WEIGHTS, PEFT_CONFIG = ADAPTER_FILE_NAMES


def create_events(client: Client, model: str, text: str, base_dir: Path,
                  extra: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """The progress events of uploading the Modelfile's local files, then of the create."""
    try:
        plan = local_files(parse_modelfile(text), base_dir)
    except ModelfileError as exc:
        raise CliError(str(exc)) from None
    uploads: dict[str, dict[str, str]] = {}
    if plan:
        yield {"status": "gathering model components"}
    for value, files in plan.items():
        uploads[value] = {}
        for name, path in files.items():
            uploads[value][name] = yield from upload(client, path)
    body: dict[str, Any] = {"model": model, "modelfile": text, "stream": True, **(extra or {})}
    if uploads:
        body["uploads"] = uploads
    with client.stream("POST", "/api/create", body) as events:
        yield from events


def local_files(modelfile: Modelfile, base_dir: Path) -> dict[str, dict[str, Path]]:
    """FROM / ADAPTER value -> the files on this machine that stand for it, by the names the
    server sees them under. Values that are model names or `@sha256:` digests are not here."""
    entries = [("FROM", modelfile.base or "", modelfile.base_position, False)]
    positions = modelfile.adapter_positions or [modelfile.base_position] * len(modelfile.adapters)
    entries += [("ADAPTER", value, position, True)
                for value, position in zip(modelfile.adapters, positions)]
    plan: dict[str, dict[str, Path]] = {}
    for keyword, value, position, adapter in entries:
        if not value or value.startswith("@") or value in plan:
            continue
        path = expand_path(value, base_dir)
        if not path.exists():
            if adapter or looks_like_path(value):
                raise ModelfileError(f"{keyword} {value!r}: no such file or directory ({path})",
                                     *position)
            continue        # a model name: the server looks it up (or pulls it)
        files = adapter_files(path) if adapter else model_files(path)
        if not files:
            problem = (f"not a PEFT adapter directory: it has no {PEFT_WEIGHTS}" if adapter else
                       "not a model directory (it needs config.json and *.safetensors files)")
            raise ModelfileError(f"{keyword} {value!r}: {problem}", *position)
        plan[value] = files
    return plan


def model_files(path: Path) -> dict[str, Path]:
    if path.is_dir():
        names = [p.name for p in path.iterdir() if p.is_file()]
        files = {name: path / name for name in select_model_files(names)}
        if files and "modules.json" in files:
            # sentence-transformers: each module's config.json, sent under the store's flat name
            for folder in module_folders(files["modules.json"].read_bytes()):
                if (path / folder / "config.json").is_file():
                    files[f"{folder}.config.json"] = path / folder / "config.json"
        return files
    return {path.name if is_safe_title(path.name) else "model.gguf": path}


def adapter_files(path: Path) -> dict[str, Path]:
    """A PEFT directory's two files; or one file (a GGUF, or a safetensors file with the
    adapter_config.json beside it, sent as a PEFT directory)."""
    if path.is_dir():
        return {name: path / name for name in ADAPTER_FILE_NAMES if (path / name).is_file()}
    config = path.parent / PEFT_CONFIG
    if _magic(path) != b"GGUF" and config.is_file() and path.name != PEFT_CONFIG:
        return {PEFT_WEIGHTS: path, PEFT_CONFIG: config}
    return {path.name if is_safe_title(path.name) else PEFT_WEIGHTS: path}


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError:
        return b""


def _digest(path: Path) -> tuple[str, int]:
    hasher = hashlib.sha256()
    size = 0
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                hasher.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    return "sha256:" + hasher.hexdigest(), size


def upload(client: Client, path: Path) -> Iterator[dict[str, Any]]:
    """Uploads `path` unless the server has its blob; yields progress; returns the digest."""
    digest, size = _digest(path)
    event = {"status": f"copying file {path.name}", "digest": digest, "total": size}
    if client.has_blob(digest):
        yield {**event, "completed": size}
        return digest
    sent: queue.Queue[int | None] = queue.Queue()
    failure: list[BaseException] = []

    def chunks() -> Iterator[bytes]:
        return file_chunks(path, sent.put)

    def send() -> None:
        try:
            client.upload_blob(digest, chunks(), size)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, on the caller's thread
            failure.append(exc)
        finally:
            sent.put(None)

    # NOTE: the upload runs on a thread so its byte counts can be yielded as they happen.
    worker = threading.Thread(target=send, name="shoal-upload", daemon=True)
    worker.start()
    yield {**event, "completed": 0}
    while (done := sent.get()) is not None:
        yield {**event, "completed": done}
    worker.join()
    if failure:
        if isinstance(failure[0], OSError):
            raise CliError(f"cannot read {path}: {failure[0].strerror or failure[0]}")
        raise failure[0]
    yield {**event, "completed": size}
    return digest
