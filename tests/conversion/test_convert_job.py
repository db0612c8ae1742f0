"""+experiment=convert_mha end to end (tiny), the cached source, and one-line errors for bad convert keys."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

from mla_analysis.models.accounting import kv_bytes_per_token
from mla_analysis.config import ModelConfig
from mla_analysis.models.transformer import Transformer

TINY = [
    "train.steps=6", "train.batch_size=4", "train.eval_batch_size=16", "train.progress=false", "train.warmup_steps=2",
    "data.eval_examples=16", "convert.heal_steps=3", "convert.calib_examples=4", "convert.kv_budget=20",
    "hydra.launcher.n_jobs=1",
]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mla_analysis.run", "+experiment=convert_mha", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_convert_mha_sweep_end_to_end(tmp_path):
    cache = tmp_path / "cache"
    r = _run([f"hydra.sweep.dir={tmp_path / 'sweep'}", f"convert.cache_dir={cache}",
              "convert.allocation=uniform,whitened", *TINY], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/results.json"))]
    assert len(records) == 2 and all(rec["status"] == "ok" for rec in records)
    # the source was trained once, into the content-hashed cache, and reused by both jobs
    sources = list(cache.glob("source-*/results.json"))
    assert len(sources) == 1
    source = json.loads(sources[0].read_text())
    assert source["config"]["model"]["attention"] == "mha"
    for rec in records:
        m = rec["metrics"]
        for key in ("convert.before.val_loss", "convert.before.mqar.exact_match", "convert.source.val_loss",
                    "convert.scratch.val_loss", "convert.scratch.mqar.exact_match", "val_loss", "mqar.exact_match"):
            assert key in m, key
        assert m["convert.source.val_loss"] == source["metrics"]["val_loss"]  # same model, same eval sets
        assert m["val_loss"] != m["convert.before.val_loss"]  # healing changed the model
        cfg = rec["config"]["model"]
        assert cfg["attention"] == "mla_coupled_rope" and sum(cfg["kv_lora_ranks"]) == 20
        assert m["convert.kv_lora_ranks"] == cfg["kv_lora_ranks"]
        assert m["kv_bytes_per_token"] == kv_bytes_per_token(ModelConfig.from_dict(cfg), "bf16")
        assert m["steps"] == 3  # the healing run
    uniform = next(r for r in records if r["config"]["convert"]["allocation"] == "uniform")
    assert uniform["config"]["model"]["kv_lora_ranks"] == [10, 10]
    assert (tmp_path / "sweep" / "comparison.md").exists()
    # scratch baselines: one per distinct architecture, trained for the source's steps + heal steps
    for p in cache.glob("scratch-*/results.json"):
        assert json.loads(p.read_text())["metrics"]["steps"] == 6 + 3


def test_bad_convert_keys_exit_2_with_one_line(tmp_path):
    r = _run(["convert.bogus=1"], tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "convert.bogus" in r.stderr, r.stderr
    r = _run(["hydra.mode=RUN", f"hydra.run.dir={tmp_path / 'run'}", "convert.allocation=magic", *TINY[:-1]], tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith("error: convert.allocation='magic' is invalid")
    assert not (tmp_path / "run" / "results.json").exists()
    assert not list(tmp_path.glob("**/source-*"))  # nothing trained before the check


def test_convert_node_kv_norm_false_reaches_the_converted_model():
    """convert.kv_norm=false: the converted model has no latent norm and is exact at the source's K/V rank."""
    import torch

    from mla_analysis.config import ConvertConfig, tiny
    from mla_analysis.conversion.job import convert_model
    from mla_analysis.models.transformer import Transformer

    torch.manual_seed(0)
    src = Transformer(tiny(d_model=64, n_heads=4, head_dim=8, attention="gqa", n_kv_heads=2, init_std=0.2)).eval()
    ids = torch.randint(0, src.cfg.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    calib = (ids, ids)
    for kv_norm in (False, True):
        new = convert_model(ConvertConfig(kv_lora_rank=32, kv_norm=kv_norm), src, calib)
        assert new.cfg.kv_norm is kv_norm
        with torch.no_grad():
            rel = float((new(ids) - src(ids)).norm() / src(ids).norm())
        assert (rel < 1e-5) is (not kv_norm), rel


def test_allocation_and_conversion_share_one_calibration_forward_without_the_lm_head():
    """convert.kv_budget with a calibrated allocation: one pass over the calibration windows (the allocation's and the
    conversion's statistics from the same forward), the LM head never run, the same model as collecting them twice."""
    import torch

    from mla_analysis.config import ConvertConfig, tiny
    from mla_analysis.conversion.job import convert_model
    from mla_analysis.conversion.mla import mha_to_mla
    from mla_analysis.conversion.rank_allocation import allocate_ranks
    from mla_analysis.models.transformer import Transformer

    torch.manual_seed(0)
    src = Transformer(tiny(attention="gqa", n_kv_heads=2, init_std=0.2)).eval()
    ids = torch.randint(0, src.cfg.vocab_size, (12, 24), generator=torch.Generator().manual_seed(1))
    calls = {"embed": 0, "head": 0}
    hooks = [getattr(src, k).register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1)) for k in calls]
    c = ConvertConfig(kv_budget=20, allocation="whitened", rope_dims=4)
    new = convert_model(c, src, (ids, ids))
    for h in hooks:
        h.remove()
    assert calls == {"embed": 2, "head": 0}  # 12 windows in batches of 8: one pass, hidden states only
    ranks = allocate_ranks(src, 20, "whitened", calib=(ids, ids), rope_dims=4)
    ref = mha_to_mla(src, 10, rope_dims=4, calib=ids, kv_lora_ranks=ranks)  # statistics collected separately
    assert new.conversion_info["kv_lora_ranks"] == ranks
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(new.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_an_interrupted_healing_resumes_from_its_checkpoint_to_the_uninterrupted_result(tmp_path, monkeypatch):
    import os
    import signal

    import pytest
    import torch

    import mla_analysis.training.trainer as trainer
    from mla_analysis.config import tiny
    from mla_analysis.conversion.job import heal
    from mla_analysis.data import DataConfig
    from mla_analysis.training.trainer import TrainConfig, TrainingInterrupted

    data = DataConfig(vocab_size=128, seq_len=32, eval_examples=8, lm_weight=1.0, tasks={"mqar": 1.0}, eval_tasks=[])
    tcfg = TrainConfig(lr=1e-3, warmup_steps=0, eval_every=2, batch_size=4, eval_batch_size=8, progress=False)

    def model():
        torch.manual_seed(0)
        return Transformer(tiny())

    full = heal(model(), data, tcfg, tmp_path / "full", 6, device="cpu")
    real, calls = trainer.lm_loss, {"n": 0}

    def cut_at_step_3(logits, targets):  # the 4th loss is step 3's: the flag stops training after it
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return real(logits, targets)

    monkeypatch.setattr(trainer, "lm_loss", cut_at_step_3)
    with pytest.raises(TrainingInterrupted, match="step 4"):
        heal(model(), data, tcfg, tmp_path / "cut", 6, device="cpu")
    monkeypatch.setattr(trainer, "lm_loss", real)
    resumed = heal(model(), data, dataclasses.replace(tcfg, resume=True), tmp_path / "cut", 6, device="cpu")
    assert resumed["history"] == full["history"]
    for (name, p), q in zip(full["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(p, q), name
