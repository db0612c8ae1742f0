"""Per-layer damage of a conversion, teacher-forced: each converted attention fed the source's own layer input.

For every layer l, a forward hook on the source's attention takes its input x_l (the source's attn_norm output
on the source's residual stream) and output y_l = attn_l(x_l), runs the converted model's attention l on the
same x_l (with the converted model's own RoPE tables, so partial RoPE and per-layer frequencies are honoured),
and accumulates ||y'_l - y_l||^2 and ||y_l||^2 per input sequence. The relative error
sqrt(sum ||y' - y||^2 / sum ||y||^2) isolates layer l's conversion error: no error of earlier converted layers
reaches it (that compounding is what end-to-end KL measures). The converted model's blocks must line up
one-to-one with the source's and share the attention input (norm weights reused as mha_to_mla does).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


class LayerError:
    """Squared-error and reference sums of one layer, one entry per input sequence (in order)."""

    def __init__(self, idx: int):
        self.idx = idx
        self.err2: list[float] = []
        self.ref2: list[float] = []

    def add(self, y_new: torch.Tensor, y_ref: torch.Tensor) -> None:
        """Add a batch's outputs [B, T, D]: per sequence sum ||y_new - y_ref||^2 and sum ||y_ref||^2."""
        d, r = (y_new.double() - y_ref.double()), y_ref.double()
        self.err2 += (d * d).sum((1, 2)).tolist()
        self.ref2 += (r * r).sum((1, 2)).tolist()

    def rel_err(self) -> float:
        """sqrt(sum err^2 / sum ref^2) over every sequence added (nan before any)."""
        ref = sum(self.ref2)
        return math.sqrt(sum(self.err2) / ref) if ref > 0 else math.nan

    def per_sequence(self) -> np.ndarray:
        """The relative error of each sequence on its own [n]."""
        return np.sqrt(np.asarray(self.err2) / np.maximum(np.asarray(self.ref2), 1e-300))


def attach(source: torch.nn.Module, converted: torch.nn.Module) -> tuple[list[LayerError], list]:
    """Hooks on the source's attention modules measuring each converted layer on the source's input; (errors, handles).

    Run the source with ``training.forward_hooks.run_hooked(source, handles, ...)`` (which removes the hooks); the
    converted model is only called layer by layer, on the source's device."""
    if len(source.layers) != len(converted.layers):
        raise ValueError(f"layer_error: {len(source.layers)} source layers vs {len(converted.layers)} converted")
    errors = [LayerError(i) for i in range(len(source.layers))]
    tables: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}  # the converted model's (cos, sin) per length

    def hook_for(err: LayerError, attn: torch.nn.Module):
        def fn(module, args, kwargs, output):
            x = args[0] if args else kwargs["x"]
            T = x.shape[1]
            if (T, x.device) not in tables:
                tables[(T, x.device)] = converted.rope(torch.arange(T, device=x.device))
            cos, sin = tables[(T, x.device)]
            err.add(attn(x, converted.rope, cos, sin), output)

        return fn

    handles = [
        s.attn.register_forward_hook(hook_for(e, c.attn), with_kwargs=True)
        for s, c, e in zip(source.layers, converted.layers, errors)
    ]
    return errors, handles


__all__ = ["LayerError", "attach"]
