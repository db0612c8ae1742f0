"""Trainer: AdamW with warmup + cosine, gradient clipping, periodic eval, safetensors checkpoints.

Reproducibility contract: the batch of step k depends only on (data config, seed, k), the model
init only on the seed, and the optimizer state is checkpointed exactly, so a run resumed from a
checkpoint (``train.resume=true``, e.g. after SIGINT/SIGTERM) ends with the same metrics as an
uninterrupted one (bitwise on CPU). Runs under ``torchrun`` (gloo on CPU, nccl on CUDA) with DDP
(``train.parallel=ddp``: replicas) or FSDP2 (``train.parallel=fsdp``: each block and the root sharded with
``fully_shard``, AdamW states sharded with them, sharded safetensors checkpoints written by every rank).
``train.trainable`` freezes all but a part of the model (healing a conversion: attention, or the MLA KV
projections only); the optimizer holds only the trainable parameters.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.accounting import count_params, kv_bytes_per_token, train_flops_per_token
from .checkpoint import (check_fresh_start, load_checkpoint, resume_checkpoint, save_checkpoint, save_model_config,
                         save_sharded_checkpoint)
from ..config import ConfigError, ModelConfig, Parallel, TrainConfig, Trainable  # TrainConfig: importable from here as before
from ..data import DataConfig, build_eval_sets, language_optimal_loss, score_predictions, train_batch
from ..models.transformer import Transformer


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint was saved and the run can be resumed."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 130 for SIGINT, 143 for SIGTERM (the shell's convention)."""
        return 128 + self.signum


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is kept."""


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} is invalid: CUDA is not available (allowed: auto, cpu)")
    return torch.device(name)


def total_steps(tcfg: TrainConfig, dcfg: DataConfig, world_size: int = 1) -> int:
    """Number of optimizer steps, from ``tokens`` when given (equal-token budgets across variants)."""
    if tcfg.tokens is not None:
        return max(1, tcfg.tokens // (tcfg.batch_size * tcfg.grad_accum * dcfg.seq_len * world_size))
    return tcfg.steps


LOG_REDRAW_S = 30.0  # seconds between progress lines when stderr is not a terminal (a log file)


def progress_bar(total: int, initial: int, desc: str, disable: bool = False, file: Any = None) -> tqdm:
    """A tqdm bar: redrawn each second on a terminal, every LOG_REDRAW_S seconds in a log (``make run > log``)."""
    file = sys.stderr if file is None else file
    tty = bool(getattr(file, "isatty", lambda: False)())
    interval = 1.0 if tty else LOG_REDRAW_S
    # maxinterval too: tqdm's monitor thread would otherwise force a redraw every 10 s
    return tqdm(total=total, initial=initial, desc=desc, disable=disable, file=file, dynamic_ncols=tty, leave=False,
                mininterval=interval, maxinterval=max(interval, 10.0))


def lr_at(step: int, tcfg: TrainConfig, steps: int) -> float:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio."""
    if step < tcfg.warmup_steps:
        return tcfg.lr * (step + 1) / tcfg.warmup_steps
    progress = min(1.0, (step - tcfg.warmup_steps) / max(1, steps - tcfg.warmup_steps))
    floor = tcfg.lr * tcfg.min_lr_ratio
    return floor + (tcfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, tcfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, not the 1-D router bias)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel runs the whole update in one pass (CPU and CUDA); results are deterministic
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), fused=True)


MLA_KV_PROJECTIONS = ("wkv_a", "kv_norm", "wkv_b")  # what mha_to_mla makes; wq / wo are the source's


def trainable_names(model: Transformer, trainable: Trainable | str) -> list[str]:
    """Names of the parameters ``train.trainable`` selects (``named_parameters`` order, tied weights once)."""
    trainable = Trainable(trainable)
    names = [n for n, _ in model.named_parameters()]
    if trainable == Trainable.all:
        return names
    if trainable == Trainable.attention:  # Block.attn: every attention variant's projections (and q/kv norms)
        picked = [n for n in names if n.startswith("layers.") and n.split(".")[2] == "attn"]
    else:  # layers.i.attn.wkv_a.weight, layers.i.attn.kv_norm.weight, ...
        picked = [n for n in names if n.startswith("layers.") and n.split(".")[2] == "attn"
                  and n.split(".")[3] in MLA_KV_PROJECTIONS]
    if not picked:
        allowed = "all, attention" if trainable == Trainable.mla else "all"
        raise ConfigError(f"train.trainable={trainable} is invalid for model {model.cfg.name!r} "
                          f"(attention={model.cfg.attention}): it selects no parameter (allowed: {allowed})")
    return picked


def freeze_untrainable(model: Transformer, trainable: Trainable | str) -> int:
    """Set requires_grad by ``train.trainable`` (the others frozen); returns the trainable parameter count."""
    keep = set(trainable_names(model, trainable))
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
    return sum(p.numel() for n, p in model.named_parameters() if n in keep)


def shard_model(model: Transformer, mesh: Any) -> None:
    """FSDP2: each block is one all-gather unit, the root (embeddings, final norm, head) another; in place."""
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


@contextlib.contextmanager
def unsharded_root(model: torch.nn.Module, sharded: bool):
    """Evaluation calls ``model.head`` outside the forward: keep the root's parameters gathered meanwhile."""
    if not sharded:
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def gathered_copy(model: torch.nn.Module, cfg: ModelConfig, keep: bool) -> Optional[Transformer]:
    """A plain (unsharded) copy of a sharded model's weights; collective, the copy kept where ``keep`` (rank 0)."""
    from torch.distributed.tensor import DTensor

    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach() for k, v in model.state_dict().items()}
    if not keep:
        return None
    plain = Transformer(cfg)
    plain.load_state_dict(full)
    return plain.to(next(iter(full.values())).device)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over scored positions (targets != -100)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, eval_sets: dict, device: torch.device, batch_size: int) -> dict[str, float]:
    """Held-out LM loss/perplexity and exact-match / token accuracy per retrieval task."""
    from ..metrics.perplexity import lm_metrics

    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    for name, (inputs, targets) in eval_sets.items():
        if name == "lm":  # chunked over the head: real vocabularies never materialise [B, T, V] logits
            out.update(lm_metrics(model, eval_sets[name], device, batch_size))
            continue
        total_loss, total_tok, preds = 0.0, 0, []
        for i in range(0, inputs.shape[0], batch_size):
            x = inputs[i : i + batch_size].to(device)
            y = targets[i : i + batch_size].to(device)
            with _autocast(device):
                logits = model(x)
            n = int((y != -100).sum())
            total_loss += float(lm_loss(logits, y)) * n
            total_tok += n
            preds.append(logits.argmax(-1).cpu())
        loss = total_loss / max(1, total_tok)
        scores = score_predictions(torch.cat(preds), targets)
        out[f"{name}.exact_match"] = scores["exact_match"]
        out[f"{name}.token_acc"] = scores["token_acc"]
        out[f"{name}.loss"] = loss
    model.train(was_training)
    return out


class StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a checkpoint can be written.

    Nested ``with StopFlag.get()`` blocks share one flag: run.py holds it until the run's record is
    written, so a signal during the final evaluation or the probes is still recorded, not lost.
    """

    _active: Optional["StopFlag"] = None

    def __init__(self):
        self.signum: Optional[int] = None
        self._old: dict[int, Any] = {}
        self._depth = 0

    @classmethod
    def get(cls) -> "StopFlag":
        """The flag installed by an enclosing block, or a new one."""
        return cls._active if cls._active is not None else cls()

    def __enter__(self):
        if self._depth == 0:
            for s in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._old[s] = signal.signal(s, self._handle)
                except ValueError:  # not the main thread
                    pass
            StopFlag._active = self
        self._depth += 1
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def interrupted(self, what: str) -> TrainingInterrupted:
        """The exception that reports the pending signal (``what``: where it arrived, what was saved)."""
        return TrainingInterrupted(f"signal {signal.Signals(self.signum).name} {what}", signum=self.signum)

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for s, h in self._old.items():
                signal.signal(s, h)
            self._old.clear()
            StopFlag._active = None
        return False


def _all_reduce(t: torch.Tensor) -> None:
    import torch.distributed as dist

    dist.all_reduce(t)


def _any_rank_stopped(signum: Optional[int], dev: torch.device) -> Optional[int]:
    """The largest pending signal number over ranks (None if none): all ranks stop after the same step."""
    import torch.distributed as dist

    t = torch.tensor([signum or 0], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item()) or None


def _replicas_in_sync(model: torch.nn.Module) -> bool:
    """Whether every rank holds bit-identical parameters and buffers (checks DDP and the router bias sync)."""
    import torch.distributed as dist

    def checksum(t: torch.Tensor) -> torch.Tensor:  # position-weighted, so permuted values still differ
        flat = t.detach().double().flatten()
        return (flat * torch.sin(torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device))).sum()

    digest = torch.stack([checksum(t) for t in model.state_dict().values()]).cpu()
    gathered = [torch.empty_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, digest)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def export_submitit_env() -> None:
    """Under a submitit launcher with several tasks (``hydra/launcher=submitit_slurm tasks_per_node=N``), set the
    torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) from the job environment; else nothing."""
    if "WORLD_SIZE" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks > 1:  # each task keeps every GPU visible: the trainer picks cuda:LOCAL_RANK
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def train(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    tcfg: TrainConfig,
    run_dir: str | os.PathLike,
    seed: int = 0,
    device: str = "auto",
    on_eval: Optional[Callable[[int, dict[str, float]], None]] = None,
    model: Optional[Transformer] = None,
    on_step: Optional[Callable[[int, dict[str, float]], None]] = None,
) -> dict[str, Any]:
    """Train from scratch, from ``model`` (its config replaces model_cfg) or resume; evaluate, checkpoint.

    Returns metrics, timings, history and the trained model. ``steps=0`` with a given model evaluates only.
    ``on_step(steps_done, {loss, lr, grad_norm, tokens_per_s})`` runs on rank 0 after each step (the trackers).
    """
    run_dir = Path(run_dir)
    rank, world, local_rank = _dist_info()
    dev = resolve_device(device)
    if world > 1:
        import torch.distributed as dist

        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        owns_group = not dist.is_initialized()
        if owns_group:
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    try:  # data problems (missing files, bad knobs) surface before anything is written
        eval_sets = build_eval_sets(data_cfg)
        train_batch(data_cfg, 0, tcfg.batch_size, rank=rank, world_size=world)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
    torch.manual_seed(seed)
    if model is None:
        model = Transformer(model_cfg)
    else:
        model_cfg = model.cfg
    model = model.to(dev)
    n_trainable = freeze_untrainable(model, tcfg.trainable)  # before the wrappers and the optimizer see the flags
    sharded = world > 1 and Parallel(tcfg.parallel) == Parallel.fsdp
    if sharded:  # the optimizer must be built over the sharded (DTensor) parameters
        from torch.distributed.device_mesh import init_device_mesh

        shard_model(model, init_device_mesh(dev.type, (world,)))
    optimizer = make_optimizer(model, tcfg)
    steps = total_steps(tcfg, data_cfg, world)
    folder = resume_folder(run_dir, tcfg.resume, rank)  # before anything is written: a refusal leaves the dir as it was
    if rank == 0:
        save_model_config(run_dir, model_cfg)

    start_step, history, solved_at, train_time = 0, [], {}, 0.0
    last_loss = float("nan")
    # training losses since the last evaluation: each history entry gets their mean as its train_loss, so the
    # curve holds train and held-out loss side by side (where more epochs of one corpus start to overfit)
    window = [0.0, 0]
    if folder is not None:
        state = load_checkpoint(folder, model, optimizer)
        start_step = int(state["step"])
        history = state.get("history", [])
        solved_at = state.get("solved_at", {})
        train_time = float(state.get("train_time", 0.0))
        last_loss = float(state["train_loss"]) if state.get("train_loss") is not None else last_loss
        window = list(state.get("train_loss_window", window))  # a resumed run's curve equals an uninterrupted one

    ddp_model = model
    if world > 1 and not sharded:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # buffers (the router bias) are kept equal by all-reducing the loads, not by broadcasting
        ddp_model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False)

    tokens_per_step = tcfg.batch_size * tcfg.grad_accum * data_cfg.seq_len * world

    checkpoint_errors: dict[int, str] = {}

    def checkpoint(step: int) -> bool:
        """Save (rank 0; every rank when sharded); a failed write is reported and recorded, training goes on."""
        if rank != 0 and not sharded:
            return True
        try:
            (save_sharded_checkpoint if sharded else save_checkpoint)(
                run_dir, model, optimizer, step,
                {"history": history, "solved_at": solved_at, "train_time": train_time, "train_loss": last_loss,
                 "train_loss_window": window},
                keep=tcfg.keep_checkpoints,
            )
        except OSError as e:
            checkpoint_errors[step] = f"checkpoint of step {step} not saved in {run_dir / 'checkpoints'}: " \
                                      f"{type(e).__name__}: {e}"
            if rank == 0:
                print(f"warning: {checkpoint_errors[step]}", file=sys.stderr)
            return False
        return True

    def run_eval(step: int) -> dict[str, float]:
        with unsharded_root(model, sharded):  # every rank evaluates (sharded: together, block by block)
            metrics = evaluate(model, eval_sets, dev, tcfg.eval_batch_size)
        metrics["step"] = step
        metrics["tokens"] = step * tokens_per_step
        for key, value in metrics.items():
            if key.endswith(".exact_match") and value >= tcfg.solve_threshold:
                solved_at.setdefault(key[: -len(".exact_match")], step)
        history.append(metrics)
        if on_eval is not None:
            on_eval(step, metrics)
        if window[1]:  # after on_eval: the trackers log the per-step loss themselves (train/loss)
            metrics["train_loss"] = window[0] / window[1]
        window[:] = [0.0, 0]
        return metrics

    model.train()
    bar = progress_bar(steps, start_step, f"train {model_cfg.name}", disable=not tcfg.progress or rank != 0)
    with StopFlag.get() as stop:
        for step in range(start_step, steps):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, tcfg, steps)
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=dev)  # the mean LM loss over the step's micro-batches
            for micro in range(tcfg.grad_accum):  # gradients of the mean over grad_accum micro-batches
                index = step * tcfg.grad_accum + micro
                inputs, targets = train_batch(data_cfg, index, tcfg.batch_size, rank=rank, world_size=world)
                inputs, targets = inputs.to(dev), targets.to(dev)
                with _autocast(dev):
                    logits = ddp_model(inputs)
                loss = lm_loss(logits, targets)
                aux = model.aux_loss()
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(
                        f"loss is {float(loss.detach())} at step {step}: training stopped; the last good checkpoint is kept"
                    )
                ((loss + aux) / tcfg.grad_accum).backward()
                step_loss += loss.detach() / tcfg.grad_accum  # a device tensor: one host sync per step, not per micro-batch
            grad_norm = None
            if tcfg.grad_clip > 0:  # sharded: the norm over all ranks' shards (a replicated DTensor)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)  # norm before clipping
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            optimizer.step()
            for moe in model.moe_layers():
                moe.update_bias(all_reduce=_all_reduce if world > 1 else None)
            if world > 1:  # the logged loss is the mean over all ranks' batches, as one process would see it
                _all_reduce(step_loss)
                step_loss /= world
            step_s = time.perf_counter() - t0
            train_time += step_s
            last_loss = float(step_loss)
            window[0] += last_loss
            window[1] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.3f}", refresh=False)  # redrawn at the bar's interval, not per step
            done = step + 1
            if on_step is not None and rank == 0:
                logged = {"loss": last_loss, "lr": optimizer.param_groups[0]["lr"],
                          "tokens_per_s": tokens_per_step / step_s}
                if grad_norm is not None:
                    logged["grad_norm"] = float(grad_norm)
                on_step(done, logged)
            if tcfg.eval_every and done % tcfg.eval_every == 0 and done < steps:
                run_eval(done)
            if tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0 and done < steps:
                checkpoint(done)
            if world > 1:  # ranks agree, else one would checkpoint while another waits in the next step
                stop.signum = _any_rank_stopped(stop.signum, dev)
            if stop.signum is not None:
                saved = checkpoint(done)
                bar.close()
                raise stop.interrupted(f"at step {done}: " + _resume_hint(run_dir, saved, checkpoint_errors.get(done)))
        bar.close()
        final = history[-1] if history and history[-1]["step"] == steps else run_eval(steps)
        saved = checkpoint(steps)
        if stop.signum is not None:  # arrived during the final evaluation
            raise stop.interrupted(f"during the final evaluation: " + _resume_hint(run_dir, saved, checkpoint_errors.get(steps)))
    metrics: dict[str, Any] = {k: v for k, v in final.items() if k not in ("step", "tokens")}
    if sharded:  # the returned model (probes, records) is a plain copy on rank 0
        metrics["fsdp_world_size"] = world
        del optimizer
        model = gathered_copy(model, model_cfg, keep=rank == 0)
    elif world > 1:
        metrics["ddp_world_size"] = world
        metrics["ddp_in_sync"] = _replicas_in_sync(model)
    if world > 1:
        if owns_group:
            dist.destroy_process_group()
    metrics["train_loss"] = last_loss
    metrics["tokens_seen"] = steps * tokens_per_step
    metrics["steps"] = steps
    # train_time is cumulative over resumed segments, so the rate covers all steps
    metrics["tokens_per_s"] = steps * tokens_per_step / train_time if train_time and steps else None
    metrics["params"] = count_params(model_cfg)
    metrics["params_active"] = count_params(model_cfg, active=True)
    metrics["params_trainable"] = n_trainable
    metrics["kv_bytes_per_token"] = kv_bytes_per_token(model_cfg, "bf16")
    metrics["flops_per_token"] = train_flops_per_token(model_cfg, data_cfg.seq_len)
    optimum = language_optimal_loss(data_cfg)
    if optimum is not None:
        metrics["val_loss_optimal"] = optimum
    for task in (k[: -len(".exact_match")] for k in final if k.endswith(".exact_match")):
        metrics[f"{task}.solved"] = task in solved_at
        metrics[f"{task}.steps_to_solve"] = solved_at.get(task)
    return {"metrics": metrics, "history": history, "timings": {"train_s": train_time}, "device": str(dev),
            "model": model, "checkpoint_error": checkpoint_errors.get(steps)}


def _resume_hint(run_dir: Path, saved: bool, error: Optional[str]) -> str:
    if saved:
        return f"checkpoint saved in {run_dir}; rerun with train.resume=true to continue"
    return f"{error}; a rerun with train.resume=true continues from the last checkpoint saved"


def resume_folder(run_dir: Path, resume: bool, rank: int = 0) -> Optional[Path]:
    """The checkpoint to continue from (resume), or None; a fresh run into a directory with checkpoints is refused."""
    if not resume:
        if rank == 0:
            check_fresh_start(run_dir)
        return None
    folder, note = resume_checkpoint(run_dir)
    if note is not None and rank == 0:
        print(f"warning: {note}", file=sys.stderr)
    return folder
