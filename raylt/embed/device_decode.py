"""Decoding in the encoder actor: encoded bytes -> uint8 [B, S, S, 3] on the actor's device.

With `embed.decode=actor` (the default on GPU clusters) the CPU tasks only read the JPEGs
that the batched decoder takes (`images.device_decodable`: 8-bit Huffman-coded, 1 or 3
components) and hand over their bytes; they decode everything else themselves, as the CPU path
does, and hand over its pixels (`images.read_batch`). The encoder actor decodes the JPEGs here,
in one batched call of torchvision's `decode_jpeg` on its device (nvJPEG on a GPU,
libjpeg-turbo on a CPU), then resizes and centre-crops them on that device: on a GPU node the
CPUs no longer starve the GPU, which decodes JPEGs many times faster. A JPEG whose batched
decode fails is decoded alone to find it, then tried with Pillow; an image Pillow cannot read
either is a counted skip with its reason, as on the CPU path.

What differs from the CPU path (`images.decode_image`): Pillow decodes a large JPEG at a
reduced DCT scale first ("draft" mode) and upsamples chroma its own way; here the JPEG is
decoded at full size and resized with torch's antialiased kernels of the same family
(bicubic or bilinear). The embeddings agree to a cosine of 0.999 or more
(tests/embed/test_device_decode.py; bench/gpu_check.sh on a GPU).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from raylt.embed.images import DecodeSpec, decode_image, device_decodable, skip_reason

def resize_crop(img: torch.Tensor, spec: DecodeSpec) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [S, S, 3] as `images.decode_image` resizes: the shortest side to
    S and a centre crop, or both sides to S (`squash`), antialiased."""
    s = spec.size
    h, w = img.shape[-2:]
    if spec.resize_mode == "squash":
        size = (s, s)
    else:
        scale = s / min(w, h)
        size = (max(s, round(h * scale)), max(s, round(w * scale)))
    x = F.interpolate(img[None].float(), size=size, mode=spec.interpolation, antialias=True, align_corners=False)
    top, left = (size[0] - s) // 2, (size[1] - s) // 2
    x = x[0, :, top : top + s, left : left + s]
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


def _decode_jpegs(datas: list[bytes], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    with warnings.catch_warnings():
        # torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec; they
        # stay the decoders of the pinned torchvision, so the notice is not the user's.
        warnings.simplefilter("ignore")
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)


def decode_on_device(encoded, spec: DecodeSpec, device: torch.device | str,
                     raw: np.ndarray | None = None) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Encoded images -> (uint8 [N, S, S, 3] on `device`, ok [N], error [N]): decodable JPEGs in
    one batched call (one at a time when the batch fails, to find the bad one), the rest and
    the failures through Pillow; rows neither can decode are zeros with ok False. Rows marked
    `raw` hold pixels the read task decoded already (S x S x 3 bytes)."""
    device = torch.device(device)
    n = len(encoded)
    out = torch.zeros((n, spec.size, spec.size, 3), dtype=torch.uint8, device=device)
    ok, errors = np.ones(n, dtype=bool), np.full(n, "", dtype=object)
    raw = np.zeros(n, dtype=bool) if raw is None else np.asarray(raw, dtype=bool)
    for i in np.flatnonzero(raw):
        out[i] = torch.frombuffer(bytearray(encoded[i]), dtype=torch.uint8).view(spec.size, spec.size, 3).to(device)
    jpeg = [i for i in range(n) if not raw[i] and device_decodable(encoded[i])]
    decoded: dict[int, torch.Tensor] = {}
    if jpeg:
        try:
            decoded = dict(zip(jpeg, _decode_jpegs([encoded[i] for i in jpeg], device)))
        except RuntimeError:  # the batched call returns nothing when one image fails
            for i in jpeg:
                try:
                    decoded[i] = _decode_jpegs([encoded[i]], device)[0]
                except RuntimeError:
                    pass  # Pillow tries it below, and reports why it cannot
    for i in np.flatnonzero(~raw):
        try:
            if i in decoded:
                out[i] = resize_crop(decoded[i], spec)
            else:
                out[i] = torch.from_numpy(np.array(decode_image(bytes(encoded[i]), spec))).to(device)
        except Exception as e:  # every decoder failure is a per-image skip, reported upstream
            ok[i] = False
            errors[i] = skip_reason(e)
    return out, ok, errors
