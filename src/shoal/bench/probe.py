"""Validation before a run: is each target reachable, speaking its dialect, serving the model?

Also finds out what kind of server it is (shoal, vLLM, llama.cpp, Ollama), which decides
whether `ignore_eos` is honoured, which /metrics names to read and how to call /tokenize.
Every failure is a BenchSetupError with one line that names the target and what to change.
"""
from __future__ import annotations

from dataclasses import dataclass

import httpx

from shoal.bench.client import BenchRequest, Endpoint, StreamingClient
from shoal.bench.targets import BenchSetupError, TargetSpec

# Server kinds whose OpenAI dialect honours vLLM's `ignore_eos` extension.
IGNORE_EOS_KINDS = frozenset({"shoal", "vllm", "llamacpp"})
# /metrics prefix -> server kind
METRIC_PREFIXES = {"shoal:": "shoal", "vllm:": "vllm", "llamacpp:": "llamacpp"}
_MODEL_LISTS = {"openai": "/v1/models", "ollama": "/api/tags"}
_PROBE_TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class TargetInfo:
    """A validated target."""

    spec: TargetSpec
    model: str                    # the model name requests send
    kind: str | None              # "shoal" | "vllm" | "llamacpp" | "ollama" | None (unknown)
    metrics: str | None           # whose /metrics names it serves, or None (no /metrics)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def ignore_eos_supported(self) -> bool:
        return self.spec.dialect == "openai" and self.kind in IGNORE_EOS_KINDS


def _names(dialect: str, data: object) -> list[str] | None:
    """Model names from a model-list response, or None when it is not that dialect's shape."""
    if not isinstance(data, dict):
        return None
    if dialect == "openai":
        items = data.get("data")
        if not isinstance(items, list):
            return None
        return [str(m.get("id")) for m in items if isinstance(m, dict)]
    items = data.get("models")
    if not isinstance(items, list):
        return None
    # Ollama lists each model under "name" and "model" (usually equal)
    names = [str(m.get(key)) for m in items if isinstance(m, dict) for key in ("name", "model") if m.get(key)]
    return list(dict.fromkeys(names))


async def _model_list(http: httpx.AsyncClient, dialect: str) -> tuple[int, list[str] | None]:
    response = await http.get(_MODEL_LISTS[dialect])
    try:
        data = response.json()
    except ValueError:
        data = None
    return response.status_code, _names(dialect, data) if response.status_code == 200 else None


def _same_model(dialect: str, wanted: str, listed: str) -> bool:
    if wanted == listed:
        return True
    # Ollama's rule: a name without a tag means ':latest'.
    return dialect == "ollama" and (f"{wanted}:latest" == listed or wanted == f"{listed}:latest")


async def _serves_model(http: httpx.AsyncClient, spec: TargetSpec, model: str) -> bool:
    """Asks for the one model by name (servers answer aliases their list leaves out)."""
    if spec.dialect == "openai":
        response = await http.get(f"/v1/models/{model}")
    else:
        # older Ollama servers read "name", newer ones "model"
        response = await http.post("/api/show", json={"model": model, "name": model})
    return response.status_code == 200


async def _server_kind(http: httpx.AsyncClient) -> tuple[str | None, str | None]:
    """(kind, metrics source) from /metrics, else from what `/` or `/props` answer."""
    try:
        response = await http.get("/metrics")
        if response.status_code == 200:
            for prefix, kind in METRIC_PREFIXES.items():
                if f"\n{prefix}" in "\n" + response.text:
                    return kind, kind
        root = await http.get("/")
        if root.status_code == 200 and "Ollama is running" in root.text:
            return "ollama", None
        if root.status_code == 200 and "shoal is running" in root.text:
            return "shoal", None
        props = await http.get("/props")
        if props.status_code == 200 and "default_generation_settings" in props.text:
            return "llamacpp", None
    except httpx.HTTPError:
        pass
    return None, None


async def probe_target(spec: TargetSpec) -> TargetInfo:
    """Checks reachability, dialect and model; raises BenchSetupError with a one-line reason."""
    where = f"target {spec.name!r} ({spec.url})"
    async with httpx.AsyncClient(base_url=spec.url, headers=spec.headers(), timeout=_PROBE_TIMEOUT_S) as http:
        try:
            status, names = await _model_list(http, spec.dialect)
            if status in (401, 403):
                raise BenchSetupError(f"{where}: the server refused the request ({status}); check api_key=")
            if names is None:
                other = "ollama" if spec.dialect == "openai" else "openai"
                _, other_names = await _model_list(http, other)
                if other_names is not None:
                    raise BenchSetupError(f"{where}: speaks the {other} dialect, not {spec.dialect} "
                                          f"(GET {_MODEL_LISTS[spec.dialect]} -> {status}); use dialect={other}")
                raise BenchSetupError(f"{where}: not a {spec.dialect}-dialect server "
                                      f"(GET {_MODEL_LISTS[spec.dialect]} -> {status})")
            model = spec.model
            if model is None:
                if len(names) != 1:
                    raise BenchSetupError(f"{where}: serves {len(names)} models ({', '.join(names) or 'none'}); "
                                          "give model=")
                model = names[0]
            elif not any(_same_model(spec.dialect, model, n) for n in names) and not await _serves_model(
                    http, spec, model):
                raise BenchSetupError(f"{where}: does not serve model {model!r} "
                                      f"(it serves: {', '.join(names) or 'none'})")
            kind, metrics = await _server_kind(http)
        except httpx.ConnectError as exc:
            raise BenchSetupError(f"{where}: cannot connect ({exc})") from None
        except httpx.TimeoutException:
            raise BenchSetupError(f"{where}: no answer within {_PROBE_TIMEOUT_S:g}s") from None
        except httpx.HTTPError as exc:
            raise BenchSetupError(f"{where}: {type(exc).__name__}: {exc}") from None
    return TargetInfo(spec=spec, model=model, kind=kind, metrics=metrics)


async def check_generation(info: TargetInfo, endpoint: Endpoint, request: BenchRequest, timeout_s: float) -> None:
    """One tiny request on the endpoint the run will use: it must answer 200 and stream."""
    client = StreamingClient(endpoint, timeout_s)
    try:
        record = await client.send(BenchRequest(prompt=request.prompt, messages=request.messages, max_tokens=1))
    finally:
        await client.aclose()
    if not record.ok:
        hint = "; try --endpoint chat" if record.status in (404, 405) and not endpoint.chat else ""
        raise BenchSetupError(f"target {info.name!r} ({info.spec.url}): a 1-token test request failed "
                              f"({record.status}: {record.error}){hint}")
