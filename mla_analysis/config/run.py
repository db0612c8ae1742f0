"""Checks across the groups of one run (model x data x train x device) that need no registry of another package."""

from __future__ import annotations

from .checks import ConfigError, check_finite
from .data import DataConfig
from .model import ModelConfig, validate_model_config
from .train import TrainConfig, validate_train


def check_run(model: ModelConfig, data: DataConfig, train: TrainConfig, device: str) -> None:
    """Raise ConfigError for a value out of range in model / train, or an impossible combination of the groups."""
    check_finite(model, "model")
    check_finite(data, "data")
    validate_model_config(model, context_len=data.seq_len)
    if model.vocab_size < data.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than data.vocab_size={data.vocab_size} "
            f"(allowed: >= {data.vocab_size})"
        )
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ConfigError(f"device={device!r} is invalid (allowed: auto, cpu, cuda, cuda:N)")
    validate_train(train)
    if train.tokens is not None and train.tokens < train.batch_size * data.seq_len:
        raise ConfigError(
            f"train.tokens={train.tokens} is invalid (allowed: >= one batch = {train.batch_size * data.seq_len})"
        )
