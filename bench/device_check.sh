#!/usr/bin/env bash
# The checks that need a GPU, in one call (CI has no GPU): the CUDA tests, the benchmarks on the GPU
# (their section of BENCHMARKS.md), the test suite with device=auto resolving to CUDA, and one kernel
# choice measured by hand. Run from the repository root on a machine with CUDA:
#   bench/device_check.sh OUT_DIR [NOTE]
# Each step has its own time limit and the next one runs even if it fails; logs go to OUT_DIR.
set -uo pipefail
out=${1:?usage: bench/device_check.sh OUT_DIR [NOTE]}
note=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PY:-python3}

step() {  # step NAME SECONDS CMD...: run CMD under a time limit, log to OUT_DIR/NAME.log, report its status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
  tail -n 4 "$out/$name.log" | sed 's/^/   /' | tee -a "$out/summary.txt"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/summary.txt"
$py -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee -a "$out/summary.txt"

step test_cuda 150 $py -m pytest -q -p no:cacheprovider tests/models/test_cuda.py
step bench 330 $py -m mla_analysis.bench --device cuda --profile --out "$out/BENCHMARKS.md" ${note:+--note "$note"}

# The real-model figures (issue 22) on the GPU: SmolLM2-135M in bf16, the toolkit's decode as CUDA-graph replays;
# their own section (real-cuda) of the report. Needs the offline SmolLM2 asset (make assets) on the machine.
step bench_real 240 $py -m mla_analysis.bench --real --device cuda --out "$out/BENCHMARKS.md" ${note:+--note "$note"}

# Kernel choice of attention.attend on CUDA: MLA's v is narrower than q/k; PyTorch's flash kernel needs equal
# widths, so unpadded v falls back to another fused kernel. Forward + backward at figure 1's GPU shape.
step sdpa_pad 60 $py - <<'EOF'
import torch, torch.nn.functional as F
from torch.utils.benchmark import Timer
B, H, T, dqk, dv = 8, 16, 1024, 96, 64
q, k = (torch.randn(B, H, T, dqk, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
v = torch.randn(B, H, T, dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
def plain():
    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
def padded():
    F.scaled_dot_product_attention(q, k, F.pad(v, (0, dqk - dv)), is_causal=True)[..., :dv].sum().backward()
ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
pad = F.scaled_dot_product_attention(q, k, F.pad(v, (0, dqk - dv)), is_causal=True)[..., :dv]
print("max |padded - plain|", float((pad - ref).abs().max()))
for name, fn in (("plain", plain), ("padded", padded), ("plain", plain), ("padded", padded)):
    print(name, f"{Timer('fn()', globals={'fn': fn}).blocked_autorange(min_run_time=2).median * 1e3:.3f} ms fwd+bwd")
EOF

# the whole suite with device=auto resolving to CUDA (lm-eval and the sweep launchers are not installed there)
step suite 200 env OMP_NUM_THREADS=2 $py -m pytest -v -p no:cacheprovider -n 8 --ignore=tests/evaluation/test_lm_eval.py \
  --ignore=tests/runner/test_sweeps.py
grep -E "FAILED|ERROR" "$out/suite.log" | sort -u | head -20 | tee -a "$out/summary.txt"
