"""A toxiproxy-style TCP proxy for tests: faults between the guard and its upstream.

The proxy listens on 127.0.0.1 and forwards to the upstream; ``set(Fault(...))`` picks what it
does to the connections and responses that follow:

==============  ===============================================================================
pass            forward both ways, untouched
refuse          the port is closed: connections are refused (open connections are reset)
blackhole       the port accepts nothing and answers no SYN: connecting hangs (connect timeout)
slow_headers    hold each response's first bytes back for ``delay_s``
stall           forward the response up to the cut point, then nothing more (connection open)
reset           forward up to the cut point, then reset the connection (RST: SO_LINGER 0)
truncate        forward up to the cut point, then close the connection cleanly (FIN)
drop_done       remove the ``data: [DONE]`` chunk from a chunked SSE response, framing intact
storm           answer every request itself with ``statuses`` in turn (never forwards)
==============  ===============================================================================

The cut point is the first occurrence of ``at`` in the response (bytes before it go through),
or else ``after`` bytes. A fault with ``times`` applies to that many requests, then the proxy
passes. Requests are counted by their request line on the way in (``attempts``): that is how a
test proves the guard never sent a POST twice. It runs its own event loop in a daemon thread;
every method is called from the test's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import struct
from dataclasses import dataclass, field
from typing import Literal

from tests.servers import LoopThread

Kind = Literal[
    "pass",
    "refuse",
    "blackhole",
    "slow_headers",
    "stall",
    "reset",
    "truncate",
    "drop_done",
    "storm",
]
CUTS = frozenset({"stall", "reset", "truncate"})

_REQUEST_LINE = re.compile(rb"(GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH) (/\S*) HTTP/1\.[01]\r\n")
_DONE_CHUNK = re.compile(rb"[0-9a-fA-F]+\r\ndata: \[DONE\]\n\n\r\n")
_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}

# What an upstream's error page may hold and the guard must never pass on to its clients.
LEAK_BAIT = (
    "Traceback (most recent call last):\n"
    '  File "/opt/vllm/vllm/engine/async_llm_engine.py", line 42, in generate\n'
    "RuntimeError: CUDA error: device-side assert triggered at 10.12.0.7:8000 0xdeadbeef"
)


@dataclass(frozen=True)
class Fault:
    kind: Kind = "pass"
    at: bytes | None = None  # cut before the first occurrence of this marker…
    after: int = 0  # …or after this many bytes of the response
    delay_s: float = 0.0  # slow_headers
    statuses: tuple[int, ...] = (500,)  # storm: answered in turn
    retry_after: str | None = None  # storm: the Retry-After header sent with each answer
    times: int | None = None  # only the first `times` requests are faulted, then pass
    linger_s: float = 0.05  # reset/truncate: let the peer read what was forwarded first


PASS = Fault()


@dataclass
class _Response:
    fault: Fault
    data: bytearray = field(default_factory=bytearray)  # what the upstream sent so far
    sent: int = 0  # bytes of ``data`` forwarded (or dropped) so far
    cut: bool = False  # the cut point was reached
    started: bool = False  # slow_headers: the delay is behind us


@dataclass(eq=False)  # kept in a set, by identity
class _Conn:
    writer: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    requests: bytearray = field(default_factory=bytearray)
    scanned: int = 0
    response: _Response = field(default_factory=lambda: _Response(PASS))
    tasks: list[asyncio.Task[None]] = field(default_factory=list)  # the two pumps
    handler: asyncio.Task[object] | None = None  # the task serving the connection


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self._target = (upstream_host, upstream_port)
        self._thread = LoopThread()
        self._fault = PASS
        self._faulted = 0  # requests the current fault has applied to
        self._requests: list[tuple[str, str]] = []
        self._accepted = 0
        self._conns: set[_Conn] = set()
        self._server: asyncio.Server | None = None
        self._blackhole: list[socket.socket] = []
        self.port = 0
        self.port = self._thread.call(self._listen)
        self.url = f"http://127.0.0.1:{self.port}"

    # --- called from the test's thread --------------------------------------------------

    def set(self, fault: Fault) -> None:
        """Apply ``fault`` from now on; refuse and blackhole also reset open connections."""
        self._thread.call(lambda: self._set(fault))

    def attempts(self, method: str = "POST", path: str = "/v1/chat/completions") -> int:
        """How many such requests reached the proxy (complete request line seen)."""
        return self._thread.call(lambda: self._count(method, path))

    def requests(self) -> list[tuple[str, str]]:
        return self._thread.call(self._copy_requests)

    def connections(self) -> int:
        """How many connections the proxy accepted."""
        return self._thread.call(self._count_connections)

    def close(self) -> None:
        self._thread.call(self._shutdown)
        self._thread.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- on the proxy's loop ------------------------------------------------------------

    async def _count(self, method: str, path: str) -> int:
        return sum(1 for m, p in self._requests if (m, p) == (method, path))

    async def _copy_requests(self) -> list[tuple[str, str]]:
        return list(self._requests)

    async def _count_connections(self) -> int:
        return self._accepted

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def _set(self, fault: Fault) -> None:
        self._fault, self._faulted = fault, 0
        listening = self._server is not None
        if fault.kind in ("refuse", "blackhole"):
            await self._stop_listening()
            for conn in list(self._conns):
                _reset(conn.writer)
            if fault.kind == "blackhole":
                self._blackhole = _blackhole(self.port)
        elif not listening:
            self._close_blackhole()
            await self._listen()

    async def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self._close_blackhole()

    def _close_blackhole(self) -> None:
        for s in self._blackhole:
            s.close()
        self._blackhole = []

    async def _shutdown(self) -> None:
        await self._stop_listening()
        pumps = [t for conn in self._conns for t in conn.tasks]
        # Handlers end on their own once their pumps do (cancelling one would make asyncio's
        # stream server log an error).
        handlers = [conn.handler for conn in self._conns if conn.handler is not None]
        for conn in list(self._conns):
            _reset(conn.writer)
            if conn.upstream is not None:
                conn.upstream.close()
        for task in pumps:
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        if handlers:
            await asyncio.wait(handlers, timeout=5)

    def _next_fault(self) -> Fault:
        fault = self._fault
        if fault.times is not None and self._faulted >= fault.times:
            return PASS
        self._faulted += 1
        return fault

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer, handler=asyncio.current_task())
        self._conns.add(conn)
        self._accepted += 1
        try:
            up_reader, conn.upstream = await asyncio.open_connection(*self._target)
            conn.tasks = [
                asyncio.create_task(self._pump_up(reader, conn)),
                asyncio.create_task(self._pump_down(up_reader, conn)),
            ]
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        except OSError:
            pass
        finally:
            self._conns.discard(conn)
            if conn.upstream is not None:
                conn.upstream.close()
            writer.close()

    def _seen(self, conn: _Conn, data: bytes) -> int:
        """Record the request lines in ``data``; return how many started."""
        conn.requests += data
        new = 0
        last = conn.scanned
        for match in _REQUEST_LINE.finditer(conn.requests, conn.scanned):
            self._requests.append((match[1].decode(), match[2].decode()))
            last = match.end()
            new += 1
        # A request line split across reads is found on the next one.
        conn.scanned = max(last, len(conn.requests) - 512)
        return new

    async def _pump_up(self, reader: asyncio.StreamReader, conn: _Conn) -> None:
        assert conn.upstream is not None
        try:
            while data := await reader.read(65536):
                if self._seen(conn, data):
                    # No pipelining from the guard: a new request means a new response.
                    conn.response = _Response(self._next_fault())
                    if conn.response.fault.kind == "storm":
                        await self._storm(reader, conn, data)
                        return  # the answer said "connection: close"
                conn.upstream.write(data)
                await conn.upstream.drain()
        finally:
            conn.upstream.close()  # the client left: so does the upstream connection
            for task in conn.tasks:
                if task is not asyncio.current_task():
                    task.cancel()

    async def _pump_down(self, reader: asyncio.StreamReader, conn: _Conn) -> None:
        try:
            while data := await reader.read(65536):
                if not await self._deliver(conn, data):
                    return
            response = conn.response
            if response.sent < len(response.data) and not response.cut:
                conn.writer.write(bytes(response.data[response.sent :]))  # held-back tail
            await conn.writer.drain()
        finally:
            conn.writer.close()
            for task in conn.tasks:
                if task is not asyncio.current_task():
                    task.cancel()

    async def _deliver(self, conn: _Conn, data: bytes) -> bool:
        """Forward ``data`` under the response's fault; False when the connection is done."""
        response = conn.response
        fault = response.fault
        if response.cut:  # stalled: swallow the rest
            return True
        if fault.kind == "slow_headers" and not response.started:
            await asyncio.sleep(fault.delay_s)
        response.started = True
        if fault.kind not in CUTS and fault.kind != "drop_done":
            conn.writer.write(data)
            await conn.writer.drain()
            return True
        response.data += data
        if fault.kind == "drop_done":
            return await self._drop_done(conn, response)
        if fault.at is not None:
            found = response.data.find(fault.at)
            # Hold back what could be the start of a marker split across reads.
            end = found if found >= 0 else max(len(response.data) - len(fault.at) + 1, 0)
            reached = found >= 0
        else:
            end = min(fault.after, len(response.data))
            reached = len(response.data) >= fault.after
        if end > response.sent:
            conn.writer.write(bytes(response.data[response.sent : end]))
            await conn.writer.drain()
            response.sent = end
        if not reached:
            return True
        response.cut = True
        if fault.kind == "stall":
            return True
        await asyncio.sleep(fault.linger_s)
        if fault.kind == "reset":
            _reset(conn.writer)
        return False  # truncate: the finally of _pump_down closes with a FIN

    async def _drop_done(self, conn: _Conn, response: _Response) -> bool:
        match = _DONE_CHUNK.search(response.data, response.sent)
        if match is not None:
            del response.data[match.start() : match.end()]
            response.fault = PASS  # the rest (the final 0-size chunk) goes through
            end = len(response.data)
        else:
            end = max(len(response.data) - 64, response.sent)  # a [DONE] chunk may be split
        if end > response.sent:
            conn.writer.write(bytes(response.data[response.sent : end]))
            await conn.writer.drain()
            response.sent = end
        return True

    async def _storm(self, reader: asyncio.StreamReader, conn: _Conn, data: bytes) -> None:
        """Answer the request that starts in ``data`` with an error page of our own."""
        while (end := data.find(b"\r\n\r\n")) < 0:
            more = await reader.read(65536)
            if not more:
                return
            data += more
        length = 0
        for line in data[:end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        missing = length - len(data[end + 4 :])
        if missing > 0:
            await reader.readexactly(missing)
        fault = conn.response.fault
        status = fault.statuses[(self._faulted - 1) % len(fault.statuses)]
        body = json.dumps({"object": "error", "message": LEAK_BAIT, "code": status}).encode()
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            "content-type: application/json",
            f"content-length: {len(body)}",
            "connection: close",
        ]
        if fault.retry_after is not None:
            lines.append(f"retry-after: {fault.retry_after}")
        conn.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await conn.writer.drain()
        conn.response.cut = True  # whatever the upstream might still send is not ours to pass


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN: SO_LINGER on, zero seconds."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _blackhole(port: int) -> list[socket.socket]:
    """A listener on ``port`` whose accept queue is full: further SYNs are dropped."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(0)
    held = [listener]
    for _ in range(2):  # a backlog of 0 still queues one connection: fill it
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        held.append(filler)
    return held
