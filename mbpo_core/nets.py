"""Batched MLPs: E independent networks held as [E, in, out] weights, run with one bmm per layer.

Used for the dynamics ensemble (E = ensemble size) and SAC's twin critics (E = 2): every member
sees its own input batch ``x [E, B, in]`` and all members advance together. ``precision`` (see
:mod:`mbpo_core.precision`) sets the dtype of the hidden layers' products; weights stay fp32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .precision import PRECISIONS, matmul_dtype


def batched_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                   members: torch.Tensor | None = None, detach: bool = False) -> torch.Tensor:
    """``x [E, B, in] @ w [E, in, out] + b [E, 1, out]``, the product in ``w``'s dtype.

    With ``members`` (indices) only those members run (``x [len, B, in]``); ``detach`` uses the
    weights as constants, so gradients flow to ``x`` only. Gradients reach fp32 weights through
    any cast of ``w``, so they and the optimizer state stay fp32."""
    if detach:
        w, b = w.detach(), b.detach()
    if members is not None:
        w, b = w[members], b[members]
    if w.shape[-1] == 1:
        # a single output (a Q value): as a product (N = 1) it runs as a slow batched GEMV, and
        # its input gradient as a slow K = 1 outer product; as a multiply and a sum both take a
        # fraction of that (an x of lower precision meets fp32 weights by type promotion)
        return (x * w.transpose(-1, -2)).sum(-1, keepdim=True) + b
    if x.dtype != w.dtype:
        x = x.to(w.dtype)
    return torch.baddbmm(b, x, w)


class BatchedLinear(nn.Module):
    def __init__(self, members: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(members, 1, out_features))

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None,
                detach: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
        """:func:`batched_linear` with this layer's weights, the product in ``dtype`` (default
        the weights')."""
        w, b = self.weight, self.bias
        if dtype is not None and dtype != w.dtype:
            w, b = w.to(dtype), b.to(dtype)
        return batched_linear(x, w, b, members, detach)

    def reset_glorot_uniform(self, generator: torch.Generator) -> None:
        """Glorot-uniform weights, bound sqrt(6 / (fan_in + fan_out)) per member, and zero
        biases: Keras' Dense defaults, which softlearning's SAC networks (the original MBPO's)
        use, as does pranz24's SAC in mbrl-lib (xavier-uniform)."""
        fan_in, fan_out = self.weight.shape[1], self.weight.shape[2]
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        with torch.no_grad():
            self.weight.uniform_(-bound, bound, generator=generator)
            self.bias.zero_()

    def reset_truncated_normal(self, generator: torch.Generator) -> None:
        """The original MBPO's init: truncated normal, std 1/(2 sqrt(in)), zero bias."""
        std = 1.0 / (2.0 * math.sqrt(self.weight.shape[1]))
        with torch.no_grad():
            nn.init.trunc_normal_(self.weight, std=std, a=-2 * std, b=2 * std, generator=generator)
            self.bias.zero_()


class BatchedMLP(nn.Module):
    """``layers`` hidden layers of ``hidden`` units with ``activation``; linear output."""

    def __init__(self, members: int, in_features: int, out_features: int, hidden: int,
                 layers: int, activation: type[nn.Module] = nn.ReLU,
                 precision: str = "fp32") -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: allowed {', '.join(PRECISIONS)}")
        sizes = [in_features] + [hidden] * layers + [out_features]
        self.layers = nn.ModuleList(BatchedLinear(members, a, b) for a, b in zip(sizes, sizes[1:]))
        self.act = activation()
        self.precision = precision

    def product_weights(self, device_type: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (weight, bias) in the dtype its product runs in: the hidden layers in the
        precision's dtype, the output layer fp32.

        A SAC update runs the same network over several batches; casting its weights once and
        passing them to every pass (``forward(..., weights=)``) saves a cast per pass and layer.
        In fp32 these are the parameters themselves."""
        dtype = matmul_dtype(self.precision, device_type)
        out = []
        for i, layer in enumerate(self.layers):
            w, b = layer.weight, layer.bias
            if i < len(self.layers) - 1 and dtype != w.dtype:
                w, b = w.to(dtype), b.to(dtype)
            out.append((w, b))
        return out

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None,
                detach: bool = False,
                weights: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Hidden layers in the precision's dtype; the output layer, and what it returns, fp32.

        ``weights``: :meth:`product_weights`, when the caller runs several passes on them."""
        if weights is None:
            weights = self.product_weights(x.device.type)
        for w, b in weights[:-1]:
            x = self.act(batched_linear(x, w, b, members, detach))
        return batched_linear(x, *weights[-1], members, detach)
