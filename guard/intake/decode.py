"""Decode untrusted image bytes within limits, and hash and re-encode the decoded pixels.

Pure functions, safe to run in worker threads: no PIL global state is read-modified-written
(no ``Image.MAX_IMAGE_PIXELS``, no ``LOAD_TRUNCATED_IMAGES``, no warning filters, which are
process-wide and would race between threads). Size limits are checked on the header before a
single pixel is decoded.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import os
import struct
from collections.abc import Callable
from typing import TypeVar

from PIL import Image, UnidentifiedImageError

from guard.config import ImagesConfig
from guard.errors import InvalidRequest, PayloadTooLarge
from guard.types import ImageInput

log = logging.getLogger(__name__)

T = TypeVar("T")

# Pillow reports a JPEG carrying extra pictures (phone cameras: MPO) under its own format
# name; its first frame is an ordinary JPEG, so it counts as JPEG for the allow-list.
_FORMAT_ALIASES = {"MPO": "JPEG"}

# What a malformed or hostile file can make Pillow raise while parsing or decoding.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError)


def _prefix(index: int | None) -> str:
    return f"image {index}: " if index is not None else "image: "


# Pillow allocates image memory in blocks of 16 MiB by default. glibc serves blocks below its
# dynamic mmap threshold (which rises to 32 MiB) from per-thread arenas and keeps them when
# freed: decoding large images on the worker threads made the served guard's resident memory
# grow round after round (1224 → 1975 → 2351 MiB for three rounds of 8 × 49-MP images under a
# 50-MP budget). Blocks above 32 MiB are always mapped on their own and go back to the OS on
# free (the same rounds: 480 MiB peak, 105 MiB after each).
PILLOW_BLOCK_BYTES = 64 * 1024 * 1024


def configure_pillow() -> None:
    """Set Pillow's block size for a serving process, once at start-up (process-wide), unless
    the operator chose one with ``PILLOW_BLOCK_SIZE``."""
    if "PILLOW_BLOCK_SIZE" not in os.environ:
        Image.core.set_block_size(PILLOW_BLOCK_BYTES)  # type: ignore[attr-defined]


def parse_data_url(url: str, cfg: ImagesConfig, *, param: str, index: int | None = None) -> bytes:
    """The bytes of a ``data:image/<subtype>[;params];base64,<payload>`` URL.

    The decoded size is computed from the payload length and checked before decoding, so an
    oversized payload costs no allocation beyond the request body itself.
    """
    prefix = _prefix(index)
    if url[:5].lower() != "data:":
        raise InvalidRequest(prefix + "not a data URL", param=param)
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise InvalidRequest(prefix + "malformed data URL", param=param)
    fields = [f.strip().lower() for f in header.split(";")]
    media_type = fields[0]
    kind, slash, subtype = media_type.partition("/")
    if kind != "image" or not slash or not subtype:
        raise InvalidRequest(prefix + "data URL must have an image/* media type", param=param)
    if len(fields) < 2 or fields[-1] != "base64":
        raise InvalidRequest(prefix + "data URL must be base64-encoded", param=param)

    padding = len(payload) - len(payload.rstrip("="))
    decoded_size = (len(payload) + 3) // 4 * 3 - min(padding, 2)
    if decoded_size > cfg.max_image_bytes:
        raise PayloadTooLarge(prefix + f"image exceeds {cfg.max_image_bytes} bytes", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(prefix + "invalid base64 in data URL", param=param) from None


def header_pixels(data: bytes, index: int, cfg: ImagesConfig, *, param: str) -> int:
    """Width × height of the image in ``data``, read from its header alone, with every limit of
    ``cfg`` checked: what decoding it will cost, before a pixel is decoded."""
    prefix = _prefix(index)
    header = _guarded(lambda: _open(data, cfg, prefix, param, decode=False), cfg, index, param)
    return header.width * header.height


def decode_image(data: bytes, index: int, cfg: ImagesConfig, *, param: str) -> ImageInput:
    """Decode ``data`` into an RGB image within ``cfg``'s limits (first frame only)."""
    prefix = _prefix(index)
    rgb = _guarded(lambda: _open(data, cfg, prefix, param, decode=True), cfg, index, param)
    return ImageInput(index=index, image=rgb, digest=image_digest(rgb))


def _guarded(read: Callable[[], T], cfg: ImagesConfig, index: int, param: str) -> T:
    """``read()``, with what Pillow raises on hostile input turned into client errors."""
    prefix = _prefix(index)
    try:
        return read()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own guard (its limit is above ours by default, so this is a backstop). The
        # warning is caught as an exception only where warnings are escalated to errors.
        raise PayloadTooLarge(
            prefix + f"image has too many pixels (at most {cfg.max_pixels})", param=param
        ) from None
    except UnidentifiedImageError:
        allowed = ", ".join(cfg.formats)
        raise InvalidRequest(
            prefix + f"unsupported or unrecognised image format (allowed: {allowed})",
            param=param,
        ) from None
    except (*_DECODE_ERRORS, Warning) as e:
        # A Warning arrives here only when the process escalates warnings to errors.
        log.debug("image %d: decode failed: %s", index, type(e).__name__)
        raise InvalidRequest(prefix + "could not decode image data", param=param) from None


def _open(data: bytes, cfg: ImagesConfig, prefix: str, param: str, *, decode: bool) -> Image.Image:
    """The RGB image (``decode``), or the opened file whose header passed every limit."""
    if len(data) > cfg.max_image_bytes:
        raise PayloadTooLarge(prefix + f"image exceeds {cfg.max_image_bytes} bytes", param=param)
    # Restricting ``formats`` keeps every other Pillow plugin's parser away from the bytes.
    with Image.open(io.BytesIO(data), formats=list(cfg.formats)) as img:
        fmt = _FORMAT_ALIASES.get(str(img.format), str(img.format))
        if fmt not in cfg.formats:
            raise InvalidRequest(prefix + "unsupported image format", param=param)
        # Header dimensions only so far: nothing has been decompressed yet.
        width, height = img.size
        if width * height > cfg.max_pixels:
            raise PayloadTooLarge(
                prefix + f"image has too many pixels (at most {cfg.max_pixels})", param=param
            )
        if min(width, height) < cfg.min_side:
            raise InvalidRequest(
                prefix + f"image is too small (shortest side at least {cfg.min_side})",
                param=param,
            )
        if max(width, height) / min(width, height) > cfg.max_aspect:
            raise InvalidRequest(
                prefix + f"image aspect ratio exceeds {cfg.max_aspect:g}", param=param
            )
        if not decode:
            return img
        img.seek(0)  # animations: the first frame is what the model is shown
        img.load()
        # Same conversion as vLLM's image loader, so the guard checks what the model sees.
        return img.convert("RGB")


# Pixels are hashed in strips of whole rows of about this many bytes: ``tobytes()`` of a whole
# 49-MP image is a second 147 MB copy, held at once by every request being decoded.
DIGEST_STRIP_BYTES = 4 * 1024 * 1024


def image_digest(img: Image.Image) -> str:
    """sha256 over mode, size and pixels: equal for the same pixels in any file format.

    The same bytes as hashing ``img.tobytes()`` whole (raw rows, in order), strip by strip.
    """
    h = hashlib.sha256(f"{img.mode}:{img.width}x{img.height}:".encode())
    row_bytes = max(1, img.width * len(img.getbands()))
    rows = max(1, DIGEST_STRIP_BYTES // row_bytes)
    for top in range(0, img.height, rows):
        h.update(img.crop((0, top, img.width, min(img.height, top + rows))).tobytes())
    return h.hexdigest()


def to_png_data_url(img: Image.Image) -> str:
    """``data:image/png;base64,...`` of ``img``, losslessly, favouring speed over size."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
