"""Run records: atomic file writes, the flat results.json record, and reading records back.

Every run directory holds one ``results.json``: ``status`` (ok | failed | interrupted), the resolved
``config`` (nested), ``flat`` (config flattened to dotted keys plus ``metrics.*``), ``metrics``,
``timings``, ``env`` and the eval ``history``. Tables are built from these records only.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

RESULTS_FILE = "results.json"
STATUSES = ("ok", "failed", "interrupted")
# folders where a tracker keeps copies of records (MLflow artifact stores): those copies are not run directories
TRACKER_DIRS = ("mlartifacts", "mlruns")


class ResultsError(ValueError):
    """A results file is missing, truncated or not a results record; the message names the file."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600: keep the mode a plain open() would give
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write a text file (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _sanitize(o: Any) -> Any:
    """Replace NaN/inf by None so the file stays strict JSON."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, Mapping):
        return {str(k): _sanitize(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_sanitize(v) for v in o]
    return o


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Atomically write strict JSON (NaN/inf become null); ``indent=None``: compact, for large matrix records."""
    text = json.dumps(_sanitize(obj), indent=indent, sort_keys=False, default=_json_default, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, raising ResultsError naming the file when it is missing or corrupt."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path}: corrupt or truncated JSON ({e})") from None


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> {dotted.key: leaf}; lists are kept as leaves."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit() -> str:
    """The source tree's git commit (with '-dirty' when it has uncommitted changes), or 'unknown'."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str, seed: int) -> dict[str, Any]:
    """Machine facts recorded with every run."""
    import torch

    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "seed": seed,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _keep_nonfinite(o: Any) -> Any:
    """Config values inf/nan as the strings 'inf'/'nan' (JSON has no such numbers; null would hide them)."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, Mapping):
        return {k: _keep_nonfinite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_keep_nonfinite(v) for v in o]
    return o


def make_record(status: str, config: Mapping[str, Any], metrics: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """A results.json record with the flat view tables are built from."""
    config = _keep_nonfinite(dict(config)) if config else {}
    flat = flatten({"config": dict(config)}) if config else {}
    flat = {k[len("config."):]: v for k, v in flat.items()}
    flat.update({f"metrics.{k}": v for k, v in flatten(dict(metrics)).items()})
    flat["status"] = status
    return {"status": status, "config": dict(config), "metrics": dict(metrics), "flat": flat, **extra}


def load_record(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check a run directory's results.json."""
    path = Path(run_dir) / RESULTS_FILE
    rec = read_json(path)
    if not isinstance(rec, dict) or "status" not in rec or "flat" not in rec:
        raise ResultsError(f"{path}: not a results record (needs 'status' and 'flat')")
    if rec["status"] not in STATUSES:
        raise ResultsError(f"{path}: not a results record (status {rec['status']!r}, allowed: {', '.join(STATUSES)})")
    for key in ("flat", "metrics", "config"):
        if not isinstance(rec.get(key, {}), dict):
            raise ResultsError(f"{path}: not a results record ('{key}' is {type(rec[key]).__name__}, not an object)")
    if rec["status"] == "ok" and "metrics" not in rec:
        raise ResultsError(f"{path}: not a results record (status ok without 'metrics')")
    rec["run_dir"] = str(Path(run_dir))
    return rec


def is_finished(run_dir: str | os.PathLike) -> bool:
    """True when the run directory holds a valid results.json with status ok."""
    try:
        return load_record(run_dir)["status"] == "ok"
    except ResultsError:
        return False


def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run directories under the given paths: those holding results.json or a Hydra .hydra/ folder."""
    found: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise ResultsError(f"{p}: no such directory")
        candidates = [p] + [q.parent for q in p.rglob(RESULTS_FILE)] + [q.parent for q in p.rglob(".hydra")]
        for c in candidates:
            if set(c.relative_to(p).parts) & set(TRACKER_DIRS):
                continue
            if (c / RESULTS_FILE).exists() or (c / ".hydra" / "config.yaml").exists():
                found.add(c)
    return sorted(found)
