"""Expert co-activation (OLMoE paper definition): CoAct(i->j) = N(i, j) / N(i) over tokens' expert sets."""

from __future__ import annotations

import torch

from .statistics import membership


def coactivation_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """N [E, E]: N[i, j] = #tokens with both i, j in S_t (all pairs, symmetric); N[i, i] = N(i)."""
    m = membership(indices, n_experts)
    return m.T @ m


def coactivation(counts: torch.Tensor) -> torch.Tensor:
    """CoAct [E, E]: CoAct[i, j] = N(i, j) / N(i) (row i = expert i; 0 where N(i) = 0). Diagonal is 1."""
    n_i = counts.diagonal().clone()
    safe = torch.where(n_i > 0, n_i, torch.ones_like(n_i))
    return torch.where(n_i[:, None] > 0, counts / safe[:, None], torch.zeros_like(counts))


def mean_offdiag(coact: torch.Tensor, counts: torch.Tensor) -> float:
    """Mean of CoAct(i->j) over i != j, rows restricted to experts with N(i) > 0."""
    e = coact.shape[0]
    rows = counts.diagonal() > 0
    off = ~torch.eye(e, dtype=torch.bool)
    vals = coact[rows][off[rows]]
    return float(vals.mean()) if vals.numel() else 0.0
