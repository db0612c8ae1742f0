"""Convert-then-heal experiments: ``python -m mla_analysis.run +experiment=convert_mha`` (or convert_moe).

A job with a ``convert`` config node (``schema.ConvertConfig``) runs ``run_convert`` instead of training:

1. Source. ``convert.source=PATH`` loads a run directory or Hugging Face checkpoint; otherwise the model
   group's model is trained with the ``train`` config. That training is cached by content: it goes to
   ``<convert.cache_dir>/source-<name>-<hash>`` (hash of the model, data and train configs and the seed)
   under an exclusive ``fcntl`` file lock, so the jobs of a sweep (parallel joblib workers included)
   train it once and every later job (and later sweep) loads it. An interrupted cached training resumes
   from its checkpoint.
2. Convert. ``direction=mla``: ``mha_to_mla`` at ``kv_lora_rank`` per layer, or at per-layer ranks
   summing to ``kv_budget`` chosen by ``allocation`` (``rank_allocation.allocate_ranks``), with
   ``rope_dims`` / ``strategy`` / ``target`` / ``factorization`` / ``whiten``; calibration = the first
   ``calib_examples`` training sequences (training batch 0 of that size). ``direction=moe``:
   ``moefy.dense_to_moe`` with ``moe_method`` (kmeans | upcycle), ``active_fraction`` (sets the routed top-k),
   ``moe_gate_weights`` and the healing balance ``moe_aux_alpha`` / ``moe_bias_update_speed``.
   ``calib_split=calibration`` takes the calibration from the calibration plays (data=shakespeare) instead.
   ``direction=gqa`` (the equal-byte
   baselines): ``kv_merge.merge_kv_heads`` to ``kv_heads`` K/V heads (null = keep the source's), then
   the cache quantised to ``kv_quant_bits`` (16 = off) per ``kv_quant_group`` channels.
3. Heal: ``heal`` = ``train(..., model=converted)`` for ``heal_steps`` steps at ``heal_lr`` (None = train.lr),
   warmup min(train.warmup_steps, heal_steps // 10); the other train settings as given. Healing reads
   training batches 0..heal_steps-1 (the data stream restarts; the source saw them early in its
   training; the held-out eval sets are disjoint).
4. Baseline (``scratch=true``): the converted architecture trained from scratch for the source's steps
   plus heal_steps (equal tokens), same data and seed, cached by content like the source.

Metrics: ``convert.source.*`` (source eval), ``convert.before.*`` (converted, before healing), the
healed model's metrics under the normal keys (val_loss, mqar.exact_match, kv_bytes_per_token, ...),
``convert.scratch.*`` (baseline eval), ``convert.kv_lora_ranks`` and ``convert.kv_weighted_rel_err``.
The record's ``config.model`` is the converted model's config. Runs single-process (no torchrun).
Measured allocation comparison (uniform / energy / fisher / whitened): mla_analysis/conversion/rank_allocation.py.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import ConfigError, ModelConfig
from ..config.model import KV_QUANT_BITS
from ..config.convert import (ALLOCATIONS, CALIB_SPLITS, DIRECTIONS, FACTORIZATIONS, MOE_METHODS, STRATEGIES, TARGETS,
                              ConvertConfig)
from ..interop.hf_io import load_model
from ..data import DataConfig, build_eval_sets, train_batch
from ..models.transformer import Transformer
from .rank_allocation import allocate_ranks
from ..training.results import RESULTS_FILE, atomic_write_json, environment, is_finished, load_record, make_record
from ..training.trainer import TrainConfig, evaluate, resolve_device, total_steps, train



def heal(
    model: Transformer,
    data_cfg: DataConfig,
    tcfg: TrainConfig,
    run_dir: str | Path,
    steps: int,
    seed: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """Fine-tune ``model`` for ``steps`` steps with train(); returns before/after eval metrics, history, model."""
    dev = resolve_device(device)
    before = evaluate(model.to(dev), build_eval_sets(data_cfg), dev, tcfg.eval_batch_size)
    tcfg = dataclasses.replace(tcfg, steps=steps, tokens=None, resume=False, init_from=None)
    out = train(model.cfg, data_cfg, tcfg, run_dir, seed=seed, device=device, model=model)
    return {"before": before, "after": out["metrics"], **out}


def validate_convert(c: ConvertConfig, model_cfg: ModelConfig, data_cfg: Optional[DataConfig] = None) -> None:
    """Raise ConfigError naming the first invalid ``convert.*`` value (before anything is trained)."""

    def bad(key: str, allowed: str) -> ConfigError:
        return ConfigError(f"convert.{key}={getattr(c, key)!r} is invalid (allowed: {allowed})")

    choices = {"direction": DIRECTIONS, "allocation": ALLOCATIONS, "strategy": STRATEGIES,
               "target": TARGETS, "factorization": FACTORIZATIONS,
               "moe_method": MOE_METHODS, "calib_split": CALIB_SPLITS}
    for key, allowed in choices.items():
        if getattr(c, key) not in allowed:
            raise bad(key, " | ".join(allowed))
    if c.calib_examples <= 0:
        raise bad("calib_examples", "an integer > 0")
    if c.heal_steps < 0:
        raise bad("heal_steps", "an integer >= 0")
    if c.heal_lr is not None and c.heal_lr <= 0:
        raise bad("heal_lr", "null or a number > 0")
    if c.calib_split == "calibration" and getattr(data_cfg, "source", None) != "shakespeare":
        raise bad("calib_split", "train unless data.source=shakespeare (the calibration plays)")
    if c.direction == "gqa":
        from .kv_merge import merged_config

        merged_config(model_cfg, model_cfg.kv_heads if c.kv_heads is None else c.kv_heads)  # raises on convert.kv_heads
        if c.kv_quant_bits not in KV_QUANT_BITS:
            raise bad("kv_quant_bits", " | ".join(map(str, KV_QUANT_BITS)) + " (16 = off)")
        d_h = model_cfg.attn_head_dim
        if c.kv_quant_bits != 16 and (c.kv_quant_group <= 0 or d_h % c.kv_quant_group):
            raise bad("kv_quant_group", f"a divisor of head_dim={d_h}")
        return
    if c.direction == "moe":
        if model_cfg.ffn != "dense":
            raise ConfigError(f"model.ffn={model_cfg.ffn!r} is invalid for convert.direction=moe (allowed: dense)")
        if not 1 <= c.n_activated_experts <= c.n_routed_experts:
            raise bad("n_activated_experts", f"1..convert.n_routed_experts={c.n_routed_experts}")
        if c.moe_method == "upcycle" and c.n_shared_experts:
            raise bad("n_shared_experts", "0 with convert.moe_method=upcycle")
        if c.moe_method == "kmeans" and (c.n_shared_experts < 0 or model_cfg.d_ff % (c.n_routed_experts + c.n_shared_experts)):
            raise bad("n_routed_experts", f"n_routed + n_shared dividing model.d_ff={model_cfg.d_ff}")
        if c.active_fraction is not None:
            from .moefy import active_experts

            try:
                active_experts(c.active_fraction, c.n_routed_experts, c.n_shared_experts)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"convert.{e}") from None
        if c.moe_method == "upcycle" and c.moe_gate_weights not in (None, "score"):
            raise bad("moe_gate_weights", "null | score with convert.moe_method=upcycle")
        for key in ("moe_aux_alpha", "moe_bias_update_speed"):
            if not isinstance(getattr(c, key), (int, float)) or getattr(c, key) < 0:
                raise bad(key, "a number >= 0")
        return
    if model_cfg.is_mla:
        raise ConfigError(f"model.attention={model_cfg.attention!r} is invalid for convert.direction=mla (allowed: mha | gqa | mqa)")
    d_h, L = model_cfg.attn_head_dim, model_cfg.n_layers
    if (c.kv_lora_rank is None) == (c.kv_budget is None):
        raise ConfigError(
            f"convert.kv_lora_rank={c.kv_lora_rank} / convert.kv_budget={c.kv_budget}: set exactly one "
            "(allowed: a per-layer rank, or a total over layers)"
        )
    if c.kv_lora_rank is not None and c.kv_lora_rank <= 0:
        raise bad("kv_lora_rank", "an integer > 0")
    if c.kv_budget is not None:
        if not L <= c.kv_budget <= L * model_cfg.d_model:
            raise bad("kv_budget", f"{L}..{L * model_cfg.d_model} (n_layers..n_layers * d_model)")
        if c.factorization == "split":
            raise bad("factorization", "joint with convert.kv_budget (allocation is defined for the joint latent)")
    elif c.allocation != "uniform":
        raise bad("allocation", "uniform with convert.kv_lora_rank (set convert.kv_budget to allocate)")
    if c.factorization == "split" and c.kv_lora_rank % 2:
        raise bad("kv_lora_rank", "an even integer with convert.factorization=split")
    if c.rope_dims is not None and (c.rope_dims <= 0 or c.rope_dims % 2 or c.rope_dims > d_h):
        raise bad("rope_dims", f"null (all) or an even integer in 2..head_dim={d_h}")


def _content_key(model_cfg: ModelConfig, data_cfg: DataConfig, tcfg: TrainConfig, seed: int) -> str:
    """Hash of everything that decides a trained model (not progress bars, threads or resume flags)."""
    t = {k: v for k, v in dataclasses.asdict(tcfg).items()
         if k not in ("progress", "threads", "resume", "init_from", "parallel")}  # ddp = fsdp to fp32 tolerance
    if t.get("trainable") == "all":  # the default: hashes of runs made before the key existed stay valid
        del t["trainable"]
    blob = json.dumps({"model": model_cfg.to_dict(), "data": dataclasses.asdict(data_cfg), "train": t, "seed": seed},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cached_train(kind: str, model_cfg: ModelConfig, data_cfg: DataConfig, tcfg: TrainConfig, seed: int,
                 device: str, cache_dir: str | Path) -> tuple[Transformer, Path]:
    """Train once per content hash under an exclusive file lock; later calls load the finished run."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_cfg.name)
    run_dir = Path(cache_dir) / f"{kind}-{name}-{_content_key(model_cfg, data_cfg, tcfg, seed)}"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f".{run_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if is_finished(run_dir):
            return load_model(run_dir, device=resolve_device(device)), run_dir
        t0 = time.time()
        out = train(model_cfg, data_cfg, dataclasses.replace(tcfg, resume=True, init_from=None), run_dir,
                    seed=seed, device=device)
        config = {"model": model_cfg.to_dict(), "data": dataclasses.asdict(data_cfg),
                  "train": dataclasses.asdict(tcfg), "seed": seed, "experiment": f"convert_{kind}"}
        atomic_write_json(run_dir / RESULTS_FILE, make_record(
            "ok", config, out["metrics"], timings={**out["timings"], "wall_s": time.time() - t0},
            env=environment(out["device"], seed), history=out["history"]))
        return out["model"].eval(), run_dir


def _prefixed(prefix: str, metrics: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{k}": v for k, v in metrics.items() if k not in ("step", "tokens")}


def moe_top_k(c: ConvertConfig) -> int:
    """Routed experts per token: from ``active_fraction`` when set, else ``n_activated_experts``."""
    if c.active_fraction is None:
        return c.n_activated_experts
    from .moefy import active_experts

    return active_experts(c.active_fraction, c.n_routed_experts, c.n_shared_experts)


def calibration_batch(c: ConvertConfig, data_cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) (B, T) of the calibration: training batch 0, or ``calib_examples`` evenly spaced
    non-overlapping windows of the calibration plays (``calib_split=calibration``; data.eval_edition's texts)."""
    if c.calib_split != "calibration":
        return train_batch(data_cfg, 0, c.calib_examples)
    import numpy as np

    from ..data.shakespeare import split_tokens

    tokens = torch.from_numpy(np.asarray(split_tokens(data_cfg, "calibration").tokens, dtype=np.int64))
    n_win = (len(tokens) - 1) // data_cfg.seq_len
    if n_win < 1:
        raise ConfigError(f"convert.calib_split=calibration: the calibration plays hold fewer than data.seq_len={data_cfg.seq_len} tokens")
    starts = torch.linspace(0, n_win - 1, min(c.calib_examples, n_win)).round().long() * data_cfg.seq_len  # (B,)
    win = torch.stack([tokens[s : s + data_cfg.seq_len + 1] for s in starts.tolist()])  # (B, T+1)
    return win[:, :-1], win[:, 1:]


def convert_model(c: ConvertConfig, source: Transformer, calib: tuple[torch.Tensor, torch.Tensor], seed: int = 0) -> Transformer:
    """The converted (unhealed) model the ``convert`` node describes."""
    from .mla import mha_to_mla
    from .moefy import dense_to_moe

    source = source.cpu().float().eval()
    inputs = calib[0]
    if c.direction == "gqa":
        from .kv_merge import merge_kv_heads, quantize_kv_cache

        merged = source if c.kv_heads is None else merge_kv_heads(source, c.kv_heads)
        return quantize_kv_cache(merged, c.kv_quant_bits, c.kv_quant_group)
    if c.direction == "moe":
        return dense_to_moe(source, c.n_routed_experts, moe_top_k(c), c.n_shared_experts,
                            method=c.moe_method, calib=inputs, noise=c.upcycle_noise, seed=seed,
                            gate_weights=None if c.moe_gate_weights is None else str(c.moe_gate_weights),
                            aux_alpha=float(c.moe_aux_alpha), bias_update_speed=float(c.moe_bias_update_speed))
    ranks, rank = None, c.kv_lora_rank
    if c.kv_budget is not None:
        ranks = allocate_ranks(source, c.kv_budget, c.allocation, calib=calib, rope_dims=c.rope_dims,
                               strategy=c.strategy)
        rank = max(1, c.kv_budget // source.cfg.n_layers)  # the config's nominal rank
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frequencies outside the config are reported in conversion_info
        return mha_to_mla(source, rank, rope_dims=c.rope_dims, strategy=c.strategy, calib=inputs,
                          factorization=c.factorization, target=c.target, whiten=c.whiten, kv_lora_ranks=ranks,
                          kv_norm=c.kv_norm)


def run_convert(c: ConvertConfig, model_cfg: ModelConfig, data_cfg: DataConfig, tcfg: TrainConfig, run_dir: str | Path,
                seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """Source (trained+cached or loaded) -> convert -> heal [-> scratch baseline]; train()-shaped result."""
    validate_convert(c, model_cfg, data_cfg)
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    timings: dict[str, float] = {}
    t0 = time.time()
    if c.source is not None:
        source = load_model(c.source, device=dev)
        validate_convert(c, source.cfg, data_cfg)
    else:
        source, _ = cached_train("source", model_cfg, data_cfg, tcfg, seed, device, c.cache_dir)
    timings["source_s"] = time.time() - t0
    eval_sets = build_eval_sets(data_cfg)
    metrics: dict[str, Any] = _prefixed("convert.source", evaluate(source, eval_sets, dev, tcfg.eval_batch_size))

    t0 = time.time()
    calib = calibration_batch(c, data_cfg)  # (inputs, targets), each (B, T)
    torch.manual_seed(seed)
    new = convert_model(c, source, calib, seed)
    timings["convert_s"] = time.time() - t0
    info = getattr(new, "conversion_info", None)
    if info is not None:
        metrics["convert.kv_lora_ranks"] = info["kv_lora_ranks"]
        errs = [layer["kv_weighted_rel_err"] for layer in info["layers"] if "kv_weighted_rel_err" in layer]
        if errs:
            metrics["convert.kv_weighted_rel_err"] = sum(errs) / len(errs)

    heal_cfg = dataclasses.replace(tcfg, lr=c.heal_lr or tcfg.lr, warmup_steps=min(tcfg.warmup_steps, c.heal_steps // 10))
    healed = heal(new, data_cfg, heal_cfg, run_dir, c.heal_steps, seed=seed, device=device)
    metrics.update(_prefixed("convert.before", healed["before"]))
    timings["heal_s"] = healed["timings"]["train_s"]

    if c.scratch:
        t0 = time.time()
        steps = total_steps(tcfg, data_cfg) + c.heal_steps  # the same number of tokens as source + healing
        scratch, _ = cached_train("scratch", new.cfg, data_cfg, dataclasses.replace(tcfg, steps=steps, tokens=None),
                                  seed, device, c.cache_dir)
        metrics.update(_prefixed("convert.scratch", evaluate(scratch, eval_sets, dev, tcfg.eval_batch_size)))
        timings["scratch_s"] = time.time() - t0
    metrics.update(healed["after"])
    return {"metrics": metrics, "history": healed["history"], "timings": {**healed["timings"], **timings},
            "device": healed["device"], "model": healed["model"]}


__all__ = ["cached_train", "calibration_batch", "convert_model", "heal", "moe_top_k", "run_convert", "validate_convert"]
