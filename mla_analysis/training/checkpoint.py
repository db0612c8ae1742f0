"""Checkpoints in safetensors (model and optimizer state), written atomically (``hf_io.load_model`` reads any model source).

Layout of a run directory:
    model_config.json                  the ModelConfig (written before training starts)
    checkpoints/step-000123/           model.safetensors, optimizer.safetensors, state.json
    checkpoints/LATEST                 name of the newest complete checkpoint folder
A sharded run (``train.parallel=fsdp``) writes, instead of the two tensor files, one pair per rank:
    model-rank00000-of-00002.safetensors, optimizer-rank00000-of-00002.safetensors, shards.json
each rank's file holding its dim-0 chunk (``torch.chunk``, FSDP2's layout) of every sharded tensor, rank 0's
also the unsharded ones (buffers, step counters); shards.json lists the sharded names and global shapes.
``load_checkpoint`` reads such a folder into a sharded model at any world size (chunks are re-cut when it
differs) or, concatenated, into a plain one (``hf_io.load_model`` of a sharded run's directory works).
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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..config import ModelConfig
from .results import ResultsError, atomic_write_json, atomic_write_text, read_json

MODEL_CONFIG_FILE = "model_config.json"
CKPT_DIR = "checkpoints"
STEP_NAME = re.compile(r"step-\d+")
SHARDS_FILE = "shards.json"


class CheckpointError(ResultsError):
    """A checkpoint is missing, truncated or inconsistent; the message names the file."""


def _optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):  # a DTensor (sharded run) stays one: its shard is taken at saving
                tensors[f"state.{idx}.{name}"] = value.detach() if _is_dtensor(value) else value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


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
    """Load model (and optimizer) state from a checkpoint folder (plain or sharded); returns its state.json."""
    folder = Path(folder)
    state = read_json(folder / "state.json")
    if (folder / SHARDS_FILE).exists():
        _load_sharded(folder, model, optimizer, state)
        return state
    _load_full(folder, model, optimizer, state, _load_tensors(folder / "model.safetensors"),
               lambda: _load_tensors(folder / "optimizer.safetensors"))
    return state


def _load_full(folder: Path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], state: dict[str, Any],
               tensors: dict[str, torch.Tensor], optimizer_tensors) -> None:
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{folder / 'model.safetensors'}: does not fit the model ({e})") from None
    tied = {"head.weight"} if getattr(getattr(model, "cfg", None), "tie_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{folder / 'model.safetensors'}: missing {missing[:3]} unexpected {unexpected[:3]}")
    if optimizer is not None:
        _optimizer_from_flat(optimizer, optimizer_tensors(), state.get("optimizer", {}))


def _shard_name(kind: str, rank: int, world: int) -> str:
    return f"{kind}-rank{rank:05d}-of-{world:05d}.safetensors"


def _local(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(this rank's tensor, whether it is a dim-0 shard) of a parameter / state entry (DTensor or plain)."""
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(t, DTensor):
        if tuple(t.placements) != (Shard(0),):
            raise CheckpointError(f"sharded checkpoint: placements {t.placements} (allowed: one mesh dim, Shard(0))")
        return t.to_local().detach().contiguous().cpu(), True
    return t.detach().contiguous().cpu(), False


def _model_entries(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (tied ones once) and persistent buffers by name, as the module holds them (DTensors when sharded)."""
    out: dict[str, torch.Tensor] = dict(model.named_parameters())  # remove_duplicate: head.weight = embed.weight once
    persistent = set(model.state_dict().keys())
    out.update({k: b for k, b in model.named_buffers() if k in persistent})
    return out


def save_sharded_checkpoint(
    run_dir: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    step: int,
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Collective (every rank calls it): each rank writes its shards, rank 0 state.json, LATEST and the pruning.

    A write failing on any rank fails it on all (OSError everywhere, the partial folder removed), so the
    ranks agree on what was saved.
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(run_dir) / CKPT_DIR
    name = f"step-{step:07d}"
    tmp = root / f".tmp-{name}"
    error: Optional[BaseException] = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            error = e
    failed = _any_rank(error is not None)  # the folder exists on every rank's view from here on
    if not failed:
        try:
            shapes: dict[str, dict[str, list[int]]] = {"model": {}, "optimizer": {}}
            tensors: dict[str, torch.Tensor] = {}
            for key, t in _model_entries(model).items():
                local, sharded = _local(t)
                if sharded:
                    shapes["model"][key] = list(t.shape)
                if sharded or rank == 0:
                    tensors[key] = local
            save_file(tensors, str(tmp / _shard_name("model", rank, world)))
            meta: dict[str, Any] = {}
            if optimizer is not None:
                flat, meta = _optimizer_to_flat(optimizer)  # DTensor values come out as they are
                opt_tensors: dict[str, torch.Tensor] = {}
                for key, t in flat.items():
                    local, sharded = _local(t)
                    if sharded:
                        shapes["optimizer"][key] = list(t.shape)
                    if sharded or rank == 0:
                        opt_tensors[key] = local
                save_file(opt_tensors, str(tmp / _shard_name("optimizer", rank, world)))
            if rank == 0:
                atomic_write_json(tmp / SHARDS_FILE, {"world_size": world, "dim": 0, "optimizer": optimizer is not None,
                                                      **shapes})
                atomic_write_json(tmp / "state.json", {"step": step, "optimizer": meta, **state})
        except (OSError, SafetensorError) as e:
            error = e
        failed = _any_rank(error is not None)
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"{tmp}: sharded checkpoint not written ({error if error is not None else 'failed on another rank'})")
    if rank == 0:
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(root / "LATEST", name + "\n")
        old = [p for p in checkpoint_folders(run_dir) if p.name != name]
        for p in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()  # nobody resumes or prunes past a folder rank 0 is still renaming
    return root / name


def _any_rank(flag: bool) -> bool:
    import torch.distributed as dist

    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class _ShardReader:
    """Reads a sharded folder's tensors: whole (chunks concatenated) or this rank's chunk at any world size."""

    def __init__(self, folder: Path, kind: str):
        self.folder, self.kind = folder, kind
        index = read_json(folder / SHARDS_FILE)
        self.world = int(index["world_size"])
        self.shapes = index.get(kind, {})
        self.paths = [folder / _shard_name(kind, r, self.world) for r in range(self.world)]
        for path in self.paths:
            if not path.exists():
                raise CheckpointError(f"{path}: file not found (shards.json names {self.world} ranks)")
        self._open: dict[int, Any] = {}

    def _file(self, r: int):
        if r not in self._open:
            try:
                self._open[r] = safe_open(str(self.paths[r]), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{self.paths[r]}: corrupt or truncated safetensors file ({e})") from None
        return self._open[r]

    def _get(self, r: int, key: str) -> torch.Tensor:
        f = self._file(r)
        if key not in f.keys():
            raise CheckpointError(f"{self.paths[r]}: missing {key!r}")
        return f.get_tensor(key)

    def keys(self) -> list[str]:
        """Every tensor name of the checkpoint (rank 0's file holds all of them)."""
        return list(self._file(0).keys())

    def full(self, key: str) -> torch.Tensor:
        """The whole tensor (shards concatenated along dim 0)."""
        if key not in self.shapes:
            return self._get(0, key)
        t = torch.cat([self._get(r, key) for r in range(self.world)], dim=0)
        if list(t.shape) != self.shapes[key]:
            raise CheckpointError(f"{self.folder / SHARDS_FILE}: {key!r} shards give {list(t.shape)}, not {self.shapes[key]}")
        return t

    def chunk(self, key: str, rank: int, world: int) -> torch.Tensor:
        """Rank ``rank``'s dim-0 chunk of ``world`` (FSDP2's torch.chunk layout); the saved one when the world is the same."""
        if key in self.shapes and world == self.world:
            return self._get(rank, key)
        pieces = torch.chunk(self.full(key), world, dim=0)
        return pieces[rank] if rank < len(pieces) else self.full(key)[:0]


def _load_sharded(folder: Path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                  state: dict[str, Any]) -> None:
    from torch.distributed.tensor import DTensor

    reader = _ShardReader(folder, "model")
    entries = _model_entries(model)
    if not any(isinstance(t, DTensor) for t in entries.values()):  # a plain model: consolidate
        tensors = {k: reader.full(k) for k in reader.keys()}
        _load_full(folder, model, optimizer, state, tensors,
                   lambda: (lambda r: {k: r.full(k) for k in r.keys()})(_ShardReader(folder, "optimizer")))
        return
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    saved = set(reader.keys())
    if set(entries) != saved:
        raise CheckpointError(f"{folder}: missing {sorted(set(entries) - saved)[:3]} "
                              f"unexpected {sorted(saved - set(entries))[:3]}")
    with torch.no_grad():
        for key, t in entries.items():
            local = t.to_local() if isinstance(t, DTensor) else t
            src = reader.chunk(key, rank, world) if isinstance(t, DTensor) else reader.full(key)
            if src.shape != local.shape:
                raise CheckpointError(f"{folder}: {key!r} has shape {tuple(src.shape)}, the model {tuple(local.shape)}")
            local.copy_(src)
    if optimizer is None:
        return
    opt_reader = _ShardReader(folder, "optimizer")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    tensors: dict[str, torch.Tensor] = {}
    for key in opt_reader.keys():
        _, idx, _name = key.split(".", 2)
        p = params[int(idx)]
        if key in opt_reader.shapes and isinstance(p, DTensor):
            local = opt_reader.chunk(key, rank, world).to(p.device)
            tensors[key] = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False,
                                              shape=p.shape, stride=p.stride())
        else:
            tensors[key] = opt_reader.full(key)
    _optimizer_from_flat(optimizer, tensors, state.get("optimizer", {}))


def save_model_config(run_dir: str | os.PathLike, cfg: ModelConfig) -> None:
    """Write model_config.json so the run directory can rebuild its model."""
    atomic_write_json(Path(run_dir) / MODEL_CONFIG_FILE, cfg.to_dict())
