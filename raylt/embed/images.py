"""Image decoding for the embedding stage (CPU side): files or bytes -> uint8 [B, S, S, 3].

Resizing and cropping happen here, on CPU tasks, so the encoder actors receive small uint8
arrays and only normalise and run the model. An unreadable image is not an exception: its
row comes out with `ok = False` and the reason in `error`, to be counted and reported.

Input columns: `row`, `id`, `label`, `split`, and `path` or `image`.
Output columns: `row`, `id`, `label`, `split`, `pixels` [S, S, 3] uint8, `ok`, `error`.
"""

from __future__ import annotations

import hashlib
import io
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageFile

from raylt.ops.storage import open_input

# Pillow refuses images above 2 * MAX_IMAGE_PIXELS (a decompression bomb); 89 MP is its default
# and far above any photo data set, so the guard stays on and such a file is a counted skip.
Image.MAX_IMAGE_PIXELS = 89_478_485
ImageFile.LOAD_TRUNCATED_IMAGES = False

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class DecodeSpec:
    """How an image becomes the encoder's input square (mirrors open_clip's PreprocessCfg)."""

    size: int
    resize_mode: Literal["shortest", "squash"] = "shortest"  # shortest side + centre crop, or stretch
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB; 16-bit and float greyscale are rescaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        img = Image.fromarray((a.clip(0, hi) * (255.0 / hi)).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


# EXIF orientation (tag 0x0112) -> the transpose that shows the picture upright, as browsers
# and Pillow's ImageOps.exif_transpose do: a phone stores a portrait photo sideways with a tag.
EXIF_ORIENTATION = 0x0112
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def decode_image(src: str | bytes, spec: DecodeSpec) -> np.ndarray:
    """Open, convert, turn upright (EXIF orientation) and resize one image to uint8 [S, S, 3].
    Raises on any unreadable input, with what is wrong with it (`describe_failure`)."""
    data = src if isinstance(src, (bytes, bytearray)) else None
    try:
        with Image.open(io.BytesIO(data) if data is not None else src) as img:
            # JPEG draft mode decodes at a reduced scale that is still >= the target size: the
            # biggest single speed-up for large photos, and the bicubic resize below follows it.
            img.draft("RGB", (spec.size, spec.size))
            turn = _UPRIGHT.get(img.getexif().get(EXIF_ORIENTATION, 1))
            img = to_rgb(img)
            img.load()
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # the file, not the image: said as the reader says it
    except Exception as e:
        raise ImageError(describe_failure(e, data if data is not None else src)) from None
    if turn is not None:
        img = img.transpose(turn)
    s = spec.size
    if spec.resize_mode == "squash":
        img = img.resize((s, s), _RESAMPLE[spec.interpolation])
    else:
        w, h = img.size
        scale = s / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        img = img.resize((nw, nh), _RESAMPLE[spec.interpolation])
        left, top = (nw - s) // 2, (nh - s) // 2
        img = img.crop((left, top, left + s, top + s))
    return np.asarray(img, dtype=np.uint8)


class ImageError(ValueError):
    """An image that cannot be decoded, said for people (`describe_failure`)."""


_MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8": "JPEG", b"GIF8": "GIF", b"RIFF": "WebP", b"BM": "BMP", b"II*\x00": "TIFF",
          b"MM\x00*": "TIFF"}


def describe_failure(e: Exception, src) -> str:
    """What is wrong with an image that did not decode, in words: empty, not an image (and what
    it holds instead), a damaged or cut-short file of a known format, too large, or the
    decoder's own message. `src`: its bytes or its path."""
    from PIL import UnidentifiedImageError

    try:
        data = bytes(src) if isinstance(src, (bytes, bytearray, memoryview)) else Path(src).read_bytes()
    except OSError:
        data = None
    size = f"{len(data):,} byte{'' if len(data) == 1 else 's'}" if data is not None else "its bytes"
    fmt = next((name for magic, name in _MAGIC.items() if data and data.startswith(magic)), None)
    if isinstance(e, Image.DecompressionBombError):
        pixels = str(e).split("(")[1].split(" pixels")[0] if "(" in str(e) else "more"
        return (f"too large: {int(pixels):,} pixels, over the {2 * Image.MAX_IMAGE_PIXELS:,}-pixel guard against "
                f"decompression bombs" if pixels.isdigit() else f"too large: {e}")
    if data is not None and len(data) == 0:
        return "empty file (0 bytes)"
    if isinstance(e, UnidentifiedImageError) and fmt is None:
        head = (data or b"")[:256].lstrip().lower()
        kind = ("an HTML page" if head.startswith((b"<!doctype html", b"<html")) else
                "text" if head and all(c in b"\t\n\r" or 32 <= c < 127 for c in head) else "bytes of no image format")
        return f"not an image: {size} of {kind}"
    if "truncated" in str(e).lower() or "premature end" in str(e).lower():
        return f"truncated: the {fmt or 'image'} data ends after {size}"
    why = "its header cannot be read" if isinstance(e, UnidentifiedImageError) else str(e)
    return f"a damaged {fmt or 'image'} file ({size}): {why}"


def skip_reason(e: Exception) -> str:
    """A skipped row's `error`: what is wrong with the image, or the reader's error with its type."""
    return (str(e) if isinstance(e, ImageError) else f"{type(e).__name__}: {e}")[:300]


# Start-of-frame markers a JPEG decoder of baseline, extended and progressive Huffman JPEGs
# takes (SOF0, SOF1, SOF2); the others are lossless (SOF3), hierarchical or arithmetic-coded.
_SOF_OK = {0xC0, 0xC1, 0xC2}
_SOF_ANY = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # DHT, JPG and DAC share the range


def device_decodable(data: bytes) -> bool:
    """Whether `data` is a JPEG that the batched decoder takes: 8-bit Huffman-coded (baseline,
    extended or progressive) with 1 or 3 components. CMYK (4 components), 12-bit, lossless and
    arithmetic-coded JPEGs, other formats and damaged headers go to Pillow."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return False
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _SOF_ANY:
            if marker not in _SOF_OK or i + 10 > len(data):
                return False
            precision, components = data[i + 4], data[i + 9]
            return precision == 8 and components in (1, 3)
        if marker in (0xDA, 0xD9) or length < 2:  # scan data or the end before any frame header
            return False
        i += 2 + length
    return False


def read_ranges(paths, offsets, sizes, filesystem=None) -> list:
    """The bytes of each (path, offset, size), or the exception that reading them raised; each
    file is opened once per batch (a batch of a shard's members reads one file; on object
    storage, a ranged request per member)."""
    out: list = [None] * len(paths)
    order = sorted(range(len(paths)), key=lambda i: (paths[i], offsets[i]))
    for path, group in itertools.groupby(order, key=lambda i: paths[i]):
        group = list(group)
        try:
            with open_input(path, filesystem) as f:
                for i in group:
                    f.seek(int(offsets[i]))
                    data = f.read(int(sizes[i]))
                    out[i] = data if len(data) == int(sizes[i]) else EOFError(
                        f"{path} ends {int(sizes[i]) - len(data)} bytes into this member")
        except OSError as e:
            for i in group:
                out[i] = e
    return out


def read_parquet_cells(paths, rows, columns, filesystem=None) -> list:
    """The bytes in `columns[i]` of row `rows[i]` of each Parquet file `paths[i]` (None where the
    cell is empty), or the exception that reading raised; each file's row groups that hold the
    rows are read once per batch, and only the image column of them."""
    out: list = [None] * len(paths)
    order = sorted(range(len(paths)), key=lambda i: (paths[i], columns[i], rows[i]))
    for (path, column), group in itertools.groupby(order, key=lambda i: (paths[i], columns[i])):
        group = list(group)
        try:
            pf = pq.ParquetFile(open_input(path, filesystem))
            starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
            wanted = np.asarray([rows[i] for i in group], dtype=np.int64)
            where = np.searchsorted(starts, wanted, side="right") - 1
            for g in np.unique(where):
                cells = pf.read_row_group(int(g), columns=[column]).column(0).combine_chunks()
                if pa.types.is_struct(cells.type):
                    cells = cells.field("bytes")
                for i, r in zip(np.asarray(group)[where == g], wanted[where == g]):
                    r = int(r - starts[g])
                    out[i] = cells[r].as_py() if 0 <= r < len(cells) else IndexError(f"{path} has no row {rows[i]}")
        except (OSError, pa.ArrowException, KeyError) as e:
            for i in group:
                out[i] = e
    return [ImageError("no image bytes in this row (an empty cell)") if v is None else v for v in out]


def read_files(paths, filesystem=None) -> list:
    """The whole bytes of each file, or the exception that reading it raised."""
    out: list = []
    for path in paths:
        try:
            with open_input(path, filesystem) as f:
                out.append(f.read())
        except OSError as e:
            out.append(e)
    return out


def source_bytes(batch: dict[str, np.ndarray], filesystem=None) -> list:
    """Each row's encoded image, read where the source keeps it: bytes, or the exception that
    reading raised (a counted skip downstream)."""
    if "offset" in batch:  # members of shards: their byte ranges
        return read_ranges(batch["path"], batch["offset"], batch["size"], filesystem)
    if "parquet_row" in batch:  # cells of Parquet files: their row groups
        return read_parquet_cells(batch["path"], batch["parquet_row"], batch["image_column"], filesystem)
    if "path" in batch:
        return read_files(batch["path"], filesystem)
    return [bytes(b) for b in batch["image"]]


def hash_batch(batch: dict[str, np.ndarray], filesystem=None) -> dict[str, np.ndarray]:
    """Ray Data batch UDF: each row's content hash (uint8 [n, 32]; `readable` False where the
    bytes could not be read: such rows go on to be decoded, and skipped with their reason)."""
    srcs = source_bytes(batch, filesystem)
    hashes = np.zeros((len(srcs), 32), dtype=np.uint8)
    readable = np.array([not isinstance(s, Exception) for s in srcs], dtype=bool)
    for i, s in enumerate(srcs):
        if readable[i]:
            hashes[i] = np.frombuffer(content_hash(bytes(s)), dtype=np.uint8)
    return {"row": batch["row"], "hash": hashes, "readable": readable}


def content_hash(data: bytes) -> bytes:
    """What an image is known by in the image cache (raylt.embed.cache): SHA-256 of its encoded bytes."""
    return hashlib.sha256(data).digest()


def read_batch(batch: dict[str, np.ndarray], spec: DecodeSpec, filesystem=None,
               hashes: bool = False) -> dict[str, np.ndarray]:
    """Ray Data batch UDF for decoding in the encoder actors (`embed.decode=actor`): JPEGs the
    actor's batched decoder takes (`device_decodable`) leave as their encoded bytes, read and
    not decoded; every other image is decoded here, on the CPU, and leaves as its S x S x 3
    pixels (`raw` True), so that the actor's device gets only what it decodes fast
    (raylt.embed.device_decode). Unreadable rows come out with `ok = False` and the reason;
    `hashes` as in `decode_batch` (of the encoded bytes)."""
    srcs = source_bytes(batch, filesystem)
    n = len(srcs)
    ok, raw = np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
    errors, encoded = np.full(n, "", dtype=object), np.full(n, b"", dtype=object)
    digests = np.zeros((n, 32), dtype=np.uint8)
    for i, src in enumerate(srcs):
        try:
            if isinstance(src, Exception):
                raise src
            data = bytes(src)
            if hashes:
                digests[i] = np.frombuffer(content_hash(data), dtype=np.uint8)
            if device_decodable(data):
                encoded[i] = data
            else:
                encoded[i], raw[i] = decode_image(data, spec).tobytes(), True
        except Exception as e:  # every reader or decoder failure is a per-image skip, reported upstream
            ok[i] = False
            errors[i] = skip_reason(e)
    out = {k: batch[k] for k in ("row", "id", "label", "split")}
    out.update(encoded=encoded, raw=raw, ok=ok, error=errors)
    if hashes:
        out["hash"] = digests
    return out


def decode_batch(batch: dict[str, np.ndarray], spec: DecodeSpec, filesystem=None,
                 hashes: bool = False) -> dict[str, np.ndarray]:
    """Ray Data batch UDF: decode every row, marking failures instead of raising (`filesystem`:
    the source's, for paths on object storage; `hashes`: also each row's content `hash`, under
    which the image cache keeps its embedding)."""
    # a plain file is opened by the decoder itself (JPEG draft mode), unless its bytes are hashed
    srcs = batch["path"] if "path" in batch and not hashes and "offset" not in batch and "parquet_row" not in batch \
        else source_bytes(batch, filesystem)
    n = len(srcs)
    pixels = np.zeros((n, spec.size, spec.size, 3), dtype=np.uint8)
    ok = np.ones(n, dtype=bool)
    errors = np.full(n, "", dtype=object)
    # uint8 [n, 32], not numpy bytes: Arrow reads numpy's fixed bytes as C strings, cut at a zero byte
    digests = np.zeros((n, 32), dtype=np.uint8)
    for i, src in enumerate(srcs):
        try:
            if isinstance(src, Exception):
                raise src
            if hashes:
                digests[i] = np.frombuffer(content_hash(bytes(src)), dtype=np.uint8)
            pixels[i] = decode_image(src if isinstance(src, (str, bytes)) else bytes(src), spec)
        except Exception as e:  # every decoder failure is a per-image skip, reported upstream
            ok[i] = False
            errors[i] = skip_reason(e)
    out = {k: batch[k] for k in ("row", "id", "label", "split")}
    out.update(pixels=pixels, ok=ok, error=errors)
    if hashes:
        out["hash"] = digests
    return out
