import io

import numpy as np
import pytest
from conftest import write_image
from PIL import Image

from raylt.embed.images import DecodeSpec, decode_batch, decode_image


def png(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_shortest_side_resize_then_centre_crop():
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, 10:30] = 255  # a white centre band, as wide as the crop
    out = decode_image(png(Image.fromarray(a)), DecodeSpec(10, "shortest", "bilinear"))
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert out[:, 1:-1].min() > 200  # the crop is the centre band


def test_squash_keeps_whole_image():
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = 255
    out = decode_image(png(Image.fromarray(a)), DecodeSpec(8, "squash", "bilinear"))
    assert out[:, :3].min() > 200 and out[:, 5:].max() < 50


@pytest.mark.parametrize(
    "mode, value",
    [("L", 128), ("CMYK", None), ("P", None), ("RGBA", None), ("I;16", 65535), ("LA", None)],
)
def test_every_mode_becomes_8bit_rgb(mode, value):
    base = Image.new("RGB", (12, 12), (200, 100, 50))
    if mode == "I;16":
        img = Image.new("I;16", (12, 12), value)
    elif mode == "L":
        img = Image.new("L", (12, 12), value)
    else:
        img = base.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    out = decode_image(png(img, fmt), DecodeSpec(8))
    assert out.shape == (8, 8, 3)
    if mode == "I;16":
        assert out.min() == 255  # full-scale 16-bit is white, not clipped garbage
    if mode == "L":
        assert abs(int(out.mean()) - 128) <= 1


def test_decode_batch_marks_bad_images_instead_of_raising(tmp_path):
    good = write_image(tmp_path / "good.jpg", (10, 200, 10))
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    zero = tmp_path / "zero.png"
    zero.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    batch = {
        "row": np.arange(5), "id": np.array(list("abcde"), dtype=object), "label": np.zeros(5, np.int64),
        "split": np.array(["train"] * 5, dtype=object),
        "path": np.array([str(good), str(truncated), str(zero), str(text), str(tmp_path / "missing.jpg")], dtype=object),
    }
    out = decode_batch(batch, DecodeSpec(16))
    assert list(out["ok"]) == [True, False, False, False, False]
    assert out["pixels"].shape == (5, 16, 16, 3) and out["pixels"][0].mean() > 0
    assert "FileNotFoundError" in out["error"][4] and out["error"][0] == ""
    # What is wrong with each file, in words (not the decoder's exception around a BytesIO).
    assert list(out["error"][1:4]) == ["truncated: the JPEG data ends after 200 bytes", "empty file (0 bytes)",
                                       "not an image: 20 bytes of text"]


def test_decompression_bomb_is_a_skip(tmp_path):
    big = tmp_path / "bomb.png"
    Image.new("L", (14000, 14000)).save(big)  # 196 MP > 2 x Pillow's limit, tiny on disk
    out = decode_batch({"row": np.arange(1), "id": np.array(["b"], dtype=object), "label": np.zeros(1, np.int64),
                        "split": np.array(["train"], dtype=object), "path": np.array([str(big)], dtype=object)},
                       DecodeSpec(8))
    assert not out["ok"][0] and out["error"][0].startswith("too large: 196,000,000 pixels, over the")
