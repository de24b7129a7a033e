"""Outbound HTTP for the guest: only to the E2B API and (when configured) TemperFS.

The guest names a URL; the gateway checks it against the configured bases (scheme, host,
port, path prefix), never follows redirects, strips credentials the guest tried to set,
adds `X-API-Key` to requests for the E2B base only, bounds the wait and the body size, and
scrubs the key from anything that flows back.

The TemperFS base is `{temper_api_url}/tdata`: only the OData entity sets the conversation
storage uses, never the rest of the Temper API. It is checked first, so a TemperFS on the
same origin as the E2B API (the mock serves both) still never receives the key.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx

from provisioner.ports import HttpError, HttpErrorKind, HttpRequest, HttpResponse

_LOG = logging.getLogger("sandbox_provisioner.http_gateway")
MAX_RESPONSE_BYTES = 1 << 20
MAX_REQUEST_BYTES = 1 << 20
_FORBIDDEN_REQUEST_HEADERS = frozenset(
    {
        "x-api-key",
        "authorization",
        "cookie",
        "host",
        "content-length",
        "transfer-encoding",
        "accept-encoding",
    }
)
_METHODS = frozenset({"GET", "POST", "DELETE", "PUT", "PATCH"})
# RFC 9110 field names (tokens) and values (visible ASCII, spaces and tabs): anything else
# could split a header or a request on the wire.
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")


@dataclass(frozen=True)
class AllowedBase:
    scheme: str
    host: str
    port: int
    path_prefix: str

    name: str = "E2B API"

    @classmethod
    def parse(cls, base_url: str, name: str = "E2B API") -> AllowedBase:
        parts = urlsplit(base_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{name} URL must be http(s)://host[:port][/path], got {base_url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname.lower(), port, parts.path.rstrip("/"), name)

    def check(self, url: str) -> str | None:
        """None when the URL is allowed, else why not."""
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as error:
            return f"unparsable URL: {error}"
        if parts.scheme != self.scheme:
            return f"scheme {parts.scheme!r} is not allowed"
        if (parts.hostname or "").lower() != self.host or port != self.port:
            return f"host {parts.hostname}:{port} is not the configured {self.name}"
        if parts.username or parts.password:
            return "credentials in the URL are not allowed"
        path = parts.path
        if self.path_prefix and not (
            path == self.path_prefix or path.startswith(self.path_prefix + "/")
        ):
            return f"path is outside the configured {self.name}"
        # Checked decoded too: a server that decodes `%2e%2e` or `%2f` before normalising
        # would otherwise walk out of the prefix.
        decoded = unquote(path)
        for form in (path, decoded):
            if "/../" in form + "/" or "/./" in form + "/":
                return "dot segments are not allowed"
        if "\\" in decoded:
            return "backslashes are not allowed in the path"
        return None


@dataclass(frozen=True)
class Exchange:
    """One `send`, as an observer sees it once it is over: the guest's request and either
    the (scrubbed) answer or the error the guest was given, and how long it took."""

    request: HttpRequest
    response: HttpResponse | None
    error: HttpError | None
    duration_s: float


ExchangeObserver = Callable[[Exchange], None]


_RESOLVE_TTL_S = 30.0


def _is_private(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


class AddressPolicy:
    """Refuses a host (E2B's, TemperFS's) that resolves to a loopback, private or
    link-local address, unless allowed (the mock E2B runs on loopback, so tests and
    simulations allow it)."""

    def __init__(self, host: str, port: int, allow_private_network: bool) -> None:
        self._host = host
        self._port = port
        self._allow = allow_private_network
        self._lock = threading.Lock()
        self._checked_at = -_RESOLVE_TTL_S
        self._refusal: str | None = None

    def refusal(self) -> str | None:
        """Why the host is refused (a non-public address), or None. A name that does not
        resolve raises HttpError(CONNECTION), as an unreachable E2B does with the check
        off: a DNS blip is E2B being unavailable (retryable), never a refusal."""
        if self._allow:
            return None
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at >= _RESOLVE_TTL_S:
                try:
                    infos = socket.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
                except OSError as error:
                    raise HttpError(
                        HttpErrorKind.CONNECTION, f"cannot resolve {self._host}: {error}"
                    ) from None
                self._refusal = self._private(infos)
                self._checked_at = now
            return self._refusal

    def _private(self, infos: list[Any]) -> str | None:
        for info in infos:
            address = str(info[4][0])
            if _is_private(address):
                return (
                    f"{self._host} resolves to the non-public address {address};"
                    " allow it explicitly with allow_private_network"
                )
        return None


TEMPERFS_PATH = "/tdata"


class HttpGateway:
    """`api_key` is the host's own E2B key: the one attached when an invocation brings none
    (`send(..., api_key=...)` carries the key its config named, see
    `host/runtime/credentials.py`). `temperfs_url` is the Temper API base whose `/tdata`
    the guest may reach without any key; None: no TemperFS."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        temperfs_url: str | None = None,
        allow_private_network: bool = False,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        transport: httpx.BaseTransport | None = None,
        observers: Iterable[ExchangeObserver] = (),
    ) -> None:
        self._observers: list[ExchangeObserver] = list(observers)
        self.base_url = base_url.rstrip("/")
        self._allowed = AllowedBase.parse(base_url)
        self._addresses = AddressPolicy(
            self._allowed.host, self._allowed.port, allow_private_network
        )
        self.temperfs_url = None if temperfs_url is None else temperfs_url.rstrip("/")
        self._temperfs: tuple[AllowedBase, AddressPolicy] | None = None
        if self.temperfs_url is not None:
            allowed = AllowedBase.parse(self.temperfs_url + TEMPERFS_PATH, "TemperFS")
            self._temperfs = (
                allowed,
                AddressPolicy(allowed.host, allowed.port, allow_private_network),
            )
        self.api_key = api_key
        self._api_key = api_key
        self._max_response_bytes = max_response_bytes
        self._client = httpx.Client(
            follow_redirects=False,
            transport=transport,
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )

    def close(self) -> None:
        self._client.close()

    def _route(self, url: str, api_key: str | None) -> str | None:
        """The key to attach (None: TemperFS, no key); raises DENIED outside both bases."""
        if self._temperfs is not None:
            allowed, addresses = self._temperfs
            if allowed.check(url) is None:
                refusal = addresses.refusal()
                if refusal is not None:
                    raise HttpError(HttpErrorKind.DENIED, refusal)
                return None
        refusal = self._allowed.check(url)
        if refusal is not None:
            raise HttpError(HttpErrorKind.DENIED, refusal)
        refusal = self._addresses.refusal()
        if refusal is not None:
            raise HttpError(HttpErrorKind.DENIED, refusal)
        return self._api_key if api_key is None else api_key

    def observe(self, observer: ExchangeObserver) -> None:
        """Call `observer` after every `send` (metrics). It runs on the calling thread; an
        exception it raises is logged and swallowed, so observing never changes an answer."""
        self._observers.append(observer)

    def send(
        self,
        request: HttpRequest,
        *,
        deadline_ms: int | None = None,
        api_key: str | None = None,
    ) -> HttpResponse:
        """`api_key`: the invocation's E2B key (None: the host's own)."""
        if not self._observers:
            return self._send(request, deadline_ms, api_key)
        started = time.monotonic()
        response: HttpResponse | None = None
        error: HttpError | None = None
        try:
            response = self._send(request, deadline_ms, api_key)
            return response
        except HttpError as raised:
            error = raised
            raise
        finally:
            exchange = Exchange(request, response, error, time.monotonic() - started)
            for observer in self._observers:
                try:
                    observer(exchange)
                except Exception:
                    _LOG.exception("an HTTP exchange observer failed")

    def _send(
        self, request: HttpRequest, deadline_ms: int | None, api_key: str | None
    ) -> HttpResponse:
        method = request.method.upper()
        if method not in _METHODS:
            raise HttpError(HttpErrorKind.INVALID_REQUEST, f"method {request.method!r} not allowed")
        key = self._route(request.url, api_key)
        secrets = [k for k in {self._api_key, api_key or ""} if k]

        def scrub(text: str) -> str:
            for secret in secrets:
                text = text.replace(secret, "[redacted]")
            return text

        if len(request.body) > MAX_REQUEST_BYTES:
            raise HttpError(HttpErrorKind.INVALID_REQUEST, "request body too large")
        timeout_ms = max(1, request.timeout_ms)
        if deadline_ms is not None:
            timeout_ms = min(timeout_ms, max(1, deadline_ms))
        # httpx's timeout bounds each read, not the exchange: a body trickled a byte at a
        # time would hold the call (and the host thread, which the guest's epoch deadline
        # cannot interrupt) for as long as the server likes.
        give_up_at = time.monotonic() + timeout_ms / 1000
        for name, value in request.headers:
            if not _HEADER_NAME.fullmatch(name) or not _HEADER_VALUE.fullmatch(value):
                raise HttpError(
                    HttpErrorKind.INVALID_REQUEST, f"header {name[:40]!r} is not a valid field"
                )
        headers = [
            (name, value)
            for name, value in request.headers
            if name.lower() not in _FORBIDDEN_REQUEST_HEADERS
        ]
        if key is not None:
            headers.append(("X-API-Key", key))
        # Decoded bytes are what is capped, so ask for no compression (no zip bombs).
        headers.append(("Accept-Encoding", "identity"))
        # A pooled keep-alive connection the server has just closed fails before any
        # answer; sending once more is safe for every request the guest makes (GET and
        # DELETE are idempotent, and a create carries an Idempotency-Key).
        for attempt in (1, 2):
            answered = False
            try:
                with self._client.stream(
                    method,
                    request.url,
                    headers=headers,
                    content=request.body or None,
                    timeout=timeout_ms / 1000,
                ) as response:
                    answered = True
                    body = bytearray()
                    for chunk in response.iter_bytes():
                        body += chunk
                        if len(body) > self._max_response_bytes:
                            raise HttpError(HttpErrorKind.TOO_LARGE, str(self._max_response_bytes))
                        if time.monotonic() > give_up_at:
                            raise HttpError(HttpErrorKind.TIMEOUT)
                    if time.monotonic() > give_up_at:
                        raise HttpError(HttpErrorKind.TIMEOUT)
                    status = response.status_code
                    response_headers = tuple(
                        (name, scrub(value)) for name, value in response.headers.multi_items()
                    )
                break
            except httpx.TimeoutException:
                raise HttpError(HttpErrorKind.TIMEOUT) from None
            except (httpx.InvalidURL, httpx.UnsupportedProtocol) as error:
                raise HttpError(HttpErrorKind.INVALID_REQUEST, scrub(str(error))[:300]) from None
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as error:
                stale = not answered and attempt == 1 and time.monotonic() < give_up_at
                if not stale:
                    raise HttpError(HttpErrorKind.CONNECTION, scrub(str(error))[:300]) from None
            except httpx.TransportError as error:
                raise HttpError(HttpErrorKind.CONNECTION, scrub(str(error))[:300]) from None
        data = bytes(body)
        for secret in secrets:
            data = data.replace(secret.encode(), b"[redacted]")
        return HttpResponse(status, response_headers, data)
