"""SSRF-safe image fetching against a real HTTP server on 127.0.0.1.

Loopback is not a public address, so tests that must reach the server list it in
``allow_networks``; the others prove that nothing connects at all.
"""

from __future__ import annotations

import asyncio
import io
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from PIL import Image

from guard.config import FetchConfig, ImagesConfig
from guard.errors import InvalidRequest, PayloadTooLarge
from guard.intake.fetch import Fetcher, Resolver


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png()


class ImageServer:
    """A tiny HTTP/1.1 server that records every connection and request."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port: int = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            target = head[0].split(" ")[1]
            fields = (line.split(":", 1) for line in head[1:] if line)
            headers = {k.strip().lower(): v.strip() for k, v in fields}
            self.requests.append((target, headers))
            await self._route(target, headers, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _route(self, target: str, headers: dict[str, str], w: asyncio.StreamWriter) -> None:
        path, _, query = target.partition("?")
        if path == "/img.png":
            await _reply(w, 200, PNG, {"Content-Type": "image/png"})
        elif path.startswith("/r/"):  # /r/N?abs: a chain of N redirects ending at /img.png
            n = int(path[3:])
            nxt = f"/r/{n - 1}?{query}" if n > 1 else "/img.png"
            if query == "abs":
                nxt = f"http://{headers['host']}{nxt}"
            await _reply(w, 302, b"", {"Location": nxt})
        elif path == "/to":  # redirect to the URL given in the query
            await _reply(w, 302, b"", {"Location": query} if query else {})
        elif path == "/cookie":
            await _reply(w, 302, b"", {"Location": "/img.png", "Set-Cookie": "sid=secret; Path=/"})
        elif path == "/slow":
            await asyncio.sleep(30)
        elif path == "/trickle":  # a byte every 50 ms: no single read ever times out
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
            for _ in range(600):
                w.write(b"x")
                await w.drain()
                await asyncio.sleep(0.05)
        elif path == "/huge":  # no Content-Length: only streaming can notice the size
            w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            for _ in range(800):  # 50 MiB at most
                w.write(b"\0" * 65536)
                await w.drain()
        elif path == "/huge-cl":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
            await w.drain()
        elif path == "/gzip":
            await _reply(w, 200, b"\x1f\x8b", {"Content-Encoding": "gzip"})
        else:
            await _reply(w, 404, b"not found", {})


async def _reply(
    w: asyncio.StreamWriter, status: int, body: bytes, headers: dict[str, str]
) -> None:
    lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    w.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await w.drain()


class RecordingTransport(httpx.AsyncBaseTransport):
    """Records what the fetcher actually sends (URL with the IP, headers, extensions)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_keepalive_connections=0))
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class CountingResolver:
    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.table[host]


LOOPBACK = ["127.0.0.1/32"]
MakeFetcher = Callable[..., Fetcher]


@pytest.fixture
async def server() -> AsyncIterator[ImageServer]:
    srv = ImageServer()
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
async def transport() -> AsyncIterator[RecordingTransport]:
    t = RecordingTransport()
    yield t
    await t.aclose()


@pytest.fixture
async def make_fetcher(transport: RecordingTransport) -> AsyncIterator[MakeFetcher]:
    made: list[Fetcher] = []

    def make(
        resolver: Resolver | None = None,
        max_image_bytes: int = 1_000_000,
        **fetch: Any,
    ) -> Fetcher:
        cfg = ImagesConfig(max_image_bytes=max_image_bytes, fetch=FetchConfig(**fetch))
        made.append(Fetcher(cfg, resolver=resolver, transport=transport))
        return made[-1]

    yield make
    for f in made:
        await f.aclose()


def assert_clean(message: str) -> None:
    """Client messages carry no addresses, exception names or internals."""
    for leak in ("127.0.0.1", "10.0.0", "169.254", "Error", "Exception", "errno", "Name or"):
        assert leak not in message, message


async def test_fetches_image_and_sends_headers(
    server: ImageServer, make_fetcher: MakeFetcher
) -> None:
    fetcher = make_fetcher(allow_networks=LOOPBACK, user_agent="test-agent")
    assert await fetcher.fetch(f"http://127.0.0.1:{server.port}/img.png", param="p") == PNG
    ((_, headers),) = server.requests
    assert headers["host"] == f"127.0.0.1:{server.port}"
    assert headers["user-agent"] == "test-agent"
    assert "cookie" not in headers


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/img.png",
        "http://localhost:{port}/img.png",  # the system resolver answers with loopback
        "http://[::1]:{port}/img.png",
        "http://[::ffff:127.0.0.1]:{port}/img.png",
        "http://127.1:{port}/img.png",
    ],
    ids=["ipv4-literal", "localhost", "ipv6-loopback", "ipv4-mapped", "short-ipv4"],
)
async def test_loopback_refused_without_connecting(
    server: ImageServer, make_fetcher: MakeFetcher, transport: RecordingTransport, url: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        await make_fetcher().fetch(url.format(port=server.port), param="p", index=2)
    assert info.value.message.startswith("image 2: ")
    assert_clean(info.value.message)
    assert server.connections == 0
    assert transport.requests == []


async def test_resolved_name_connects_to_validated_ip(
    server: ImageServer, make_fetcher: MakeFetcher, transport: RecordingTransport
) -> None:
    resolver = CountingResolver({"images.test": ["127.0.0.1"]})
    fetcher = make_fetcher(resolver, allow_networks=LOOPBACK)
    assert await fetcher.fetch(f"http://images.test:{server.port}/img.png", param="p") == PNG
    ((_, headers),) = server.requests
    assert headers["host"] == f"images.test:{server.port}"
    (sent,) = transport.requests
    assert sent.url.host == "127.0.0.1"
    assert "sni_hostname" not in sent.extensions  # plain http: no TLS


@pytest.mark.parametrize(
    "answers",
    [["8.8.8.8", "10.0.0.1"], ["10.0.0.1", "8.8.8.8"], ["127.0.0.1", "::1"], ["169.254.169.254"]],
    ids=["public-then-private", "private-then-public", "loopback-v4-v6", "metadata"],
)
async def test_any_non_public_answer_refuses(
    server: ImageServer,
    make_fetcher: MakeFetcher,
    transport: RecordingTransport,
    answers: list[str],
) -> None:
    # 127.0.0.1 is allowed here, so only the other answers can be the reason for refusal.
    fetcher = make_fetcher(CountingResolver({"images.test": answers}), allow_networks=LOOPBACK)
    with pytest.raises(InvalidRequest, match="non-public address") as info:
        await fetcher.fetch(f"http://images.test:{server.port}/img.png", param="p")
    assert_clean(info.value.message)
    assert server.connections == 0
    assert transport.requests == []


@pytest.mark.parametrize("answers", [[], ["not-an-ip"], None], ids=["empty", "garbage", "nxdomain"])
async def test_resolution_failures(make_fetcher: MakeFetcher, answers: list[str] | None) -> None:
    resolver = CountingResolver({} if answers is None else {"images.test": answers})
    with pytest.raises(InvalidRequest, match="could not resolve image host") as info:
        await make_fetcher(resolver).fetch("http://images.test/img.png", param="p")
    assert_clean(info.value.message)


@pytest.mark.parametrize("hops", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("mode", ["rel", "abs"])
async def test_redirect_chains(
    server: ImageServer, make_fetcher: MakeFetcher, hops: int, mode: str
) -> None:
    resolver = CountingResolver({"images.test": ["127.0.0.1"]})
    fetcher = make_fetcher(resolver, allow_networks=LOOPBACK, max_redirects=5)
    url = f"http://images.test:{server.port}/r/{hops}?{mode}"
    assert await fetcher.fetch(url, param="p") == PNG
    assert len(server.requests) == hops + 1
    assert len(resolver.calls) == hops + 1  # every hop is resolved and checked again
    assert all(h["host"] == f"images.test:{server.port}" for _, h in server.requests)


@pytest.mark.parametrize(("hops", "ok"), [(3, True), (4, False)])
async def test_max_redirects(
    server: ImageServer, make_fetcher: MakeFetcher, hops: int, ok: bool
) -> None:
    fetcher = make_fetcher(allow_networks=LOOPBACK, max_redirects=3)
    url = f"http://127.0.0.1:{server.port}/r/{hops}?rel"
    if ok:
        assert await fetcher.fetch(url, param="p") == PNG
    else:
        with pytest.raises(InvalidRequest, match="too many redirects"):
            await fetcher.fetch(url, param="p")
    assert len(server.requests) == min(hops + 1, 4)


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("http://169.254.169.254/latest/meta-data/", "non-public address"),
        ("http://10.0.0.1/", "non-public address"),
        ("http://[::ffff:a9fe:a9fe]/", "non-public address"),
        ("http://127.0.0.2:{port}/img.png", "non-public address"),  # loopback, but not listed
        ("http://internal.test/", "non-public address"),  # a name that resolves privately
        ("http://0x7f000001:{port}/img.png", "invalid host"),
        ("file:///etc/passwd", "scheme must be http or https"),
        ("http://user@images.test/", "credentials"),
        ("", "invalid redirect"),
    ],
    ids=["metadata", "private", "mapped-metadata", "other-loopback", "private-name", "hex-ip",
         "file", "userinfo", "no-location"],
)  # fmt: skip
async def test_redirect_targets_are_checked(
    server: ImageServer,
    make_fetcher: MakeFetcher,
    transport: RecordingTransport,
    location: str,
    reason: str,
) -> None:
    resolver = CountingResolver({"internal.test": ["10.0.0.7"], "images.test": ["127.0.0.1"]})
    fetcher = make_fetcher(resolver, allow_networks=LOOPBACK)
    url = f"http://127.0.0.1:{server.port}/to?{location.format(port=server.port)}"
    with pytest.raises(InvalidRequest, match=reason) as info:
        await fetcher.fetch(url, param="p")
    assert_clean(info.value.message)
    assert [r.url.host for r in transport.requests] == ["127.0.0.1"]  # only the first hop


@pytest.mark.parametrize("path", ["/slow", "/trickle"])
async def test_deadline_covers_the_whole_fetch(
    server: ImageServer, make_fetcher: MakeFetcher, path: str
) -> None:
    fetcher = make_fetcher(allow_networks=LOOPBACK, timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(InvalidRequest, match=r"could not fetch image \(timeout\)"):
        await fetcher.fetch(f"http://127.0.0.1:{server.port}{path}", param="p")
    assert time.monotonic() - start < 2.0


async def test_slow_resolver_counts_against_the_deadline(make_fetcher: MakeFetcher) -> None:
    async def stuck(host: str, port: int) -> list[str]:
        await asyncio.sleep(30)
        return []

    start = time.monotonic()
    with pytest.raises(InvalidRequest, match="timeout"):
        await make_fetcher(stuck, timeout_s=0.3).fetch("http://images.test/a.png", param="p")
    assert time.monotonic() - start < 2.0


@pytest.mark.parametrize("path", ["/huge", "/huge-cl"])
async def test_body_limit(server: ImageServer, make_fetcher: MakeFetcher, path: str) -> None:
    fetcher = make_fetcher(allow_networks=LOOPBACK, max_image_bytes=100_000)
    with pytest.raises(PayloadTooLarge, match="exceeds 100000 bytes"):
        await fetcher.fetch(f"http://127.0.0.1:{server.port}{path}", param="p")


@pytest.mark.parametrize(
    ("path", "reason"),
    [("/missing", r"\(HTTP 404\)"), ("/gzip", "unsupported content encoding")],
)
async def test_bad_responses(
    server: ImageServer, make_fetcher: MakeFetcher, path: str, reason: str
) -> None:
    with pytest.raises(InvalidRequest, match=reason):
        await make_fetcher(allow_networks=LOOPBACK).fetch(
            f"http://127.0.0.1:{server.port}{path}", param="p"
        )


async def test_connection_refused_is_client_safe(make_fetcher: MakeFetcher) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nobody listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(InvalidRequest) as info:
        await make_fetcher(allow_networks=LOOPBACK).fetch(f"http://127.0.0.1:{port}/", param="p")
    assert info.value.message == "image: could not fetch image"


async def test_cookies_are_never_kept(server: ImageServer, make_fetcher: MakeFetcher) -> None:
    fetcher = make_fetcher(allow_networks=LOOPBACK)
    assert await fetcher.fetch(f"http://127.0.0.1:{server.port}/cookie", param="p") == PNG
    assert await fetcher.fetch(f"http://127.0.0.1:{server.port}/img.png", param="p") == PNG
    assert len(server.requests) == 3
    assert all("cookie" not in h for _, h in server.requests)


async def test_https_uses_ip_with_sni_and_host_of_the_name() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, stream=httpx.ByteStream(PNG))

    resolver = CountingResolver({"images.test": ["93.184.215.14"]})
    fetcher = Fetcher(ImagesConfig(), resolver=resolver, transport=httpx.MockTransport(handler))
    try:
        assert await fetcher.fetch("https://images.test/a.png?v=1", param="p") == PNG
    finally:
        await fetcher.aclose()
    (request,) = seen
    assert str(request.url) == "https://93.184.215.14/a.png?v=1"
    assert request.headers["host"] == "images.test"
    assert request.extensions["sni_hostname"] == "images.test"
