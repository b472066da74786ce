import numpy as np
import pytest
import torch

from raylt.config import BackboneConfig
from raylt.embed.backbones import BACKBONES, build_encoder
from raylt.errors import BackboneError, ConfigError

TINY = BackboneConfig(name="open_clip", model="raylt-tiny-vit")


def uint8_images(n=3, size=32, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 255, (n, size, size, 3), dtype=np.uint8))


def test_registry():
    assert BACKBONES.names() == ["open_clip", "pixels"]
    with pytest.raises(ConfigError, match="unknown backbone 'clip'"):
        build_encoder(BackboneConfig(name="clip"))


def test_pixel_encoder_is_normalised_and_separates_colours():
    enc = build_encoder(BackboneConfig(name="pixels", image_size=4))
    assert enc.dim == 48 and enc.spec.size == 4
    red = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    red[..., 0] = 255
    blue = torch.zeros(1, 4, 4, 3, dtype=torch.uint8)
    blue[..., 2] = 255
    e = enc.encode(torch.cat([red, blue]))
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert (e[0] @ e[1]).item() > 0.99 and (e[0] @ e[2]).item() < 0.1


def test_tiny_open_clip_shapes_norm_and_determinism():
    enc = build_encoder(TINY)
    assert enc.dim == 32 and enc.spec.size == 32 and enc.identity["weights"] == "random-init"
    x = uint8_images()
    e = enc.encode(x)
    assert e.shape == (3, 32) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    # random init is seeded, so a rebuilt encoder (another process, another actor) agrees
    assert torch.allclose(build_encoder(TINY).encode(x), e, atol=1e-6)
    assert enc.encode(x, "bf16").shape == (3, 32)


def test_checkpoint_file_written_here_loads_and_is_fingerprinted(tmp_path):
    enc = build_encoder(TINY)
    sd = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in enc.model.state_dict().items()}
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": sd}, ckpt)
    loaded = build_encoder(BackboneConfig(name="open_clip", model="raylt-tiny-vit", pretrained=str(ckpt)))
    assert loaded.identity["weights"].startswith("sha256:")
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    x = uint8_images()
    assert not torch.allclose(loaded.encode(x), enc.encode(x))


def test_local_dir_model(tmp_path):
    import json

    from raylt.embed.backbones import MODEL_CONFIG_DIR

    cfg = json.loads((MODEL_CONFIG_DIR / "raylt-tiny-vit.json").read_text())
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    sd = {k: v * 1.5 for k, v in build_encoder(TINY).model.state_dict().items()}
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    enc = build_encoder(BackboneConfig(name="open_clip", model=f"local-dir:{tmp_path}"))
    assert enc.identity["weights"].startswith("sha256:") and enc.identity["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert all(torch.equal(enc.model.state_dict()[k], v) for k, v in sd.items())
    assert enc.encode(uint8_images()).shape == (3, 32)


@pytest.mark.parametrize(
    "cfg, message",
    [
        (BackboneConfig(name="open_clip", model="raylt-tiny-vit", pretrained="/nowhere/w.pt"),
         "backbone.pretrained weight file /nowhere/w.pt does not exist"),
        (BackboneConfig(name="open_clip", model="ViT-B-16", pretrained="openai", offline=True),
         "cannot load open_clip weights for ViT-B-16 / openai"),
        (BackboneConfig(name="open_clip", model="ViT-B-17"), "'ViT-B-17' is not an open_clip architecture"),
        (BackboneConfig(name="open_clip"), "backbone.model is required"),
        (BackboneConfig(name="open_clip", model="local-dir:/nowhere"), "no checkpoint"),
        (BackboneConfig(name="open_clip", model="raylt-tiny-vit", pretrained="laion9000"),
         "cannot load open_clip weights"),
    ],
)
def test_missing_weights_give_clear_errors(cfg, message):
    with pytest.raises(BackboneError) as e:
        build_encoder(cfg)
    assert message in str(e.value)
    if "cannot load" in message:
        assert "backbone.pretrained=/path/to/file" in str(e.value)


def test_checkpoint_for_another_architecture_is_refused(tmp_path):
    ckpt = tmp_path / "other.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, ckpt)
    with pytest.raises(BackboneError, match="cannot load open_clip weights for raylt-tiny-vit"):
        build_encoder(BackboneConfig(name="open_clip", model="raylt-tiny-vit", pretrained=str(ckpt)))


def test_text_embeddings_of_class_names_for_text_initialised_heads():
    from raylt.embed.backbones import text_embeddings

    t = text_embeddings(TINY, ["desert/sand", "field_road", "abbey"])
    assert t.shape == (3, 32) and np.allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    assert not np.allclose(t[0], t[1])  # different names, different directions
    with pytest.raises(BackboneError, match="head.text_init needs a backbone with a text tower"):
        text_embeddings(BackboneConfig(name="pixels"), ["a"])
