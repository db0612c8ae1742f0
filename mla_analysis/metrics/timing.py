"""Timing harness: synchronised timers, A/B interleaving, medians, profiler hotspots (the bench's and the cost probe's)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Optional, Sequence

import torch


class BenchError(RuntimeError):
    """A benchmark precondition failed (e.g. the compared models disagree)."""


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


def time_decode(core, S: int, B: int, steps: int, vocab: int, device: torch.device):
    """Prefill ``S`` random tokens into a fresh cache of ``core``, then ``steps`` greedy single-token decode steps;
    returns (prefill seconds, per-step seconds, first decode logits [B, V]). The probes' and the claims' decode timer."""
    g = torch.Generator().manual_seed(1234 + S + B)
    prompt = torch.randint(0, vocab, (B, S), generator=g).to(device)
    cache = core.new_cache(B, S + steps)
    sync(device)
    t0 = time.perf_counter()
    logits = core(prompt, cache=cache)[:, -1]  # (B, V)
    sync(device)
    prefill = time.perf_counter() - t0
    nxt = logits.argmax(-1, keepdim=True)  # (B, 1)
    lat, first = [], None
    for _ in range(steps):
        t = time.perf_counter()
        logits = core(nxt, cache=cache)[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        sync(device)
        lat.append(time.perf_counter() - t)
        first = logits.float().cpu() if first is None else first
    return prefill, lat, first
