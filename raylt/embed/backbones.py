"""Backbones: frozen image encoders behind one interface, chosen by name from a registry.

`open_clip` wraps any open_clip model: a built-in architecture with a pretrained tag
(`ViT-B-16` / `openai`), a local checkpoint file, or a `local-dir:` folder. `pixels` is a
raw-pixel encoder (down-sampled, centred, L2-normalised pixels): it needs no weights, so the
offline demo and accuracy-bearing tests use it, since a randomly initialised CLIP gives
near-chance features.

An `Encoder` takes uint8 images [B, S, S, 3] (already resized on CPU) and returns float32
L2-normalised embeddings [B, D]; its `identity` names everything that changes its output, and
the embedding store is keyed on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from raylt.choices import BACKBONES  # declared there: names, help, this module
from raylt.config import BackboneConfig
from raylt.embed.images import DecodeSpec
from raylt.embed.recipe import weights_identity
from raylt.errors import BackboneError
from raylt.ops.precision import autocast

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"


class Encoder(Protocol):
    spec: DecodeSpec
    dim: int
    identity: dict

    def encode(self, pixels: torch.Tensor, precision: str = "fp32") -> torch.Tensor: ...

    def to(self, device: str) -> "Encoder": ...


def build_encoder(cfg: BackboneConfig) -> Encoder:
    return BACKBONES.get(cfg.name)(cfg)


def _l2(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


# ----------------------------------------------------------------------------- pixels


@dataclass
class PixelEncoder:
    """Down-sampled RGB pixels, centred per image and L2-normalised (D = 3 * S * S)."""

    size: int
    spec: DecodeSpec = field(init=False)
    dim: int = field(init=False)
    identity: dict = field(init=False)

    def __post_init__(self):
        self.spec = DecodeSpec(self.size, resize_mode="squash", interpolation="bilinear")
        self.dim = 3 * self.size * self.size
        self.identity = {"backbone": "pixels", "size": self.size, "weights": "none"}

    def to(self, device: str) -> "PixelEncoder":
        return self

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        x = pixels.reshape(len(pixels), -1).float() / 255.0
        return _l2(x - x.mean(dim=1, keepdim=True))


@BACKBONES.register("pixels")
def build_pixels(cfg: BackboneConfig) -> PixelEncoder:
    if cfg.image_size < 2:
        raise BackboneError(f"backbone.image_size must be >= 2 for the pixels backbone, got {cfg.image_size}")
    return PixelEncoder(cfg.image_size)


# ----------------------------------------------------------------------------- open_clip


class OpenClipEncoder:
    def __init__(self, model: torch.nn.Module, identity: dict):
        self.model = model.eval().requires_grad_(False)
        pcfg = model.visual.preprocess_cfg
        size = pcfg["size"] if isinstance(pcfg["size"], int) else pcfg["size"][0]
        self.spec = DecodeSpec(int(size), pcfg.get("resize_mode", "shortest"), pcfg.get("interpolation", "bicubic"))
        self.mean = torch.tensor(pcfg["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(pcfg["std"]).view(1, 3, 1, 1)
        self.dim = int(model.visual.output_dim)
        # JSON round trip: the identity is stored in manifests and compared after reloading.
        self.identity = json.loads(json.dumps({**identity, "preprocess": pcfg}, sort_keys=True))
        self.device = torch.device("cpu")

    def to(self, device: str) -> "OpenClipEncoder":
        self.device = torch.device(device)
        self.model.to(self.device)
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
        return self

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        # uint8 NHWC -> normalised float NCHW on the device: the copy to the GPU stays 4x smaller.
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self.mean) / self.std
        with autocast(self.device, precision):
            return _l2(self.model.encode_image(x))


    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text-tower embeddings (CLIP's other half), [len(texts), D]."""
        import open_clip  # open_clip only for its own backbone: it takes seconds to import

        model = self.identity["model"]
        tokenizer = open_clip.get_tokenizer(model[len("local-dir:"):] if model.startswith("local-dir:") else model)
        out = [self.model.encode_text(tokenizer(texts[s : s + 256]).to(self.device)) for s in range(0, len(texts), 256)]
        return _l2(torch.cat(out))


def text_embeddings(cfg: BackboneConfig, class_names: list[str], prompt: str = "a photo of a {}.",
                    purpose: str = "head.text_init") -> np.ndarray:
    """[C, D] CLIP text embeddings of the class names (text-initialised heads, name matching)."""
    encoder = build_encoder(cfg)
    if not hasattr(encoder, "encode_text"):
        raise BackboneError(f"{purpose} needs a backbone with a text tower; {cfg.name!r} has none (use open_clip)")
    return encode_class_names(encoder, class_names, prompt)


def has_text_tower(name: str) -> bool:
    """Whether the backbone registered as `name` builds encoders with `encode_text` (its
    builder says so with a `text_tower` attribute), known without building one."""
    return bool(getattr(BACKBONES.get(name), "text_tower", False))


def encode_class_names(encoder, class_names: list[str], prompt: str = "a photo of a {}.") -> np.ndarray:
    """[C, D] text-tower embeddings of `prompt` filled with each class name (its last `/` part,
    underscores as spaces)."""
    names = [n.replace("_", " ").split("/")[-1] for n in class_names]
    return encoder.encode_text([prompt.format(n) for n in names]).cpu().numpy()


def register_model_configs(extra: str | None) -> None:
    """Make raylt's own model configs (and `extra`, a user's JSON) known to open_clip."""
    import open_clip  # open_clip only for its own backbone: it takes seconds to import

    if str(MODEL_CONFIG_DIR) not in {str(p) for p in open_clip.factory._MODEL_CONFIG_PATHS}:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    if extra:
        path = Path(extra).expanduser()
        if not path.is_file():
            raise BackboneError(f"backbone.model_config {path} does not exist; give an open_clip model JSON file")
        open_clip.add_model_config(path)


def _set_offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    with contextlib.suppress(ImportError, AttributeError):
        import huggingface_hub.constants as hf_constants  # comes with open_clip

        hf_constants.HF_HUB_OFFLINE = True  # read at call time by recent huggingface_hub


@BACKBONES.register("open_clip")
def build_open_clip(cfg: BackboneConfig) -> OpenClipEncoder:
    import open_clip  # open_clip only for its own backbone: it takes seconds to import

    if not cfg.model:
        raise BackboneError("backbone.model is required for the open_clip backbone (e.g. ViT-B-16)")
    register_model_configs(cfg.model_config)
    if cfg.offline:
        _set_offline()
    is_dir = cfg.model.startswith("local-dir:")
    if not is_dir and cfg.model not in open_clip.list_models():
        raise BackboneError(
            f"backbone.model {cfg.model!r} is not an open_clip architecture; `raylt list` shows them"
        )
    identity = {"backbone": "open_clip", "model": cfg.model, "weights": weights_identity(cfg)}
    try:
        # A random-init model is seeded, so that its store is reproducible and reusable.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.create_model(
                cfg.model,
                pretrained=None if is_dir else cfg.pretrained,
                cache_dir=cfg.cache_dir,
                weights_only=True,
            )
    except pickle.UnpicklingError as e:  # weights_only refused it, so nothing in it ran
        why = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()
        raise BackboneError(
            f"backbone.pretrained {cfg.pretrained} cannot be loaded as plain weights ({(why or ['?'])[0][:120]}): "
            "it is not a checkpoint, or it holds Python objects, which are never unpickled; save a plain "
            "state dict (or .safetensors) where it was made"
        ) from None
    except (RuntimeError, FileNotFoundError, ValueError, OSError) as e:
        where = cfg.model if is_dir else f"{cfg.model} / {cfg.pretrained}"
        raise BackboneError(
            f"cannot load open_clip weights for {where}: {str(e).splitlines()[0][:200]}. "
            "Without internet, copy the checkpoint to this machine and set backbone.pretrained=/path/to/file "
            "(or backbone.model=local-dir:/path), or fill backbone.cache_dir on a machine that has internet"
        ) from None
    return OpenClipEncoder(model, identity)


build_open_clip.text_tower = True  # OpenClipEncoder.encode_text: CLIP's other half
