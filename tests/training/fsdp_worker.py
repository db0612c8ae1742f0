"""Run under torchrun by tests/training/test_fsdp.py: FSDP2 runs (uninterrupted, resumed, frozen) and a DDP run, losses to JSON."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from mla_analysis.training.trainer import train
from tests.training.fsdp_setup import DATA, MODEL, SEED, STEPS, CUT, tcfg


def _run(name: str, out: Path, **kw) -> dict:
    losses: list[float] = []
    res = train(MODEL, DATA, tcfg(**kw), out / name, seed=SEED, device="cpu",
                on_step=lambda step, m: losses.append(m["loss"]))
    return {"losses": losses, "val_loss": res["metrics"]["val_loss"], "metrics":
            {k: v for k, v in res["metrics"].items() if isinstance(v, (int, float, bool, str))}}


def main(out: Path) -> None:
    dist.init_process_group("gloo")  # train() uses the caller's group and leaves it open
    rank = dist.get_rank()
    record = {"fsdp": _run("fsdp", out, parallel="fsdp", checkpoint_every=CUT)}
    if rank == 0:  # the interrupted run: the uninterrupted one's directory cut back to its step-CUT checkpoint
        shutil.copytree(out / "fsdp", out / "cut")
        ckpts = out / "cut" / "checkpoints"
        for p in ckpts.iterdir():
            if p.name.startswith("step-") and int(p.name[5:]) > CUT:
                shutil.rmtree(p)
        (ckpts / "LATEST").write_text(f"step-{CUT:07d}\n")
    dist.barrier()
    record["resumed"] = _run("cut", out, parallel="fsdp", resume=True)
    record["ddp"] = _run("ddp", out, parallel="ddp")
    record["fsdp_attention"] = _run("fsdp_attention", out, parallel="fsdp", trainable="attention")
    if rank == 0:
        (out / "losses.json").write_text(json.dumps(record))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
