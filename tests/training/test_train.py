"""Trainer: resume after interruption is bitwise identical, NaN stops with the step, checkpoints, load_model."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from mla_analysis import load_model
from mla_analysis.training.checkpoint import CheckpointError, latest_checkpoint
from mla_analysis.config import tiny
from mla_analysis.data import DataConfig
from mla_analysis.data.tasks import MQARConfig
from mla_analysis.training.trainer import NonFiniteLoss, TrainConfig, TrainingInterrupted, lr_at, train


def _data() -> DataConfig:
    return DataConfig(vocab_size=128, seq_len=32, lm_weight=0.5, tasks={"mqar": 1.0},
                      mqar=MQARConfig(num_kv_pairs=2, random_non_queries=False), eval_tasks=["mqar"], eval_examples=16)


def _tcfg(**kw) -> TrainConfig:
    base = dict(steps=12, batch_size=8, eval_every=6, eval_batch_size=16, warmup_steps=2, progress=False)
    base.update(kw)
    return TrainConfig(**base)


MODELS = [dict(attention="mha"), dict(attention="mla", ffn="moe", bias_update_speed=0.01, aux_alpha=0.01)]


@pytest.mark.parametrize("overrides", MODELS, ids=["mha", "mla-moe"])
def test_resume_after_sigint_is_bitwise_identical(tmp_path, overrides):
    cfg = tiny(**overrides)
    full = train(cfg, _data(), _tcfg(), tmp_path / "full", seed=3, device="cpu")

    def interrupt(step, metrics):
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)  # delivered to the trainer's handler, not KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="step 6"):
        train(cfg, _data(), _tcfg(), tmp_path / "cut", seed=3, device="cpu", on_eval=interrupt)
    assert latest_checkpoint(tmp_path / "cut").name == "step-0000006"
    resumed = train(cfg, _data(), _tcfg(resume=True), tmp_path / "cut", seed=3, device="cpu")
    assert resumed["metrics"]["val_loss"] == full["metrics"]["val_loss"]
    assert resumed["history"] == full["history"]
    a, b = load_model(tmp_path / "full"), load_model(tmp_path / "cut")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_nonfinite_loss_stops_with_step_and_keeps_checkpoint(tmp_path, monkeypatch):
    import mla_analysis.training.trainer as tr

    real = tr.lm_loss
    calls = {"n": 0}

    def poisoned(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(tr, "lm_loss", poisoned)
    with pytest.raises(NonFiniteLoss, match="at step 4"):
        train(tiny(), _data(), _tcfg(checkpoint_every=2, eval_every=0), tmp_path, seed=0, device="cpu")
    assert latest_checkpoint(tmp_path).name == "step-0000004"


def test_load_model_rejects_truncated_checkpoint(tmp_path):
    train(tiny(), _data(), _tcfg(steps=2, eval_every=0), tmp_path, seed=0, device="cpu")
    weights = latest_checkpoint(tmp_path) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(tmp_path)


def test_load_model_returns_trained_weights(tmp_path):
    out = train(tiny(), _data(), _tcfg(steps=4, eval_every=0), tmp_path, seed=0, device="cpu")
    model = load_model(tmp_path)
    ids = torch.randint(0, 128, (2, 10))
    assert model(ids).shape == (2, 10, tiny().vocab_size)
    assert out["metrics"]["steps"] == 4
    fresh = type(model)(tiny())
    assert not torch.equal(fresh.embed.weight, model.embed.weight)


def test_lr_schedule_warmup_then_cosine():
    t = TrainConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, t, 100) == pytest.approx(0.1)
    assert lr_at(9, t, 100) == pytest.approx(1.0)
    assert lr_at(55, t, 100) == pytest.approx(0.55)  # half-way through the cosine: (1 + 0.1) / 2
    assert lr_at(100, t, 100) == pytest.approx(0.1)


def test_equal_token_budget_sets_steps(tmp_path):
    d = _data()
    out = train(tiny(), d, _tcfg(tokens=8 * 32 * 3, eval_every=0), tmp_path, seed=0, device="cpu")
    assert out["metrics"]["steps"] == 3 and out["metrics"]["tokens_seen"] == 8 * 32 * 3


def test_signal_during_final_eval_saves_final_checkpoint_and_resume_matches(tmp_path):
    full = train(tiny(), _data(), _tcfg(eval_every=0), tmp_path / "full", seed=1, device="cpu")

    def interrupt(step, metrics):  # eval_every=0: the only eval is the final one
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted, match="SIGTERM during the final evaluation") as info:
        train(tiny(), _data(), _tcfg(eval_every=0), tmp_path / "cut", seed=1, device="cpu", on_eval=interrupt)
    assert info.value.exit_code == 143
    assert latest_checkpoint(tmp_path / "cut").name == "step-0000012"
    resumed = train(tiny(), _data(), _tcfg(eval_every=0, resume=True), tmp_path / "cut", seed=1, device="cpu")
    for key in ("val_loss", "train_loss", "steps"):  # train_loss is kept in the checkpoint, not lost on resume
        assert resumed["metrics"][key] == full["metrics"][key], key
    assert resumed["metrics"]["tokens_per_s"] is not None
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed afterwards


def test_checkpoint_write_failure_is_reported_and_training_finishes(tmp_path, capsys):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "checkpoints").write_text("not a directory")  # every checkpoint write fails (as root too)
    out = train(tiny(), _data(), _tcfg(steps=4, eval_every=0, checkpoint_every=2), tmp_path, seed=0, device="cpu")
    assert out["metrics"]["steps"] == 4 and out["metrics"]["val_loss"] is not None
    assert "checkpoint of step 4 not saved" in out["checkpoint_error"] and "checkpoints" in out["checkpoint_error"]
    err = capsys.readouterr().err
    assert "step 2 not saved" in err and "step 4 not saved" in err


def test_resume_without_latest_uses_newest_complete_checkpoint(tmp_path, capsys):
    full = train(tiny(), _data(), _tcfg(eval_every=0), tmp_path / "full", seed=2, device="cpu")

    def interrupt(step, metrics):
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    cut = tmp_path / "cut"
    with pytest.raises(TrainingInterrupted):
        train(tiny(), _data(), _tcfg(eval_every=6, checkpoint_every=3), cut, seed=2, device="cpu", on_eval=interrupt)
    (cut / "checkpoints" / "LATEST").unlink()
    (cut / "checkpoints" / ".tmp-step-0000009").mkdir()  # a partial write is never taken for a checkpoint
    resumed = train(tiny(), _data(), _tcfg(eval_every=0, resume=True), cut, seed=2, device="cpu")
    err = capsys.readouterr().err
    assert "LATEST is missing: resuming from step-0000006" in err
    assert [h["step"] for h in resumed["history"]] == [6, 12]  # continued (a restart would have only step 12)
    assert resumed["metrics"]["val_loss"] == full["metrics"]["val_loss"]


@pytest.mark.parametrize("content,shown", [(b"\xff\xfe\x00s", "not UTF-8"), (b"", "empty"), (b"../x\n", "'../x'")])
def test_bad_latest_is_one_error_naming_latest(tmp_path, content, shown):
    train(tiny(), _data(), _tcfg(steps=2, eval_every=0), tmp_path, seed=0, device="cpu")
    (tmp_path / "checkpoints" / "LATEST").write_bytes(content)
    with pytest.raises(CheckpointError, match="LATEST") as info:
        train(tiny(), _data(), _tcfg(steps=2, eval_every=0, resume=True), tmp_path, seed=0, device="cpu")
    assert shown in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="LATEST"):
        load_model(tmp_path)


def test_fresh_run_into_dir_with_checkpoints_is_refused_before_writing(tmp_path):
    train(tiny(), _data(), _tcfg(steps=4, eval_every=0, checkpoint_every=2, keep_checkpoints=5), tmp_path, seed=0,
          device="cpu")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(CheckpointError, match="step-0000004 of an earlier run.*train.resume=true"):
        train(tiny(), _data(), _tcfg(steps=2, eval_every=0, checkpoint_every=1), tmp_path, seed=5, device="cpu")
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before  # nothing touched, nothing pruned


def test_history_train_loss_is_the_mean_step_loss_since_the_last_eval_and_survives_a_resume(tmp_path):
    cfg = tiny()
    losses: list[float] = []
    full = train(cfg, _data(), _tcfg(), tmp_path / "full", seed=1, device="cpu",
                 on_step=lambda step, m: losses.append(m["loss"]))
    assert [h["step"] for h in full["history"]] == [6, 12]
    assert full["history"][0]["train_loss"] == pytest.approx(sum(losses[:6]) / 6, rel=1e-12)
    assert full["history"][1]["train_loss"] == pytest.approx(sum(losses[6:]) / 6, rel=1e-12)

    def interrupt(step, metrics):  # mid-window (eval at 6 and 12): the checkpoint carries the partial mean
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="step 4"):
        train(cfg, _data(), _tcfg(), tmp_path / "cut", seed=1, device="cpu", on_step=interrupt)
    resumed = train(cfg, _data(), _tcfg(resume=True), tmp_path / "cut", seed=1, device="cpu")
    assert resumed["history"] == full["history"]
