from __future__ import annotations

import pytest

from guard.sse import SSEError, SSEParser

# Every line ending, a comment, other fields, multi-line data, a 2-byte and a 4-byte UTF-8
# character, an empty data line, and the OpenAI terminator.
SAMPLE = (
    "\ufeff: keep-alive comment\r\n"
    'data: {"a":"é"}\r\n\r\n'
    "event: message\n"
    "id: 7\n"
    "data: line one\n"
    "data:line two\n"
    "retry: 100\n\n"
    "data: 🙂 cr only\r\r"
    "data\n\n"
    ":\n\n"
    "data: [DONE]\n\n"
).encode()
EXPECTED = ['{"a":"é"}', "line one\nline two", "🙂 cr only", "", "[DONE]"]


def parse(chunks: list[bytes]) -> list[str]:
    parser = SSEParser()
    out: list[str] = []
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    parser.close()
    return out


def test_whole_stream() -> None:
    assert parse([SAMPLE]) == EXPECTED


@pytest.mark.parametrize("cut", range(len(SAMPLE) + 1))
def test_every_split_point(cut: int) -> None:
    assert parse([SAMPLE[:cut], SAMPLE[cut:]]) == EXPECTED


def test_every_split_point_twice() -> None:
    # Three pieces, both cuts everywhere: CRLF pairs and UTF-8 characters split in all ways.
    for i in range(len(SAMPLE) + 1):
        for j in range(i, len(SAMPLE) + 1):
            assert parse([SAMPLE[:i], SAMPLE[i:j], SAMPLE[j:]]) == EXPECTED, (i, j)


def test_byte_by_byte() -> None:
    assert parse([SAMPLE[i : i + 1] for i in range(len(SAMPLE))]) == EXPECTED


def test_events_come_out_as_soon_as_complete() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: one\n") == []
    assert parser.feed(b"\n") == ["one"]
    assert parser.feed(b"data: two\r") == []
    assert parser.feed(b"\r") == ["two"]  # CR CR: a blank line, not a CRLF pair
    assert parser.feed(b"\n") == []  # a lone LF is just another blank line
    parser.close()


def test_comments_and_other_fields_only() -> None:
    parser = SSEParser()
    assert parser.feed(b": hello\n\nevent: x\nid: 1\n\n") == []
    parser.close()


def test_unknown_field_with_data_prefix_is_not_data() -> None:
    assert parse([b"database: no\ndata: yes\n\n"]) == ["yes"]


def test_only_one_leading_space_is_removed() -> None:
    assert parse([b"data:  two spaces\n\n"]) == [" two spaces"]


def test_invalid_utf8_is_replaced_not_fatal() -> None:
    assert parse([b"data: \xff\n\n"]) == ["\ufffd"]


@pytest.mark.parametrize("tail", [b"data: cut", b"data: cut\n", b"data: cut\r\n"])
def test_close_inside_an_event_raises(tail: bytes) -> None:
    parser = SSEParser()
    assert parser.feed(b"data: ok\n\n" + tail) == ["ok"]
    with pytest.raises(SSEError):
        parser.close()


def test_close_after_a_comment_line_without_newline_raises() -> None:
    parser = SSEParser()
    parser.feed(b": partial")
    with pytest.raises(SSEError):
        parser.close()


def test_line_limit() -> None:
    parser = SSEParser(max_line_bytes=8)
    assert parser.feed(b"data: 1\n\n") == ["1"]
    with pytest.raises(SSEError):
        parser.feed(b"data: 123456789")
