"""Fetch one remote image without letting a client aim the guard at internal services (SSRF).

Every hop of a fetch (the URL and each redirect target) is parsed and checked by
:mod:`guard.intake.addresses`; the host is resolved once and *every* address must be allowed;
the connection then goes to that validated address itself (``Host`` header and TLS SNI keep
the name), so a DNS answer that changes between the check and the connect (rebinding) cannot
redirect it. Redirects are followed by hand for the same reason.

Client-facing messages are short and fixed; addresses, exception text and URLs go to the log
only.
"""

from __future__ import annotations

import asyncio
import http.cookiejar
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable

import httpx

from guard.config import ImagesConfig
from guard.errors import InvalidRequest, PayloadTooLarge
from guard.intake.addresses import (
    IPAddress,
    ParsedURL,
    address_allowed,
    parse_image_url,
    url_text_ok,
)

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> IP address strings, as ``getaddrinfo`` would return them."""

_REDIRECTS = frozenset({301, 302, 303, 307, 308})


async def system_resolver(host: str, port: int) -> list[str]:
    """Resolve with the system resolver, both address families, de-duplicated in order."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class _FetchError(Exception):
    """Internal: a fetch failure with a client-safe reason (the message's tail)."""

    def __init__(self, reason: str, *, too_large: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.too_large = too_large


class Fetcher:
    """Fetches remote images for the intake; one shared HTTP client, closed by :meth:`aclose`.

    ``resolver`` and ``transport`` exist for tests. A given transport brings its own
    connection-pool settings (the no-keep-alive limits below apply to the default one only).
    """

    def __init__(
        self,
        cfg: ImagesConfig,
        *,
        resolver: Resolver | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._cfg = cfg
        self._resolver = resolver or system_resolver
        # A jar whose policy accepts no domain: a Set-Cookie from one image host must never
        # be replayed to another request (the client is shared by all users of the guard).
        no_cookies = http.cookiejar.CookieJar(
            http.cookiejar.DefaultCookiePolicy(allowed_domains=[])
        )
        self._client = httpx.AsyncClient(
            trust_env=False,  # no proxy or netrc from the environment: we connect ourselves
            follow_redirects=False,
            transport=transport,
            cookies=no_cookies,
            timeout=httpx.Timeout(cfg.fetch.timeout_s),
            # No keep-alive: a pooled connection is keyed by IP, and must not be reused for
            # another host name whose TLS certificate was never checked on it.
            limits=httpx.Limits(max_keepalive_connections=0),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str, *, param: str, index: int | None = None) -> bytes:
        """The body of the image at ``url`` (http/https), within the configured limits.

        Raises :class:`InvalidRequest` (refused URL or address, failed fetch) or
        :class:`PayloadTooLarge` (body over ``max_image_bytes``).
        """
        prefix = f"image {index}: " if index is not None else "image: "
        try:
            # One deadline for all hops, DNS included.
            async with asyncio.timeout(self._cfg.fetch.timeout_s):
                return await self._fetch(url, param=param, index=index)
        except _FetchError as e:
            cls = PayloadTooLarge if e.too_large else InvalidRequest
            raise cls(prefix + e.reason, param=param) from None
        except (TimeoutError, httpx.TimeoutException):
            log.info("image fetch timed out (param=%s)", param)
            raise InvalidRequest(prefix + "could not fetch image (timeout)", param=param) from None
        except httpx.HTTPError as e:
            log.info("image fetch failed (param=%s): %s", param, type(e).__name__)
            log.debug("image fetch failure detail", exc_info=True)
            raise InvalidRequest(prefix + "could not fetch image", param=param) from None

    async def _fetch(self, url: str, *, param: str, index: int | None) -> bytes:
        fetch_cfg = self._cfg.fetch
        current = url
        for hop in range(fetch_cfg.max_redirects + 1):
            parsed = parse_image_url(current, fetch_cfg, param=param, index=index)
            addresses = await self._addresses(parsed)
            response = await self._send(parsed, addresses)
            try:
                if response.status_code in _REDIRECTS:
                    location = response.headers.get("location", "")
                    log.debug("image fetch hop %d: %d redirect", hop, response.status_code)
                    if not location or not url_text_ok(location):
                        raise _FetchError("could not fetch image (invalid redirect)")
                    try:
                        current = str(httpx.URL(parsed.url).join(location))
                    except (httpx.InvalidURL, UnicodeError, ValueError):
                        raise _FetchError("could not fetch image (invalid redirect)") from None
                    continue
                if not 200 <= response.status_code < 300:
                    raise _FetchError(f"could not fetch image (HTTP {response.status_code})")
                return await self._read_body(response)
            finally:
                await response.aclose()
        raise _FetchError("could not fetch image (too many redirects)")

    async def _addresses(self, parsed: ParsedURL) -> list[IPAddress]:
        """The validated addresses to connect to; refuses if any resolved one is not allowed."""
        fetch_cfg = self._cfg.fetch
        if parsed.ip is not None:
            candidates: list[IPAddress] = [parsed.ip]
        else:
            try:
                answers = await self._resolver(parsed.host, parsed.port)
                candidates = [ipaddress.ip_address(a) for a in answers]
            except (OSError, UnicodeError, ValueError) as e:
                log.info("image host %s did not resolve: %s", parsed.host, type(e).__name__)
                raise _FetchError("could not resolve image host") from None
            if not candidates:
                raise _FetchError("could not resolve image host")
        # All, not any: the system may pick any answer when connecting, and a name that also
        # points inside the network is suspicious enough to refuse outright.
        refused = [ip for ip in candidates if not address_allowed(ip, fetch_cfg)]
        if refused:
            log.info("image host %s refused: non-public address %s", parsed.host, refused)
            raise _FetchError("URL resolves to a non-public address")
        return candidates

    async def _send(self, parsed: ParsedURL, addresses: list[IPAddress]) -> httpx.Response:
        """Send the GET to the first validated address that accepts a connection."""
        headers = {
            "Host": parsed.host_header,
            "User-Agent": self._cfg.fetch.user_agent,
            "Accept": "image/*",
            # Identity only: a compressed body could expand past the size limit in one chunk.
            "Accept-Encoding": "identity",
        }
        extensions = {"sni_hostname": parsed.host} if parsed.scheme == "https" else {}
        last_error: httpx.ConnectError | None = None
        for ip in addresses:
            target = httpx.URL(
                scheme=parsed.scheme,
                host=ip.compressed,
                port=parsed.port,
                raw_path=parsed.target.encode("ascii"),
            )
            request = httpx.Request("GET", target, headers=headers, extensions=extensions)
            try:
                return await self._client.send(request, stream=True)
            except httpx.ConnectError as e:
                log.debug("image host %s: connect to %s failed", parsed.host, ip)
                last_error = e
        assert last_error is not None  # addresses is never empty
        raise last_error

    async def _read_body(self, response: httpx.Response) -> bytes:
        limit = self._cfg.max_image_bytes
        too_large = _FetchError(f"image exceeds {limit} bytes", too_large=True)
        declared = response.headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            raise too_large
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise _FetchError("could not fetch image (unsupported content encoding)")
        body = bytearray()
        # Raw bytes: nothing is decompressed, so memory is bounded by the limit plus a chunk.
        async for chunk in response.aiter_raw():
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)
