"""Task scoring on shifted targets: exact match and token accuracy, Zoology style (per example, then mean)."""

from __future__ import annotations

import torch

IGNORE = -100


def score_predictions(pred: torch.Tensor, targets: torch.Tensor) -> dict:
    """Exact match and per-example token accuracy over scored positions (targets != -100).

    ``pred`` and ``targets`` are [N, L]. exact_match = mean over examples of 1[every scored position
    right]; token_acc = mean over examples of (fraction of that example's scored positions right).
    Examples without scored positions are excluded; with none left both values are NaN.
    """
    if pred.shape != targets.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != targets shape {tuple(targets.shape)}")
    mask = targets != IGNORE  # [N, L]
    n_scored = mask.sum(dim=1)  # [N]
    correct = ((pred == targets) & mask).sum(dim=1)  # [N]
    keep = n_scored > 0
    if not bool(keep.any()):
        return {"exact_match": float("nan"), "token_acc": float("nan")}
    n_scored, correct = n_scored[keep], correct[keep]
    return {
        "exact_match": float((correct == n_scored).double().mean()),
        "token_acc": float((correct.double() / n_scored.double()).mean()),
    }


def score_logits(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """:func:`score_predictions` of the argmax of ``logits`` [N, L, V] against ``targets`` [N, L]."""
    return score_predictions(logits.argmax(dim=-1), targets)
