"""DDP under torchrun on CPU (gloo, 2 processes): replicas stay identical, rank 0 writes the record."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "mla_analysis.run", f"hydra.run.dir={out}", "device=cpu", "model=mla_moe", "train.steps=4",
           "train.batch_size=4", "train.eval_every=0", "data.eval_examples=8", "train.progress=false",
           "train.threads=1"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((out / "results.json").read_text())["metrics"]
    assert m["ddp_world_size"] == 2
    assert m["ddp_in_sync"] is True  # gradients averaged and router biases updated from the summed loads
    assert m["tokens_seen"] == 4 * 4 * 64 * 2  # steps x per-rank batch x seq_len x ranks
