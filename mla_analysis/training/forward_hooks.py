"""Running a model over inputs with forward hooks attached (calibration statistics, probes)."""

from __future__ import annotations

from typing import Iterable, Optional

import torch


@torch.no_grad()
def run_hooked(model: torch.nn.Module, handles: Iterable, inputs: torch.Tensor, batch_size: int,
               device: Optional[torch.device] = None, **forward_kwargs) -> None:
    """Forward ``inputs`` [N, T] in eval mode and batches of ``batch_size``; then remove ``handles``, restore the mode.

    ``forward_kwargs`` go to every forward call (e.g. ``return_hidden=True``: hooks that only need the layers skip
    the vocabulary projection)."""
    handles = list(handles)
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for chunk in inputs.split(batch_size):
            model(chunk.to(device), **forward_kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
