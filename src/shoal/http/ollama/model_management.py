"""The Ollama dialect's model-management endpoints: pull, push, create, copy, delete, blobs.

Store operations are blocking (disk, network); they run on worker threads and report
progress events (dicts shaped like Ollama's NDJSON lines) that are streamed as they come.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from shoal.access.principal import current_principal
from shoal.core.echo import clip
from shoal.core.errors import InvalidParameterError, UnknownModelError
from shoal.http.errors import HttpError, classify
from shoal.http.json_lines import json_line
from shoal.http.ollama.protocol import CopyBody, CreateBody, DeleteBody, PullBody, PushBody
from shoal.http.ollama.routes import NDJSON
from shoal.http.openapi_bodies import binary_body, json_body
from shoal.http.request_body import body_as
from shoal.store.blobs import is_digest, normalize_digest
from shoal.store.create import LocalPaths
from shoal.store.errors import DigestMismatchError
from shoal.store.modelfile import Message, Modelfile, check_parameters
from shoal.store.names import check_name_size, parse_name

router = APIRouter(prefix="/api")

_DONE = object()
# the `uploads` keys the object form of /api/create gives Ollama's `files` and `adapters`
FILES_KEY = "files"
ADAPTERS_KEY = "adapters"


def _store(request: Request):
    store = getattr(request.app.state, "store", None)
    if store is None:
        raise HttpError(501, "this server has no model store (it serves only the --model it was started with)",
                        type="server_error")
    return store


def _line(event: dict[str, Any]) -> bytes:
    return json_line(event).encode() + b"\n"


async def _progress_response(work: Callable[[Callable[[dict], None]], Any], stream: bool,
                             after: Callable[[], Any] | None = None) -> Response:
    """Runs `work(progress)` on a thread; streams its events as NDJSON, or answers once."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def progress(event: dict) -> None:
        if event.get("status") == "success":
            return      # said once, below, after `after` ran
        loop.call_soon_threadsafe(queue.put_nowait, dict(event))

    async def run() -> None:
        try:
            await asyncio.to_thread(work, progress)
            if after is not None:
                result = after()
                if asyncio.iscoroutine(result):
                    await result
            queue.put_nowait({"status": "success"})
        except Exception as exc:  # noqa: BLE001 - reported to the client
            queue.put_nowait(exc)
        queue.put_nowait(_DONE)

    task = asyncio.ensure_future(run())
    if not stream:
        events = []
        while (item := await queue.get()) is not _DONE:
            if isinstance(item, Exception):
                raise item
            events.append(item)
        return JSONResponse(events[-1] if events else {"status": "success"})

    async def lines() -> AsyncIterator[bytes]:
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, Exception):
                    error = classify(item)
                    yield _line({"error": error.ollama_message or error.message})
                else:
                    yield _line(item)
        finally:
            # NOTE: a client that leaves does not cancel a pull half-way: the blob download
            # finishes (or stays resumable) on its thread; only the reporting stops.
            if not task.done():
                task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    return StreamingResponse(lines(), media_type=NDJSON)


def _model_name(body: Any) -> str:
    """The request's model (`model`, or the older `name`); 400 when neither is given."""
    name = body.model or body.name
    if not name:
        raise HttpError(400, "model is required", param="model")
    parse_name(name)     # a bad name is a 400 before any progress is streamed, as in Ollama
    return name


def _stream_flag(body: Any) -> bool:
    return body.stream is not False


@router.post("/pull", openapi_extra=json_body(PullBody))
async def pull(request: Request) -> Response:
    body = await body_as(request, PullBody)
    name = _model_name(body)
    store = _store(request)
    # NOTE: a refused registry host is a plain 400 before any progress is streamed.
    await asyncio.to_thread(store.check_destination, name, bool(body.insecure))
    return await _progress_response(
        lambda progress: store.pull(name, progress=progress, insecure=bool(body.insecure)),
        _stream_flag(body))


@router.post("/push", openapi_extra=json_body(PushBody))
async def push(request: Request) -> Response:
    body = await body_as(request, PushBody)
    name = _model_name(body)
    store = _store(request)
    if not await asyncio.to_thread(store.exists, name):
        # NOTE: checked before the stream starts, so an unknown model is a plain 404.
        raise UnknownModelError(name)
    await asyncio.to_thread(store.check_destination, name, bool(body.insecure))
    return await _progress_response(
        lambda progress: store.push(name, progress=progress, insecure=bool(body.insecure)),
        _stream_flag(body))


@router.post("/create", openapi_extra=json_body(CreateBody))
async def create(request: Request) -> Response:
    body = await body_as(request, CreateBody)
    name = _model_name(body)
    store = _store(request)
    modelfile, base_dir, uploads = modelfile_of(body, store)
    paths = local_paths_policy(request)
    residency = request.app.state.residency

    async def forget_loaded() -> None:
        # NOTE: a model re-created under a loaded name must not keep serving the old files.
        await residency.unload(name)

    return await _progress_response(
        lambda progress: store.create(name, modelfile, base_dir=base_dir, progress=progress,
                                      paths=paths, uploads=uploads),
        _stream_flag(body), after=forget_loaded)


def local_paths_policy(request: Request) -> LocalPaths:
    """FROM / ADAPTER paths on the server's disk: off with SHOAL_ALLOW_LOCAL_PATHS=0; with keys
    required, for admin keys only (on loopback too). Only admins learn why a path failed: to
    anyone else every path problem reads the same (which files exist is not theirs to learn)."""
    settings = request.app.state.settings
    principal = current_principal.get()
    refusal = None
    if not settings.allow_local_paths:
        refusal = ("this server does not read model files from its own disk "
                   "(SHOAL_ALLOW_LOCAL_PATHS=0); upload them (POST /api/blobs/<digest>) and name "
                   "them in 'files', as `shoal create` does")
    elif getattr(request.app.state.authenticator, "required", False) and not principal.admin:
        refusal = ("reading model files from the server's disk needs an admin key; upload them "
                   "(POST /api/blobs/<digest>) and name them in 'files', as `shoal create` does")
    return LocalPaths(refusal=refusal, detailed=principal.admin)


def _uploaded(store, field: str, files: dict[str, str]) -> dict[str, str]:
    """`files` (file name -> digest) with each digest checked and present; else 400."""
    checked = {}
    for file_name, digest in files.items():
        if not is_digest(digest):
            raise HttpError(400, f"{field}: {clip(file_name)!r}: not a sha256 digest", param=field)
        digest = normalize_digest(digest)
        if not store.blobs.has(digest):
            raise HttpError(400, f"{field}: blob {digest} has not been uploaded", param=field)
        checked[file_name] = digest
    return checked


def modelfile_of(body: CreateBody, store) -> tuple[Any, Path, dict[str, dict[str, str]]]:
    """The Modelfile of either form of /api/create, its folder, and the uploaded files that
    stand for its FROM / ADAPTER values: the text (older clients; `uploads` maps a value as
    written to uploaded files, as `shoal create` sends a local model), or, built as an object
    so no quoting can break, the fields of current clients (`from`, `files`, `adapters`,
    `template`, `system`, `parameters`, `messages`, `license`)."""
    base_dir = Path(body.path).expanduser().parent if body.path else Path.cwd()
    uploads = {value: _uploaded(store, "uploads", files)
               for value, files in (body.uploads or {}).items()}
    if body.modelfile:
        return body.modelfile, base_dir, uploads
    if body.from_:
        base = body.from_
    elif body.files:
        base = FILES_KEY
        uploads[FILES_KEY] = _uploaded(store, "files", body.files)
    else:
        raise HttpError(400, "neither 'from' nor 'files' was specified", param="from")
    adapters = []
    if body.adapters:
        # NOTE: as in Ollama, the files of `adapters` make one adapter (a PEFT directory's
        # two files, or one GGUF).
        adapters.append(ADAPTERS_KEY)
        uploads[ADAPTERS_KEY] = _uploaded(store, "adapters", body.adapters)
    licenses = body.license if isinstance(body.license, list) else ([body.license] if body.license else [])
    messages = []
    for i, message in enumerate(body.messages or []):
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content", ""), str):
            raise HttpError(400, f"messages[{i}]: needs a string role and content", param="messages")
        messages.append(Message(message["role"], message.get("content", "")))
    modelfile = Modelfile(base=base, parameters=check_parameters(body.parameters or {}),
                          template=body.template, system=body.system, messages=messages,
                          adapters=adapters, licenses=list(licenses))
    return modelfile, base_dir, uploads


@router.post("/copy", openapi_extra=json_body(CopyBody))
async def copy(request: Request) -> Response:
    body = await body_as(request, CopyBody)
    if not body.source or not body.destination:
        raise HttpError(400, "source and destination are required")
    check_name_size(body.source, "source")
    check_name_size(body.destination, "destination")
    store = _store(request)
    await asyncio.to_thread(store.copy, body.source, body.destination)
    return Response(status_code=200)


@router.delete("/delete", openapi_extra=json_body(DeleteBody))
async def delete(request: Request) -> Response:
    body = await body_as(request, DeleteBody)
    name = _model_name(body)
    store = _store(request)
    residency = request.app.state.residency
    await asyncio.to_thread(store.delete, name)
    # NOTE: only once the delete succeeded: a name that is not stored (404) unloads nothing.
    await residency.unload(name)
    return Response(status_code=200)


@router.head("/blobs/{digest}")
async def blob_exists(digest: str, request: Request) -> Response:
    store = _store(request)
    return Response(status_code=200 if store.blobs.has(digest) else 404)


@router.post("/blobs/{digest}", openapi_extra=binary_body())
async def blob_upload(digest: str, request: Request) -> Response:
    """Stores an uploaded file under its digest (the client sends it before /api/create).

    Streamed into a scratch file in the store (a GGUF upload can be gigabytes; the body limit
    does not apply to this path, SHOAL_MAX_BLOB_BYTES does: 413, checked as the bytes arrive,
    whatever Content-Length said), hashed as it arrives, kept only if it hashes to `digest`
    (else 400 "digest mismatch").
    """
    store = _store(request)
    try:
        digest = normalize_digest(digest)
    except InvalidParameterError as exc:
        raise HttpError(400, exc.message, param="digest") from None
    if store.blobs.has(digest):
        return Response(status_code=200)
    limit = request.app.state.settings.max_blob_bytes
    too_large = HttpError(413, f"the blob is larger than this server's limit of {limit} bytes "
                               "(SHOAL_MAX_BLOB_BYTES)", code="blob_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    with store.blobs.writer() as writer:
        async for chunk in request.stream():
            if writer.size + len(chunk) > limit:
                raise too_large
            writer.write(chunk)
        try:
            await asyncio.to_thread(writer.commit, digest)
        except DigestMismatchError:
            raise HttpError(400, "digest mismatch", param="digest", code="digest_mismatch") from None
    return Response(status_code=201)
