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

``--real`` runs the real-model figures instead (SmolLM2-135M vs transformers: ``mla_analysis/bench/real.py``).
``--quick`` shrinks every size (a few seconds; used by the tests) and does not write BENCHMARKS.md
unless ``--out`` is given. ``--profile`` adds torch.profiler hotspot tables for figures 1 and 2 and for the
MLA decode step at the longest context of figure 3.
"""

from __future__ import annotations

from ..metrics.timing import BenchError, median, profile_top, sync, time_decode, time_interleaved
from .machine import (OtherCpuLoad, PeakMemory, available_memory, cache_sizes, cpu_flags, cpu_model, load_average,
    machine_info, measure_copy_bandwidth)
from .sizes import Sizes, decode_config, decode_shape, make_sizes, train_config
from .spectra import bench_spectra
from .train_step import (HF_VARIANTS, bench_train, build_train_pair, cast_params_, check_train_parity, forward_logits,
    hf_implementations, make_train_step, random_batch, randomise_router_bias)
from .decode import check_decode_parity, decode_models, fill_cache_, make_decode_step, parity_atol
from .absorb import bench_absorb
from .decode_sweep import SWEEP_VARIANTS, VARIANT_LABELS, bench_decode_sweep, skip_reason, sweep_variant
from .sweep_time import sweep_wall_time
from .render import (DEFAULT_OUT, HEADER, SECTION_RE, TARGET_ABSORB_RATIO, TARGET_BW_FRACTION,
    TARGET_SPECTRA_MEM_RATIO, TARGET_TRAIN_RATIO, merge_section, render, summary_rows, sweep_table, train_target,
    write_report)
from .cli import DTYPES, cli_device, main, parse_args, run
