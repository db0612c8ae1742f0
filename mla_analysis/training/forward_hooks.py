"""Running a model over inputs with forward hooks attached (calibration statistics, probes)."""

from __future__ import annotations

from typing import Iterable, Optional

import torch


@torch.no_grad()
def run_hooked(model: torch.nn.Module, handles: Iterable, inputs: torch.Tensor, batch_size: int,
               device: Optional[torch.device] = None, return_hidden: bool = False) -> None:
    """Forward ``inputs`` [N, T] in eval mode and batches of ``batch_size``; then remove ``handles``, restore the mode.

    return_hidden: call ``model(ids, return_hidden=True)`` (a ``Transformer``), so hooks that only read the layers
    skip the LM head: for a 49k vocabulary its logits are most of a calibration forward's memory.
    """
    handles = list(handles)
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for chunk in inputs.split(batch_size):
            model(chunk.to(device), return_hidden=True) if return_hidden else model(chunk.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
