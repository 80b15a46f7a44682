"""Server-Sent Events, incrementally: a parser (bytes in, complete ``data`` payloads out) and a
framer (bytes in, whole events out, unchanged).

The parser follows the WHATWG event-stream rules the guard needs: lines end in CRLF, LF or CR;
a blank line ends an event; ``data`` lines of one event are joined with "\\n"; comments (``:``)
and the other fields (``event``, ``id``, ``retry``) are ignored. Chunks may split the stream
anywhere, a CRLF pair or a multi-byte UTF-8 character included: lines are decoded only once
complete.
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
        # Bytes fed since the end of the last blank line (an event boundary): the event still
        # being read, and the start of its next line.
        self.unfinished = 0

    def feed(self, chunk: bytes) -> list[str]:
        """Parse ``chunk``; return the payloads of the events it completed, in order."""
        buf = self._pending + chunk
        start = 0
        boundary: int | None = None  # where the last blank line in ``buf`` ends
        if self._skip_lf and buf:
            start = 1 if buf[:1] == b"\n" else 0
            self._skip_lf = False
            if start and not self.unfinished:
                boundary = 1  # the LF of a CRLF blank line that began in the last chunk
        events: list[str] = []
        while (eol := _EOL.search(buf, start)) is not None:
            if self._line(buf[start : eol.start()], events):
                boundary = eol.end()
            start = eol.end()
            if eol.group() == b"\r" and start == len(buf):
                self._skip_lf = True
        self._pending = buf[start:]
        if boundary is None:
            self.unfinished += len(chunk)
        else:
            self.unfinished = len(buf) - boundary
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

    def _line(self, raw: bytes, events: list[str]) -> bool:
        """Take one line; True when it was blank (the end of an event)."""
        line = raw.decode("utf-8", errors="replace")
        if self._first_line:
            self._first_line = False
            line = line.removeprefix(_BOM)
        if not line:
            if self._data:
                events.append("\n".join(self._data))
                self._data = []
            return True
        if line.startswith(":"):
            return False
        name, colon, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" ") if colon else "")
        return False


class EventFramer:
    """Cuts an event stream at event boundaries: bytes in, whole events out, byte for byte.

    A relay that forwards only whole events can always end a broken stream with an event of its
    own: the client never sees half an event glued to it. ``done`` says whether the last event
    was OpenAI's ``[DONE]``, the only proof that an answer is complete.
    """

    def __init__(self, *, max_event_bytes: int = 16 * 1024 * 1024) -> None:
        self._parser = SSEParser(max_line_bytes=max_event_bytes)
        self._max = max_event_bytes
        self._held = b""  # the unfinished event: fed, not yet returned
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        """Take ``chunk``; return the bytes up to the end of the last event it completed."""
        payloads = self._parser.feed(chunk)
        if payloads:
            self.done = payloads[-1] == "[DONE]"
        data = self._held + chunk
        cut = len(data) - self._parser.unfinished
        self._held = data[cut:]
        if len(self._held) > self._max:
            raise SSEError(f"event-stream event longer than {self._max} bytes")
        return data[:cut]

    def close(self) -> bytes:
        """End of stream: raise :class:`SSEError` inside an event, else return what is left
        (blank lines, comments or fields that complete no event)."""
        self._parser.close()
        rest, self._held = self._held, b""
        return rest
