"""Write kl_windows.json (per-window sums of the kl probe) into finished runs that predate it, from their checkpoints.

Run: python experiments/real_conversion/backfill_windows.py RUN_DIR ...   (skips runs that already have the file)
Recomputes the kl probe with the run's own recorded probe.kl options and data config, on the run's checkpoint; the
recomputed mean KL must equal the recorded one (checked), so the file describes the same measurement.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from mla_analysis.data import DataConfig, prepare_data_config
from mla_analysis.interop.hf_io import load_model
from mla_analysis.probes import PROBES, check_probes

torch.set_num_threads(1)
for arg in sys.argv[1:]:
    run = Path(arg)
    if (run / "kl_windows.json").exists():
        print(f"{run}: has kl_windows.json")
        continue
    rec = json.loads((run / "results.json").read_text())
    data_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), rec["config"]["data"]))
    model = load_model(run)
    data_cfg = prepare_data_config(data_cfg, rec["config"]["convert"]["source"], model.cfg.max_seq_len)
    params = rec["config"]["probe"]["kl"]
    check_probes({"kl": params})
    out = PROBES["kl"](model, params, data_cfg, run, torch.device("cpu"))
    want = rec["metrics"]["probe.kl.kl.mean"]
    assert abs(out["kl.mean"] - want) < 1e-4 * max(1.0, abs(want)), (out["kl.mean"], want)
    print(f"{run}: kl_windows.json written (kl {out['kl.mean']:.4f} = recorded {want:.4f})")
