"""Decoding untrusted images and data: URLs within limits; hashing and re-encoding pixels."""

from __future__ import annotations

import base64
import hashlib
import io
import random
import zlib
from typing import Any

import pytest
from PIL import Image

from guard.config import ImagesConfig
from guard.errors import GuardError, InvalidRequest, PayloadTooLarge
from guard.intake import decode
from guard.intake.decode import decode_image, image_digest, parse_data_url, to_png_data_url

DEFAULT = ImagesConfig()


def noise(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    bands = len(mode)  # RGB, RGBA, L, CMYK: one byte per band
    data = random.Random(seed).randbytes(size[0] * size[1] * bands)
    return Image.frombytes(mode, size, data)


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    return encode(Image.new(mode, size), "PNG")


def png_claiming(width: int, height: int) -> bytes:
    """A tiny real PNG whose IHDR claims ``width`` x ``height`` (CRC recomputed)."""
    data = bytearray(png((8, 8)))
    # Signature (8) | IHDR length (4) | "IHDR" (4) | width (4) | height (4) | ... | CRC (4)
    data[16:20] = width.to_bytes(4, "big")
    data[20:24] = height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def data_url(payload: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(payload).decode()


def load(source: bytes | str, cfg: ImagesConfig = DEFAULT) -> Image.Image:
    data = parse_data_url(source, cfg, param="p", index=3) if isinstance(source, str) else source
    return decode_image(data, 3, cfg, param="p").image


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect/></svg>'
TRUNCATED = encode(noise((64, 64)), "PNG")[:2000]

BAD = [
    ("truncated-png", TRUNCATED, {}, InvalidRequest),
    ("empty", b"", {}, InvalidRequest),
    ("png-signature-only", b"\x89PNG\r\n\x1a\n", {}, InvalidRequest),
    ("bomb-20000x20000", png_claiming(20000, 20000), {}, PayloadTooLarge),  # Pillow's limit
    ("bomb-10000x10000", png_claiming(10000, 10000), {}, PayloadTooLarge),  # Pillow's warning
    ("bomb-8000x8000", png_claiming(8000, 8000), {}, PayloadTooLarge),  # our 50 MP limit
    ("max-pixels", png((100, 100)), {"max_pixels": 5000}, PayloadTooLarge),
    ("too-many-bytes", encode(noise((64, 64)), "PNG"), {"max_image_bytes": 1000}, PayloadTooLarge),
    ("bmp", encode(noise((16, 16)), "BMP"), {}, InvalidRequest),
    ("tiff", encode(noise((16, 16)), "TIFF"), {}, InvalidRequest),
    ("text", b"hello, this is not an image", {}, InvalidRequest),
    ("svg", SVG, {}, InvalidRequest),
    ("format-not-allowed", encode(noise((16, 16)), "GIF"), {"formats": ["PNG"]}, InvalidRequest),
    ("1x1", png((1, 1)), {}, InvalidRequest),
    ("4x400-min-side", png((4, 400)), {}, InvalidRequest),
    ("8x500-aspect", png((8, 500)), {}, InvalidRequest),
    ("500x8-aspect", png((500, 8)), {}, InvalidRequest),
    ("data-non-image", data_url(b"hello", "text/plain"), {}, InvalidRequest),
    ("data-no-media-type", data_url(png((16, 16)), ""), {}, InvalidRequest),
    ("data-image-no-subtype", data_url(png((16, 16)), "image/"), {}, InvalidRequest),
    ("data-not-base64", "data:image/png,%89PNG", {}, InvalidRequest),
    ("data-charset-not-base64", "data:image/png;charset=utf-8,abc", {}, InvalidRequest),
    ("data-no-comma", "data:image/png;base64", {}, InvalidRequest),
    ("data-not-data", "http://example.com/a.png", {}, InvalidRequest),
    ("bad-base64-chars", "data:image/png;base64,@@@@", {}, InvalidRequest),
    ("bad-base64-padding", "data:image/png;base64,abc", {}, InvalidRequest),
    ("base64-with-newline", "data:image/png;base64,iVBO\nRw0K", {}, InvalidRequest),
    ("data-valid-base64-not-image", data_url(b"not an image at all"), {}, InvalidRequest),
    ("data-too-large", data_url(b"\0" * 1001), {"max_image_bytes": 1000}, PayloadTooLarge),
    # Size is judged before decoding: even invalid base64 is refused as too large.
    ("data-too-large-invalid", "data:image/png;base64," + "!" * 2000,
     {"max_image_bytes": 1000}, PayloadTooLarge),
]  # fmt: skip

# Fragments of Python/Pillow exception text that must never reach a client.
LEAKS = ("cannot identify", "truncated", "Error", "PIL", "padding", "binascii", "struct",
         "Decompression", "Traceback", "errno", "Incorrect", "non-base64")  # fmt: skip


@pytest.mark.parametrize(
    ("source", "overrides", "expected"), [c[1:] for c in BAD], ids=[c[0] for c in BAD]
)
def test_bad_images(
    source: bytes | str, overrides: dict[str, Any], expected: type[GuardError]
) -> None:
    with pytest.raises(GuardError) as info:
        load(source, ImagesConfig(**overrides))
    assert type(info.value) is expected
    assert info.value.param == "p"
    assert info.value.message.startswith("image 3: ")
    for leak in LEAKS:
        assert leak not in info.value.message


def test_size_exactly_at_limit_is_accepted() -> None:
    payload = encode(Image.new("RGB", (16, 16)), "PNG")
    cfg = ImagesConfig(max_image_bytes=len(payload))
    assert parse_data_url(data_url(payload), cfg, param="p") == payload
    assert decode_image(payload, 0, cfg, param="p").image.size == (16, 16)


@pytest.mark.parametrize(
    ("fmt", "params"),
    [("PNG", {}), ("WEBP", {"lossless": True}), ("GIF", {}), ("JPEG", {"quality": 95})],
)
def test_good_formats(fmt: str, params: dict[str, Any]) -> None:
    src = noise((40, 24)) if fmt != "GIF" else noise((40, 24)).convert("P").convert("RGB")
    decoded = decode_image(encode(src, fmt, **params), 1, DEFAULT, param="p")
    assert decoded.index == 1
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (40, 24)
    if fmt != "JPEG":  # lossless formats give the exact pixels back
        assert decoded.image.tobytes() == src.tobytes()


def test_data_url_good_path() -> None:
    src = noise((20, 30))
    got = load(data_url(encode(src, "PNG"), "image/PNG"))
    assert got.tobytes() == src.tobytes()


def test_animated_gif_first_frame_only() -> None:
    frames = [Image.new("RGB", (32, 32), c).convert("P") for c in ((255, 0, 0), (0, 0, 255))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    with Image.open(io.BytesIO(gif)) as check:
        assert getattr(check, "n_frames", 1) == 2
    got = load(gif)
    assert got.tobytes() == Image.new("RGB", (32, 32), (255, 0, 0)).tobytes()


def test_mpo_counts_as_jpeg() -> None:
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    mpo = encode(frames[0], "MPO", save_all=True, append_images=frames[1:])
    got = load(mpo)
    assert got.getpixel((16, 16))[0] > 200  # type: ignore[index]  # the red first frame
    with pytest.raises(InvalidRequest):
        load(mpo, ImagesConfig(formats=["PNG"]))


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("RGBA", "PNG"), ("P", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("CMYK", "JPEG"),
     ("RGBA", "WEBP"), ("L", "JPEG")],
)  # fmt: skip
def test_modes_become_rgb(mode: str, fmt: str) -> None:
    if mode == "P":
        src = noise((24, 24)).convert("P")
    elif mode == "LA":
        src = noise((24, 24), "RGBA").convert("LA")
    else:
        src = noise((24, 24), mode)
    got = load(encode(src, fmt))
    assert got.mode == "RGB"
    assert got.size == (24, 24)
    if fmt == "PNG":  # same conversion as Pillow's own: exactly its pixels
        assert got.tobytes() == src.convert("RGB").tobytes()


def test_digest_depends_on_pixels_not_encoding() -> None:
    src = noise((33, 17))
    as_png = decode_image(encode(src, "PNG"), 0, DEFAULT, param="p")
    as_webp = decode_image(encode(src, "WEBP", lossless=True), 0, DEFAULT, param="p")
    as_png9 = decode_image(encode(src, "PNG", compress_level=9), 0, DEFAULT, param="p")
    assert as_png.digest == as_webp.digest == as_png9.digest == image_digest(src)
    assert len(as_png.digest) == 64

    other = noise((33, 17), seed=1)
    assert image_digest(other) != as_png.digest
    # Same bytes, different shape: size is part of the digest.
    reshaped = Image.frombytes("RGB", (17, 33), src.tobytes())
    assert image_digest(reshaped) != image_digest(src)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "1"])
@pytest.mark.parametrize("strip", [1, 7, 100, 10**9])
def test_digest_in_strips_equals_the_digest_of_all_bytes(
    monkeypatch: pytest.MonkeyPatch, mode: str, strip: int
) -> None:
    # The digest keys caches and audit lines: hashing strip by strip (to spare a whole copy of
    # a large image) must give the same value as hashing tobytes() whole, at any strip size.
    img = noise((13, 29)).convert(mode)
    whole = hashlib.sha256(f"{img.mode}:{img.width}x{img.height}:".encode() + img.tobytes())
    monkeypatch.setattr(decode, "DIGEST_STRIP_BYTES", strip)
    assert image_digest(img) == whole.hexdigest()


def test_png_data_url_round_trips_exactly() -> None:
    src = noise((48, 20))
    url = to_png_data_url(src)
    assert url.startswith("data:image/png;base64,")
    back = decode_image(parse_data_url(url, DEFAULT, param="p"), 0, DEFAULT, param="p")
    assert back.image.tobytes() == src.tobytes()
    assert back.digest == image_digest(src)


def test_decoded_image_is_detached_from_input() -> None:
    data = bytearray(encode(noise((16, 16)), "PNG"))
    got = decode_image(bytes(data), 0, DEFAULT, param="p")
    data[:] = b"\0" * len(data)
    assert got.image.tobytes() == noise((16, 16)).tobytes()
