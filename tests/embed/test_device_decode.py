"""Decoding in the encoder actor (raylt.embed.device_decode), exercised on the CPU device: the
batched JPEG path, Pillow for the rest, counted skips, and agreement with the CPU tasks' decode.
The same code runs with device="cuda" (nvJPEG) on a GPU node: bench/gpu_check.sh."""

from __future__ import annotations

import hashlib
import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from raylt.config import load_config
from raylt.embed.device_decode import decode_on_device
from raylt.embed.images import DecodeSpec, decode_image, device_decodable, read_batch

# The CPU device always; a GPU's (nvJPEG) where there is one (bench/gpu_check.sh runs these there).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def photo(seed: int, size=(500, 375), mode="RGB", progressive=False) -> bytes:
    """A photo-sized JPEG: a smooth colour field with noise, as bench/embed_throughput.py makes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    base = np.stack([np.sin(xx * (seed % 5 + 1) * 3 + k + yy) for k in range(3)], axis=-1) * 100 + 128
    img = Image.fromarray((base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, progressive=progressive)
    return buf.getvalue()


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_the_batched_decoder_takes_8_bit_huffman_jpegs_with_one_or_three_components():
    assert device_decodable(photo(0)) and device_decodable(photo(1, progressive=True))
    assert device_decodable(photo(2, mode="L"))
    assert not device_decodable(photo(3, mode="CMYK"))  # 4 components: Pillow
    assert not device_decodable(png(0)) and not device_decodable(b"") and not device_decodable(b"\xff\xd8\xff")
    assert not device_decodable(b"\xff\xd8" + b"\x00" * 40)  # a JPEG start and then no markers


@pytest.mark.parametrize("device", DEVICES)
def test_decodes_agree_with_the_cpu_path_and_failures_are_counted_skips(device):
    spec = DecodeSpec(224)
    good = [photo(0), photo(1, progressive=True), photo(2, mode="L"), photo(3, mode="CMYK"), png(4)]
    bad = [photo(5)[:3000], b"not an image"]
    pixels, ok, errors = decode_on_device(good + bad, spec, device)
    pixels = pixels.cpu()
    assert pixels.shape == (7, 224, 224, 3) and pixels.dtype == torch.uint8
    assert list(ok) == [True] * 5 + [False] * 2
    assert errors[5].startswith("truncated: the JPEG data ends after 3,000 bytes") and errors[6] == "not an image: 12 bytes of text"
    assert not pixels[5:].any()
    for i, data in enumerate(good):
        ref = decode_image(data, spec).astype(np.float64)
        got = pixels[i].numpy().astype(np.float64)
        if i >= 3:  # CMYK and PNG go through Pillow: the CPU path's pixels exactly
            assert np.array_equal(got, ref)
        else:  # full-size decode and torch's antialiased bicubic against Pillow's draft mode
            assert np.abs(got - ref).mean() < 1.0, i


@pytest.mark.parametrize("device", DEVICES)
def test_embeddings_of_actor_decoded_images_match_the_cpu_path_to_a_cosine_of_0_999(device):
    from raylt.embed.backbones import build_encoder

    enc = build_encoder(load_config(None, ["backbone.name=open_clip", "backbone.model=raylt-tiny-vit",
                                           "backbone.offline=true"]).backbone)
    images = [photo(s, size=(500 + 37 * s, 375)) for s in range(8)]
    pixels, ok, _ = decode_on_device(images, enc.spec, device)
    ref = torch.from_numpy(np.stack([decode_image(d, enc.spec) for d in images]))
    pixels = pixels.cpu()
    cos = (enc.encode(pixels) * enc.encode(ref)).sum(1)
    assert ok.all() and cos.min().item() >= 0.999, cos


def test_read_batch_hands_the_actor_jpeg_bytes_decodes_the_rest_and_counts_unreadable_rows(tmp_path):
    spec = DecodeSpec(16)
    (tmp_path / "a.jpg").write_bytes(photo(0))
    (tmp_path / "c.png").write_bytes(png(1))
    (tmp_path / "d.jpg").write_bytes(photo(2, mode="CMYK"))
    names = ["a.jpg", "b.jpg", "c.png", "d.jpg"]
    batch = {"row": np.arange(4), "id": np.array(names, object), "label": np.zeros(4, np.int64),
             "split": np.array(["train"] * 4, object), "path": np.array([str(tmp_path / n) for n in names], object)}
    out = read_batch(batch, spec, hashes=True)
    assert list(out["ok"]) == [True, False, True, True] and "No such file" in out["error"][1]
    assert list(out["raw"]) == [False, False, True, True]  # PNG and CMYK: decoded by the task
    assert out["encoded"][0] == (tmp_path / "a.jpg").read_bytes() and out["encoded"][1] == b""
    assert out["encoded"][2] == decode_image(png(1), spec).tobytes()
    assert out["hash"][2].tobytes() == hashlib.sha256(png(1)).digest() and not out["hash"][1].any()
    # The actor takes both kinds: the JPEG decoded on its device, the raw pixels as they are.
    pixels, ok, _ = decode_on_device(out["encoded"][[0, 2, 3]], spec, "cpu", out["raw"][[0, 2, 3]])
    assert ok.all() and np.array_equal(pixels[1].numpy(), decode_image(png(1), spec))
    assert np.array_equal(pixels[2].numpy(), decode_image(photo(2, mode="CMYK"), spec))


@pytest.mark.ray
def test_a_store_decoded_by_the_actors_matches_the_cpu_decoded_one(ray_session, image_tree, tmp_path, caplog):
    from raylt.embed.stage import run_embed
    from raylt.embed.store import read_store

    def cfg(*extra):
        return load_config(None, ["data.source=folder", f"data.root={image_tree}", f"store.root={tmp_path / 'store'}",
                                  "backbone.name=pixels", "backbone.image_size=8", "embed.shard_size=6", "data.max_bad_fraction=0.1",
                                  *extra])

    (image_tree / "test" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    tasks = run_embed(cfg())
    with caplog.at_level(logging.INFO, logger="raylt.embed.stage"):
        actor = run_embed(cfg("embed.decode=actor"))
    # a store and an image cache of its own: the pixels differ a little
    assert actor.store != tasks.store and actor.encoded_rows == 27
    assert actor.manifest["skipped"] == tasks.manifest["skipped"] == 1
    want, got = read_store(tasks.store), read_store(actor.store)
    assert got["id"].to_pylist() == want["id"].to_pylist()
    a, b = (np.stack(t["embedding"].to_numpy(zero_copy_only=False)) for t in (got, want))
    png_rows = np.array([i.endswith(".png") for i in want["id"].to_pylist()])
    assert np.array_equal(a[png_rows], b[png_rows])  # decoded by the read tasks, as on the CPU path
    assert (a * b).sum(1).min() >= 0.999


def sideways(data: bytes, orientation: int = 6) -> bytes:
    """The photo as a phone stores a portrait shot: the pixels turned, and an EXIF orientation
    tag saying how to show them (6: turn 90 degrees clockwise)."""
    img = Image.open(io.BytesIO(data))
    turned = img.transpose(Image.Transpose.ROTATE_90)  # counter-clockwise: tag 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    turned.save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("device", DEVICES)
def test_a_photo_stored_sideways_with_its_orientation_tag_decodes_and_embeds_upright(device):
    from raylt.config import BackboneConfig
    from raylt.embed.backbones import build_encoder

    encoder = build_encoder(BackboneConfig(name="open_clip", model="raylt-tiny-vit"))
    spec = DecodeSpec(encoder.spec.size)
    upright, stored = photo(7, size=(400, 300)), sideways(photo(7, size=(400, 300)))
    assert Image.open(io.BytesIO(stored)).size == (300, 400)  # stored on its side
    cpu = [decode_image(d, spec).astype(np.float64) for d in (upright, stored)]
    actor, ok, _ = decode_on_device([upright, stored], spec, device)  # the batched JPEG decoder
    assert ok.all()
    for a, b in (cpu, actor.cpu().numpy().astype(np.float64)):
        assert np.abs(a - b).mean() < 3  # the same picture, but for JPEG's re-encoding
        assert np.abs(a - np.rot90(b)).mean() > 20  # and not as stored
    emb = encoder.encode(torch.from_numpy(np.stack(cpu).astype(np.uint8))).numpy()
    cos = float(emb[0] @ emb[1] / np.linalg.norm(emb[0]) / np.linalg.norm(emb[1]))
    turned = encoder.encode(torch.from_numpy(np.rot90(cpu[1], axes=(0, 1)).astype(np.uint8)[None].copy())).numpy()[0]
    assert cos > 0.99 and cos > float(emb[0] @ turned / np.linalg.norm(emb[0]) / np.linalg.norm(turned)) + 0.01
