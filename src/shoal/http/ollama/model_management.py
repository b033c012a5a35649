"""The Ollama dialect's model-management endpoints: pull, push, create, copy, delete, blobs.

Store operations are blocking (disk, network); they run on worker threads and report
progress events (dicts shaped like Ollama's NDJSON lines) that are streamed as they come.
"""
from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from shoal.core.errors import UnknownModelError
from shoal.http.errors import HttpError, classify
from shoal.http.ollama.protocol import CopyBody, CreateBody, DeleteBody, PullBody, PushBody
from shoal.http.ollama.routes import NDJSON, read_body
from shoal.http.openapi_bodies import binary_body, json_body
from shoal.store.modelfile import Message, Modelfile, check_parameters
from shoal.store.names import parse_name

router = APIRouter(prefix="/api")

_DONE = object()


def _store(request: Request):
    store = getattr(request.app.state, "store", None)
    if store is None:
        raise HttpError(501, "this server has no model store (it serves only the --model it was started with)",
                        type="server_error")
    return store


def _line(event: dict[str, Any]) -> bytes:
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


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
    body = await read_body(request, PullBody)
    name = _model_name(body)
    store = _store(request)
    return await _progress_response(
        lambda progress: store.pull(name, progress=progress, insecure=bool(body.insecure)),
        _stream_flag(body))


@router.post("/push", openapi_extra=json_body(PushBody))
async def push(request: Request) -> Response:
    body = await read_body(request, PushBody)
    name = _model_name(body)
    store = _store(request)
    if not await asyncio.to_thread(store.exists, name):
        # NOTE: checked before the stream starts, so an unknown model is a plain 404.
        raise UnknownModelError(name)
    return await _progress_response(
        lambda progress: store.push(name, progress=progress, insecure=bool(body.insecure)),
        _stream_flag(body))


@router.post("/create", openapi_extra=json_body(CreateBody))
async def create(request: Request) -> Response:
    body = await read_body(request, CreateBody)
    name = _model_name(body)
    store = _store(request)
    modelfile, base_dir = modelfile_of(body, store)
    residency = request.app.state.residency

    async def forget_loaded() -> None:
        # NOTE: a model re-created under a loaded name must not keep serving the old files.
        await residency.unload(name)

    return await _progress_response(
        lambda progress: store.create(name, modelfile, base_dir=base_dir, progress=progress),
        _stream_flag(body), after=forget_loaded)


def modelfile_of(body: CreateBody, store) -> tuple[Any, Path]:
    """The Modelfile of either form of /api/create: the text (older clients), or — built as
    an object, so no quoting can break — the fields of current clients (`from`, `files`,
    `adapters`, `template`, `system`, `parameters`, `messages`, `license`)."""
    base_dir = Path(body.path).expanduser().parent if body.path else Path.cwd()
    if body.modelfile:
        return body.modelfile, base_dir
    if body.from_:
        base = body.from_
    elif body.files:
        if len(body.files) != 1:
            raise HttpError(400, "files: exactly one weights file is supported", param="files")
        digest = next(iter(body.files.values()))
        if not store.blobs.has(digest):
            raise HttpError(400, f"files: blob {digest} has not been uploaded", param="files")
        base = str(store.blobs.path(digest))
    else:
        raise HttpError(400, "neither 'from' nor 'files' was specified", param="from")
    adapters = []
    for digest in (body.adapters or {}).values():
        if not store.blobs.has(digest):
            raise HttpError(400, f"adapters: blob {digest} has not been uploaded", param="adapters")
        adapters.append(str(store.blobs.path(digest)))
    licenses = body.license if isinstance(body.license, list) else ([body.license] if body.license else [])
    messages = []
    for i, message in enumerate(body.messages or []):
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content", ""), str):
            raise HttpError(400, f"messages[{i}]: needs a string role and content", param="messages")
        messages.append(Message(message["role"], message.get("content", "")))
    modelfile = Modelfile(base=base, parameters=check_parameters(body.parameters or {}),
                          template=body.template, system=body.system, messages=messages,
                          adapters=adapters, licenses=list(licenses))
    return modelfile, base_dir


@router.post("/copy", openapi_extra=json_body(CopyBody))
async def copy(request: Request) -> Response:
    body = await read_body(request, CopyBody)
    if not body.source or not body.destination:
        raise HttpError(400, "source and destination are required")
    store = _store(request)
    await asyncio.to_thread(store.copy, body.source, body.destination)
    return Response(status_code=200)


@router.delete("/delete", openapi_extra=json_body(DeleteBody))
async def delete(request: Request) -> Response:
    body = await read_body(request, DeleteBody)
    name = _model_name(body)
    store = _store(request)
    residency = request.app.state.residency
    await residency.unload(name)
    await asyncio.to_thread(store.delete, name)
    return Response(status_code=200)


@router.head("/blobs/{digest}")
async def blob_exists(digest: str, request: Request) -> Response:
    store = _store(request)
    return Response(status_code=200 if store.blobs.has(digest) else 404)


@router.post("/blobs/{digest}", openapi_extra=binary_body())
async def blob_upload(digest: str, request: Request) -> Response:
    """Stores an uploaded file under its digest (the client sends it before /api/create).

    Streamed to a temporary file (a GGUF upload can be gigabytes; the body limit does not
    apply to this path), then imported with its digest checked.
    """
    store = _store(request)
    if store.blobs.has(digest):
        return Response(status_code=200)
    # NOTE: an upload can be a new store's first write (before any pull or create made its root)
    store.blobs.root.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".upload-", dir=store.blobs.root)
    tmp = Path(tmp_name)
    try:
        with open(fd, "wb") as out:
            async for chunk in request.stream():
                out.write(chunk)
        await asyncio.to_thread(store.blobs.import_file, tmp, digest=digest, link=False)
    finally:
        tmp.unlink(missing_ok=True)
    return Response(status_code=201)
