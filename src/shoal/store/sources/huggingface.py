"""Hugging Face as a pull source: `hf.co/<owner>/<repo>[:<quant>]`.

* A repo with GGUF files: the file whose name carries the quant tag (`Q4_K_M`, `q8_0`, ...,
  case-insensitive) is downloaded; without a tag the first of QUANT_PREFERENCE present wins
  (Q4_K_M first), the smaller file on a tie.
* A repo without GGUF files but with config.json + safetensors (and no quant tag): its model
  files (configs, tokenizer, safetensors) are downloaded and stored like a directory FROM.
* Downloads go through `huggingface_hub` into its cache (resumable there), then into the store
  (hardlinked when possible) with the sha256 checked against the hub's LFS digest when known.
* Offline (`HF_HUB_OFFLINE=1`, or the hub unreachable): a cached snapshot of the repo is used if
  the cache has one, else PullError says so.

`list_files` and `download` can be injected (tests; a mirror).
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.core.errors import UnknownModelError
from shoal.store.blobs import BlobStore
from shoal.store.errors import PullError
from shoal.store.hf_files import select_model_files
from shoal.store.locks import Lease
from shoal.store.manifests import ANNOTATION_TITLE, MEDIA_LICENSE, MEDIA_MODEL, MEDIA_MODEL_FILE, Layer
from shoal.store.modelinfo import gguf_details, hf_dir_details, is_gguf
from shoal.store.names import DEFAULT_TAG, HF_REGISTRY, ModelName
from shoal.store.progress import Reporter, short_digest
from shoal.store.sources import PulledModel

QUANT_PREFERENCE = (
    "Q4_K_M", "Q4_K_S", "Q4_K_L", "Q4_K_XL", "Q4_0", "Q4_1", "IQ4_XS", "IQ4_NL",
    "Q5_K_M", "Q5_K_S", "Q5_K_L", "Q5_0", "Q5_1", "Q6_K", "Q6_K_L", "Q8_0",
    "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_XS", "Q2_K", "Q2_K_L", "BF16", "F16", "F32")
_QUANT_RE = re.compile(r"(?<![A-Za-z0-9])(I?Q[0-9]+(?:_[A-Za-z0-9]+)*|BF16|FP16|F16|FP32|F32)"
                       r"(?![A-Za-z0-9])", re.IGNORECASE)
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_LICENSE_NAMES = ("LICENSE", "LICENSE.md", "LICENSE.txt")
_MAX_LICENSE_BYTES = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TRUE = {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True, slots=True)
class HFFile:
    """One file of a repo: its path in the repo, size and (for LFS files) sha256 when known."""

    path: str
    size: int | None = None
    sha256: str | None = None

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


ListFiles = Callable[[str, str], list[HFFile]]
# download(repo_id, path_in_repo, revision, report(completed, total)) -> local file
Download = Callable[[str, str, str, Callable[[int, int | None], None]], Path]


def quant_of(filename: str) -> str | None:
    """The quantization a GGUF file name carries (upper case; FP16 -> F16), if any."""
    stem = filename.rsplit("/", 1)[-1]
    stem = _SPLIT_RE.sub(".gguf", stem)
    stem = stem[:-5] if stem.lower().endswith(".gguf") else stem
    matches = _QUANT_RE.findall(stem)
    if not matches:
        return None
    quant = matches[-1].upper()
    return {"FP16": "F16", "FP32": "F32"}.get(quant, quant)


def _is_candidate_gguf(file: HFFile) -> bool:
    name = file.name.lower()
    return name.endswith(".gguf") and not name.startswith("mmproj")


def select_gguf(repo: str, files: list[HFFile], quant: str | None) -> HFFile:
    """The GGUF file to pull for `quant` (None: the default choice). Raises UnknownModelError
    listing the quants there are, or PullError for a split file."""
    ggufs = [f for f in files if _is_candidate_gguf(f)]
    if not ggufs:
        raise PullError(f"hf.co/{repo} has no GGUF files")
    if quant is None:
        def rank(f: HFFile) -> tuple[int, float, str]:
            q = quant_of(f.path)
            pref = QUANT_PREFERENCE.index(q) if q in QUANT_PREFERENCE else len(QUANT_PREFERENCE)
            return (pref, f.size if f.size is not None else float("inf"), f.path)
        chosen = min(ggufs, key=rank)
    else:
        wanted = quant.upper()
        matching = [f for f in ggufs if quant_of(f.path) == wanted]
        if not matching:
            bounded = re.compile(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])",
                                 re.IGNORECASE)
            matching = [f for f in ggufs if bounded.search(f.name[:-5])]
        if not matching:
            available = sorted({q for f in ggufs if (q := quant_of(f.path))})
            raise UnknownModelError(f"hf.co/{repo}:{quant}",
                                    [f"hf.co/{repo}:{q}" for q in available])
        chosen = min(matching, key=lambda f: (f.size if f.size is not None else float("inf"),
                                              f.path))
    split = _SPLIT_RE.search(chosen.name)
    if split and int(split.group(2)) > 1:
        raise PullError(f"hf.co/{repo}: {chosen.path} is one of {int(split.group(2))} parts of a "
                        "split GGUF; shoal loads single-file GGUFs only")
    return chosen


def hf_cache_dir() -> Path:
    """$HF_HUB_CACHE, else $HF_HOME/hub, else huggingface_hub's default (~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except ImportError:
        return Path.home() / ".cache" / "huggingface" / "hub"


def hf_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it only once, at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def cached_snapshot(cache_dir: Path, repo: str, revision: str = "main") -> Path | None:
    """The snapshot folder of `repo` at `revision` in a huggingface_hub cache, if there is one
    (refs/<revision> first; else the newest snapshot)."""
    folder = "models--" + repo.replace("/", "--")
    repo_dir = cache_dir / folder
    if not repo_dir.is_dir() and cache_dir.is_dir():
        # NOTE: hub repo ids are case-insensitive; the cache keeps the spelling first used.
        folded = folder.casefold()
        repo_dir = next((p for p in cache_dir.iterdir() if p.name.casefold() == folded), repo_dir)
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo_dir / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        if (snapshots / commit).is_dir():
            return snapshots / commit
    if (snapshots / revision).is_dir():
        return snapshots / revision
    candidates = [p for p in snapshots.iterdir() if p.is_dir()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def snapshot_files(snapshot: Path) -> list[HFFile]:
    """The files of a cached snapshot (dangling links - files not downloaded - skipped)."""
    files = []
    for path in sorted(snapshot.rglob("*")):
        try:
            if not path.is_file():
                continue
            size = path.stat().st_size
        except OSError:
            continue
        target = Path(os.path.realpath(path)).name
        files.append(HFFile(path.relative_to(snapshot).as_posix(), size,
                            target if _HEX64.fullmatch(target) else None))
    return files


def _hub_list_files(token: str | None) -> ListFiles:
    def list_files(repo: str, revision: str) -> list[HFFile]:
        from huggingface_hub import HfApi

        out = []
        for entry in HfApi(token=token).list_repo_tree(repo, recursive=True, revision=revision):
            size = getattr(entry, "size", None)
            if size is None:          # a folder
                continue
            lfs = getattr(entry, "lfs", None)
            sha = getattr(lfs, "sha256", None) if lfs is not None else None
            out.append(HFFile(entry.path, size, sha))
        return out
    return list_files


def _tqdm_reporting(report: Callable[[int, int | None], None]) -> type:
    """A tqdm class for huggingface_hub that prints nothing and forwards byte counts."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class _Reporting(hf_tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            self._done = int(kwargs.get("initial") or 0)
            self._total = kwargs.get("total")
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            self._done += int(n or 0)
            report(self._done, self._total)
            return super().update(n)

    return _Reporting


def _hub_download(cache_dir: Path, token: str | None) -> Download:
    def download(repo: str, path: str, revision: str,
                 report: Callable[[int, int | None], None]) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, path, revision=revision, cache_dir=cache_dir,
                                    token=token, tqdm_class=_tqdm_reporting(report)))
    return download


class HuggingFaceSource:
    """Pulls `hf.co/<owner>/<repo>[:quant]`; see the module docstring."""

    def __init__(self, *, list_files: ListFiles | None = None, download: Download | None = None,
                 cache_dir: str | Path | None = None, offline: bool | None = None,
                 token: str | None = None, revision: str = "main") -> None:
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self._list_files = list_files
        self._download = download
        self._offline = offline
        self.token = token
        self.revision = revision

    @property
    def cache(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else hf_cache_dir()

    @property
    def offline(self) -> bool:
        return self._offline if self._offline is not None else hf_offline()

    def handles(self, name: ModelName) -> bool:
        return name.registry.lower() == HF_REGISTRY

    # -- what is there ---------------------------------------------------------------------------
    def resolve_files(self, repo: str) -> tuple[list[HFFile], Path | None]:
        """(files, cached snapshot or None): the hub's listing, or the cache's when offline or
        when the hub cannot be reached."""
        snapshot = cached_snapshot(self.cache, repo, self.revision)
        if self.offline:
            if snapshot is None:
                raise PullError(
                    f"HF_HUB_OFFLINE is set and the Hugging Face cache ({self.cache}) has no "
                    f"snapshot of {repo}; unset HF_HUB_OFFLINE or download it first")
            return snapshot_files(snapshot), snapshot
        lister = self._list_files or _hub_list_files(self.token)
        try:
            return lister(repo, self.revision), None
        except Exception as exc:  # noqa: BLE001 - classified below
            kind = type(exc).__name__
            if kind in ("RepositoryNotFoundError", "RevisionNotFoundError"):
                raise UnknownModelError(f"hf.co/{repo}") from None
            if kind == "GatedRepoError":
                raise PullError(f"hf.co/{repo} is gated: accept its terms on huggingface.co and "
                                "set HF_TOKEN") from None
            if snapshot is not None:
                return snapshot_files(snapshot), snapshot
            raise PullError(f"cannot list hf.co/{repo} ({kind}: {exc}) and the Hugging Face "
                            f"cache ({self.cache}) has no snapshot of it") from None

    def fetch(self, repo: str, file: HFFile, snapshot: Path | None,
              report: Callable[[int, int | None], None]) -> Path:
        """A local path holding `file` (the cached snapshot's, or a fresh download)."""
        if snapshot is not None:
            local = snapshot / file.path
            if local.is_file():
                size = local.stat().st_size
                report(size, size)
                return local
            raise PullError(f"the cached snapshot of {repo} lacks {file.path}")
        downloader = self._download or _hub_download(self.cache, self.token)
        try:
            return Path(downloader(repo, file.path, self.revision, report))
        except Exception as exc:  # noqa: BLE001 - any transport failure
            raise PullError(f"downloading {file.path} from hf.co/{repo} failed: "
                            f"{type(exc).__name__}: {exc}") from exc

    # -- pulling -----------------------------------------------------------------------------------
    def pull(self, name: ModelName, blobs: BlobStore, lease: Lease,
             reporter: Reporter) -> PulledModel:
        repo = f"{name.namespace}/{name.name}"
        quant = None if name.tag.lower() == DEFAULT_TAG else name.tag
        files, snapshot = self.resolve_files(repo)
        has_gguf = any(_is_candidate_gguf(f) for f in files)
        if not has_gguf and quant is None:
            chosen = select_model_files([f.path for f in files])
            if chosen:
                by_path = {f.path: f for f in files}
                return self._pull_directory(repo, [by_path[p] for p in chosen], files, snapshot,
                                            blobs, lease, reporter)
        if not has_gguf:
            raise PullError(f"hf.co/{repo} has no GGUF files (and is not a safetensors model "
                            "directory)")
        file = select_gguf(repo, files, quant)
        layer, local = self._store(repo, file, snapshot, blobs, lease, reporter, MEDIA_MODEL)
        if not is_gguf(blobs.path(layer.digest)):
            raise PullError(f"{file.path} from hf.co/{repo} is not a GGUF file")
        layers = [layer]
        license_layer = self._license(repo, files, snapshot, blobs, lease, reporter)
        if license_layer is not None:
            layers.append(license_layer)
        return PulledModel(layers, gguf_details(blobs.path(layer.digest)))

    def _store(self, repo: str, file: HFFile, snapshot: Path | None, blobs: BlobStore,
               lease: Lease, reporter: Reporter, media_type: str,
               annotations: dict[str, str] | None = None) -> tuple[Layer, Path]:
        digest = f"sha256:{file.sha256}" if file.sha256 and _HEX64.fullmatch(file.sha256) else None
        status = f"pulling {short_digest(digest)}" if digest else f"pulling {file.name}"
        report = reporter.bytes(status, digest, file.size)
        if digest is not None and file.size is not None and \
                blobs.claim_verified(digest, lease.add_one) == file.size:
            report(file.size, file.size)
            return Layer(media_type, digest, file.size, dict(annotations or {})), blobs.path(digest)
        local = self.fetch(repo, file, snapshot, report)
        reporter.status("verifying sha256 digest")
        info = blobs.import_file(local, digest=digest, on_digest=lease.add_one)
        return Layer(media_type, info.digest, info.size, dict(annotations or {})), local

    def _pull_directory(self, repo: str, files: list[HFFile], all_files: list[HFFile],
                        snapshot: Path | None, blobs: BlobStore, lease: Lease,
                        reporter: Reporter) -> PulledModel:
        layers = []
        config_local: Path | None = None
        for file in files:
            layer, local = self._store(repo, file, snapshot, blobs, lease, reporter,
                                       MEDIA_MODEL_FILE, {ANNOTATION_TITLE: file.path})
            layers.append(layer)
            if file.path == "config.json":
                config_local = local
        details = hf_dir_details(config_local.parent) if config_local is not None else None
        license_layer = self._license(repo, all_files, snapshot, blobs, lease, reporter)
        if license_layer is not None:
            layers.append(license_layer)
        return PulledModel(layers, details) if details else PulledModel(layers)

    def _license(self, repo: str, files: list[HFFile], snapshot: Path | None, blobs: BlobStore,
                 lease: Lease, reporter: Reporter) -> Layer | None:
        """The repo's LICENSE file as a license layer, when it has a small one (best effort)."""
        found = next((f for n in _LICENSE_NAMES for f in files if f.path == n), None)
        if found is None or (found.size or 0) > _MAX_LICENSE_BYTES:
            return None
        try:
            local = self.fetch(repo, found, snapshot, lambda done, total: None)
            text = Path(local).read_bytes()[:_MAX_LICENSE_BYTES]
        except (PullError, OSError):
            reporter.status(f"skipping {found.path}: it could not be fetched")
            return None
        info = blobs.write_bytes(text, on_digest=lease.add_one)
        return Layer(MEDIA_LICENSE, info.digest, info.size)
