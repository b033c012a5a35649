"""benchmarks/lean_http.py, the benchmarks' low-CPU HTTP client: answers read whole however the
server frames them, server-sent events split where SSE splits them, errors raised, against a
real shoal server and a loopback server that cuts its bytes at awkward places."""
from __future__ import annotations

import asyncio
import itertools

import orjson
import pytest
from benchmark_scripts import load_benchmark

lean_http = load_benchmark("lean_http.py", "lean_http")


def test_streamed_completion_from_shoal_arrives_event_by_event(shoal_server) -> None:
    events: list[bytes] = []
    stamps: list[float] = []

    def on_event(event: bytes, arrived: float) -> None:
        events.append(event)
        stamps.append(arrived)

    body = orjson.dumps({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 12,
                         "temperature": 0, "ignore_eos": True, "stream": True,
                         "stream_options": {"include_usage": True}})
    asyncio.run(lean_http.post_events(shoal_server.url, "/v1/completions", body, on_event))
    assert events[-1] == b"data: [DONE]"
    payloads = [orjson.loads(e[6:]) for e in events[:-1]]
    texts = [p["choices"][0]["text"] for p in payloads if p.get("choices")]
    assert sum(1 for t in texts if t) >= 10          # one event per token (a few may be empty)
    assert payloads[-1]["usage"]["completion_tokens"] == 12
    assert stamps == sorted(stamps)


def test_embeddings_answers_are_read_whole_and_errors_raise(shoal_server) -> None:
    async def go() -> tuple[bytes, str]:
        async with lean_http.LeanClient(shoal_server.url, 2) as http:
            ok = http.send(http.request("/v1/embeddings", orjson.dumps(
                {"model": "smollm2", "input": ["one", "two", "three"]})))
            bad = http.send(http.request("/v1/embeddings", b'{"model": "smollm2"}'))
            answer, failure = await asyncio.gather(ok, bad, return_exceptions=True)
            # the connection that carried the 4xx still serves the next request
            again = await http.send(http.request("/v1/embeddings", orjson.dumps(
                {"model": "smollm2", "input": "four"})))
            assert again.count(b'"embedding":') == 1
            return answer, str(failure)

    answer, failure = asyncio.run(go())
    assert orjson.loads(answer)["usage"]["prompt_tokens"] > 0
    assert answer.count(b'"embedding":') == 3
    assert failure.startswith("HTTP 4") and "input" in failure


async def _serve_in_pieces(pieces: list[bytes]) -> tuple[asyncio.AbstractServer, str]:
    """A loopback server that answers any request with `pieces`, written one by one."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.005)
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


EVENTS = b'data: {"n": 1}\n\ndata: {"n": 2}\n\ndata: [DONE]\n\n'


def _cut(data: bytes, at: list[int]) -> list[bytes]:
    edges = [0, *at, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@pytest.mark.parametrize("framing", ["chunked", "content-length", "until-close"])
def test_events_survive_any_framing_and_any_cut(framing: str) -> None:
    if framing == "chunked":
        chunks = [EVENTS[:9], EVENTS[9:30], EVENTS[30:]]
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    elif framing == "content-length":
        body = EVENTS
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(EVENTS)
    else:
        body = EVENTS
        head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
    raw = head + body
    # cuts inside the head, inside a chunk-size line, between \n and \n of an event's end
    pieces = _cut(raw, [5, len(head) + 2, len(head) + 17, len(raw) - 3])

    async def go() -> list[bytes]:
        server, url = await _serve_in_pieces(pieces)
        got: list[bytes] = []
        async with server:
            await lean_http.post_events(url, "/x", b"{}", lambda e, _t: got.append(e))
        return got

    assert asyncio.run(go()) == [b'data: {"n": 1}', b'data: {"n": 2}', b"data: [DONE]"]


@pytest.mark.parametrize(("pieces", "error"), [
    # an error status: raised with the start of its body
    ([b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 9\r\n\r\n", b"busy, sor"],
     "HTTP 503: b'busy, sor'"),
    # the connection closes before the promised length
    ([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"data: {}\n\n"],
     "closed the connection mid-answer"),
    # a chunk size that is not hex: raised, not left waiting forever
    ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"zz\r\nnot hex\r\n"],
     "unreadable answer"),
], ids=["error-status", "cut-mid-answer", "malformed"])
def test_a_bad_answer_raises(pieces: list[bytes], error: str) -> None:
    async def go() -> None:
        server, url = await _serve_in_pieces(pieces)
        async with server:
            await asyncio.wait_for(lean_http.post_events(url, "/x", b"{}", lambda e, _t: None), 10)

    with pytest.raises(lean_http.HttpError, match=error):
        asyncio.run(go())
