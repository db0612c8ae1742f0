"""Command line: ``python -m mla_analysis.bench`` (parse the flags, run the figures, render, write)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Optional, Sequence

import torch

from ..metrics.timing import profile_top
from .machine import OtherCpuLoad, load_average, machine_info, measure_copy_bandwidth
from .sizes import make_sizes
from .spectra import bench_spectra
from .train_step import HF_VARIANTS, bench_train
from .absorb import bench_absorb
from .decode_sweep import bench_decode_sweep
from .sweep_time import sweep_wall_time
from .render import DEFAULT_OUT, render, write_report

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
    if "--real" in argv:  # the real-model figures (issue 22): mla_analysis/bench/real.py, its own options
        import importlib

        # real builds on this package's timers and report writer; importing it by name keeps the
        # import graph one way (bench.real -> bench)
        return importlib.import_module("mla_analysis.bench.real").main(argv)
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
