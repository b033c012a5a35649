"""What models exist and where their files are (not whether they are loaded)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shoal.core.errors import ShoalError, UnknownModelError
from shoal.store.errors import InvalidModelNameError
from shoal.store.names import normalize_name


def path_size(path: Path) -> int:
    """Bytes of a model on disk: a file, or every file of a directory (0 if missing)."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


@dataclass(slots=True)
class ModelSpec:
    """Everything needed to load a model and to present it: files, defaults, prompt parts."""

    name: str
    path: Path
    aliases: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)      # Ollama-named defaults (PARAMETER)
    template: str | None = None       # a Go template (Modelfile TEMPLATE); None = the model's own
    system: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    adapters: list[Path] = field(default_factory=list)
    license: list[str] = field(default_factory=list)
    digest: str | None = None         # of the manifest (store) or None
    modified_at: float | None = None
    pinned: bool = False              # loaded at start and never unloaded (`serve --model`)
    parent_model: str = ""            # what a Modelfile's FROM named (store models)

    def matches(self, name: str) -> bool:
        wanted = {name.strip().lower(), normalize_name(name)}
        mine = {n.strip().lower() for n in (self.name, *self.aliases)}
        mine |= {normalize_name(n) for n in (self.name, *self.aliases)}
        return bool(wanted & mine)


class Catalog(Protocol):
    def resolve(self, name: str) -> ModelSpec:
        """The model a name means; raises UnknownModelError."""

    def specs(self) -> list[ModelSpec]:
        """Every model this catalog can serve."""


class StaticCatalog:
    """A fixed list of models (those named on the command line)."""

    def __init__(self, specs: Iterable[ModelSpec] = ()) -> None:
        self._specs = list(specs)

    def resolve(self, name: str) -> ModelSpec:
        for spec in self._specs:
            if spec.matches(name):
                return spec
        raise UnknownModelError(name, [s.name for s in self._specs])

    def specs(self) -> list[ModelSpec]:
        return list(self._specs)


class ChainCatalog:
    """Several catalogs, first match wins (command-line models before the store)."""

    def __init__(self, catalogs: Sequence[Catalog]) -> None:
        self.catalogs = list(catalogs)

    def resolve(self, name: str) -> ModelSpec:
        for catalog in self.catalogs:
            try:
                return catalog.resolve(name)
            except UnknownModelError:
                continue
        raise UnknownModelError(name, [s.name for s in self.specs()])

    def specs(self) -> list[ModelSpec]:
        """The models a name can reach: a later catalog's model whose name an earlier one
        answers to (the store's `smollm2:latest`, pulled for a Modelfile's `FROM smollm2`, behind
        the served `smollm2:135m` that answers to `smollm2`) is shadowed, so not listed."""
        out: list[ModelSpec] = []
        for catalog in self.catalogs:
            earlier = list(out)
            for spec in catalog.specs():
                if not any(e.matches(spec.name) for e in earlier) and \
                        not any(normalize_name(o.name) == normalize_name(spec.name) for o in out):
                    out.append(spec)
        return out


class StoreCatalog:
    """The models in a shoal.store ModelStore (pulled or created)."""

    def __init__(self, store) -> None:
        self.store = store

    def resolve(self, name: str) -> ModelSpec:
        try:
            resolved = self.store.resolve(name)
        except InvalidModelNameError:
            raise UnknownModelError(name, []) from None
        return ModelSpec(
            name=resolved.name, path=Path(resolved.weights), options=dict(resolved.params),
            template=resolved.template, system=resolved.system, messages=list(resolved.messages),
            adapters=list(resolved.adapter_paths), license=list(resolved.licenses),
            digest=resolved.digest, parent_model=resolved.details.parent_model,
            modified_at=resolved.modified_at.timestamp() if resolved.modified_at else None)

    def specs(self) -> list[ModelSpec]:
        out = []
        for stored in self.store.list():
            try:
                out.append(self.resolve(stored.name))
            except (UnknownModelError, ShoalError):
                continue      # removed meanwhile, or damaged: /api/tags must still answer
        return out
