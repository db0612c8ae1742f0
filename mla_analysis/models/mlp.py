"""Dense feed-forward blocks.

SwiGLU follows DeepSeek-V3 ``inference/model.py`` ``MLP`` naming (w1 gate, w3 up, w2 down).
GELUMLP is GPT-2's non-gated MLP (``c_fc`` -> w1, ``c_proj`` -> w2) with the tanh-approximate GELU
that GPT-2 calls ``gelu_new``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """Dense gated FFN: ``w2(silu(w1 x) * w3 x)``, biases only when ``bias``."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.dim = dim
        self.hidden = hidden
        self.w1 = nn.Linear(dim, hidden, bias=bias)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=bias)  # up
        self.w2 = nn.Linear(hidden, dim, bias=bias)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> [..., dim]."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}"


class GELUMLP(nn.Module):
    """Non-gated FFN ``w2(gelu_tanh(w1 x))`` as GPT-2 (biases only when ``bias``)."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.dim = dim
        self.hidden = hidden
        self.w1 = nn.Linear(dim, hidden, bias=bias)  # up (GPT-2 c_fc)
        self.w2 = nn.Linear(hidden, dim, bias=bias)  # down (GPT-2 c_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] -> [..., dim]."""
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden={self.hidden}"


MLP_CLASSES: dict[str, type[nn.Module]] = {"swiglu": SwiGLU, "gelu": GELUMLP}

__all__ = ["GELUMLP", "MLP_CLASSES", "SwiGLU"]
