"""Counting tokens the way a target's model does.

In order of preference: a tokenizer file the user gives (`--tokenizer`: a tokenizer.json, a
GGUF, or a Hugging Face directory), the target's own `/tokenize` (shoal and vLLM take
{"model", "prompt"}; llama.cpp's server takes {"content"}), else an estimate. Counts include
the special tokens (BOS) the server adds to a prompt, as the servers' usage figures do.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Protocol

import httpx

from shoal.bench.targets import BenchSetupError


class TokenCounter(Protocol):
    source: str          # "server" | "file" | "estimate": how exact the prompt lengths are

    async def count(self, text: str) -> int: ...


class ServerTokenizer:
    """The target's own /tokenize endpoint."""

    source = "server"

    def __init__(self, url: str, headers: dict[str, str], model: str, kind: str | None) -> None:
        self._http = httpx.AsyncClient(base_url=url, headers=headers, timeout=30.0)
        self._model = model
        self._llamacpp = kind == "llamacpp"

    async def count(self, text: str) -> int:
        body = ({"content": text, "add_special": True} if self._llamacpp
                else {"model": self._model, "prompt": text})
        response = await self._http.post("/tokenize", json=body)
        response.raise_for_status()
        data = response.json()
        if isinstance(data.get("count"), int):
            return data["count"]
        if isinstance(data.get("tokens"), list):
            return len(data["tokens"])
        raise ValueError("the /tokenize answer has neither 'count' nor 'tokens'")

    async def aclose(self) -> None:
        await self._http.aclose()


class FileTokenizer:
    """A tokenizer read from a file: tokenizer.json (tokenizers), or a GGUF / HF directory (shoal's)."""

    source = "file"

    def __init__(self, path: str | Path) -> None:
        path = Path(path).expanduser()
        if not path.exists():
            raise BenchSetupError(f"--tokenizer {path}: no such file or directory")
        try:
            self._encode = _load_encoder(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same one-line error
            raise BenchSetupError(f"--tokenizer {path}: cannot read a tokenizer from it ({exc})") from None

    async def count(self, text: str) -> int:
        return len(self._encode(text))


def _load_encoder(path: Path):
    if path.is_file() and path.suffix == ".json":
        from tokenizers import Tokenizer as RustTokenizer

        rust = RustTokenizer.from_file(str(path))
        return lambda text: rust.encode(text, add_special_tokens=True).ids
    from shoal.text.tokenizer import Tokenizer

    if path.is_dir():
        return Tokenizer.from_hf_dir(path).encode
    from shoal.model.loader import open_model

    source = open_model(path)
    try:
        return Tokenizer.from_gguf_metadata(source.metadata, str(path)).encode
    finally:
        source.close()


_PIECE = re.compile(r"\w+|[^\w\s]")


class EstimateTokenizer:
    """No tokenizer at hand: one token per word and per punctuation mark (close for plain English)."""

    source = "estimate"

    async def count(self, text: str) -> int:
        return len(_PIECE.findall(text))


async def make_counter(*, tokenizer_path: str | None, url: str, headers: dict[str, str], model: str,
                       kind: str | None) -> TokenCounter:
    """The best counter available for one target (a server tokenizer only once it has answered)."""
    if tokenizer_path:
        return FileTokenizer(tokenizer_path)
    if kind in ("shoal", "vllm", "llamacpp"):
        server = ServerTokenizer(url, headers, model, kind)
        try:
            await server.count("hello world")
            return server
        except (httpx.HTTPError, ValueError, KeyError):
            await server.aclose()
    return EstimateTokenizer()


async def close_counter(counter: TokenCounter) -> None:
    if isinstance(counter, ServerTokenizer):
        await counter.aclose()
