"""The job a run does (``job``) and the checks across the groups of one run (model x data x train x device)."""

from __future__ import annotations

from .checks import Choice, ConfigError, check_finite
from .data import DataConfig
from .model import ModelConfig, validate_model_config
from .train import TrainConfig, validate_train


class Job(Choice):
    """What ``python -m mla_analysis.run`` does with a composed config (the root key ``job``)."""

    train = "train"  # train (or, with train.init_from, load) a model, evaluate and probe it
    convert = "convert"  # convert a model and heal it (needs the convert node: +experiment=convert_mha, ...)
    claims = "claims"  # the claims audit, no model (needs the claims node: +experiment=claims)


def check_job(job: Job, nodes: dict[str, bool]) -> None:
    """Raise ConfigError naming ``job`` when its own node is missing or another job's node is set.

    ``nodes`` maps each job's node (``convert``, ``claims``) to whether the composed config sets it.
    """
    job = Job.parse(job, "job")
    given = sorted(n for n, is_set in nodes.items() if is_set)
    if job is not Job.train and job.value not in given:
        raise ConfigError(f"job={job} needs a {job} node (allowed: job={' | '.join(given) or 'train'}, "
                          f"or an experiment that sets {job}:, e.g. +experiment={EXAMPLE[job]})")
    extra = [n for n in given if n != job.value]
    if extra:
        raise ConfigError(f"job={job} is invalid with a {extra[0]} node set (allowed: job={extra[0]})")


EXAMPLE = {Job.convert: "convert_mha", Job.claims: "claims"}  # the README's example experiment of each node


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
