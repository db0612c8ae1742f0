"""Machine facts recorded beside every number: CPU, caches, memory, load, copy bandwidth."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..training.results import git_commit
from ..metrics.timing import median, time_interleaved


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
