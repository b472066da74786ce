"""Decoding in the encoder actor: encoded bytes -> uint8 [B, S, S, 3] on the actor's device.

With `embed.decode=actor` (the default on GPU clusters) the CPU tasks only read bytes
(`images.read_batch`) and the encoder actor decodes them here: JPEGs in one batched call of
torchvision's `decode_jpeg` on the actor's device (nvJPEG on a GPU, libjpeg-turbo on a CPU),
then resized and centre-cropped on that device; on a GPU node the CPUs then only read and the
GPU is no longer starved by JPEG decoding. What nvJPEG does not take goes through Pillow on the
actor's CPU, one image at a time, as the CPU path decodes it: other formats (PNG, WebP, ...),
JPEGs it cannot decode (CMYK, 12-bit, arithmetic coding, lossless), and any image whose batched
decode fails. An image Pillow cannot read either is a counted skip with its reason, as on the
CPU path.

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

from raylt.embed.images import DecodeSpec, decode_image

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
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def decode_on_device(encoded, spec: DecodeSpec, device: torch.device | str) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Encoded images -> (uint8 [N, S, S, 3] on `device`, ok [N], error [N]): decodable JPEGs in
    one batched call (one at a time when the batch fails, to find the bad one), the rest and
    the failures through Pillow; rows neither can decode are zeros with ok False."""
    device = torch.device(device)
    n = len(encoded)
    out = torch.zeros((n, spec.size, spec.size, 3), dtype=torch.uint8, device=device)
    ok, errors = np.ones(n, dtype=bool), np.full(n, "", dtype=object)
    jpeg = [i for i in range(n) if device_decodable(encoded[i])]
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
    for i in range(n):
        try:
            if i in decoded:
                out[i] = resize_crop(decoded[i], spec)
            else:
                out[i] = torch.from_numpy(np.array(decode_image(bytes(encoded[i]), spec))).to(device)
        except Exception as e:  # every decoder failure is a per-image skip, reported upstream
            ok[i] = False
            errors[i] = f"{type(e).__name__}: {e}"[:300]
    return out, ok, errors
