"""Decoder-only pre-norm transformer built from one ``ModelConfig``.

The attention variant is chosen by name (``cfg.attention``) through ``ATTENTION_CLASSES``; layers
from ``first_k_dense_replace`` on use DeepSeekMoE when ``cfg.ffn == "moe"``, as in the reference.
The norm (``cfg.norm``: RMSNorm, or torch's LayerNorm with bias) and the dense FFN (``cfg.mlp``:
SwiGLU or GPT-2's GELU MLP) are chosen by name too; ``cfg.pos_emb == "learned"`` adds a learned
absolute position table (GPT-2) and drops RoPE.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig, validate_model_config
from .attention import Attention
from .cache import KVCache
from .mla import MLA, MLACoupledRoPE
from .mlp import MLP_CLASSES
from .moe import MoE
from .norm import RMSNorm
from .rope import RotaryEmbedding

ATTENTION_CLASSES: dict[str, type[nn.Module]] = {
    "mha": Attention,
    "gqa": Attention,
    "mqa": Attention,
    "mla": MLA,
    "mla_coupled_rope": MLACoupledRoPE,
}


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The block/final norm ``cfg.norm`` names: RMSNorm, or LayerNorm with bias (GPT-2)."""
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.rms_norm_eps)
    return RMSNorm(cfg.d_model, cfg.rms_norm_eps)


class Block(nn.Module):
    """attn_norm -> attention -> residual; ffn_norm -> dense FFN or MoE (or nothing) -> residual."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = ATTENTION_CLASSES[cfg.attention](cfg, layer_idx)
        self.ffn_norm: Optional[nn.Module] = None
        self.ffn: Optional[nn.Module] = None
        if cfg.ffn != "none":
            self.ffn_norm = make_norm(cfg)
            if cfg.is_moe_layer(layer_idx):
                self.ffn = MoE(cfg)
            else:
                self.ffn = MLP_CLASSES[cfg.mlp](cfg.d_model, cfg.d_ff, bias=cfg.bias)

    def forward(self, x, rope, cos, sin, cache=None, start=0):
        x = x + self.attn(self.attn_norm(x), rope, cos, sin, cache, start)
        if self.ffn is None:  # attention-only block
            return x
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """Token ids [B, T] -> logits [B, T, vocab]; optional KV cache for incremental decoding."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model_config(cfg)
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed: Optional[nn.Embedding] = None
        self.rope: Optional[RotaryEmbedding] = None
        if cfg.pos_emb == "learned":
            self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)  # (positions, D), GPT-2's wpe
        else:
            self.rope = RotaryEmbedding.from_config(cfg)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)  # as GPT-2 / Qwen2 initialise their biases

    def moe_layers(self) -> list[MoE]:
        """The DeepSeekMoE FFNs, in layer order."""
        return [b.ffn for b in self.layers if isinstance(b.ffn, MoE)]

    def aux_loss(self) -> torch.Tensor:
        """Sum of the balance losses the MoE layers computed in the last training forward."""
        losses = [m.aux_loss for m in self.moe_layers() if isinstance(m.aux_loss, torch.Tensor)]
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.embed.weight.device)

    def new_cache(self, batch_size: int, max_len: int, dtype: Optional[torch.dtype] = None) -> KVCache:
        """An empty KV cache for this model on its device."""
        dtype = dtype or self.embed.weight.dtype
        return KVCache(self.cfg, batch_size, max_len, dtype=dtype, device=self.embed.weight.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Optional[KVCache] = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] (or final hidden states [B, T, D]); appends to ``cache`` when given."""
        B, T = input_ids.shape
        start = cache.seq_len if cache is not None else 0
        positions = torch.arange(start, start + T, device=input_ids.device)
        x = self.embed(input_ids)  # (B, T, D)
        if self.rope is not None:
            cos, sin = self.rope(positions)  # (T, d_rope/2) each
        else:  # learned absolute positions, offset by the tokens already cached
            cos = sin = None
            x = x + self.pos_embed(positions)  # (B, T, D) + (T, D)
        for block in self.layers:
            x = block(x, self.rope, cos, sin, cache, start)
        if cache is not None:
            cache.seq_len = start + T
        x = self.norm(x)
        return x if return_hidden else self.head(x)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos_id: Optional[int] = None) -> torch.Tensor:
        """Greedy decoding with the KV cache; returns the new tokens [B, max_new_tokens]."""
        B, T = input_ids.shape
        cache = self.new_cache(B, T + max_new_tokens)
        logits = self(input_ids, cache=cache)[:, -1]
        out = []
        for _ in range(max_new_tokens):
            nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
            out.append(nxt)
            if eos_id is not None and bool((nxt == eos_id).all()):
                break
            logits = self(nxt, cache=cache)[:, -1]
        return torch.cat(out, dim=1)
