"""Matrix-product precision: bf16 products on processors with bf16 matrix units, fp32 elsewhere.

With ``precision = "bf16"`` a network's hidden-layer products run in bfloat16 while its weights,
gradients, optimizer state, losses and reductions stay fp32 (autocast-style, but explicit per
layer). The output layer always runs in fp32: the ensemble's mean and log-variance and SAC's Q
values and policy parameters feed losses, targets and exponentials, where bf16's 8-bit mantissa
would show. On a processor without bf16 matrix instructions (AVX512_BF16 or AMX on x86, or a GPU
without bf16) bf16 products are emulated and slower than fp32, so the setting falls back to fp32
with one log line.
"""

from __future__ import annotations

import logging
from functools import cache

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")


@cache
def bf16_matmul_supported(device_type: str) -> bool:
    """Whether ``device_type`` ("cpu", "cuda") multiplies bf16 matrices natively."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return False


@cache
def matmul_dtype(precision: str, device_type: str) -> torch.dtype:
    """The dtype of hidden-layer matrix products for ``precision`` on ``device_type``."""
    if precision == "fp32":
        return torch.float32
    if precision != "bf16":
        raise ValueError(f"precision {precision!r}: allowed {', '.join(PRECISIONS)}")
    if bf16_matmul_supported(device_type):
        return torch.bfloat16
    log.warning("precision = bf16: this %s has no bf16 matrix instructions (AVX512_BF16 or AMX "
                "on x86, bf16 on a GPU), where bf16 would be slower than fp32; using fp32",
                device_type)
    return torch.float32
