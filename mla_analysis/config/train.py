"""The ``train`` group: the optimisation and evaluation schedule, and its range checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .checks import Choice, ConfigError, check_finite


class Trainable(Choice):
    """Which parameters the optimizer updates (healing a converted model trains a part of it)."""

    all = "all"
    attention = "attention"  # every attention module's weights (layers.*.attn.*); embeddings, norms, FFNs frozen
    mla = "mla"  # only the MLA KV projections a conversion makes (wkv_a, kv_norm, wkv_b); MLA models only


class Parallel(Choice):
    """How ranks share the work under torchrun (one process: no effect)."""

    ddp = "ddp"  # replicas, gradients all-reduced (DistributedDataParallel)
    fsdp = "fsdp"  # FSDP2: parameters, gradients and AdamW states sharded over ranks; sharded checkpoints


TRAINABLE = Trainable.values()
PARALLEL = Parallel.values()


@dataclass
class TrainConfig:
    """Optimisation and evaluation schedule."""

    steps: int = 1200
    tokens: Optional[int] = None  # if set, steps = tokens // (batch_size * seq_len): equal-token budgets
    batch_size: int = 64
    grad_accum: int = 1  # micro-batches of batch_size per optimizer step (step k uses batches k*grad_accum + j)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_batch_size: int = 128
    checkpoint_every: int = 0  # 0 = only at the end (and on interruption)
    keep_checkpoints: int = 2
    resume: bool = False
    init_from: Optional[str] = None  # run dir or HF checkpoint dir: start from its model (and its config)
    solve_threshold: float = 0.99  # a task counts as solved from the first eval at or above this
    threads: Optional[int] = None  # torch intra-op threads (None = torch's default)
    trainable: Trainable = Trainable.all  # frozen parameters get no gradient and no optimizer state
    parallel: Parallel = Parallel.ddp  # under torchrun: ddp (replicas) or fsdp (sharded, for models that outgrow one device)
    progress: bool = True


def _range_error(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"train.{key}={value!r} is invalid (allowed: {allowed})")


def validate_train(train: TrainConfig) -> None:
    """Raise ConfigError naming the first training option out of its range (run before any compute)."""
    check_finite(train, "train")
    if train.steps < 0 or (train.steps == 0 and train.init_from is None):
        raise ConfigError(
            f"train.steps={train.steps} is invalid (allowed: an integer > 0, or 0 with train.init_from to evaluate only)"
        )
    positive = ("batch_size", "eval_batch_size", "grad_accum", "keep_checkpoints", "lr")
    non_negative = ("warmup_steps", "eval_every", "checkpoint_every", "weight_decay", "grad_clip")
    unit = {"min_lr_ratio": "0..1", "solve_threshold": "0..1"}
    for key in positive:
        if getattr(train, key) <= 0:
            raise _range_error(key, getattr(train, key), "a number > 0" if key == "lr" else "an integer > 0")
    for key in non_negative:
        if getattr(train, key) < 0:
            raise _range_error(key, getattr(train, key), "a number >= 0")
    for key, allowed in unit.items():
        if not 0 <= getattr(train, key) <= 1:
            raise _range_error(key, getattr(train, key), allowed)
    for key in ("beta1", "beta2"):  # torch's AdamW takes [0, 1)
        if not 0 <= getattr(train, key) < 1:
            raise _range_error(key, getattr(train, key), "0 <= beta < 1")
    if train.threads is not None and train.threads < 1:
        raise _range_error("threads", train.threads, "null (torch's default) or an integer >= 1")
    if train.tokens is not None and train.tokens <= 0:
        raise _range_error("tokens", train.tokens, "null or an integer > 0")
