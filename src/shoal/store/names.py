"""Model names: `[registry/][namespace/]name[:tag]`, Ollama's shape with shoal's defaults.

A name is four parts. Missing ones are filled from the defaults (registry
`registry.shoal.local`, namespace `library`, tag `latest`) and dropped again for display,
so `smollm2` is stored as `registry.shoal.local/library/smollm2:latest` and shown as
`smollm2:latest`. Names compare case-insensitively (two names that differ only in case are
the same model), but keep the case they were written with. Plain names live under
`registry.shoal.local` on disk; pulling or pushing one goes to Ollama's registry
(store/registry.py maps the host).

Each part maps to one directory level of the manifest store, so the character rules below
also guarantee a part can never be `.`/`..` or contain a path separator.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from shoal.core.echo import clip
from shoal.core.errors import InvalidParameterError
from shoal.store.errors import InvalidModelNameError

DEFAULT_REGISTRY = "registry.shoal.local"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
HF_REGISTRY = "hf.co"
_HF_ALIASES = frozenset({"hf.co", "huggingface.co"})
MAX_PART_LEN = 128
# An OCI reference's limit; checked before a name is parsed, looked up or echoed anywhere.
MAX_NAME_BYTES = 255

# NOTE: a registry is a host name with an optional port; the port's ':' is why the tag is
# split off the last '/'-separated segment only.
_REGISTRY_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?")
_PART_CHARS = {
    "namespace": re.compile(r"[A-Za-z0-9_-]"),
    "namespace.": re.compile(r"[A-Za-z0-9_.-]"),
    "name": re.compile(r"[A-Za-z0-9_.-]"),
    "tag": re.compile(r"[A-Za-z0-9_.-]"),
}
_ALLOWED_WORDS = {
    "namespace": "letters, digits, '_' and '-'",
    "namespace.": "letters, digits, '_', '-' and '.'",
    "name": "letters, digits, '_', '-' and '.'",
    "tag": "letters, digits, '_', '-' and '.'",
}


@dataclass(frozen=True, eq=False, slots=True)
class ModelName:
    """A parsed, validated, fully filled-in model name. Compare with ==; it ignores case."""

    registry: str
    namespace: str
    name: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> ModelName:
        """Parses and validates `text`; raises InvalidModelNameError saying what is wrong."""
        return parse_name(text)

    @property
    def key(self) -> tuple[str, str, str, str]:
        """The case-folded parts: equal keys mean the same model."""
        return (self.registry.lower(), self.namespace.lower(), self.name.lower(), self.tag.lower())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModelName):
            return NotImplemented
        return self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    @property
    def full(self) -> str:
        """Every part written out: `registry/namespace/name:tag`."""
        return f"{self.registry}/{self.namespace}/{self.name}:{self.tag}"

    @property
    def display(self) -> str:
        """The name as people see it: the default registry and namespace dropped, the tag kept
        (`smollm2:latest`, `alice/mymodel:v1`, `hf.co/owner/repo:Q4_K_M`)."""
        if self.registry.lower() != DEFAULT_REGISTRY:
            return self.full
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.name}:{self.tag}"
        return f"{self.name}:{self.tag}"

    @property
    def short(self) -> str:
        """`display` without a `:latest` tag (the shortest text that parses back to this name)."""
        text = self.display
        suffix = ":" + DEFAULT_TAG
        return text[: -len(suffix)] if self.tag.lower() == DEFAULT_TAG else text

    @property
    def is_huggingface(self) -> bool:
        return self.registry.lower() == HF_REGISTRY

    @property
    def parts(self) -> tuple[str, str, str, str]:
        """(registry, namespace, name, tag): the manifest's path below `manifests/`."""
        return (self.registry, self.namespace, self.name, self.tag)

    def with_tag(self, tag: str) -> ModelName:
        return parse_name(f"{self.registry}/{self.namespace}/{self.name}:{tag}")

    def __str__(self) -> str:
        return self.display

    def __repr__(self) -> str:
        return f"ModelName({self.full!r})"


def check_name_size(name: str, field: str = "model") -> None:
    """400 (InvalidParameterError on `field`) for a name over MAX_NAME_BYTES in UTF-8, before
    anything else reads it; the name itself is not echoed."""
    # NOTE: len() first: a 15 MB name is refused without being encoded.
    if len(name) > MAX_NAME_BYTES or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidParameterError(field, f"a model name is at most {MAX_NAME_BYTES} bytes long "
                                           f"(this one has {len(name)} characters)")


def _check_part(original: str, kind: str, value: str, rule: str | None = None) -> None:
    label = kind.rstrip(".")
    if not value:
        raise InvalidModelNameError(original, f"the {label} is empty")
    if len(value) > MAX_PART_LEN:
        raise InvalidModelNameError(
            original, f"the {label} is {len(value)} characters long (at most {MAX_PART_LEN})")
    chars = _PART_CHARS[rule or kind]
    for i, ch in enumerate(value):
        if not chars.fullmatch(ch):
            raise InvalidModelNameError(
                original, f"the {label} {value!r} may contain only {_ALLOWED_WORDS[rule or kind]}"
                          f" (found {ch!r} at position {i + 1})")
    if not (value[0].isascii() and (value[0].isalnum() or value[0] == "_")):
        raise InvalidModelNameError(
            original, f"the {label} {value!r} must start with a letter, a digit or '_'")
    if ".." in value:
        raise InvalidModelNameError(original, f"the {label} {value!r} contains '..'")


def _looks_like_host(part: str) -> bool:
    """Docker's rule for a first name component: a registry host if it has a '.' or a ':'
    or is `localhost`."""
    return "." in part or ":" in part or part.lower() == "localhost"


def _checked_registry(original: str, registry: str) -> str:
    if not registry or len(registry) > MAX_PART_LEN or not _REGISTRY_RE.fullmatch(registry):
        raise InvalidModelNameError(
            original, f"the registry '{clip(registry)}' is not a host name (letters, digits, '.', "
                      "'-', optionally ':port')")
    if ".." in registry:
        raise InvalidModelNameError(original, f"the registry {registry!r} contains '..'")
    return HF_REGISTRY if registry.lower() in _HF_ALIASES else registry


def parse_name(text: str) -> ModelName:
    """`[registry/][namespace/]name[:tag]` -> ModelName, defaults filled in.

    `http://` / `https://` prefixes are dropped; `huggingface.co/...` is stored as
    `hf.co/...`. In a two-part name the first part is a registry host when it has a '.' or
    a ':' or is `localhost` (Docker's rule: `localhost:5000/mymodel` is
    `localhost:5000/library/mymodel`), else a namespace. Dots are allowed in a namespace only
    when a registry is written too.
    """
    if not isinstance(text, str):
        raise InvalidModelNameError(repr(text), "a model name must be a string")
    check_name_size(text)
    original = text
    text = text.strip()
    for scheme in ("https://", "http://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme):]
            break
    if not text:
        raise InvalidModelNameError(original, "the name is empty")
    head, _, last = text.rpartition("/")
    base, colon, tag = last.partition(":")
    if colon and not tag:
        raise InvalidModelNameError(original, "the tag after ':' is empty")
    segments = head.split("/") if head else []
    if len(segments) > 2:
        raise InvalidModelNameError(
            original, "too many '/'-separated parts (the most is registry/namespace/name)")
    registry, namespace = DEFAULT_REGISTRY, DEFAULT_NAMESPACE
    namespace_rule = "namespace"
    if len(segments) == 2:
        registry, namespace = segments
        namespace_rule = "namespace."
        registry = _checked_registry(original, registry)
    elif len(segments) == 1:
        namespace = segments[0]
        if namespace.lower() in _HF_ALIASES:
            raise InvalidModelNameError(
                original, "Hugging Face names need an owner: hf.co/<owner>/<repo>[:quant]")
        if _looks_like_host(namespace):
            # NOTE: Docker's rule: `localhost:5000/mymodel` names a registry, not a namespace.
            registry, namespace = _checked_registry(original, namespace), DEFAULT_NAMESPACE
    _check_part(original, namespace_rule, namespace)
    _check_part(original, "name", base)
    tag = tag if colon else DEFAULT_TAG
    _check_part(original, "tag", tag)
    return ModelName(registry, namespace, base, tag)


def is_valid_name(text: str) -> bool:
    try:
        parse_name(text)
    except InvalidModelNameError:
        return False
    return True


def normalize_name(name: str) -> str:
    """Ollama's rule for comparing names: a name without a tag means ':latest'; case is ignored.

    Unlike parse_name it checks nothing: it also compares names that are no store names (a
    served model's aliases, `default`, a file's name), as residency and key model lists do.
    """
    name = name.strip().lower()
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"
