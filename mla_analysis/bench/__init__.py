"""Benchmarks: every speed figure the toolkit claims, measured side by side in one process.

``python -m mla_analysis.bench`` prints one table and records it, with the machine it ran on, in
``BENCHMARKS.md`` (one section per device kind, replaced atomically; other sections are kept).

Figures (each a ratio or a fraction, so that they travel between machines better than raw speeds):

1. Training throughput: tokens/s of one forward + backward + AdamW step of the toolkit's MLA + MoE
   model over ``transformers``' ``DeepseekV3ForCausalLM`` built from the identical config
   (``to_hf_config(cfg, "deepseek_v3")``), the same weights (``state_dict_to_hf``), batch, dtype and
   loss, with HF's default attention and experts implementations (``sdpa``, ``grouped_mm`` in
   transformers 5.x); for information also HF with eager attention and with eager experts. Before timing both models must give the same logits (1e-4), so the comparison is
   like for like. The optimizer is torch's default AdamW for both (a per-parameter loop on CPU, as the
   toolkit's trainer with ``foreach=False``). Target >= 1.5x on CPU, >= 2x on a GPU. On a GPU the model is
   larger (``train_config(gpu=True)``: d_model 1024, 64 experts, top-6, batch 8 x 1024) and bf16; there our
   routed experts run as grouped GEMMs (``F.grouped_mm``) and, for information, also as the per-expert loop.
2. MLA decode, absorbed vs naive: tokens/s of single-token decode steps at context 8k with
   DeepSeek-V2's per-layer attention shape (kv_lora_rank 512, rope 64, nope 128, v 128; 16 heads
   instead of 128 on CPU, 128 on a GPU; 1 layer, small dense FFN). The cache is filled with random latents (no
   prefill). Both paths must give the same next-token logits first. Target >= 5x.
3. Decode sweep, MLA (absorbed) vs MHA vs GQA over contexts 1k..32k at batch 1 and 8: tokens/s,
   KV bytes read per step (``accounting.kv_bytes_per_token`` in the cache dtype x context x batch),
   achieved KV-read bandwidth (bytes/step / time/step) and its fraction of the machine's copy
   bandwidth (``dst.copy_(src)`` of a 256 MB tensor, read + write bytes counted, STREAM convention;
   median of several). Target: >= 30% of copy bandwidth at 32k for MLA. For information also MLA with a
   bfloat16 cache (``new_cache(dtype=torch.bfloat16)``; bytes counted in bf16), the same fp32 model, and
   the achieved GFLOP/s (``accounting.decode_flops_per_token``): absorbed MLA does 4 H FLOPs per cached
   element (scores and weighted sum for each of H heads), so on a CPU it can be compute-bound, not read-bound.
4. Streaming spectra: tokens/s of the spectra probe's Gram accumulation, and peak memory flat in the
   number of tokens (each size streamed in a fresh process; peak RSS of 1M tokens within 10% of 100k).
5. Whole-job budget: with ``--sweep-dir DIR`` the wall time of a finished sweep is read from its
   ``results.json`` files (``timings.wall_s``); the sweep itself is never run here.

Timing: warmup iterations, then the median of N timed iterations; compared candidates are timed in
alternation (A B A B ...) so that slow drifts of background load hit both alike. On CUDA every timed
region is bracketed by ``torch.cuda.synchronize``. Decode runs under ``torch.inference_mode``.
Section 3 skips a context when the previous (half as long) one predicts more memory than is
available or a step longer than ``--max-step-s``, and says so in the table.

``--quick`` shrinks every size (a few seconds; used by the tests) and does not write BENCHMARKS.md
unless ``--out`` is given. ``--profile`` adds torch.profiler hotspot tables for figures 1 and 2 and for the
MLA decode step at the longest context of figure 3.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..models.accounting import decode_flops_per_token, kv_bytes_per_token
from ..config import ModelConfig, validate_model_config
from ..models.cache import KVCache
from ..models.transformer import Transformer
from ..training.results import ResultsError, atomic_write_text, git_commit, read_json

DEFAULT_OUT = "BENCHMARKS.md"
SECTION_RE = re.compile(r"<!-- bench:(?P<key>[\w.-]+):begin -->\n(?P<body>.*?)<!-- bench:(?P=key):end -->\n?", re.S)
HEADER = (
    "# Benchmarks\n\n"
    "Written by `python -m mla_analysis.bench` (definitions: the docstring of `mla_analysis/bench.py`).\n"
    "One section per device kind; a run replaces only its own section. Targets are for 2 CPU cores\n"
    "(figure 1 has its own on a GPU: >= 2x).\n"
    "Tests never assert timings: these numbers are the only performance claims.\n"
    "Sections the bench does not write (e.g. `cpu-notes`, an analysis by hand) are kept as they are.\n\n"
)

TARGET_TRAIN_RATIO = {"cpu": 1.5, "cuda": 2.0}  # by device type
TARGET_ABSORB_RATIO = 5.0
TARGET_BW_FRACTION = 0.30
TARGET_SPECTRA_MEM_RATIO = 1.10

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


class BenchError(RuntimeError):
    """A benchmark precondition failed (e.g. the compared models disagree)."""


# ----------------------------------------------------------------------------------------- sizes
@dataclass
class Sizes:
    """Everything --quick shrinks."""

    train_cfg: ModelConfig
    train_batch: int
    train_seq: int
    train_warmup: int
    train_iters: int
    decode_kw: dict[str, Any]  # shared shape of the decode models (figures 2 and 3)
    absorb_context: int
    absorb_iters: int
    contexts: list[int]
    batches: list[int]
    decode_iters: int
    decode_min_time_s: float
    copy_bytes: int
    copy_reps: int


def train_config(quick: bool = False, gpu: bool = False) -> ModelConfig:
    """The MLA + DeepSeekMoE model of figure 1 (DeepSeek-V3 style: sigmoid router, normalised top-k);
    ``gpu``: a larger one (64 fine-grained experts, top-6), so that a GPU step is not bound by kernel launches."""
    if quick:
        sizes = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
                     qk_rope_head_dim=4, v_head_dim=8, max_seq_len=32, n_routed_experts=4, moe_d_ff=16, d_ff=64)
    elif gpu:
        sizes = dict(vocab_size=8192, d_model=1024, n_layers=4, n_heads=16, kv_lora_rank=256, qk_nope_head_dim=64,
                     qk_rope_head_dim=32, v_head_dim=64, max_seq_len=1024, n_routed_experts=64, n_activated_experts=6,
                     moe_d_ff=256, d_ff=2048)
    else:
        sizes = dict(vocab_size=1024, d_model=256, n_layers=4, n_heads=8, kv_lora_rank=64, qk_nope_head_dim=32,
                     qk_rope_head_dim=16, v_head_dim=32, max_seq_len=256, n_routed_experts=16, moe_d_ff=128, d_ff=512)
    sizes.setdefault("n_activated_experts", 2)
    cfg = ModelConfig(
        name="bench-train", attention="mla", rope_interleave=True, ffn="moe", n_shared_experts=1,
        score_func="sigmoid", norm_topk_prob=True, **sizes,
    )
    return validate_model_config(cfg)


def decode_shape(quick: bool = False, gpu: bool = False) -> dict[str, Any]:
    """DeepSeek-V2's per-layer attention shape, 16 heads instead of 128 on CPU, 128 on a GPU (quick: tiny)."""
    if quick:
        return dict(vocab_size=128, d_model=64, n_heads=4, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16,
                    v_head_dim=16, head_dim=16, gqa_kv_heads=2, d_ff=64)
    heads = 128 if gpu else 16
    return dict(vocab_size=512, d_model=1024, n_heads=heads, kv_lora_rank=512, qk_rope_head_dim=64,
                qk_nope_head_dim=128, v_head_dim=128, head_dim=128, gqa_kv_heads=heads // 4, d_ff=256)


def decode_config(variant: str, shape: dict[str, Any], max_len: int, mla_decode: str = "absorb") -> ModelConfig:
    """One-layer decode model: ``mla`` (naive or absorbed), ``mha`` or ``gqa`` with the given shape."""
    common = dict(name=variant, vocab_size=shape["vocab_size"], d_model=shape["d_model"], n_layers=1,
                  n_heads=shape["n_heads"], max_seq_len=max_len, ffn="dense", d_ff=shape["d_ff"])
    if variant == "mla":
        cfg = ModelConfig(attention="mla", rope_interleave=True, kv_lora_rank=shape["kv_lora_rank"],
                          qk_rope_head_dim=shape["qk_rope_head_dim"], qk_nope_head_dim=shape["qk_nope_head_dim"],
                          v_head_dim=shape["v_head_dim"], mla_decode=mla_decode, **common)
    elif variant in ("mha", "gqa"):
        cfg = ModelConfig(attention=variant, head_dim=shape["head_dim"],
                          n_kv_heads=shape["gqa_kv_heads"] if variant == "gqa" else None, **common)
    else:
        raise ValueError(f"variant={variant!r} (allowed: mla | mha | gqa)")
    return validate_model_config(cfg)


def make_sizes(quick: bool, device: torch.device = torch.device("cpu")) -> Sizes:
    """The sizes of every figure: tiny with ``quick``, else the CPU's or (larger) a GPU's."""
    if quick:
        return Sizes(train_cfg=train_config(True), train_batch=2, train_seq=16, train_warmup=1, train_iters=2,
                     decode_kw=decode_shape(True), absorb_context=128, absorb_iters=2, contexts=[64, 128],
                     batches=[1, 2], decode_iters=2, decode_min_time_s=0.0, copy_bytes=8 << 20, copy_reps=3)
    if device.type == "cuda":
        return Sizes(train_cfg=train_config(gpu=True), train_batch=8, train_seq=1024, train_warmup=3, train_iters=20,
                     decode_kw=decode_shape(gpu=True), absorb_context=8192, absorb_iters=20,
                     contexts=[1024, 2048, 4096, 8192, 16384, 32768], batches=[1, 8], decode_iters=20,
                     decode_min_time_s=0.5, copy_bytes=1 << 30, copy_reps=20)
    return Sizes(train_cfg=train_config(False), train_batch=8, train_seq=256, train_warmup=3, train_iters=15,
                 decode_kw=decode_shape(False), absorb_context=8192, absorb_iters=5,
                 contexts=[1024, 2048, 4096, 8192, 16384, 32768], batches=[1, 8], decode_iters=3,
                 decode_min_time_s=1.0, copy_bytes=256 << 20, copy_reps=7)


# ------------------------------------------------------------------------------------ machinery
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    warmup: int,
    iters: int,
    min_time_s: float = 0.0,
    max_iters: Optional[int] = None,
) -> dict[str, list[float]]:
    """Seconds per call of each fn, timed in alternation; at least ``iters`` rounds, more until
    ``min_time_s`` of timed work per fn (capped at ``max_iters`` rounds)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    max_iters = max(iters, max_iters or iters)
    rounds = 0
    while True:
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        rounds += 1
        if rounds >= iters and (rounds >= max_iters or min(sum(t) for t in times.values()) >= min_time_s):
            return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _proc_status(field_name: str) -> Optional[int]:
    try:
        m = re.search(rf"^{field_name}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


class PeakMemory:
    """Peak memory of a region above its starting point: CUDA allocator stats, or Linux VmHWM (reset via
    /proc/self/clear_refs). ``bytes`` is None when the platform offers neither."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: Optional[int] = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._start = _proc_status("VmRSS")
        except OSError:
            pass
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._start is not None:
            peak = _proc_status("VmHWM")
            self.bytes = None if peak is None else max(0, peak - self._start)


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes that can still be allocated on the device (MemAvailable on Linux CPUs)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        m = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cache_sizes() -> str:
    """CPU cache sizes per level, e.g. 'L2 2MB, L3 300MB' (from sysfs; '' when unknown). A working set that
    fits in the last-level cache is read at cache, not DRAM, bandwidth."""
    out = {}
    for d in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind, size = ((d / f).read_text().strip() for f in ("level", "type", "size"))
        except OSError:
            continue
        if kind != "Instruction" and int(level) >= 2:
            m = re.fullmatch(r"(\d+)K", size)
            out[f"L{level}"] = f"{int(m.group(1)) / 1024:g} MiB" if m and int(m.group(1)) >= 1024 else size
    return ", ".join(f"{k} {v}" for k, v in sorted(out.items()))


def cpu_flags(wanted: Sequence[str] = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")) -> str:
    """The vector/matrix extensions that decide fp32/bf16 matmul speed, as listed in /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    have = set(m.group(1).split()) if m else set()
    return " ".join(f for f in wanted if f in have)


def load_average() -> Optional[tuple[float, float, float]]:
    try:
        return os.getloadavg()
    except (OSError, AttributeError):
        return None


class OtherCpuLoad:
    """CPU time the rest of the machine used while this block ran, in cores (0 = quiet, 1 = one core busy):
    busy time from /proc/stat minus this process's own CPU time, over the wall time. None off Linux."""

    def __enter__(self) -> "OtherCpuLoad":
        self.cores: Optional[float] = None
        self._start = self._sample()
        return self

    def __exit__(self, *exc: Any) -> None:
        end = self._sample()
        if self._start is None or end is None:
            return
        busy = (end[0] - self._start[0]) / os.sysconf("SC_CLK_TCK")
        own = end[1] - self._start[1]
        wall = end[2] - self._start[2]
        self.cores = max(0.0, busy - own) / wall if wall > 0 else None

    @staticmethod
    def _sample() -> Optional[tuple[int, float, float]]:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
        t = os.times()
        return busy, t.user + t.system, time.perf_counter()


def machine_info(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The facts a reader needs to compare these numbers with their own."""
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:  # pragma: no cover
        tf_version = "not installed"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        usable = os.cpu_count() or 0
    info = {
        "cpu": cpu_model(),
        "cpu_caches": cache_sizes(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch": torch.__version__,
        "transformers": tf_version,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "git_commit": git_commit(),
        # OpenMP/MKL settings change how a shared machine's load hits the timings
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS") if k in os.environ},
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def measure_copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> dict[str, float]:
    """Copy bandwidth in bytes/s, counting bytes read + written (STREAM convention); median of reps."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)  # touch the pages before timing
    times = time_interleaved({"copy": lambda: dst.copy_(src)}, device, warmup=1, iters=reps)["copy"]
    moved = 2 * n * 4
    return {"bytes": float(n * 4), "median_bw": moved / median(times), "best_bw": moved / min(times)}


def cast_params_(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast parameters to ``dtype``, keeping what the references keep in fp32: RoPE frequencies (buffers
    are not touched) and the MoE router weights (``gate.weight``)."""
    if dtype != torch.float32:
        for name, p in model.named_parameters():
            if not name.endswith("gate.weight"):
                p.data = p.data.to(dtype)
    return model


# --------------------------------------------------------------------------- figure 1: training
def randomise_router_bias(model: Transformer, seed: int) -> None:
    """Non-zero aux-loss-free biases, so the bias path of the router is exercised (and copied to HF)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for moe in model.moe_layers():
            b = moe.gate.e_score_correction_bias
            b.copy_(0.01 * torch.randn(b.shape, generator=g).to(b.device))


def build_train_pair(cfg: ModelConfig, device: torch.device, seed: int = 0, attn_implementation: Optional[str] = None,
                     experts_implementation: Optional[str] = None) -> tuple[Transformer, torch.nn.Module]:
    """(ours, HF DeepseekV3ForCausalLM) with identical weights, fp32, on ``device``; HF's attention and experts
    implementations are its defaults unless named (e.g. ``"eager"``)."""
    import transformers

    from ..interop.state_dict import state_dict_to_hf, to_hf_config

    torch.manual_seed(seed)
    ours = Transformer(cfg)
    randomise_router_bias(ours, seed)
    hf_cfg = to_hf_config(cfg, "deepseek_v3")
    if attn_implementation is not None:
        hf_cfg._attn_implementation = attn_implementation
    if experts_implementation is not None:
        hf_cfg._experts_implementation = experts_implementation
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg)
    hf.load_state_dict(state_dict_to_hf(cfg, ours.state_dict(), "deepseek_v3"), strict=True)
    return ours.to(device), hf.to(device)


def hf_implementations(hf: torch.nn.Module) -> str:
    """HF's attention and experts implementations, as a label: "`sdpa` attention, `grouped_mm` experts"."""
    attn = getattr(hf.config, "_attn_implementation", None) or "eager"
    experts = getattr(hf.config, "_experts_implementation", None) or "eager"
    return f"`{attn}` attention, `{experts}` experts"


# HF baselines besides its defaults, for information: name -> build_train_pair keywords
HF_VARIANTS = {
    "hf_eager_attention": dict(attn_implementation="eager"),
    "hf_eager_experts": dict(experts_implementation="eager"),
}


def random_batch(cfg: ModelConfig, batch: int, seq: int, device: torch.device, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    return ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)


def forward_logits(model: torch.nn.Module, ids: torch.Tensor, is_hf: bool) -> torch.Tensor:
    if is_hf:
        return model(input_ids=ids, use_cache=False).logits
    return model(ids)


def check_train_parity(ours: Transformer, hf: torch.nn.Module, ids: torch.Tensor, atol: float = 1e-4) -> float:
    """Max |logit difference| of the two models on ``ids`` (eval mode); raises BenchError above ``atol``."""
    was = ours.training, hf.training
    ours.eval()
    hf.eval()
    with torch.no_grad():
        got = forward_logits(ours, ids, False).float()
        ref = forward_logits(hf, ids, True).float()
    ours.train(was[0])
    hf.train(was[1])
    try:
        torch.testing.assert_close(got, ref, atol=atol, rtol=atol)
    except AssertionError as e:
        raise BenchError(f"ours and HF DeepseekV3 disagree before timing, so the comparison is void:\n{e}") from None
    return float((got - ref).abs().max())


def make_train_step(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor, is_hf: bool) -> Callable[[], None]:
    """One forward + backward + AdamW step on a fixed batch (the same loss for both models)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step() -> None:
        logits = forward_logits(model, ids, is_hf)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_train(sizes: Sizes, device: torch.device, dtype: torch.dtype, seed: int,
                hf_variants: Sequence[str] = tuple(HF_VARIANTS)) -> dict[str, Any]:
    """Figure 1: tokens/s of ours vs HF with its default implementations (and, for information, ``hf_variants``)."""
    cfg = sizes.train_cfg
    ids, targets = random_batch(cfg, sizes.train_batch, sizes.train_seq, device, seed + 1)
    ours, hf = build_train_pair(cfg, device, seed)
    contenders: dict[str, tuple[torch.nn.Module, bool]] = {"ours": (ours, False), "hf": (hf, True)}
    labels = {"hf": hf_implementations(hf)}
    for name in hf_variants:
        _, other = build_train_pair(cfg, device, seed, **HF_VARIANTS[name])
        if hf_implementations(other) != labels["hf"]:  # skip a variant that is HF's default already
            contenders[name], labels[name] = (other, True), hf_implementations(other)
    diffs = {k: check_train_parity(ours, m, ids) for k, (m, is_hf) in contenders.items() if is_hf}
    if device.type == "cuda":  # for information: what grouped-GEMM experts (CUDA's default) buy over the loop
        loop = copy.deepcopy(ours)
        for moe in loop.moe_layers():
            moe.grouped_mm = False
        contenders["ours_loop_experts"] = (loop, False)
    for m, _ in contenders.values():
        cast_params_(m, dtype)
    steps = {k: make_train_step(m, ids, targets, is_hf) for k, (m, is_hf) in contenders.items()}
    times = time_interleaved(steps, device, sizes.train_warmup, sizes.train_iters)
    tokens = sizes.train_batch * sizes.train_seq
    tok_s = {k: tokens / median(v) for k, v in times.items()}
    ratios = {k: tok_s["ours"] / tok_s[k] for k in tok_s if k.startswith("hf_")}  # ours over each other HF
    if "ours_loop_experts" in tok_s:
        ratios["ours_loop_experts"] = tok_s["ours_loop_experts"] / tok_s["hf"]  # that variant of ours over HF
    return {
        "config": cfg, "batch": sizes.train_batch, "seq": sizes.train_seq, "tokens_per_step": tokens,
        "hf_implementations": labels, "max_logit_diff": diffs, "times": times, "tok_s": tok_s,
        "ratio": tok_s["ours"] / tok_s["hf"], "ratios": ratios, "_steps": steps,
    }


# ---------------------------------------------------------------------------- decode machinery
def fill_cache_(cache: KVCache, context: int, seed: int = 0, block: int = 1024) -> None:
    """Random cached values for positions [0, context) and ``cache.seq_len = context`` (no prefill).

    A random block of ``block`` positions is tiled along the sequence, so filling a multi-GB cache
    costs a copy, not a random-number generation per element.
    """
    g = torch.Generator().manual_seed(seed)
    for layer in cache.layers:
        for buf in layer.values():
            n = min(block, context)
            rnd = torch.randn((buf.shape[0], n, *buf.shape[2:]), generator=g).to(buf.device, buf.dtype)
            for s in range(0, context, n):
                e = min(context, s + n)
                buf[:, s:e].copy_(rnd[:, : e - s])
    cache.seq_len = context


def decode_models(shape: dict[str, Any], max_len: int, device: torch.device, dtype: torch.dtype,
                  variants: Iterable[str], seed: int = 0) -> dict[str, Transformer]:
    """Decode models by name: 'mla' (absorbed), 'mla_naive' (same weights as 'mla'), 'mha', 'gqa'."""
    out: dict[str, Transformer] = {}
    for v in variants:
        torch.manual_seed(seed)
        if v == "mla_naive":
            cfg = decode_config("mla", shape, max_len, mla_decode="naive")
        else:
            cfg = decode_config(v, shape, max_len, mla_decode="absorb")
        m = Transformer(cfg).eval()
        if v == "mla_naive" and "mla" in out:
            m.load_state_dict(out["mla"].state_dict())
        out[v] = cast_params_(m.to(device), dtype)
    return out


def make_decode_step(model: Transformer, cache: KVCache, context: int, batch: int, device: torch.device,
                     seed: int = 0) -> Callable[[], torch.Tensor]:
    """One single-token decode step at position ``context`` (rewinds the cache so every step sees the same
    context); returns the next-token logits [B, vocab]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, 1), generator=g).to(device)

    def step() -> torch.Tensor:
        cache.seq_len = context
        with torch.inference_mode():
            return model(ids, cache=cache)[:, -1]

    return step


def check_decode_parity(a: Callable[[], torch.Tensor], b: Callable[[], torch.Tensor], atol: float) -> float:
    """Max |difference| of two decoders' next-token logits; raises BenchError above ``atol``."""
    la, lb = a().float(), b().float()
    try:
        torch.testing.assert_close(la, lb, atol=atol, rtol=atol)
    except AssertionError as e:
        raise BenchError(f"absorbed and naive MLA decoding disagree, so the comparison is void:\n{e}") from None
    return float((la - lb).abs().max())


def parity_atol(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 3e-2


# -------------------------------------------------------------------- figure 2: absorbed vs naive
def bench_absorb(sizes: Sizes, device: torch.device, dtype: torch.dtype, seed: int) -> dict[str, Any]:
    """Figure 2: absorbed vs naive MLA decode at ``sizes.absorb_context`` (batch 1), same weights and cache."""
    S, B = sizes.absorb_context, 1
    models = decode_models(sizes.decode_kw, S + 1, device, dtype, ["mla", "mla_naive"], seed)
    cache = models["mla"].new_cache(B, S + 1, dtype)
    fill_cache_(cache, S, seed)
    steps = {
        "absorb": make_decode_step(models["mla"], cache, S, B, device, seed),
        "naive": make_decode_step(models["mla_naive"], cache, S, B, device, seed),
    }
    diff = check_decode_parity(steps["absorb"], steps["naive"], parity_atol(dtype))
    times = time_interleaved(steps, device, warmup=1, iters=sizes.absorb_iters)
    tok_s = {k: B / median(v) for k, v in times.items()}
    return {
        "config": models["mla"].cfg, "context": S, "batch": B, "max_logit_diff": diff, "times": times,
        "tok_s": tok_s, "ratio": tok_s["absorb"] / tok_s["naive"], "_steps": steps, "_keep": (models, cache),
    }


# ------------------------------------------------------------------------ figure 3: decode sweep
SWEEP_VARIANTS = ("mla", "mla_bf16", "mha", "gqa")
VARIANT_LABELS = {"mla_bf16": "mla, bf16 cache"}


def sweep_variant(name: str, dtype: torch.dtype) -> tuple[str, torch.dtype]:
    """(model variant, cache dtype) of a sweep variant: ``mla_bf16`` is the MLA model with a bfloat16 cache."""
    return ("mla", torch.bfloat16) if name == "mla_bf16" else (name, dtype)


def bench_decode_sweep(sizes: Sizes, device: torch.device, dtype: torch.dtype, copy_bw: float, seed: int,
                       max_step_s: float, variants: Sequence[str] = SWEEP_VARIANTS,
                       log: Callable[[str], None] = lambda s: None, profile: bool = False) -> list[dict[str, Any]]:
    """Figure 3: one row per (variant, batch, context); skipped cells say why. ``mla_bf16`` (the same MLA
    model reading a bfloat16 cache) is left out when ``dtype`` is already bfloat16. With ``profile`` the MLA
    step at the longest context gets a profiler hotspot table (``row["profile"]``)."""
    variants = [v for v in variants if not (v == "mla_bf16" and dtype == torch.bfloat16)]
    max_ctx = max(sizes.contexts)
    models = decode_models(sizes.decode_kw, max_ctx + 1, device, dtype,
                           sorted({sweep_variant(v, dtype)[0] for v in variants}), seed)
    rows: list[dict[str, Any]] = []
    for batch in sizes.batches:
        for v in variants:
            base, cache_dtype = sweep_variant(v, dtype)
            model = models[base]
            per_token = kv_bytes_per_token(model.cfg, cache_dtype)
            prev: Optional[dict[str, Any]] = None
            for S in sorted(sizes.contexts):
                row: dict[str, Any] = {"variant": v, "batch": batch, "context": S, "kv_bytes_per_token": per_token,
                                       "kv_bytes_per_step": per_token * S * batch,
                                       "flops_per_step": decode_flops_per_token(model.cfg, S + 1) * batch,
                                       "cache_dtype": str(cache_dtype).replace("torch.", "")}
                rows.append(row)
                reason = _skip_reason(prev, S, batch, per_token, device, max_step_s, sizes.decode_iters)
                if reason:
                    row["skipped"] = reason
                    log(f"  {v:8s} B={batch} S={S}: skipped ({reason})")
                    continue
                with PeakMemory(device) as peak:
                    cache = model.new_cache(batch, S + 1, cache_dtype)
                    fill_cache_(cache, S, seed)
                    step = make_decode_step(model, cache, S, batch, device, seed)
                    times = time_interleaved({"step": step}, device, warmup=1, iters=sizes.decode_iters,
                                             min_time_s=sizes.decode_min_time_s, max_iters=20)["step"]
                if profile and v == "mla" and S == max_ctx:
                    row["profile"] = profile_top(step, device)
                del cache, step
                t = median(times)
                row.update(step_s=t, iters=len(times), tok_s=batch / t, kv_read_bw=row["kv_bytes_per_step"] / t,
                           flops_per_s=row["flops_per_step"] / t, peak_bytes=peak.bytes)
                row["bw_fraction"] = row["kv_read_bw"] / copy_bw
                prev = row
                log(f"  {v:8s} B={batch} S={S}: {t * 1e3:8.1f} ms/step, {row['tok_s']:8.1f} tok/s, "
                    f"{row['kv_read_bw'] / 1e9:6.2f} GB/s KV ({100 * row['bw_fraction']:.0f}% of copy)")
    return rows


def _skip_reason(prev: Optional[dict[str, Any]], S: int, batch: int, per_token: float, device: torch.device,
                 max_step_s: float, iters: int) -> Optional[str]:
    """Why the next (longer) context should not run, extrapolating linearly from the previous one."""
    avail = available_memory(device)
    if prev is None:
        need = 2 * per_token * S * batch  # the cache plus one copy of it
        if avail is not None and need > 0.8 * avail:
            return f"cache needs ~{need / 1e9:.1f} GB, {avail / 1e9:.1f} GB available"
        return None
    if "skipped" in prev:
        return "longer context skipped before"
    scale = S / prev["context"]
    if prev.get("peak_bytes") and avail is not None and prev["peak_bytes"] * scale > 0.8 * avail:
        return f"would need ~{prev['peak_bytes'] * scale / 1e9:.1f} GB, {avail / 1e9:.1f} GB available"
    if prev["step_s"] * scale > max_step_s:
        return f"would take ~{prev['step_s'] * scale:.1f} s/step > --max-step-s {max_step_s:g}"
    return None


# ---------------------------------------------------------------------- figure 5: sweep wall time
def sweep_wall_time(sweep_dir: str | os.PathLike) -> dict[str, Any]:
    """Wall time of a finished sweep from its results.json files.

    ``sum_wall_s``: sum of the runs' ``timings.wall_s`` (sequential cost); ``span_s``: from the earliest
    run start (file time - wall_s) to the latest results.json (elapsed time with parallel jobs).
    """
    root = Path(sweep_dir)
    if not root.is_dir():
        raise ResultsError(f"{root}: no such directory")
    walls, starts, ends, statuses, unreadable = [], [], [], {}, 0
    for path in sorted(root.rglob("results.json")):
        try:
            rec = read_json(path)
            wall = float(rec["timings"]["wall_s"])
            status = str(rec.get("status", "unknown"))
        except (ResultsError, KeyError, TypeError, ValueError):
            unreadable += 1
            continue
        statuses[status] = statuses.get(status, 0) + 1
        walls.append(wall)
        end = path.stat().st_mtime
        ends.append(end)
        starts.append(end - wall)
    if not walls:
        raise ResultsError(f"{root}: no results.json with timings.wall_s")
    return {
        "dir": str(root), "runs": len(walls), "statuses": statuses, "unreadable": unreadable,
        "sum_wall_s": sum(walls), "max_wall_s": max(walls), "span_s": max(ends) - min(starts),
    }


# ---------------------------------------------------------------------------------- profiling
def profile_top(fn: Callable[[], Any], device: torch.device, reps: int = 2, top: int = 8) -> list[dict[str, Any]]:
    """Top ops by self time over ``reps`` calls of fn (after one unprofiled call)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        sync(device)
    # operators only: on CUDA each kernel is also an event of its own, and its time is already its operator's
    # self device time (counting both would double the total)
    events = [e for e in prof.key_averages() if getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU]
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr, 0) for e in events) or 1
    rows = sorted(events, key=lambda e: getattr(e, attr, 0), reverse=True)[:top]
    return [{"op": e.key, "self_ms_per_call_of_fn": getattr(e, attr, 0) / 1e3 / reps,
             "share": getattr(e, attr, 0) / total, "calls_per_fn": e.count / reps} for e in rows]


# ------------------------------------------------------------------------------------- report
def _fmt(x: Optional[float], unit: str = "", digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:,.{digits}f}{unit}"


def train_target(device: str) -> float:
    """Figure 1's target on a device ('cpu', 'cuda', 'cuda:1', ...)."""
    return TARGET_TRAIN_RATIO[device.split(":")[0]]


def _status(value: Optional[float], target: float, quick: bool) -> str:
    if value is None:
        return "not measured"
    if quick:
        return "quick run: not assessed"
    return "met" if value >= target else "MISSED"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def summary_rows(res: dict[str, Any], quick: bool) -> list[list[str]]:
    """The one table: every figure, measured or marked, with its target and status."""
    rows: list[list[str]] = []
    t = res.get("train")
    target = train_target(res["machine"]["device"])
    if t:
        rows.append([f"1. training throughput, fwd+bwd+AdamW, MLA+MoE ours vs HF DeepseekV3 (its defaults: "
                     f"{t['hf_implementations']['hf']})", _fmt(t["tok_s"]["ours"], " tok/s"),
                     _fmt(t["tok_s"]["hf"], " tok/s"), _fmt(t["ratio"], "x", 2), f">= {target}x",
                     _status(t["ratio"], target, quick)])
        for i, (name, ratio) in enumerate(t["ratios"].items()):
            letter = "bcdefgh"[i]
            if name.startswith("hf"):
                rows.append([f"1{letter}. same, vs HF DeepseekV3 with {t['hf_implementations'][name]} (for information)",
                             _fmt(t["tok_s"]["ours"], " tok/s"), _fmt(t["tok_s"][name], " tok/s"),
                             _fmt(ratio, "x", 2), "-", "info"])
            else:  # ours_loop_experts
                rows.append([f"1{letter}. ours with a per-expert loop instead of grouped GEMMs (`MoE.grouped_mm = False`) "
                             "vs HF's defaults (for information)", _fmt(t["tok_s"][name], " tok/s"),
                             _fmt(t["tok_s"]["hf"], " tok/s"), _fmt(ratio, "x", 2), "-", "info"])
    else:
        rows.append(["1. training throughput, ours vs HF DeepseekV3", "not run", "", "", f">= {target}x", "not run"])
    a = res.get("absorb")
    if a:
        rows.append([f"2. MLA decode tok/s at context {a['context']:,}, absorbed vs naive (batch 1)",
                     _fmt(a["tok_s"]["absorb"], " tok/s", 2), _fmt(a["tok_s"]["naive"], " tok/s", 2),
                     _fmt(a["ratio"], "x", 2), f">= {TARGET_ABSORB_RATIO:g}x",
                     _status(a["ratio"], TARGET_ABSORB_RATIO, quick)])
    else:
        rows.append(["2. MLA decode, absorbed vs naive", "not run", "", "", f">= {TARGET_ABSORB_RATIO:g}x", "not run"])
    sweep = res.get("sweep")
    if sweep is not None:
        ctx = max(r["context"] for r in sweep)
        for batch in sorted({r["batch"] for r in sweep}):
            cell = next(r for r in sweep if r["variant"] == "mla" and r["batch"] == batch and r["context"] == ctx)
            label = f"3. MLA absorbed decode KV-read bandwidth at context {ctx:,}, batch {batch}, fraction of copy bw"
            if "skipped" in cell:
                rows.append([label, f"skipped: {cell['skipped']}", _fmt(res["copy"]["median_bw"] / 1e9, " GB/s", 2),
                             "-", f">= {TARGET_BW_FRACTION:.0%}", "not measured"])
                continue
            rows.append([label, _fmt(cell["kv_read_bw"] / 1e9, " GB/s", 2),
                         _fmt(res["copy"]["median_bw"] / 1e9, " GB/s copy", 2),
                         f"{cell['bw_fraction']:.1%}", f">= {TARGET_BW_FRACTION:.0%}",
                         _status(cell["bw_fraction"], TARGET_BW_FRACTION, quick)])
        for batch in sorted({r["batch"] for r in sweep}):
            cell = next((r for r in sweep if r["variant"] == "mla_bf16" and r["batch"] == batch
                         and r["context"] == ctx and "tok_s" in r), None)
            if cell:
                rows.append([f"3b. same, MLA absorbed with a bf16 cache (`new_cache(dtype=torch.bfloat16)`), batch "
                             f"{batch} (for information)", _fmt(cell["kv_read_bw"] / 1e9, " GB/s", 2),
                             _fmt(res["copy"]["median_bw"] / 1e9, " GB/s copy", 2), f"{cell['bw_fraction']:.1%}",
                             "-", "info"])
        for batch in sorted({r["batch"] for r in sweep}):  # what the smaller cache buys, at the longest context
            cells = {r["variant"]: r for r in sweep if r["batch"] == batch and r["context"] == ctx and "tok_s" in r}
            if "mla" in cells and len(cells) > 1:
                others = [v for v in ("mha", "gqa") if v in cells]
                rows.append([f"3'. decode tok/s at context {ctx:,}, batch {batch}: MLA absorbed vs "
                             + " / ".join(o.upper() for o in others) + " (for information)",
                             _fmt(cells["mla"]["tok_s"], " tok/s", 2),
                             " / ".join(_fmt(cells[o]["tok_s"], " tok/s", 1) for o in others),
                             " / ".join(_fmt(cells["mla"]["tok_s"] / cells[o]["tok_s"], "x", 2) for o in others),
                             "-", "info"])
    else:
        rows.append(["3. MLA vs MHA vs GQA decode sweep", "not run", "", "", f">= {TARGET_BW_FRACTION:.0%}", "not run"])
    sp = res.get("spectra")
    if sp:
        small, large = sp["counts"]
        rows.append([f"4. streaming spectra, dim {sp['dim']}: Gram accumulation tokens/s; peak RSS at {large:,} vs "
                     f"{small:,} tokens", _fmt(sp["tok_s"], " tok/s", 0),
                     f"{sp['runs'][large]['peak_kb'] / 1024:,.0f} vs {sp['runs'][small]['peak_kb'] / 1024:,.0f} MiB",
                     _fmt(sp["mem_ratio"], "x", 3), f"<= {TARGET_SPECTRA_MEM_RATIO:.2f}x",
                     "met" if sp["mem_ratio"] <= TARGET_SPECTRA_MEM_RATIO else ("info" if quick else "MISSED")])
    else:
        rows.append(["4. streaming spectra", "not run", "", "", f"<= {TARGET_SPECTRA_MEM_RATIO:.2f}x", "not run"])
    w = res.get("sweep_wall")
    if w:
        st = ", ".join(f"{k} {v}" for k, v in sorted(w["statuses"].items()))
        rows.append([f"5. rank-sweep wall time (`{w['dir']}`, {w['runs']} runs: {st})",
                     _fmt(w["span_s"], " s elapsed", 0), _fmt(w["sum_wall_s"], " s summed", 0),
                     f"longest run {w['max_wall_s']:.0f} s", "-", "info"])
    else:
        rows.append(["5. rank-sweep wall time", "not given (--sweep-dir DIR)", "", "", "-", "n/a"])
    return rows


def sweep_table(sweep: list[dict[str, Any]]) -> str:
    rows = []
    for r in sweep:
        head = [VARIANT_LABELS.get(r["variant"], r["variant"]), r["batch"], f"{r['context']:,}", f"{r['kv_bytes_per_token']:,.0f}",
                _fmt(r["kv_bytes_per_step"] / 1e6, "", 1)]
        if "skipped" in r:
            rows.append(head + ["-", "-", "-", f"skipped: {r['skipped']}", "-"])
            continue
        rows.append(head + [_fmt(r["step_s"] * 1e3, "", 2), _fmt(r["tok_s"], "", 1), _fmt(r["kv_read_bw"] / 1e9, "", 2),
                            f"{r['bw_fraction']:.1%}", _fmt(r["flops_per_s"] / 1e9, "", 1)])
    return _table(["attention", "batch", "context", "KV B/token", "KV MB/step", "ms/step", "tok/s", "KV-read GB/s",
                   "of copy bw", "GFLOP/s"], rows)


def _cfg_line(cfg: ModelConfig, keys: Sequence[str]) -> str:
    return ", ".join(f"{k}={getattr(cfg, k)}" for k in keys)


def render(res: dict[str, Any], argv: Sequence[str]) -> str:
    """The markdown body of one device section."""
    info, quick = res["machine"], res["quick"]
    out = [f"## {info['device']}{' (quick)' if quick else ''}: {info['date']}", ""]
    cores = f"{info['cores']} cores ({info['usable_cores']} usable)"
    caches = "; ".join(x for x in (info.get("cpu_caches"), info.get("cpu_flags")) if x)
    caches = f" ({caches})" if caches else ""
    out.append(f"Machine: {info['cpu']}{caches}, {cores}" + (f", GPU {info['gpu']}" if "gpu" in info else "")
               + f"; torch {info['torch']} ({info['threads']} threads), transformers {info['transformers']}, "
                 f"Python {info['python']}; dtype {info['dtype']}; git {info['git_commit']}"
               + "".join(f"; {k}={v}" for k, v in (info.get("env") or {}).items()) + ".")
    out.append("")
    cmd = " ".join(["python -m mla_analysis.bench", *argv])
    out.append(f"Command: `{cmd}`; bench wall time {res['wall_s']:.0f} s.")
    la0, other = res.get("load_before"), res.get("other_cpu_cores")
    facts = []
    if la0 is not None:
        facts.append(f"load average (1 min) at start {la0[0]:.2f}")
    if other is not None:
        facts.append(f"other processes used {other:.2f} of {info['cores']} cores on average during the run")
    if facts:
        # the load average lags (it still counts what ran a minute ago), so prefer the measured share
        cores = info["usable_cores"] or 1
        busy = other > 0.05 * cores if other is not None else la0[0] > 0.5 * cores
        out += ["", "Background: " + "; ".join(facts) + "."
                + (" **The machine was busy with other work during this run; absolute numbers (and, less so, "
                   "the interleaved ratios) may be affected.**" if busy else " The machine was otherwise quiet.")]
    if res.get("note"):
        out += ["", f"Note: {res['note']}"]
    out += ["", "### Summary", "", _table(["figure", "measured", "baseline", "ratio", "target", "status"],
                                          summary_rows(res, quick)), ""]
    t = res.get("train")
    if t:
        cfg = t["config"]
        out.append(f"Figure 1 model: {_cfg_line(cfg, ['d_model', 'n_layers', 'n_heads', 'kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim', 'n_routed_experts', 'n_activated_experts', 'n_shared_experts', 'moe_d_ff', 'vocab_size', 'score_func'])}; "
                   f"batch {t['batch']} x seq {t['seq']} = {t['tokens_per_step']} tokens/step; "
                   f"{len(t['times']['ours'])} timed steps each (median), interleaved. "
                   "Max |logit diff| before timing: "
                   + ", ".join(f"{k} {v:.1e}" for k, v in t["max_logit_diff"].items()) + ".")
        out.append("")
    a = res.get("absorb")
    if a:
        cfg = a["config"]
        out.append(f"Figure 2 model: 1 layer, {_cfg_line(cfg, ['d_model', 'n_heads', 'kv_lora_rank', 'qk_rope_head_dim', 'qk_nope_head_dim', 'v_head_dim', 'd_ff', 'vocab_size'])}; "
                   f"cache filled with random latents; median ms/step absorbed {median(a['times']['absorb']) * 1e3:.1f}, "
                   f"naive {median(a['times']['naive']) * 1e3:.1f}; max |next-token logit diff| {a['max_logit_diff']:.1e}.")
        out.append("")
    if res.get("sweep") is not None:
        c = res["copy"]
        shape = res["decode_shape"]
        out += ["### 3. Decode sweep: MLA (absorbed) vs MHA vs GQA", "",
                f"One layer each, d_model {shape['d_model']}, {shape['n_heads']} query heads; MHA/GQA head_dim "
                f"{shape['head_dim']} (GQA: {shape['gqa_kv_heads']} K/V heads); MLA as figure 2. KV bytes from "
                f"`accounting.kv_bytes_per_token` in the cache dtype ({info['dtype']}; "
                f"bfloat16 for 'mla, bf16 cache': the same model and weights reading a bf16 cache). Copy bandwidth "
                f"(`copy_` of {c['bytes'] / 2**20:.0f} MiB, read+write bytes): median {c['median_bw'] / 1e9:.2f} GB/s, "
                f"best {c['best_bw'] / 1e9:.2f} GB/s."
                + (f" CPU caches: {info['cpu_caches']}; a cache smaller than the last level is partly read from "
                   "there, not from DRAM." if info.get("cpu_caches") and info["device"] == "cpu" else ""),
                "", sweep_table(res["sweep"]), ""]
    profiles = dict(res.get("profile") or {})
    for r in res.get("sweep") or []:
        if r.get("profile"):
            profiles[f"figure 3, MLA absorbed decode step at {r['context']:,}, batch {r['batch']}"] = r["profile"]
    if profiles:
        out += ["### Profile (torch.profiler, top ops by self time)", ""]
        for name, prof in profiles.items():
            out += [f"{name}:", "", _table(["op", "self ms per call", "share", "calls per call"],
                                           [[p["op"], f"{p['self_ms_per_call_of_fn']:.1f}", f"{p['share']:.0%}",
                                             f"{p['calls_per_fn']:.0f}"] for p in prof]), ""]
    return "\n".join(out).rstrip() + "\n"


def merge_section(existing: str, key: str, body: str) -> str:
    """BENCHMARKS.md text with the section ``key`` replaced (or added); other sections are kept."""
    sections = {m.group("key"): m.group("body") for m in SECTION_RE.finditer(existing)}
    sections[key] = body
    order = sorted(sections, key=lambda k: (k != "cpu", k))
    parts = [HEADER]
    for k in order:
        parts.append(f"<!-- bench:{k}:begin -->\n{sections[k].rstrip()}\n<!-- bench:{k}:end -->\n\n")
    return "".join(parts).rstrip() + "\n"


def write_report(path: str | os.PathLike, key: str, body: str) -> Path:
    p = Path(path)
    existing = p.read_text(encoding="utf-8") if p.exists() else ""
    return atomic_write_text(p, merge_section(existing, key, body))


# --------------------------------------------------------------------------------------- main
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mla_analysis.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default cpu: targets are for CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp32 on CPU, bf16 on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds); writes nothing unless --out is given")
    p.add_argument("--out", default=None, help=f"report file (default {DEFAULT_OUT}; none with --quick)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--sections", default="1,2,3,4", help="figures to run, e.g. 1,3 (5 needs --sweep-dir)")
    p.add_argument("--sweep-dir", default=None, help="a finished sweep directory: report its wall time (figure 5)")
    p.add_argument("--contexts", default=None, help="figure 3 contexts, comma separated (default 1k..32k)")
    p.add_argument("--batches", default=None, help="figure 3 batch sizes, comma separated (default 1,8)")
    p.add_argument("--train-iters", type=int, default=None, help="timed training steps per model")
    p.add_argument("--max-step-s", type=float, default=6.0,
                   help="figure 3: skip a context whose step is predicted to take longer than this")
    p.add_argument("--no-eager-experts", action="store_true", help="figure 1: skip the HF eager-experts row")
    p.add_argument("--no-eager-attention", action="store_true", help="figure 1: skip the HF eager-attention row")
    p.add_argument("--profile", action="store_true", help="add torch.profiler hotspots of figures 1, 2 and 3 (MLA)")
    p.add_argument("--note", default=None, help="a line recorded with the results")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def cli_device(name: str) -> torch.device:
    """The trainer's device resolution ('auto' -> cuda when available), as a CLI error when CUDA is missing."""
    from ..config import ConfigError
    from ..training.trainer import resolve_device as resolve

    try:
        return resolve(name)
    except ConfigError as e:
        raise SystemExit(f"--device {name}: {e}") from None


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the selected figures; returns everything measured (``_``-prefixed keys hold live objects)."""
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, log)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    t_start = time.perf_counter()
    device = cli_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    sizes = make_sizes(args.quick, device)
    if args.contexts:
        sizes.contexts = [int(c) for c in args.contexts.split(",")]
    if args.batches:
        sizes.batches = [int(b) for b in args.batches.split(",")]
    if args.train_iters:
        sizes.train_iters = args.train_iters
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    other = OtherCpuLoad().__enter__()
    res: dict[str, Any] = {"quick": args.quick, "machine": machine_info(device, dtype), "load_before": load_average(),
                           "note": args.note, "decode_shape": sizes.decode_kw}
    log(f"bench on {res['machine']['cpu']} ({device}, {res['machine']['threads']} threads, {res['machine']['dtype']})")
    if "1" in sections:
        log("1. training throughput ...")
        skip = {"hf_eager_experts": args.no_eager_experts, "hf_eager_attention": args.no_eager_attention}
        res["train"] = bench_train(sizes, device, dtype, args.seed, hf_variants=[k for k in HF_VARIANTS if not skip[k]])
        log("   " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in res["train"]["tok_s"].items())
            + f"; ratio {res['train']['ratio']:.2f}x")
    if "2" in sections:
        log("2. absorbed vs naive MLA decode ...")
        res["absorb"] = bench_absorb(sizes, device, dtype, args.seed)
        log(f"   absorbed {res['absorb']['tok_s']['absorb']:.2f} tok/s, naive {res['absorb']['tok_s']['naive']:.2f} "
            f"tok/s; ratio {res['absorb']['ratio']:.2f}x")
    if "3" in sections:
        log("3. decode sweep ...")
        res["copy"] = measure_copy_bandwidth(device, sizes.copy_bytes, sizes.copy_reps)
        log(f"   copy bandwidth {res['copy']['median_bw'] / 1e9:.2f} GB/s (read+write)")
        res["sweep"] = bench_decode_sweep(sizes, device, dtype, res["copy"]["median_bw"], args.seed,
                                          args.max_step_s, log=log, profile=args.profile)
    if "4" in sections:
        log("4. streaming spectra ...")
        res["spectra"] = bench_spectra(device, args.quick)
        log(f"   {res['spectra']['tok_s']:,.0f} tok/s; peak RSS ratio {res['spectra']['mem_ratio']:.3f}")
    if args.sweep_dir:
        res["sweep_wall"] = sweep_wall_time(args.sweep_dir)
    if args.profile:
        res["profile"] = {}
        if "train" in res:
            for k, step in res["train"]["_steps"].items():
                res["profile"][f"figure 1, training step, {k}"] = profile_top(step, device)
        if "absorb" in res:
            for k, step in res["absorb"]["_steps"].items():
                res["profile"][f"figure 2, decode step at {res['absorb']['context']:,}, {k}"] = profile_top(step, device)
    for key in ("train", "absorb"):  # drop live models before writing
        if key in res:
            res[key] = {k: v for k, v in res[key].items() if not k.startswith("_")}
    res["load_after"] = load_average()
    other.__exit__(None, None, None)
    res["other_cpu_cores"] = other.cores
    res["wall_s"] = time.perf_counter() - t_start
    return res


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    res = run(args)
    body = render(res, argv)
    print()
    print(body)
    out = args.out if args.out else (None if args.quick else DEFAULT_OUT)
    if out and not args.no_write:
        key = cli_device(args.device).type
        path = write_report(out, key, body)
        print(f"wrote {path}")
        res["out"] = str(path)
    res["markdown"] = body
    return res


if __name__ == "__main__":
    main()
