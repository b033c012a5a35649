"""shoal's model store: names, blobs, manifests, the Modelfile, create, and pull sources.

The server (/api/pull, /api/push, /api/create, /api/tags, /api/show, /api/delete,
/api/copy), the CLI (`shoal pull/push/create/ls/rm/cp/show`) and residency use `ModelStore`;
docs/store.md has the layout on disk, the registry protocol and the Modelfile reference.
"""
from __future__ import annotations

from shoal.store.blobs import BlobInfo, BlobStore, normalize_digest
from shoal.store.errors import (DigestMismatchError, InvalidModelNameError, ModelfileError, PullError,
                               RegistryError)
from shoal.store.manifests import Layer, Manifest
from shoal.store.modelfile import (PARAMETERS, Message, Modelfile, check_parameters,
                                   format_parameters, parse_modelfile, render_modelfile)
from shoal.store.modelinfo import ModelDetails
from shoal.store.names import DEFAULT_NAMESPACE, DEFAULT_REGISTRY, DEFAULT_TAG, ModelName, parse_name
from shoal.store.progress import ProgressCallback, ProgressEvent, RichProgress
from shoal.store.registry import RegistryClient
from shoal.store.store import ModelShow, ModelStore, ResolvedAdapter, ResolvedModel, StoredModel

__all__ = [
    "BlobInfo", "BlobStore", "DEFAULT_NAMESPACE", "DEFAULT_REGISTRY", "DEFAULT_TAG",
    "DigestMismatchError", "InvalidModelNameError", "Layer", "Manifest", "Message", "ModelDetails",
    "ModelName", "ModelShow", "ModelStore", "Modelfile", "ModelfileError", "PARAMETERS",
    "ProgressCallback", "ProgressEvent", "PullError", "RegistryClient", "RegistryError",
    "ResolvedAdapter", "ResolvedModel",
    "RichProgress", "StoredModel", "check_parameters", "format_parameters", "normalize_digest",
    "parse_modelfile", "parse_name", "render_modelfile",
]
