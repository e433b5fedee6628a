"""engine.image_processor against mistral-common's own v7 image encoder (the reference implementation)."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import mistral_common
import numpy as np
import pytest
from mistral_common.protocol.instruct.chunk import ImageChunk, ImageURLChunk, TextChunk
from mistral_common.tokens.tokenizers.image import ImageConfig as MCImageConfig
from mistral_common.tokens.tokenizers.image import ImageEncoder, SpecialImageIDs
from PIL import Image

from engine import image_processor as ip
from engine.image_processor import (
    ImageConfig,
    ImageError,
    ImageTokenIds,
    image_grid,
    image_hash,
    image_token_ids,
    load_image,
    preprocess,
)

REF = ImageEncoder(
    MCImageConfig(image_patch_size=14, max_image_size=1540, spatial_merge_size=2),
    SpecialImageIDs(img=10, img_break=12, img_end=13),
)


def reference(source):
    chunk = ImageURLChunk(image_url=source) if isinstance(source, str) else ImageChunk(image=source)
    return REF(chunk)


def assert_same_as(ref, ours: ip.ProcessedImage) -> None:
    assert ours.token_ids() == ref.tokens
    assert ours.pixels.dtype == np.float32
    assert ours.pixels.flags.c_contiguous
    assert ours.pixels.shape == ref.image.shape == (3, ours.rows * 28, ours.cols * 28)
    # The brief allows 1e-5, but both sides run the same opencv code, so anything but equality is a bug.
    assert np.array_equal(ours.pixels, ref.image), float(np.max(np.abs(ours.pixels - ref.image)))


def noise(mode: str, w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "LA": 2, "L": 1, "CMYK": 4, "YCbCr": 3}
    if mode in channels:
        arr = rng.integers(0, 256, (h, w, channels[mode]), dtype=np.uint8)
        return Image.frombytes(mode, (w, h), arr.tobytes())
    if mode == "1":
        return Image.fromarray(rng.integers(0, 2, (h, w)).astype(bool))
    if mode.startswith("P"):
        img = Image.frombytes("P", (w, h), rng.integers(0, 256, (h, w), dtype=np.uint8).tobytes())
        img.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tobytes())
        if mode == "P+index":
            img.info["transparency"] = 7
        elif mode == "P+alphas":
            img.info["transparency"] = rng.integers(0, 256, 256, dtype=np.uint8).tobytes()
        return img
    raise AssertionError(mode)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


# --- token grid -------------------------------------------------------------------------------------


SIZES = [(1, 1), (27, 27), (28, 28), (29, 29), (200, 300), (1024, 768), (1540, 1540), (1541, 113),
         (2000, 1000), (4000, 30), (30, 4000), (10000, 5)]


def test_grid_matches_reference_on_a_sweep():
    rng = np.random.default_rng(1)
    sizes = SIZES + [tuple(int(v) for v in rng.integers(1, 20000, 2)) for _ in range(3000)]
    sizes += [(w, h) for w in range(1, 120) for h in (1539, 1540, 1541, 3079, 3080, 3081, 4620)]
    for w, h in sizes:
        width_tokens, height_tokens = REF._image_to_num_tokens(SimpleNamespace(size=(w, h)))
        assert image_grid(w, h) == (height_tokens, width_tokens), (w, h)
        assert image_grid(h, w) == (width_tokens, height_tokens), (h, w)


def test_grid_known_values():
    # From docs/model.md, independent of mistral-common; 57x3080 needs round-half-to-even (28.5 -> 28).
    assert image_grid(200, 300) == (11, 8)
    assert image_grid(1024, 768) == (28, 37)
    assert image_grid(2000, 1000) == (28, 55)
    assert image_grid(1541, 113) == (5, 55)
    assert image_grid(57, 3080) == (55, 1)
    pixtral_12b = ImageConfig(patch_size=16, max_image_size=1024, spatial_merge_size=1)
    assert image_grid(1540, 1540, pixtral_12b) == (64, 64)


def test_image_token_ids_layout():
    assert image_token_ids(2, 3) == [10, 10, 10, 12, 10, 10, 10, 13]
    assert image_token_ids(1, 1, ImageTokenIds(img=5, img_break=6, img_end=7)) == [5, 7]


# --- pixels -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("w,h", SIZES)
def test_sizes_match_reference(w, h):
    assert_same_as(reference(noise("RGB", w, h)), preprocess(noise("RGB", w, h)))


MODES = ["RGB", "RGBA", "LA", "L", "P", "P+index", "P+alphas", "1", "CMYK", "YCbCr"]


@pytest.mark.parametrize("size", [(61, 47), (1700, 90)])
@pytest.mark.parametrize("mode", MODES)
def test_modes_match_reference(mode, size):
    ours = preprocess(noise(mode, *size, seed=3))
    assert_same_as(reference(noise(mode, *size, seed=3)), ours)


def test_transparency_is_composited_over_white():
    img = Image.new("RGBA", (30, 30), (0, 0, 0, 0))
    white = preprocess(Image.new("RGB", (30, 30), (255, 255, 255))).pixels
    assert np.array_equal(preprocess(img).pixels, white)


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16bit_gray_matches_mistral_common(mode):
    # mistral-common clips 16-bit values at 255 (a quirk of PIL's convert); we keep its pixels exactly
    rng = np.random.default_rng(4)
    arr = rng.integers(0, 65536, (45, 70)).astype(np.uint16 if mode == "I;16" else np.int32)
    img = Image.fromarray(arr)
    assert img.mode == mode
    assert_same_as(reference(Image.fromarray(arr)), preprocess(img))


def test_16bit_png_round_trip():
    arr = np.random.default_rng(5).integers(0, 65536, (33, 50)).astype(np.uint16)
    img = load_image(encode(Image.fromarray(arr), "PNG"))
    assert img.mode == "I;16"
    assert_same_as(reference(Image.fromarray(arr)), preprocess(img))


# --- encoded inputs ---------------------------------------------------------------------------------


def _encoded_cases():
    rgb, rgba = noise("RGB", 301, 97, seed=6), noise("RGBA", 301, 97, seed=6)
    return {
        "jpeg-rgb": encode(rgb, "JPEG", quality=90),
        "jpeg-l": encode(noise("L", 120, 80), "JPEG"),
        "jpeg-cmyk": encode(noise("CMYK", 64, 64), "JPEG"),
        "png-rgb": encode(rgb, "PNG"),
        "png-rgba": encode(rgba, "PNG"),
        "png-p-transparency": encode(noise("P+index", 90, 40), "PNG"),
        "png-1": encode(noise("1", 90, 40), "PNG"),
        "gif": encode(noise("P", 90, 40), "GIF"),
        "webp-lossy": encode(rgb, "WEBP", quality=80),
        "webp-lossless-rgba": encode(rgba, "WEBP", lossless=True),
        "bmp": encode(rgb, "BMP"),
        "large-jpeg": encode(noise("RGB", 2000, 1500, seed=7), "JPEG"),
    }


ENCODED = _encoded_cases()


@pytest.mark.parametrize("name", list(ENCODED))
def test_encoded_round_trip_matches_reference(name):
    data = ENCODED[name]
    ref = reference(data_uri(data))  # mistral-common decodes the data URI itself
    assert_same_as(ref, preprocess(load_image(data)))
    assert_same_as(ref, preprocess(load_image(data_uri(data))))
    assert_same_as(ref, preprocess(load_image(bytearray(data))))
    assert_same_as(ref, preprocess(load_image(memoryview(data))))


def test_media_type_is_sniffed_not_trusted():
    data = ENCODED["png-rgba"]
    ref = reference(data_uri(data))
    for uri in ("data:;base64," + base64.b64encode(data).decode(), data_uri(data, "image/jpeg"),
                data_uri(data, "text/plain;charset=utf-8"), "  " + data_uri(data) + "\n"):
        assert_same_as(ref, preprocess(load_image(uri)))
    wrapped = base64.encodebytes(data).decode()  # base64 with line breaks every 76 characters
    assert_same_as(ref, preprocess(load_image("DATA:image/png;BASE64," + wrapped)))


def test_gif_uses_first_frame():
    frames = [noise("P", 80, 60, seed=8), noise("P", 80, 60, seed=9)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    ours = preprocess(load_image(data))
    assert_same_as(reference(data_uri(data, "image/gif")), ours)
    assert_same_as(reference(frames[0].convert("RGB")), ours)
    assert not np.array_equal(ours.pixels, preprocess(frames[1]).pixels)


def test_several_images_in_one_message():
    from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV7
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    tekken = Tekkenizer.from_file(Path(mistral_common.__file__).parent / "data" / "tekken_240911.json")
    tokenizer = InstructTokenizerV7(tekken, image_encoder=REF)
    inputs = [data_uri(ENCODED["jpeg-rgb"]), noise("RGBA", 1600, 30, seed=10), data_uri(ENCODED["gif"])]
    chunks = [ImageURLChunk(image_url=inputs[0]), TextChunk(text="compare these"),
              ImageChunk(image=inputs[1]), ImageURLChunk(image_url=inputs[2])]
    ref_tokens, ref_images, _ = tokenizer.encode_user_content(chunks, is_last=True)

    ours = [preprocess(load_image(x)) for x in inputs]
    assert [t for t in ref_tokens if t in (10, 12, 13)] == [t for p in ours for t in p.token_ids()]
    assert len(ref_images) == len(ours)
    for ref_img, p in zip(ref_images, ours):
        assert p.pixels.shape == ref_img.shape and np.array_equal(p.pixels, ref_img)
    assert len({image_hash(p) for p in ours}) == 3


def test_pil_image_is_returned_as_is():
    img = noise("RGB", 10, 10)
    assert load_image(img) is img


# --- hashing ----------------------------------------------------------------------------------------


def test_image_hash():
    png, bmp = ENCODED["png-rgb"], ENCODED["bmp"]  # both lossless encodings of the same pixels
    a, b = preprocess(load_image(png)), preprocess(load_image(bmp))
    assert image_hash(a) == image_hash(b) == image_hash(a.pixels.copy())
    assert len(image_hash(a)) == 64
    c = preprocess(noise("RGB", 301, 97, seed=99))
    assert image_hash(c) != image_hash(a)
    tweaked = a.pixels.copy()
    tweaked[2, -1, -1] += 1e-3
    assert image_hash(tweaked) != image_hash(a)
    assert image_hash(a.pixels.reshape(3, -1)) != image_hash(a)  # same bytes, other shape
    assert image_hash(png) != image_hash(bmp) and image_hash(png) == image_hash(bytearray(png))
    with pytest.raises(TypeError):
        image_hash("not an image")


# --- errors -----------------------------------------------------------------------------------------


def png_header_only(w: int, h: int, bit_depth: int = 1, color_type: int = 0, idat: bytes = b"x") -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def real_1bit_png(w: int, h: int) -> bytes:
    raw = (b"\x00" + b"\x00" * ((w + 7) // 8)) * h
    return png_header_only(w, h, idat=zlib.compress(raw, 9))


@pytest.mark.parametrize("source,match", [
    ("http://example.com/cat.png", "image URLs are not fetched; send the image as a data URI"),
    ("HTTPS://example.com/cat.png", "image URLs are not fetched"),
    ("/etc/passwd", "expected an image data URI"),
    ("iVBORw0KGgoAAAANSUhEUg", "expected an image data URI"),
    ("data:image/png;base64,iVBOR*w0K", "not valid base64"),
    ("data:image/png;base64,A", "not valid base64"),
    ("data:image/png,%89PNG", "must be base64-encoded"),
    ("data:image/png;base64", "must be base64-encoded"),
    ("data:image/png;base64,", "image data is empty"),
    (b"", "image data is empty"),
    (bytes(np.random.default_rng(11).integers(0, 256, 4096, dtype=np.uint8)), "not a recognized image"),
    (b"GIF89a" + b"\x00" * 10, "not a recognized image"),
    (encode(noise("RGB", 20, 20), "TIFF"), "accepted formats: JPEG, PNG, GIF, WebP or BMP"),
    (ENCODED["png-rgb"][: len(ENCODED["png-rgb"]) // 2], "PNG data: it is corrupt or truncated"),
    (ENCODED["jpeg-rgb"][: len(ENCODED["jpeg-rgb"]) // 2], "JPEG data: it is corrupt or truncated"),
    (png_header_only(64, 64, idat=b"garbage"), "corrupt or truncated"),
    (png_header_only(30000, 30000), "image is too large"),
    (png_header_only(10000, 10000), "image is too large"),  # PIL only warns at this size
    (real_1bit_png(9000, 9000), "9000x9000 = 81000000 pixels"),  # caught by our own limit
    (png_header_only(0, 10), "not a recognized image"),
    (12345, "unsupported image input of type int"),
])
def test_bad_inputs_raise_image_error(source, match):
    with pytest.raises(ImageError, match=match):
        load_image(source)


def test_size_limit_is_checked_before_decoding_and_without_pil_global(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's own guard switched off
    with pytest.raises(ImageError, match="30000x30000"):
        load_image(png_header_only(30000, 30000, idat=b"not even zlib"))  # decoding it would fail differently


def test_pil_decompression_bomb_warning_and_error_become_image_error(monkeypatch):
    monkeypatch.setattr(ip, "MAX_IMAGE_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for side in (40, 100):  # 1600 px: PIL warns; 10000 px: PIL raises
        with pytest.raises(ImageError, match="possible decompression bomb"):
            load_image(real_1bit_png(side, side))


def test_payload_size_limit(monkeypatch):
    with pytest.raises(ImageError, match="image payload is too large"):
        load_image(b"\x89PNG" + bytes(ip.MAX_IMAGE_BYTES))
    monkeypatch.setattr(ip, "MAX_IMAGE_BYTES", 1000)
    big = ENCODED["png-rgb"]
    assert len(big) > 1000
    for source in (data_uri(big), big):
        with pytest.raises(ImageError, match=r"image payload is too large \(\d+ bytes\); the limit is 1000"):
            load_image(source)


def test_zero_size_and_unsupported_modes():
    with pytest.raises(ImageError, match="zero size"):
        load_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="zero size"):
        preprocess(Image.new("RGB", (5, 0)))
    with pytest.raises(ImageError, match="zero size"):
        image_grid(0, 10)
    with pytest.raises(ImageError, match="unsupported pixel mode 'F'"):
        preprocess(Image.new("F", (5, 5)))
    assert issubclass(ImageError, ValueError)


def test_lazy_pil_image_truncation_is_caught():
    lazy = Image.open(io.BytesIO(ENCODED["jpeg-rgb"][:2000]))
    with pytest.raises(ImageError, match="corrupt or truncated"):
        preprocess(lazy)
