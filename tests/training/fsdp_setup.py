"""The setting tests/training/test_fsdp.py and its torchrun worker share: model, data, schedule."""

from __future__ import annotations

from mla_analysis.config import tiny
from mla_analysis.data import DataConfig
from mla_analysis.training.trainer import TrainConfig

# MLA with tied embeddings (as SmolLM2): the shared tensor lives in the root's FSDP unit
MODEL = tiny(attention="mla", name="mla", tie_embeddings=True, vocab_size=128, n_layers=2)
DATA = DataConfig(vocab_size=128, seq_len=16, lm_weight=1.0, tasks={}, eval_tasks=[], eval_examples=4)
SEED, STEPS, CUT, BATCH, WORLD = 5, 5, 2, 3, 2  # batch 3 per rank: a 2-row / 1-row chunking of nothing is even


def tcfg(**kw) -> TrainConfig:
    """The schedule: warmup, cosine, clipping that binds (grad_clip below the first norms), weight decay."""
    base = dict(steps=STEPS, batch_size=BATCH, eval_every=0, eval_batch_size=4, warmup_steps=2, lr=1e-2,
                grad_clip=0.5, weight_decay=0.1, progress=False, threads=1, keep_checkpoints=10)
    base.update(kw)
    return TrainConfig(**base)
