"""Property-based fuzzing (hypothesis) of what untrusted clients and upstreams control: image
URL hosts in every spelling of a non-public address, data: URL variants, damaged image
headers, and event streams cut at arbitrary chunk boundaries.

Each property names the only outcomes allowed; any other exception, or an accepted input
that breaks a limit, fails it. Example counts are kept small enough for `make test`.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import itertools
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from guard.config import FetchConfig, ImagesConfig
from guard.errors import InvalidRequest, PayloadTooLarge
from guard.intake.addresses import address_allowed, parse_image_url
from guard.intake.decode import decode_image, parse_data_url
from guard.sse import EventFramer, SSEError, SSEParser

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FETCH = FetchConfig()
IMAGES = ImagesConfig()

# --- URL hosts: every spelling of a non-public IPv4 address is refused ---------------------

NON_PUBLIC = [
    ipaddress.ip_network(n)
    for n in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
              "0.0.0.0/8", "100.64.0.0/10", "224.0.0.0/4", "240.0.0.0/4")
]  # fmt: skip


@st.composite
def non_public_ipv4(draw: st.DrawFn) -> ipaddress.IPv4Address:
    net = draw(st.sampled_from(NON_PUBLIC))
    offset = draw(st.integers(0, net.num_addresses - 1))
    return ipaddress.IPv4Address(int(net.network_address) + offset)


def spellings(ip: ipaddress.IPv4Address) -> list[str]:
    """Hosts that some resolver, browser or inet_aton reads as ``ip``."""
    a, b, c, d = ip.packed
    n = int(ip)
    return [
        str(ip),
        str(n),  # 2130706433
        hex(n),  # 0x7f000001
        "0" + oct(n)[2:],  # 017700000001
        ".".join("0" + oct(x)[2:] for x in (a, b, c, d)),  # 0177.0.0.01
        ".".join(hex(x) for x in (a, b, c, d)),  # 0x7f.0x0.0x0.0x1
        f"{a}.{(b << 16) | (c << 8) | d}",  # 127.1
        f"{a}.{b}.{(c << 8) | d}",  # 127.0.1
        f"[::ffff:{ip}]",  # IPv4-mapped
        f"[::ffff:{n >> 16:x}:{n & 0xFFFF:x}]",
        f"[2002:{n >> 16:x}:{n & 0xFFFF:x}::1]",  # 6to4
        f"[64:ff9b::{ip}]",  # NAT64
        f"[::{ip}]",  # IPv4-compatible
        f"{ip}.",  # trailing dot
    ]


@FAST
@given(non_public_ipv4(), st.sampled_from(["http", "https", "HTTP"]), st.integers(0, 13))
def test_no_spelling_of_a_non_public_address_is_fetchable(
    ip: ipaddress.IPv4Address, scheme: str, which: int
) -> None:
    host = spellings(ip)[which]
    try:
        parsed = parse_image_url(f"{scheme}://{host}/x.png", FETCH, param="p")
    except InvalidRequest:
        return  # refused as written
    # Accepted only as an IP literal the connection check then refuses; a name would go to
    # DNS, where a numeric spelling could come back as ``ip``.
    assert parsed.ip is not None, host
    assert not address_allowed(parsed.ip, FETCH), host


# --- data: URLs ------------------------------------------------------------------------------


def _png(width: int = 8, height: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


@FAST
@given(
    media=st.sampled_from(["image/png", "IMAGE/PNG", "image/jpeg", "text/plain", "image", ""]),
    params=st.lists(st.sampled_from(["charset=utf-8", "name=a.png", "base64", " base64 ", ""])),
    payload=st.one_of(
        st.just(base64.b64encode(_png()).decode()),
        st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
        st.text(max_size=64),
    ),
)
def test_data_urls_decode_exactly_or_are_refused(
    media: str, params: list[str], payload: str
) -> None:
    url = "data:" + ";".join([media, *params]) + "," + payload
    try:
        data = parse_data_url(url, IMAGES, param="p")
    except (InvalidRequest, PayloadTooLarge):
        return
    assert data == base64.b64decode(payload, validate=True)
    assert len(data) <= IMAGES.max_image_bytes


# --- image headers ---------------------------------------------------------------------------


def _samples() -> dict[str, bytes]:
    image = Image.new("RGB", (16, 12), (200, 10, 10))
    out = {}
    for fmt in ("PNG", "JPEG", "GIF", "WEBP"):
        buf = io.BytesIO()
        image.save(buf, fmt)
        out[fmt] = buf.getvalue()
    return out


SAMPLES = _samples()


@FAST
@given(
    fmt=st.sampled_from(sorted(SAMPLES)),
    edits=st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 200)),
)
def test_damaged_images_decode_within_limits_or_are_refused(
    fmt: str, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(SAMPLES[fmt])
    for at, value in edits:
        if at < len(data):
            data[at] = value
    if cut is not None:
        data = data[:cut]
    try:
        decoded = decode_image(bytes(data), 0, IMAGES, param="p")
    except (InvalidRequest, PayloadTooLarge):
        return
    width, height = decoded.image.size
    assert decoded.image.mode == "RGB"
    assert width * height <= IMAGES.max_pixels and min(width, height) >= IMAGES.min_side


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header (with a valid CRC) declares ``width`` × ``height``; no pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    crc = struct.pack(">I", zlib.crc32(chunk))
    idat = zlib.compress(b"\x00" * 64)
    idat_chunk = b"IDAT" + idat
    return (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + crc
        + struct.pack(">I", len(idat)) + idat_chunk + struct.pack(">I", zlib.crc32(idat_chunk))
    )  # fmt: skip


@FAST
@given(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1))
def test_declared_sizes_are_judged_before_any_pixel_is_decoded(width: int, height: int) -> None:
    try:
        decode_image(_png_header(width, height), 0, IMAGES, param="p")
    except PayloadTooLarge:
        assert width * height > IMAGES.max_pixels
    except InvalidRequest:
        pass  # too small, too narrow, or the (short) pixel data does not fill it
    else:
        pytest.fail("a header-only PNG cannot decode")


# --- event streams at arbitrary chunk boundaries ---------------------------------------------

EVENT = st.lists(
    st.sampled_from(['data: {"a": 1}', "data: é€😀", "data:", ": comment", "event: x", "id: 7"]),
    min_size=1,
    max_size=3,
)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    eol = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    events = draw(st.lists(EVENT, max_size=5))
    text = "".join(eol.join(lines) + eol + eol for lines in events) + "data: [DONE]" + eol + eol
    raw = text.encode()
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    return raw, cuts


def _chunks(raw: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *cuts, len(raw)]
    return [raw[a:b] for a, b in itertools.pairwise(edges)]


@FAST
@given(streams())
def test_events_do_not_depend_on_chunk_boundaries(stream: tuple[bytes, list[int]]) -> None:
    raw, cuts = stream
    whole = SSEParser()
    expected = whole.feed(raw)
    whole.close()
    parser, framer = SSEParser(), EventFramer()
    got, relayed = [], b""
    for chunk in _chunks(raw, cuts):
        got += parser.feed(chunk)
        out = framer.feed(chunk)
        relayed += out
        # Only whole events leave the framer: what it gave so far parses to complete events.
        check = SSEParser()
        check.feed(relayed)
        check.close()
    parser.close()
    relayed += framer.close()
    assert got == expected and expected[-1] == "[DONE]"
    assert relayed == raw and framer.done


@FAST
@given(streams(), st.data())
def test_a_stream_cut_inside_an_event_is_never_complete(
    stream: tuple[bytes, list[int]], data: st.DataObject
) -> None:
    raw, cuts = stream
    end = data.draw(st.integers(1, len(raw) - 1))
    framer = EventFramer()
    for chunk in _chunks(raw[:end], [c for c in cuts if c < end]):
        framer.feed(chunk)
    try:
        framer.close()
    except SSEError:
        return  # cut inside an event: noticed
    assert not framer.done or raw[:end].rstrip(b"\r\n").endswith(b"[DONE]")
