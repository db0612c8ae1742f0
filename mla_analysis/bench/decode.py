"""Decode machinery shared by figures 2 and 3: models, a filled cache, one timed decode step, parity."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from ..models.cache import KVCache
from ..models.transformer import Transformer
from ..metrics.timing import BenchError
from .sizes import decode_config
from .train_step import cast_params_

# ---------------------------------------------------------------------------- decode machinery
def fill_cache_(cache: KVCache, context: int, seed: int = 0, block: int = 1024) -> None:
    """Random cached values for positions [0, context) and ``cache.seq_len = context`` (no prefill).

    A random block of ``block`` positions is tiled along the sequence, so filling a multi-GB cache
    costs a copy, not a random-number generation per element.
    """
    g = torch.Generator().manual_seed(seed)
    for layer in cache.layers:
        for buf in layer.values():
            n = min(block, context)
            rnd = torch.randn((buf.shape[0], n, *buf.shape[2:]), generator=g).to(buf.device, buf.dtype)
            for s in range(0, context, n):
                e = min(context, s + n)
                buf[:, s:e].copy_(rnd[:, : e - s])
    cache.seq_len = context


def decode_models(shape: dict[str, Any], max_len: int, device: torch.device, dtype: torch.dtype,
                  variants: Iterable[str], seed: int = 0) -> dict[str, Transformer]:
    """Decode models by name: 'mla' (absorbed), 'mla_naive' (same weights as 'mla'), 'mha', 'gqa'."""
    out: dict[str, Transformer] = {}
    for v in variants:
        torch.manual_seed(seed)
        if v == "mla_naive":
            cfg = decode_config("mla", shape, max_len, mla_decode="naive")
        else:
            cfg = decode_config(v, shape, max_len, mla_decode="absorb")
        m = Transformer(cfg).eval()
        if v == "mla_naive" and "mla" in out:
            m.load_state_dict(out["mla"].state_dict())
        out[v] = cast_params_(m.to(device), dtype)
    return out


def make_decode_step(model: Transformer, cache: KVCache, context: int, batch: int, device: torch.device,
                     seed: int = 0) -> Callable[[], torch.Tensor]:
    """One single-token decode step at position ``context`` (rewinds the cache so every step sees the same
    context); returns the next-token logits [B, vocab]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, 1), generator=g).to(device)

    def step() -> torch.Tensor:
        cache.seq_len = context
        with torch.inference_mode():
            return model(ids, cache=cache)[:, -1]

    return step


def check_decode_parity(a: Callable[[], torch.Tensor], b: Callable[[], torch.Tensor], atol: float) -> float:
    """Max |difference| of two decoders' next-token logits; raises BenchError above ``atol``."""
    la, lb = a().float(), b().float()
    try:
        torch.testing.assert_close(la, lb, atol=atol, rtol=atol)
    except AssertionError as e:
        raise BenchError(f"absorbed and naive MLA decoding disagree, so the comparison is void:\n{e}") from None
    return float((la - lb).abs().max())


def parity_atol(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 3e-2
