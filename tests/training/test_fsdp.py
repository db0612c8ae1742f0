"""FSDP2 under torchrun on CPU (gloo, 2 processes): one process's loss trajectory to fp32 tolerance, sharded resume.

One torchrun launch (tests/training/fsdp_worker.py) makes every distributed run; the reference is a plain
single-process loop here, which feeds one model the two ranks' batches and averages their losses (what
the ranks' averaged gradients mean), with torch's own clipping and AdamW.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mla_analysis import load_model
from mla_analysis.data import train_batch
from mla_analysis.models.transformer import Transformer
from mla_analysis.training.trainer import freeze_untrainable, lm_loss, lr_at, make_optimizer
from tests.training.fsdp_setup import BATCH, CUT, DATA, MODEL, SEED, STEPS, WORLD, tcfg

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", f"--master_port={_free_port()}",
           str(ROOT / "tests" / "fsdp_worker.py"), str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr[-3000:]
    return out, json.loads((out / "losses.json").read_text())


def _reference(trainable: str = "all") -> tuple[list[float], Transformer]:
    """One process, one model, the WORLD ranks' batches of each step: mean of their losses, then clip and AdamW."""
    t = tcfg(trainable=trainable)
    torch.manual_seed(SEED)
    model = Transformer(MODEL)
    freeze_untrainable(model, trainable)
    opt = make_optimizer(model, t)
    losses = []
    for step in range(STEPS):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, t, STEPS)
        opt.zero_grad(set_to_none=True)
        per_rank = [lm_loss(model(x), y) for x, y in (train_batch(DATA, step, BATCH, rank=r, world_size=WORLD)
                                                       for r in range(WORLD))]
        loss = torch.stack(per_rank).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
    return losses, model


@pytest.mark.slow
def test_fsdp_and_ddp_follow_one_process_to_fp32_tolerance(runs):
    out, rec = runs
    ref_losses, ref_model = _reference()
    assert ref_losses[-1] < ref_losses[0] - 0.3  # it trains: the comparison is not between flat lines
    for kind in ("fsdp", "ddp"):
        assert rec[kind]["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6), kind
    assert rec["fsdp"]["metrics"]["fsdp_world_size"] == WORLD
    assert rec["fsdp"]["metrics"]["tokens_seen"] == STEPS * BATCH * DATA.seq_len * WORLD
    # the sharded final checkpoint, consolidated into a plain model, holds the reference's weights
    sharded = load_model(out / "fsdp")
    for (name, p), q in zip(ref_model.state_dict().items(), sharded.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_resumed_sharded_run_equals_uninterrupted(runs):
    out, rec = runs
    assert rec["resumed"]["losses"] == rec["fsdp"]["losses"][CUT:]  # bitwise: same shards, same order of sums
    assert rec["resumed"]["val_loss"] == rec["fsdp"]["val_loss"]
    a, b = load_model(out / "fsdp"), load_model(out / "cut")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    shards = sorted(p.name for p in (out / "cut" / "checkpoints" / f"step-{CUT:07d}").iterdir())
    assert shards == ["model-rank00000-of-00002.safetensors", "model-rank00001-of-00002.safetensors",
                      "optimizer-rank00000-of-00002.safetensors", "optimizer-rank00001-of-00002.safetensors",
                      "shards.json", "state.json"]


@pytest.mark.slow
def test_fsdp_with_frozen_parameters_follows_one_process(runs):
    _, rec = runs
    ref_losses, _ = _reference("attention")
    assert rec["fsdp_attention"]["losses"] == pytest.approx(ref_losses, rel=1e-5, abs=1e-6)
    assert rec["fsdp_attention"]["losses"] != rec["fsdp"]["losses"]  # the freezing took effect
