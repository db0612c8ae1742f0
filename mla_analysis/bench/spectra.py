"""Figure 4: streaming spectra, Gram-accumulation throughput and peak memory flat in the token count."""

from __future__ import annotations

from typing import Any

import torch

# VmHWM is this process's own peak; ru_maxrss would inherit the parent's peak across fork + exec
_SPECTRA_SCRIPT = """
import json, resource, sys, time, torch
from mla_analysis.probes.spectra import GramAccumulator
def peak_kb():
    try:
        with open("/proc/self/status") as f:
            return int(next(l for l in f if l.startswith("VmHWM")).split()[1])
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n, dim, chunk, device = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
g = torch.Generator().manual_seed(0)
acc = GramAccumulator(dim, device=torch.device(device))
acc.update(torch.randn(chunk, dim, generator=g))
base = peak_kb()
t0 = time.perf_counter()
for _ in range(n // chunk - 1):
    acc.update(torch.randn(chunk, dim, generator=g).to(device))
acc.spectrum()
print(json.dumps({"seconds": time.perf_counter() - t0, "tokens": (n // chunk) * chunk,
                  "peak_kb": peak_kb(), "base_kb": base}))
"""


def bench_spectra(device: torch.device, quick: bool) -> dict[str, Any]:
    """Gram-accumulation throughput and peak RSS at two token counts, each in a fresh process."""
    import json
    import subprocess
    import sys

    dim, chunk = (64, 1024) if quick else (256, 4096)
    counts = (10_240, 102_400) if quick else (102_400, 1_024_000)
    runs = {}
    for n in counts:
        out = subprocess.run([sys.executable, "-c", _SPECTRA_SCRIPT, str(n), str(dim), str(chunk), str(device)],
                             capture_output=True, text=True, check=True)
        runs[n] = json.loads(out.stdout.strip().splitlines()[-1])
    small, large = (runs[n] for n in counts)
    return {"dim": dim, "chunk": chunk, "counts": counts, "runs": runs,
            "tok_s": large["tokens"] / large["seconds"], "mem_ratio": large["peak_kb"] / small["peak_kb"],
            "growth_kb": large["peak_kb"] - small["peak_kb"]}
