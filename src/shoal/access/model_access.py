"""Which models a caller may use: the check at name resolution and the filter of listings."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

from shoal.access.principal import Principal, current_principal
from shoal.core.errors import PermissionDeniedError
from shoal.store.names import normalize_name


class NamedModel(Protocol):
    """A ModelSpec or a ServedModel: a name and the other names it answers to."""

    name: str
    aliases: tuple[str, ...]


M = TypeVar("M", bound=NamedModel)


def may_use(principal: Principal, model: NamedModel) -> bool:
    """True when the key's model list names the model by its name or any alias."""
    allowed = principal.allowed_models
    if allowed is None:
        return True
    return any(normalize_name(name) in allowed for name in (model.name, *model.aliases))


def check_model_access(principal: Principal, model: NamedModel) -> None:
    """Raises 403 when the caller's key does not list the model."""
    if not may_use(principal, model):
        raise PermissionDeniedError(f"the API key '{principal.name}' may not use the model "
                                    f"'{model.name}'", code="model_not_allowed", model=model.name)


def visible_models(models: Iterable[M]) -> list[M]:
    """The models the current caller may use (/v1/models, /api/tags, /api/ps list only these)."""
    principal = current_principal.get()
    return [m for m in models if may_use(principal, m)]
