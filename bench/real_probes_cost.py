"""Cost of the real-text probes on SmolLM2-135M at the study's sizes, extrapolated from measured units.

Each probe is run at a reduced size that keeps its unit (a window, an example of a given length), the time per
unit is measured, and the study size's cost is the units it needs times that time (the probes are linear in
their units). Run from the repository root (the model and the plays from the cache):

    python bench/real_probes_cost.py [--device cpu|cuda] [--seq_len 1024]

Prints one line per probe: measured units, seconds per unit, and the extrapolated seconds at the defaults
of conf/probe/<name>.yaml (KlConfig, CopyingConfig, ... of mla_analysis/config/probes.py; kl / token_bins:
max_windows windows of seq_len; copying: examples x distances; needles: tasks x lengths x depths x examples;
next_line: examples). The load average is printed with them:
on a shared machine the CPU numbers are upper bounds.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seq_len", type=int, default=1024, help="the study's data.seq_len (kl / token_bins windows)")
    ap.add_argument("--out", default="/tmp/real_probes_cost")
    args = ap.parse_args()
    from mla_analysis.data import DataConfig
    from mla_analysis.interop.hf_io import load_model
    from mla_analysis.config.probes import CopyingConfig, KlConfig, NeedlesConfig, NextLineConfig
    from mla_analysis.probes import PROBES, check_probes

    kl, copying, needles, next_line = KlConfig(), CopyingConfig(), NeedlesConfig(), NextLineConfig()  # study sizes

    check_probes({"kl": {}})  # loads the probe registry
    dev = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    cfg = DataConfig(source="shakespeare", tokenizer="smollm2-135m", vocab_size=49152, seq_len=args.seq_len, eval_tasks=[])
    model = load_model("smollm2-135m", device=dev)
    print(f"device {dev}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, seq_len {args.seq_len}")

    def timed(name: str, params: dict) -> float:
        t = time.time()
        PROBES[name](model, params, cfg, args.out, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.time() - t

    print(f"{'probe':28s} {'units':>6s} {'s/unit':>8s} {'study s':>9s}", flush=True)

    class Rows(list):
        def append(self, row) -> None:  # print each row as soon as it is measured (long runs on a CPU)
            super().append(row)
            name, units, per, study = row
            print(f"{name:28s} {units:6d} {per:8.2f} {study:9.0f}", flush=True)

    rows = Rows()
    t = time.time()
    with torch.no_grad():
        model(torch.zeros(1, 1024, dtype=torch.long, device=dev))
    print(f"one 1,024-token forward: {time.time() - t:.2f} s (the machine's speed now)", flush=True)
    # kl (and token_bins, which reuses its pass): per window, both models + both heads on every position
    PROBES["kl"](model, {"max_windows": 1, "seq_len": 64}, cfg, args.out, dev)  # warm-up: reference load, tokens
    n = 4
    t = timed("kl", {"max_windows": n, "seq_len": args.seq_len, "batch_size": 4, "reference": "smollm2-135m",
                     "resamples": 10})  # other windows than the warm-up's: kl's one-entry memo misses
    t_ref = timed("kl", {"max_windows": 1, "seq_len": 64})  # reference load + split lookup + one tiny window
    per = max(t - t_ref, 1e-9) / n
    rows.append(("kl", n, per, kl.max_windows * per + t_ref))
    t_bins = timed("token_bins", {"max_windows": 1, "seq_len": 64, "bins": 3})  # memo hit: labels + counts only
    rows.append(("token_bins (after kl)", 1, t_bins, t_bins))
    # copying: per example per distance
    total = 0.0
    for d in copying.distances:
        t = timed("copying", {"distances": [d], "examples": 2, "batch_size": 2})
        total += t / 2 * copying.examples
        rows.append((f"copying d={d}", 2, t / 2, t / 2 * copying.examples))
    rows.append(("copying (all distances)", 0, 0.0, total))
    # needles: per example per length (both tasks)
    total = 0.0
    for L in needles.lengths:
        t = timed("needles", {"lengths": [L], "depths": [0.5], "examples": 1, "figures": False, "batch_size": 1})
        per = t / 2  # two tasks, one example each
        cost = per * len(needles.tasks) * len(needles.depths) * needles.examples
        total += cost
        rows.append((f"needles len={L}", 2, per, cost))
    rows.append(("needles (grid)", 0, 0.0, total))
    n = 40
    t = timed("next_line", {"examples": n, "batch_size": 16})
    rows.append(("next_line", n, t / n, t / n * next_line.examples))


if __name__ == "__main__":
    main()
