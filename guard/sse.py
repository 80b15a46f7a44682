"""An incremental Server-Sent Events parser: bytes in, complete ``data`` payloads out.

It follows the WHATWG event-stream rules the guard needs: lines end in CRLF, LF or CR; a blank
line ends an event; ``data`` lines of one event are joined with "\\n"; comments (``:``) and the
other fields (``event``, ``id``, ``retry``) are ignored. Chunks may split the stream anywhere,
a CRLF pair or a multi-byte UTF-8 character included: lines are decoded only once complete.
"""

from __future__ import annotations

import re

_EOL = re.compile(rb"\r\n|\r|\n")
_BOM = "\ufeff"


class SSEError(ValueError):
    """The stream is malformed: it ended inside an event, or a line is too long."""


class SSEParser:
    def __init__(self, *, max_line_bytes: int = 16 * 1024 * 1024) -> None:
        self._max_line = max_line_bytes
        self._pending = b""  # an incomplete line
        self._data: list[str] = []  # data lines of the event being read
        self._skip_lf = False  # the last chunk ended in CR: a leading LF belongs to it
        self._first_line = True

    def feed(self, chunk: bytes) -> list[str]:
        """Parse ``chunk``; return the payloads of the events it completed, in order."""
        buf = self._pending + chunk
        start = 0
        if self._skip_lf and buf:
            start = 1 if buf[:1] == b"\n" else 0
            self._skip_lf = False
        events: list[str] = []
        while (eol := _EOL.search(buf, start)) is not None:
            self._line(buf[start : eol.start()], events)
            start = eol.end()
            if eol.group() == b"\r" and start == len(buf):
                self._skip_lf = True
        self._pending = buf[start:]
        if len(self._pending) > self._max_line:
            raise SSEError(f"event-stream line longer than {self._max_line} bytes")
        return events

    def close(self) -> None:
        """End of stream. Raise :class:`SSEError` if it stopped inside an event.

        The event-stream rules discard such an event; a proxy must notice that its answer was
        cut short rather than pretend it was complete.
        """
        truncated = bool(self._pending or self._data)
        self._pending, self._data = b"", []
        if truncated:
            raise SSEError("event stream ended inside an event")

    def _line(self, raw: bytes, events: list[str]) -> None:
        line = raw.decode("utf-8", errors="replace")
        if self._first_line:
            self._first_line = False
            line = line.removeprefix(_BOM)
        if not line:
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
            return
        if line.startswith(":"):
            return
        name, colon, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" ") if colon else "")
