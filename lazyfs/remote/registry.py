"""A :class:`Source` over the OCI distribution API (``/v2/``), with httpx under trio.

Every request goes through :meth:`RegistrySource._fetch`: endpoints from hosts.toml in order,
auth (Basic / Bearer), manual redirects (Authorization never leaves the registry host), retries
with capped exponential backoff and jitter on 429 / 5xx / resets / short bodies, and a
per-host :class:`trio.CapacityLimiter`.  Callers see exact bytes or one :class:`RemoteError`.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import os
import random
import re
import socket
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import httpcore
import httpx
import msgspec
import trio

from lazyfs import oci
from lazyfs.errors import IntegrityError, LazyfsError, NotFoundError, RemoteError
from lazyfs.remote.auth import Authenticator, Credentials, load_docker_credentials
from lazyfs.remote.base import (
    REQUEST_SENT,
    STREAM_PIECE,
    RangesSink,
    Sink,
    Source,
    check_ranges,
)
from lazyfs.remote.hosts import Endpoint, load_endpoints
from lazyfs.remote.multipart import ByteRanges, Malformed, boundary_of, range_spec, split_ranges

T = TypeVar("T")
log = logging.getLogger(__name__)

# httpx reads an answer 64 KiB at a time (httpcore's READ_NUM_BYTES), a step of the event
# loop each, and each step's Python (h11, the multipart parser, the store's sink) costs more
# than its copy.  A start-up's prefetch (9 MiB on the Debian image, half of it arriving while
# the program starts) came in 216 pieces; a mount daemon takes what the socket holds by a
# step, up to this much (:func:`receive_wide`).
RECV_BYTES = 1 << 20
_HTTPCORE_READ = httpcore.AsyncHTTP11Connection.READ_NUM_BYTES


def receive_wide(on: bool = True) -> None:
    """Have every HTTP/1.1 connection of this process read up to RECV_BYTES a step (``on``),
    or httpcore's own 64 KiB.  Only where glibc's thresholds are raised
    (``heap.serving_thresholds``): at its start values each 1 MiB buffer is mapped and
    unmapped per read, 7x the CPU of a read, and a TLS read brings one 16 KiB record whatever
    its size (BENCHMARKS "H88"): ``lazyfs pull`` and the snapshotter keep 64 KiB."""
    httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = RECV_BYTES if on else _HTTPCORE_READ


MANIFEST_ACCEPT = ", ".join(
    (oci.MT_OCI_INDEX, oci.MT_OCI_MANIFEST, oci.MT_DOCKER_LIST, oci.MT_DOCKER_MANIFEST)
)
MAX_MANIFEST_SIZE = 4 << 20
# get_blob holds a whole blob in memory: it serves documents (image configs, prefetch groups),
# never layers, so a registry that sends more is refused rather than believed.
MAX_DOCUMENT_SIZE = 64 << 20
MAX_REDIRECTS = 5
# After the last range of a multipart answer, at most this much more is read (its closing
# boundary) so the connection can be reused; a server that sends more is cut off.
_MAX_EPILOGUE = 64 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class RetryPolicy(msgspec.Struct, frozen=True):
    """How hard to try.  Tests shrink the delays; the CLI keeps the defaults."""

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 5.0
    #: a registry asking us to wait longer than this is waited on only this long
    max_retry_after: float = 30.0
    #: an attempt that receives no byte for this long is abandoned (and the next host tried):
    #: stalls are found by lack of progress, so a slow but moving transfer is never cut
    stall_timeout: float = 10.0
    #: no attempt starts this long after the first one: a request that gets no bytes ends
    #: within deadline + stall_timeout (30 s by default), whatever the registry does
    deadline: float = 20.0

    @classmethod
    def within(cls, seconds: float) -> RetryPolicy:
        """A policy under which a fetch that gets no bytes ends within ``seconds``."""
        return cls(stall_timeout=seconds / 3, deadline=seconds * 2 / 3)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        backoff = min(self.max_delay, self.base_delay * 2.0**attempt)
        # "Equal jitter": never zero, never in lock-step with other clients.
        backoff = backoff / 2 + random.uniform(0, backoff / 2)
        if retry_after is not None:
            backoff = max(backoff, min(retry_after, self.max_retry_after))
        return backoff


class Stats(msgspec.Struct):
    #: HTTP requests sent to registry endpoints (including redirects, excluding token requests)
    requests: int = 0
    bytes_received: int = 0
    retries: int = 0
    token_requests: int = 0
    #: requests for several ranges at once, and those answered otherwise than with all of
    #: them in one multipart body (after which that location is asked for single ranges)
    multirange_requests: int = 0
    multirange_refused: int = 0


class _Transient(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _NotFound(Exception):
    pass


class _Spooled(Exception):
    """The endpoint sent the whole blob for a Range request: read it from the spool."""


class _Spool:
    """A blob an endpoint sends whole (a 200 to a Range request, as a pull-through cache does
    for blobs it has not cached yet), written to an unlinked file as it arrives.  Every read
    of that blob is served from here, each as soon as its bytes are in, so the blob crosses
    the wire once however many readers want parts of it."""

    def __init__(self, directory: Path | None) -> None:
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        self.file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 (closed at aclose)
        self.have = 0  # bytes [0, have) are in the file
        self.done = False
        self.error: str | None = None
        self.changed = trio.Event()
        self.scope = trio.CancelScope()

    def wrote(self, n: int) -> None:
        self.have += n
        self._wake()

    def finish(self, error: str | None) -> None:
        self.done, self.error = True, error
        self._wake()

    def _wake(self) -> None:
        changed, self.changed = self.changed, trio.Event()
        changed.set()


class _NoMultirange(Exception):
    """The answer to a multi-range request was not a usable multipart body (a 200 with the
    whole blob, a single range, 416, a malformed body): ask for the rest one range at a time."""


class _Unsatisfiable(RemoteError):
    """HTTP 416: the server (``host``) refuses the ranges asked for."""

    def __init__(self, message: str, host: str) -> None:
        super().__init__(message)
        self.host = host


class _Permanent(Exception):
    """This endpoint cannot serve us however often we ask (it speaks plain HTTP to our TLS,
    its name does not resolve, it refuses access): try the next endpoint, never again."""


def transport_cause(error: BaseException) -> tuple[str, bool]:
    """A connection failure in words a user can act on, and whether retrying is pointless.
    httpx wraps the cause several layers deep (and a failed connect in an exception group)."""
    seen: set[int] = set()
    todo: list[BaseException] = [error]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLError):
            if e.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST"):
                return (
                    "server gave HTTP response to HTTPS client (use --plain-http, or "
                    'server = "http://…" in its hosts.toml)',
                    True,
                )
            if isinstance(e, ssl.SSLCertVerificationError):
                return (
                    f"TLS certificate not trusted: {e.verify_message} (use --insecure, or a "
                    "ca in its hosts.toml)",
                    True,
                )
            return f"TLS error: {e.reason or e}", False
        if isinstance(e, socket.gaierror):
            if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
                return "cannot resolve the host name (DNS: no such host)", True
            return f"DNS lookup failed: {e.strerror or e}", False
        if isinstance(e, ConnectionRefusedError):
            return "connection refused (is the registry running on that port?)", False
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        for nxt in (e.__cause__, e.__context__):
            if nxt is not None:
                todo.append(nxt)
    return (f"{type(error).__name__}: {error}" if str(error) else type(error).__name__), False


class _Unauthorized(Exception):
    def __init__(self, challenge: str) -> None:
        super().__init__("unauthorized")
        self.challenge = challenge


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _on_headers_sent(sent: Callable[[], None]) -> Callable[[str, dict[str, Any]], Awaitable[None]]:
    """An httpcore ``trace`` callback that calls ``sent`` once a request's headers are
    written (see :data:`~lazyfs.remote.base.REQUEST_SENT`)."""

    async def trace(event: str, info: dict[str, Any]) -> None:
        if event.endswith("send_request_headers.complete"):
            sent()

    return trace


class DefaultTLS(ssl.SSLContext):
    """httpx's default verification (certifi's CAs) with the CA bundle loaded at the first
    TLS handshake rather than when a client is made: a plain-HTTP registry never loads it
    (0.07-0.1 s), and a fork server loads it once for all its daemons (:func:`default_tls`)."""

    def load(self) -> None:
        if not getattr(self, "_loaded", False):
            import certifi  # imported by httpx already; here only where a handshake needs it

            self.load_verify_locations(cafile=certifi.where())
            self._loaded = True

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        self.load()
        return super().wrap_bio(*args, **kwargs)

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self.load()
        return super().wrap_socket(*args, **kwargs)


_default_tls: DefaultTLS | None = None


def default_tls() -> DefaultTLS:
    """The one context every verifying client without its own CAs shares (what httpx would
    build per client: ``ssl.create_default_context(cafile=certifi.where())``)."""
    global _default_tls
    if _default_tls is None:
        _default_tls = DefaultTLS(ssl.PROTOCOL_TLS_CLIENT)  # verifies host and chain
    return _default_tls


class RegistrySource(Source):
    def __init__(
        self,
        host: str,
        repository: str,
        *,
        plain_http: bool = False,
        insecure: bool = False,
        hosts_dir: str | os.PathLike[str] | None = None,
        docker_config: str | os.PathLike[str] | None = None,
        credentials: Credentials | None = None,
        retry: RetryPolicy | None = None,
        max_concurrency: int = 8,
    ) -> None:
        self.host = host
        self.repository = repository
        self.name = f"{host}/{repository}"
        self.endpoints: list[Endpoint] = load_endpoints(
            host, hosts_dir, plain_http=plain_http, insecure=insecure
        )
        self.retry = retry or RetryPolicy()
        self.stats = Stats()
        #: endpoint netlocs seen answering a Range request with 200 and the whole blob
        self.range_ignored: set[str] = set()
        #: hosts (where blob bytes finally came from, after redirects) seen answering a
        #: multi-range request otherwise than with a multipart body of every range
        self.multirange_refused: set[str] = set()
        self._blob_host: dict[str, str] = {}  # blob digest -> the host its bytes came from
        #: where blobs sent whole are spooled (the opener puts them beside the cache)
        self.spool_dir: Path | None = None
        self._spools: dict[str, _Spool] = {}
        self._credentials = credentials
        self._docker_config = docker_config
        self._max_concurrency = max_concurrency
        stall = self.retry.stall_timeout
        # httpx's read timeout is per socket read: it fires on silence, not on total time.
        self._timeout = httpx.Timeout(stall, connect=min(stall, 10.0))
        self._clients: dict[tuple[bool, tuple[str, ...]], httpx.AsyncClient] = {}
        self._auth: dict[str, Authenticator] = {}
        self._limiters: dict[str, trio.CapacityLimiter] = {}
        self._scope = f"repository:{repository}:pull"
        self._push_scope = f"repository:{repository}:pull,push"

    # -- plumbing ---------------------------------------------------------------------------

    def _client(self, ep: Endpoint) -> httpx.AsyncClient:
        key = (ep.skip_verify, ep.ca)
        client = self._clients.get(key)
        if client is None:
            verify: bool | ssl.SSLContext = False if ep.skip_verify else default_tls()
            if ep.ca and not ep.skip_verify:
                verify = ssl.create_default_context()
                for ca in ep.ca:
                    verify.load_verify_locations(cafile=ca)
            client = httpx.AsyncClient(
                verify=verify, timeout=self._timeout, follow_redirects=False, trust_env=False
            )
            self._clients[key] = client
        return client

    def _authenticator(self, ep: Endpoint) -> Authenticator:
        auth = self._auth.get(ep.netloc)
        if auth is None:
            creds = self._credentials
            if creds is None:
                creds = load_docker_credentials(ep.netloc, self._docker_config)
            if creds is None and ep.netloc != self.host:
                creds = load_docker_credentials(self.host, self._docker_config)
            auth = self._auth[ep.netloc] = Authenticator(creds)
        return auth

    def _limiter(self, netloc: str) -> trio.CapacityLimiter:
        lim = self._limiters.get(netloc)
        if lim is None:
            lim = self._limiters[netloc] = trio.CapacityLimiter(self._max_concurrency)
        return lim

    async def aclose(self) -> None:
        for spool in self._spools.values():
            spool.scope.cancel()
            spool.file.close()
        self._spools.clear()
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()

    async def preconnect(self, n: int = 1) -> None:
        """Open ``n`` connections to the first pull endpoint and leave them idle in the pool:
        a cold open's requests beside the TOC (which keeps the manifest's connection) then
        find them ready instead of paying a handshake each in series.  ``GET /v2/`` is the
        version check every registry answers (200 or 401), read to its end so httpx keeps
        the connection.  A bonus: a failure is logged, never raised."""
        ep = next((e for e in self.endpoints if "pull" in e.capabilities), None)
        if ep is None:
            return
        client = self._client(ep)

        async def one() -> None:
            try:
                with trio.move_on_after(self._timeout.connect or 10.0):
                    async with client.stream("GET", f"{ep.url}/") as resp:
                        async for _ in resp.aiter_raw():
                            pass
            except httpx.HTTPError as e:
                log.info("%s: warming a connection failed: %s", ep.netloc, e)
            except Exception as e:  # a bonus: nothing here may take an open down
                log.warning("%s: warming a connection failed: %r", ep.netloc, e)

        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)

    # -- the request loop -------------------------------------------------------------------

    async def _fetch(
        self,
        path: str,
        headers: dict[str, str],
        consume: Callable[[httpx.Response, str], Awaitable[T]],
        *,
        capability: str,
        what: str,
        method: str = "GET",
        body: bytes | None = None,
    ) -> T:
        endpoints = [e for e in self.endpoints if capability in e.capabilities]
        if not endpoints:
            raise RemoteError(f"{self.name}: no endpoint with capability {capability!r}")
        last = ""
        give_up = trio.current_time() + self.retry.deadline
        broken: set[str] = set()  # endpoints that failed for good: asked no more
        for attempt in range(self.retry.attempts):
            retry_after: float | None = None
            missing = 0
            for n, ep in enumerate(endpoints):
                if ep.url in broken:
                    continue
                if (attempt or n) and trio.current_time() >= give_up:
                    break
                try:
                    return await self._fetch_one(ep, path, headers, consume, method, body)
                except _NotFound as e:
                    missing += 1
                    last = f"{ep.netloc}: {e}"
                except _Permanent as e:
                    broken.add(ep.url)
                    last = f"{ep.netloc}: {e}"
                except _Transient as e:
                    # Fall through to the next endpoint at once: a dead mirror costs no sleep.
                    last = f"{ep.netloc}: {e}"
                    if e.retry_after is not None:
                        retry_after = max(retry_after or 0.0, e.retry_after)
            if missing and missing + len(broken) == len(endpoints):
                raise NotFoundError(f"{what} not found in {self.name} ({last})")
            if len(broken) == len(endpoints):
                raise RemoteError(f"{what} from {self.name}: {last}")
            delay = self.retry.delay(attempt, retry_after)
            if attempt + 1 >= self.retry.attempts or delay >= give_up - trio.current_time():
                break  # sleeping past the deadline would only postpone the error
            self.stats.retries += 1
            await trio.sleep(delay)
        tries = attempt + 1
        raise RemoteError(f"{what} from {self.name}: gave up after {tries} tries: {last}")

    async def _fetch_one(
        self,
        ep: Endpoint,
        path: str,
        headers: dict[str, str],
        consume: Callable[[httpx.Response, str], Awaitable[T]],
        method: str = "GET",
        body: bytes | None = None,
    ) -> T:
        client = self._client(ep)
        auth = self._authenticator(ep)
        # An absolute URL is an upload session's Location, which belongs to one endpoint.
        url = path if "://" in path else f"{ep.url}/{self.repository}/{path}"
        scope = self._scope if method in ("GET", "HEAD") else self._push_scope
        async with self._limiter(ep.netloc):
            for round_ in range(2):
                try:
                    if auth.needs_token(scope):
                        self.stats.token_requests += 1
                        await auth.fetch_token(client, scope)
                    h = dict(headers)
                    value = auth.header(scope)
                    if value:
                        h["Authorization"] = value
                    return await self._send(client, url, ep.netloc, h, consume, method, body)
                except _Unauthorized as e:
                    if round_ == 1:
                        raise RemoteError(
                            f"{ep.netloc}: access to {self.repository} denied "
                            "(credentials rejected)"
                        ) from None
                    self.stats.token_requests += 1
                    if not await auth.on_unauthorized(client, e.challenge, scope):
                        raise RemoteError(
                            f"{ep.netloc}: authentication required for "
                            f"{self.repository} (no usable credentials)"
                        ) from None
        raise AssertionError("unreachable")

    async def _send(
        self,
        client: httpx.AsyncClient,
        url: str,
        netloc: str,
        headers: dict[str, str],
        consume: Callable[[httpx.Response, str], Awaitable[T]],
        method: str = "GET",
        body: bytes | None = None,
    ) -> T:
        sent = REQUEST_SENT.get()
        extensions = {"trace": _on_headers_sent(sent)} if sent is not None else None
        for _ in range(MAX_REDIRECTS + 1):
            target = httpx.URL(url)
            h = headers
            if target.netloc.decode() != netloc:
                # Storage backends get presigned URLs; our registry credentials stay home.
                h = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            try:
                async with client.stream(
                    method, target, headers=h, content=body, extensions=extensions
                ) as resp:
                    self.stats.requests += 1
                    status = resp.status_code
                    if status in (301, 302, 303, 307, 308):
                        loc = resp.headers.get("location")
                        if not loc:
                            raise _Transient(f"redirect {status} without Location")
                        url = str(resp.url.join(loc))
                        continue
                    if status == 401 and target.netloc.decode() == netloc:
                        raise _Unauthorized(resp.headers.get("www-authenticate", ""))
                    if status == 404:
                        raise _NotFound(await self._error_text(resp, "404 Not Found"))
                    if status == 403 and target.netloc.decode() == netloc:
                        why = await self._error_text(resp, "HTTP 403 Forbidden")
                        raise _Permanent(f"access to {self.repository} denied ({why})")
                    if status == 429:
                        raise _Transient(
                            "429 Too Many Requests", _retry_after(resp.headers.get("retry-after"))
                        )
                    if status in (408,) or status >= 500:
                        raise _Transient(f"HTTP {status}")
                    if status == 416:
                        raise _Unsatisfiable(
                            f"{netloc}: {url} answered HTTP 416", target.netloc.decode()
                        )
                    if status in (200, 206) or (method != "GET" and status in (201, 202, 204)):
                        return await consume(resp, netloc)
                    raise RemoteError(f"{netloc}: {url} answered HTTP {status}")
            except httpx.TransportError as e:
                text, permanent = transport_cause(e)
                raise (_Permanent if permanent else _Transient)(text) from e
        raise RemoteError(f"{netloc}: too many redirects for {url}")

    async def _error_text(self, resp: httpx.Response, default: str) -> str:
        """``default`` and the registry's own error code (``MANIFEST_UNKNOWN``,
        ``NAME_UNKNOWN``, ``DENIED``…) when its body says one."""
        try:
            body = await self._read_all(resp, 64 * 1024)
            errors = msgspec.json.decode(body).get("errors") or []
            code = errors[0].get("code") if errors and isinstance(errors[0], dict) else None
        except (RemoteError, _Transient, httpx.HTTPError, msgspec.DecodeError, AttributeError):
            return default
        return f"{default}: {code}" if isinstance(code, str) and code else default

    async def _read_all(self, resp: httpx.Response, limit: int) -> bytes:
        declared = resp.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RemoteError(f"{resp.url}: document of {declared} bytes is too large")
        buf = bytearray()
        async for chunk in resp.aiter_bytes():
            self.stats.bytes_received += len(chunk)
            buf += chunk
            if len(buf) > limit:
                raise RemoteError(f"{resp.url}: document larger than {limit} bytes")
        if declared is not None and declared.isdigit() and len(buf) != int(declared):
            raise _Transient(f"body of {len(buf)} bytes, Content-Length {declared}")
        return bytes(buf)

    # -- Source -----------------------------------------------------------------------------

    async def get_manifest(self, ref: str) -> tuple[bytes, str, str]:
        by_digest = ref.startswith("sha256:")
        if by_digest:
            oci.check_digest(ref)

        async def consume(resp: httpx.Response, netloc: str) -> tuple[bytes, str, str]:
            data = await self._read_all(resp, MAX_MANIFEST_SIZE)
            header = resp.headers.get("docker-content-digest", "")
            want = ref if by_digest else (header if header.startswith("sha256:") else "")
            if want:
                try:
                    oci.verify(data, want, "manifest")
                except IntegrityError as e:
                    raise _Transient(str(e)) from None
            mt = oci.sniff_media_type(data, resp.headers.get("content-type", "").split(";")[0])
            return data, mt, want or oci.sha256_digest(data)

        return await self._fetch(
            f"manifests/{ref}",
            {"Accept": MANIFEST_ACCEPT},
            consume,
            capability="pull" if by_digest else "resolve",
            what=f"manifest {ref}" if by_digest else f"tag {ref}",
        )

    async def get_blob(self, digest: str) -> bytes:
        oci.check_digest(digest)

        async def consume(resp: httpx.Response, netloc: str) -> bytes:
            data = await self._read_all(resp, MAX_DOCUMENT_SIZE)
            try:
                return oci.verify(data, digest)
            except IntegrityError as e:
                raise _Transient(str(e)) from None

        return await self._fetch(
            f"blobs/{digest}",
            {"Accept-Encoding": "identity"},
            consume,
            capability="pull",
            what=f"blob {digest}",
        )

    async def read_range(self, digest: str, start: int, end: int) -> bytes:
        # Pieces joined once at the end: appending to a bytearray and slicing it copied
        # every range twice more (a third of the time of a large read).
        pieces: list[bytes] = []

        async def keep(piece: bytes) -> None:
            pieces.append(piece)

        await self.stream_range(digest, start, end, keep)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def stream_range(self, digest: str, start: int, end: int, sink: Sink) -> None:
        oci.check_digest(digest)
        if start < 0 or end < start:
            raise ValueError(f"bad range [{start}, {end})")
        if end == start:
            await sink(b"")
            return
        spool = self._spools.get(digest)
        if spool is not None and spool.error is None:
            await self._stream_spool(digest, spool, start, end, sink)
            return
        want = end - start
        got = 0  # bytes handed to the sink, over all attempts
        # Each attempt asks for what is still missing: the loop in _fetch sends these
        # headers again on a retry, so a cut transfer resumes after its last byte.
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}

        async def consume(resp: httpx.Response, netloc: str) -> None:
            nonlocal got
            skip = start + got
            if resp.status_code == 206:
                m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
                first = int(m.group(1)) if m else start + got
                if first > start + got:
                    raise _Transient(f"server sent range from {first}, wanted {start + got}")
                skip = start + got - first
            elif self.spool_dir is not None:
                # The whole blob is coming: drop this answer after its headers and have one
                # download of the blob serve this read and every other one.
                self.range_ignored.add(netloc)
                self._start_spool(digest)
                raise _Spooled
            else:
                # The whole blob came back: remember, and take only what we need from it.
                self.range_ignored.add(netloc)
            async for chunk in resp.aiter_bytes():
                self.stats.bytes_received += len(chunk)
                if skip >= len(chunk):
                    skip -= len(chunk)
                    continue
                piece = chunk[skip:] if skip else chunk
                skip = 0
                if got + len(piece) > want:
                    piece = piece[: want - got]
                if piece:
                    await sink(piece)
                    got += len(piece)
                if got >= want:
                    if resp.status_code != 206:
                        # The whole blob is coming: stop here (closing this connection)
                        # rather than read the rest.  A 206 is read to its end, so httpx can
                        # reuse the connection: a new one costs a round trip (and TLS).
                        break
                else:
                    headers["Range"] = f"bytes={start + got}-{end - 1}"
            if got < want:
                raise _Transient(f"short body: {got} of {want} bytes")

        # One deadline for the whole transfer, as for any fetch: a registry that stalls
        # again and again fails within it even though each attempt resumes.
        try:
            await self._fetch(
                f"blobs/{digest}",
                headers,
                consume,
                capability="pull",
                what=f"bytes {start}-{end} of blob {digest}",
            )
        except _Spooled:
            await self._stream_spool(digest, self._spools[digest], start + got, end, sink)

    def multirange(self, digest: str) -> bool:
        """Whether a multi-range request is worth sending for this blob: not once the host
        its bytes come from refused one, nor while the blob is spooled whole."""
        if digest in self._spools:
            return False
        host = self._blob_host.get(digest)
        if host is not None:
            return host not in self.multirange_refused
        return not any(ep.netloc in self.multirange_refused for ep in self.endpoints)

    async def stream_ranges(
        self, digest: str, ranges: Sequence[tuple[int, int]], sink: RangesSink
    ) -> None:
        oci.check_digest(digest)
        check_ranges(ranges)
        for part in split_ranges(ranges):
            if len(part) == 1 or not self.multirange(digest):
                await super().stream_ranges(digest, part, sink)  # one range at a time
            else:
                await self._stream_multi(digest, part, sink)

    async def _stream_multi(
        self, digest: str, ranges: list[tuple[int, int]], sink: RangesSink
    ) -> None:
        """One request for several ranges, each part handed over as it arrives.  A cut
        answer resumes with the ranges still missing; an answer that is not a multipart body
        of them (the host ignores or refuses multi-range) is used for what it holds in
        order, the host is remembered, and the rest is asked for one range at a time."""
        idx = 0  # ranges[idx:] are missing; of ranges[idx], bytes from pos
        pos = ranges[0][0]
        headers = {"Range": range_spec(ranges), "Accept-Encoding": "identity"}

        async def deliver(at: int, data: bytes) -> None:
            # Bytes [at, at + len(data)) of the blob: hand over those that were asked for and
            # not handed over yet.  Bytes before pos (an overlapping or repeated part) are
            # dropped; a part that starts past pos left a hole: parts must come in order.
            nonlocal idx, pos
            stop = at + len(data)
            while idx < len(ranges) and pos < stop:
                if at > pos:
                    raise Malformed(f"a part from {at} skips bytes from {pos}")
                end = min(ranges[idx][1], stop)
                await sink(pos, data if (pos, end) == (at, stop) else data[pos - at : end - at])
                pos = end
                if pos == ranges[idx][1]:
                    idx += 1
                    if idx < len(ranges):
                        pos = ranges[idx][0]

        async def consume(resp: httpx.Response, netloc: str) -> None:
            host = resp.url.netloc.decode()
            self._blob_host[digest] = host
            several = "," in headers["Range"]
            self.stats.multirange_requests += several
            try:
                boundary = boundary_of(resp.headers.get("content-type", ""))
                if resp.status_code != 206 or (several and boundary is None):
                    if several:
                        self._refused(host)
                    if resp.status_code != 206:
                        raise _NoMultirange  # a whole blob: not read here (see stream_range)
                if boundary is None:
                    m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
                    if m is None:
                        raise Malformed("a 206 answer without Content-Range")
                    at = int(m.group(1))
                    async for chunk in resp.aiter_bytes():
                        self.stats.bytes_received += len(chunk)
                        await deliver(at, chunk)
                        at += len(chunk)
                        # Only what lies near: a 206 of the whole blob is not read through.
                        if idx == len(ranges) or (several and pos - at > _MAX_EPILOGUE):
                            break
                    if several and idx < len(ranges):
                        raise _NoMultirange
                else:
                    parts = ByteRanges(boundary)
                    extra = 0  # bytes read after the last range was complete
                    async for chunk in resp.aiter_bytes():
                        self.stats.bytes_received += len(chunk)
                        if idx == len(ranges):
                            extra += len(chunk)
                        if not parts.done:
                            for at, piece in parts.feed(chunk):
                                await deliver(at, piece)
                        # Past the closing boundary the body is read to its end (an
                        # epilogue, usually nothing): left early, the connection closes and
                        # the next request pays a new one's handshake.
                        if extra > _MAX_EPILOGUE:
                            break
                    parts.finish()
                if idx < len(ranges):
                    raise _Transient(f"short multipart body: {len(ranges) - idx} ranges missing")
            except Malformed:
                self._refused(host)
                raise _NoMultirange from None
            finally:
                # A retry (a cut or stalled answer) asks only for what is still missing.
                if idx < len(ranges):
                    headers["Range"] = range_spec([(pos, ranges[idx][1]), *ranges[idx + 1 :]])

        try:
            await self._fetch(
                f"blobs/{digest}",
                headers,
                consume,
                capability="pull",
                what=f"{len(ranges)} ranges of blob {digest}",
            )
        except (_NoMultirange, _Unsatisfiable) as e:
            if isinstance(e, _Unsatisfiable):
                self._blob_host[digest] = e.host
                self._refused(e.host)
            if idx < len(ranges):
                rest = [(pos, ranges[idx][1]), *ranges[idx + 1 :]]
                await super().stream_ranges(digest, rest, sink)

    def _refused(self, host: str) -> None:
        if host and host not in self.multirange_refused:
            log.info(
                "%s: no multi-range answers from %s; asking for single ranges", self.name, host
            )
        self.multirange_refused.add(host)
        self.stats.multirange_refused += 1

    async def _stream_spool(
        self, digest: str, spool: _Spool, start: int, end: int, sink: Sink
    ) -> None:
        for pos in range(start, end, STREAM_PIECE):
            await sink(await self._from_spool(digest, spool, pos, min(end, pos + STREAM_PIECE)))

    def ranges_supported(self) -> bool:
        """With a spool directory, a blob sent whole is downloaded once and every range read
        from that copy; without one, False once an endpoint was seen ignoring Range."""
        return self.spool_dir is not None or not self.range_ignored

    def _start_spool(self, digest: str) -> None:
        spool = self._spools.get(digest)
        if spool is None or spool.error is not None:
            spool = self._spools[digest] = _Spool(self.spool_dir)
            # A system task: the download outlives the reader that found the blob sent whole
            # (which returns as soon as its own bytes are in), and ends at aclose.
            trio.lowlevel.spawn_system_task(self._spool_blob, digest, spool)

    async def _spool_blob(self, digest: str, spool: _Spool) -> None:
        async def consume(resp: httpx.Response, netloc: str) -> None:
            spool.have = 0  # a retry starts over (the bytes are the same, or chunks fail)
            sha = hashlib.sha256()
            fd = spool.file.fileno()
            async for chunk in resp.aiter_bytes():
                self.stats.bytes_received += len(chunk)
                sha.update(chunk)
                os.pwrite(fd, chunk, spool.have)  # page cache: quicker than a thread hop
                spool.wrote(len(chunk))
            if "sha256:" + sha.hexdigest() != digest:
                raise _Transient(f"blob {digest} sent whole has another digest")

        error: str | None = None
        with spool.scope:
            try:
                await self._fetch(
                    f"blobs/{digest}",
                    {"Accept-Encoding": "identity"},
                    consume,
                    capability="pull",
                    what=f"blob {digest}",
                )
            except (LazyfsError, OSError) as e:
                error = str(e)
            except Exception as e:  # a system task must not raise: readers get the error
                error = f"{type(e).__name__}: {e}"
        spool.finish(error or ("download stopped" if spool.scope.cancel_called else None))

    async def _from_spool(self, digest: str, spool: _Spool, start: int, end: int) -> bytes:
        while spool.have < end and not spool.done:
            await spool.changed.wait()
        if spool.have < end:
            if spool.error is not None and self._spools.get(digest) is spool:
                del self._spools[digest]  # the next read asks again
            raise RemoteError(
                f"bytes {start}-{end} of blob {digest} from {self.name}: "
                + (spool.error or f"the blob has only {spool.have} bytes")
            )
        if end - start <= 1 << 20:  # from the page cache: quicker than a thread hop
            await trio.lowlevel.checkpoint()
            return os.pread(spool.file.fileno(), end - start, start)
        return await trio.to_thread.run_sync(os.pread, spool.file.fileno(), end - start, start)

    async def download(self, digest: str, size: int, dst: BinaryIO) -> None:
        oci.check_digest(digest)

        async def consume(resp: httpx.Response, netloc: str) -> None:
            dst.seek(0)
            dst.truncate()  # a retry starts over
            sha = hashlib.sha256()
            got = 0
            async for chunk in resp.aiter_bytes():
                self.stats.bytes_received += len(chunk)
                sha.update(chunk)
                # Disk writes of up to a few MiB: quick enough not to need a worker thread.
                dst.write(chunk)
                got += len(chunk)
            if got != size or "sha256:" + sha.hexdigest() != digest:
                raise _Transient(f"blob {digest}: got {got} of {size} bytes or a bad digest")

        await self._fetch(
            f"blobs/{digest}",
            {"Accept-Encoding": "identity"},
            consume,
            capability="pull",
            what=f"blob {digest}",
        )

    # -- writes (lazyfs.remote.push) ---------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        capability: str = "push",
        what: str,
    ) -> tuple[int, httpx.Headers, bytes]:
        """One request through the auth / retry / mirror machinery: ``(status, headers, body)``
        of a 2xx answer (body bounded like a manifest; ``Location`` made absolute).  404 raises
        NotFoundError."""

        async def consume(resp: httpx.Response, netloc: str) -> tuple[int, httpx.Headers, bytes]:
            data = b"" if method == "HEAD" else await self._read_all(resp, MAX_MANIFEST_SIZE)
            headers = httpx.Headers(resp.headers)
            if "location" in headers:
                # Absolute, so an upload session continues on the endpoint that opened it.
                headers["location"] = str(resp.url.join(headers["location"]))
            return resp.status_code, headers, data

        return await self._fetch(
            path, headers or {}, consume, capability=capability, what=what, method=method, body=body
        )
