"""Helpers shared by test modules (not tests): random weights for parity checks against transformers."""

from __future__ import annotations

import torch


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter and float buffer random (transformers inits routers and biases to zero, norms to one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point() or "inv_freq" in name or name.endswith("attn.bias"):
                continue
            if "norm" in name or ".ln_" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "e_score_correction_bias" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
