"""Mixed precision: which autocast a device gets for a precision setting.

`bf16` and `fp16` run matrix products in half precision under `torch.autocast`; parameters,
optimiser state and losses stay float32. A head trained this way gives the same top-1 as in
float32 (bench/head_fit.py), at twice the speed where the hardware multiplies bf16 natively:
CUDA GPUs from Ampere on, and x86 CPUs with AVX512-BF16 or AMX. Elsewhere bf16 is emulated
and slower, so `auto` picks it only where it is native.
"""

from __future__ import annotations

import contextlib
import functools

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16() -> bool:
    # torch reports the CPU's instruction sets only through a private call; without it, fp32.
    caps = getattr(torch._C._cpu, "_get_cpu_capability", lambda: {})()
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and _cpu_has_bf16()


def resolve(precision: str, device: torch.device | str) -> str:
    """`auto` as bf16 where `device` has native bf16, else fp32; any other setting as it is."""
    if precision not in PRECISIONS and precision != "auto":
        raise ValueError(f"precision {precision!r}: choose auto, {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def autocast(device: torch.device | str, precision: str):
    """The autocast context of a resolved precision on `device` (a no-op for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
