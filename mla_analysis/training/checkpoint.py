"""Checkpoints in safetensors (model and optimizer state), written atomically (``hf_io.load_model`` reads any model source).

Layout of a run directory:
    model_config.json                  the ModelConfig (written before training starts)
    checkpoints/step-000123/           model.safetensors, optimizer.safetensors, state.json
    checkpoints/LATEST                 name of the newest complete checkpoint folder
A checkpoint folder is written under a temporary name and renamed when complete, and LATEST is
replaced atomically afterwards, so a crash never leaves LATEST pointing at a partial checkpoint.
Nothing here unpickles: tensors go through safetensors, everything else through JSON.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import ModelConfig
from .results import ResultsError, atomic_write_json, atomic_write_text, read_json

MODEL_CONFIG_FILE = "model_config.json"
CKPT_DIR = "checkpoints"
STEP_NAME = re.compile(r"step-\d+")


class CheckpointError(ResultsError):
    """A checkpoint is missing, truncated or inconsistent; the message names the file."""


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Model tensors with tied weights stored once (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, t in model.state_dict().items():
        ptr = t.data_ptr()
        if ptr in seen and t.numel() > 0:
            continue  # a tied alias (e.g. head.weight = embed.weight)
        seen[ptr] = name
        out[name] = t.detach().contiguous().cpu()
    return out


def save_checkpoint(
    run_dir: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    step: int,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoints/step-N atomically, point LATEST at it, and keep the newest ``keep``."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(_state_dict_for_save(model), str(tmp / "model.safetensors"))
        meta: dict[str, Any] = {}
        if optimizer is not None:
            tensors, meta = _optimizer_to_flat(optimizer)
            save_file(tensors, str(tmp / "optimizer.safetensors"))
        atomic_write_json(tmp / "state.json", {"step": step, "optimizer": meta, **state})
    except BaseException as e:  # a full disk: give the partial folder's space back
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, SafetensorError):  # its I/O errors, as the OSError they are (callers catch OSError)
            raise OSError(f"{tmp}: {e}") from None
        raise
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_text(root / "LATEST", name + "\n")
    old = [p for p in checkpoint_folders(run_dir) if p.name != name]
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def checkpoint_folders(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoint folders (step-N, renamed into place only when written), oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_NAME.fullmatch(p.name)), key=lambda p: int(p.name[5:]))


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[Path]:
    """The folder LATEST names, or None when the run has no checkpoint."""
    pointer = Path(run_dir) / CKPT_DIR / "LATEST"
    if not pointer.exists():
        return None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{pointer}: not UTF-8 text (allowed: the name of a step-N folder)") from None
    except OSError as e:
        raise CheckpointError(f"{pointer}: cannot be read ({e.strerror})") from None
    if not STEP_NAME.fullmatch(name):
        shown = repr(name[:40]) if name else "empty"
        raise CheckpointError(f"{pointer}: {shown} is not a checkpoint name (allowed: step-N, e.g. step-0000100)")
    folder = pointer.parent / name
    if not folder.is_dir():
        raise CheckpointError(f"{pointer}: names {folder.name}, which does not exist")
    return folder


def resume_checkpoint(run_dir: str | os.PathLike) -> tuple[Optional[Path], Optional[str]]:
    """The checkpoint to resume from and a one-line note when LATEST was missing and the newest folder is used."""
    folder = latest_checkpoint(run_dir)
    if folder is not None:
        return folder, None
    folders = checkpoint_folders(run_dir)
    if not folders:
        return None, None
    pointer = Path(run_dir) / CKPT_DIR / "LATEST"
    return folders[-1], f"{pointer} is missing: resuming from {folders[-1].name}, the newest complete checkpoint"


def check_fresh_start(run_dir: str | os.PathLike) -> None:
    """Refuse a fresh run into a directory holding checkpoints, so pruning only ever sees one run's steps."""
    folders = checkpoint_folders(run_dir)
    if folders:
        raise CheckpointError(
            f"{Path(run_dir) / CKPT_DIR}: holds {folders[-1].name} of an earlier run "
            "(allowed: train.resume=true to continue it, or another run directory)"
        )


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None


def load_checkpoint(
    folder: str | os.PathLike, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None
) -> dict[str, Any]:
    """Load model (and optimizer) state from a checkpoint folder; returns its state.json."""
    folder = Path(folder)
    state = read_json(folder / "state.json")
    tensors = _load_tensors(folder / "model.safetensors")
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{folder / 'model.safetensors'}: does not fit the model ({e})") from None
    tied = {"head.weight"} if getattr(getattr(model, "cfg", None), "tie_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{folder / 'model.safetensors'}: missing {missing[:3]} unexpected {unexpected[:3]}")
    if optimizer is not None:
        _optimizer_from_flat(optimizer, _load_tensors(folder / "optimizer.safetensors"), state.get("optimizer", {}))
    return state


def save_model_config(run_dir: str | os.PathLike, cfg: ModelConfig) -> None:
    """Write model_config.json so the run directory can rebuild its model."""
    atomic_write_json(Path(run_dir) / MODEL_CONFIG_FILE, cfg.to_dict())
