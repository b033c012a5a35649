"""What `shoal list`, `shoal ps` and `shoal show` print (and the chat's /list and /show), in Ollama's layout."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from shoal.cli.client import Client
from shoal.cli.display import human_bytes, human_number, human_time, parse_time, print_table, stdout_console


def print_model_list(client: Client, prefix: str | None) -> None:
    """`shoal list`: NAME, ID, SIZE, MODIFIED of the models the server has (names starting with prefix)."""
    models = (client.tags() or {}).get("models") or []
    rows = [[m.get("name") or m.get("model", ""), short_id(m.get("digest")), human_bytes(m.get("size") or 0),
             human_time(m.get("modified_at"), "Never")]
            for m in models if not prefix or str(m.get("name", "")).startswith(prefix)]
    print_table(["NAME", "ID", "SIZE", "MODIFIED"], rows)


def short_id(digest: Any) -> str:
    return str(digest or "").removeprefix("sha256:")[:12]


def processor(size: int, size_vram: int) -> str:
    if size_vram == 0:
        return "100% CPU"
    if size_vram == size:
        return "100% GPU"
    if size_vram > size or size == 0:
        return "Unknown"
    cpu = round((size - size_vram) / size * 100)
    return f"{cpu}%/{100 - cpu}% CPU/GPU"


def until(expires_at: Any) -> str:
    at = parse_time(expires_at)
    if at is not None and at < datetime.now(timezone.utc):
        return "Stopping..."
    return human_time(expires_at, "Never")


SHOW_FIELDS = ("license", "modelfile", "parameters", "system", "template")


def license_text(info: dict[str, Any]) -> str:
    value = info.get("license")
    if isinstance(value, list):
        value = "\n".join(str(v) for v in value)
    if value:
        return str(value)
    # NOTE: shoal's /api/show has no `license` yet; the GGUF header often names one.
    return str((info.get("model_info") or {}).get("general.license") or "")


def show_field(info: dict[str, Any], name: str) -> str:
    if name == "license":
        return license_text(info)
    return str(info.get(name) or "")


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def print_info(info: dict[str, Any], verbose: bool = False, console=None) -> None:
    """Ollama's `show` summary: Model, Capabilities, Parameters, System, License."""
    console = console or stdout_console()
    model_info = info.get("model_info") or {}
    details = info.get("details") or {}

    def section(title: str, rows: list[list[str]]) -> None:
        if not rows:
            return
        console.print(f"  {title}", highlight=False)
        print_table(None, rows, indent=4, console=console)
        console.print()

    rows: list[list[str]] = []
    arch = model_info.get("general.architecture")
    if arch:
        rows.append(["architecture", str(arch)])
        if model_info.get("general.parameter_count"):
            rows.append(["parameters", human_number(model_info["general.parameter_count"])])
        if model_info.get(f"{arch}.context_length"):
            rows.append(["context length", _number(model_info[f"{arch}.context_length"])])
        if model_info.get(f"{arch}.embedding_length"):
            rows.append(["embedding length", _number(model_info[f"{arch}.embedding_length"])])
    else:
        rows.append(["architecture", str(details.get("family") or "")])
        rows.append(["parameters", str(details.get("parameter_size") or "")])
    rows.append(["quantization", str(details.get("quantization_level") or "")])
    section("Model", rows)
    section("Capabilities", [[str(c)] for c in info.get("capabilities") or []])
    section("Parameters", [line.split(None, 1) for line in str(info.get("parameters") or "").splitlines()
                           if line.strip()])
    if verbose and model_info:
        section("Metadata", [[key, _metadata_value(model_info[key])] for key in sorted(model_info)])
    section("System", _head(str(info.get("system") or ""), 2))
    section("License", _head(license_text(info), 2))


def _metadata_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        shown = [str(v) for v in value[:3]]
        more = f" ...+{len(value) - 3} more" if len(value) > 3 else ""
        return "[" + " ".join(shown) + more + "]"
    return _number(value)


def _head(text: str, n: int) -> list[list[str]]:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    rows = [[line] for line in lines[:n]]
    if len(lines) > n:
        rows.append(["..."])
    return rows
