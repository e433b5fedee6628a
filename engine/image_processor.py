"""Image input layer: decode untrusted image payloads safely, then preprocess them for the model.

mistral-common (what vLLM's ``tokenizer_mode=mistral`` runs) is the source of truth for Mistral Small 3.1
preprocessing, so pixels come from its own ``transform_image`` (opencv INTER_CUBIC) instead of a copy of it:
that is the only way to stay bit-identical as its resize/normalize details evolve.

Known mistral-common quirks, all matched so that we see what the hosted model sees:
- 16-bit grayscale ("I;16", which Pillow >= 10 gives for 16-bit gray PNGs, and "I") is *clipped* to 0..255 by
  PIL's convert, turning almost every real image white. Kept: a rescale here would disagree with the hosted
  model and with the pixels mistral-common's chat encoding produces for the same request.
- RGB images skip the alpha composite, so a PNG tRNS colour key on an RGB image is ignored, while the same
  key on an "L" or "P" image is honoured (made white). Kept as is.
- EXIF orientation is not applied (rotated phone photos reach the model unrotated). Kept as is.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from mistral_common.tokens.tokenizers.image import transform_image
from PIL import Image

from engine.config import ImageConfig  # noqa: F401  (the geometry lives with the model's config)

MAX_IMAGE_BYTES = 32 * 1024 * 1024  # encoded payload, after base64 decoding
# 8192x8192. Bounds memory: mistral-common resizes from a full-resolution float32 RGB copy (~800 MB here).
MAX_IMAGE_PIXELS = 8192 * 8192
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
_ACCEPTED = "JPEG, PNG, GIF, WebP or BMP"
# Modes mistral-common's _convert_to_rgb converts without crashing; anything else is refused.
_PASSTHROUGH_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr",
                                "I;16", "I;16L", "I;16B", "I;16N", "I"})


class ImageError(ValueError):
    """The image input is unusable; the message is meant for the API user."""


@dataclass(frozen=True)
class ImageTokenIds:
    img: int = 10
    img_break: int = 12
    img_end: int = 13


@dataclass
class ProcessedImage:
    pixels: np.ndarray  # float32 [3, rows*28, cols*28], normalized
    rows: int
    cols: int

    def token_ids(self, ids: ImageTokenIds = ImageTokenIds()) -> list[int]:
        return image_token_ids(self.rows, self.cols, ids)


def load_image(source: str | bytes | bytearray | memoryview | Image.Image) -> Image.Image:
    """Decode a data URI, raw encoded bytes or a PIL image into a fully loaded, size-checked PIL image."""
    if isinstance(source, Image.Image):
        return _load_checked(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        _check_payload_size(memoryview(source).nbytes)
        return _decode(bytes(source))
    if isinstance(source, str):
        return _decode(_data_uri_payload(source))
    raise ImageError(
        f"unsupported image input of type {type(source).__name__}; send a base64 data URI "
        "(data:image/png;base64,...)"
    )


def _data_uri_payload(uri: str) -> bytes:
    uri = uri.strip()
    head = uri[:16].lower()
    if head.startswith(("http://", "https://")):
        raise ImageError(
            "image URLs are not fetched; send the image as a data URI (data:image/png;base64,...)"
        )
    if not head.startswith("data:"):
        raise ImageError(f"expected an image data URI (data:image/png;base64,...), got {uri[:24]!r}")
    header, comma, payload = uri.partition(",")
    # The media type is ignored on purpose (clients often get it wrong); the decoder sniffs the real format.
    if not comma or not header.lower().endswith(";base64"):
        raise ImageError("image data URI must be base64-encoded: data:<media type>;base64,<data>")
    payload = "".join(payload.split())  # tolerate line-wrapped base64
    _check_payload_size(len(payload) // 4 * 3)
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"image data URI payload is not valid base64 ({e})") from None


def _check_payload_size(n: int) -> None:
    if n > MAX_IMAGE_BYTES:
        raise ImageError(f"image payload is too large ({n} bytes); the limit is {MAX_IMAGE_BYTES} bytes")


def _too_large(detail: str) -> ImageError:
    return ImageError(f"image is too large ({detail}); at most {MAX_IMAGE_PIXELS} pixels are accepted")


def _decode(data: bytes) -> Image.Image:
    if not data:
        raise ImageError("image data is empty")
    _check_payload_size(len(data))
    try:
        # PIL only *warns* below 2x its global limit; make that fatal too. (catch_warnings touches global
        # state, so a concurrent thread may briefly see this filter; harmless, it only makes bombs fatal.)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)  # lazy: parses the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_large("refused as a possible decompression bomb") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"not a recognized image, or a corrupt one; accepted formats: {_ACCEPTED}") from None
    except Exception as e:
        raise ImageError(f"image header is corrupt ({e})") from None
    return _load_checked(image)


def _check_size(image: Image.Image) -> None:
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ImageError(f"image has zero size ({w}x{h})")
    if w * h > MAX_IMAGE_PIXELS:
        raise _too_large(f"{w}x{h} = {w * h} pixels")


def _load_checked(image: Image.Image) -> Image.Image:
    _check_size(image)  # before load(): the header's dimensions decide whether we decode at all
    try:
        image.load()  # force the full decode so truncation surfaces here, not deep inside preprocessing
    except Exception as e:
        fmt = image.format or "image"
        raise ImageError(f"could not decode {fmt} data: it is corrupt or truncated ({e})") from None
    return image


def image_grid(width: int, height: int, cfg: ImageConfig = ImageConfig()) -> tuple[int, int]:
    """(rows, cols) of [IMG] tokens, as mistral-common's ImageEncoder._image_to_num_tokens computes them."""
    if width <= 0 or height <= 0:
        raise ImageError(f"image has zero size ({width}x{height})")
    w: float = width
    h: float = height
    ratio = max(h / cfg.max_image_size, w / cfg.max_image_size)
    if ratio > 1:  # Python's round (half to even) and the floor of 1 are part of the reference behaviour
        w = max(round(w / ratio), 1)
        h = max(round(h / ratio), 1)
    unit = cfg.token_pixels
    return int((h - 1) // unit + 1), int((w - 1) // unit + 1)


def image_token_ids(rows: int, cols: int, ids: ImageTokenIds = ImageTokenIds()) -> list[int]:
    tokens = ([ids.img] * cols + [ids.img_break]) * rows
    tokens[-1] = ids.img_end
    return tokens


def _to_supported_mode(image: Image.Image) -> Image.Image:
    if image.mode in _PASSTHROUGH_MODES:
        return image
    raise ImageError(f"unsupported pixel mode {image.mode!r}; send an 8-bit RGB, RGBA or grayscale image")


def preprocess(image: Image.Image, cfg: ImageConfig = ImageConfig()) -> ProcessedImage:
    """RGB conversion, resize and normalization, bit-identical to mistral-common's ImageEncoder."""
    image = _to_supported_mode(_load_checked(image))
    rows, cols = image_grid(*image.size, cfg)
    unit = cfg.token_pixels
    pixels = transform_image(image, (cols * unit, rows * unit))
    return ProcessedImage(np.ascontiguousarray(pixels, dtype=np.float32), rows, cols)


def image_hash(content: ProcessedImage | np.ndarray | bytes | bytearray | memoryview) -> str:
    """Stable sha256 hex digest; shape and dtype are hashed too, so equal bytes in another layout differ."""
    h = hashlib.sha256()
    if isinstance(content, ProcessedImage):
        content = content.pixels
    if isinstance(content, np.ndarray):
        arr = np.ascontiguousarray(content)
        h.update(f"pixels:{arr.dtype.str}:{arr.shape}:".encode())
        h.update(arr.tobytes())
    elif isinstance(content, (bytes, bytearray, memoryview)):
        h.update(b"bytes:")
        h.update(content)
    else:
        raise TypeError(f"image_hash takes pixels or bytes, not {type(content).__name__}")
    return h.hexdigest()
