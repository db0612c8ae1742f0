"""Convert-then-heal experiments: ``python -m mla_analysis.run +experiment=convert_mha`` (or convert_moe).

A job with a ``convert`` config node (``schema.ConvertConfig``) runs ``run_convert`` instead of training:

1. Source. ``convert.source=PATH`` loads a run directory or Hugging Face checkpoint; otherwise the model
   group's model is trained with the ``train`` config. That training is cached by content: it goes to
   ``<convert.cache_dir>/source-<name>-<hash>`` (hash of the model, data and train configs and the seed)
   under an exclusive ``fcntl`` file lock, so the jobs of a sweep (parallel joblib workers included)
   train it once and every later job (and later sweep) loads it. An interrupted cached training resumes
   from its checkpoint.
2. Convert. ``direction=mla``: ``mha_to_mla`` at ``kv_lora_rank`` per layer, at per-layer ranks
   summing to ``kv_budget`` chosen by ``allocation`` (``rank_allocation.allocate_ranks``), or at
   ``cache_budget`` cache elements per token and layer (RoPE keys included: kv_lora_rank = cache_budget -
   rope keys x rope_dims), with ``rope_dims`` / ``strategy`` / ``rope_heads`` / ``rope_key`` / ``bkv`` / ``target`` /
   ``factorization`` / ``whiten``. Calibration (``calibration``): ``calib_examples`` windows of data.seq_len tokens;
   with data.source=shakespeare consecutive windows of the calibration plays (never training or evaluation text;
   fewer tokens than asked is a config error before any compute), otherwise training batch 0 of that size; the
   record says which (``convert.calib.text``, ``convert.calib.tokens``). ``direction=moe``:
   ``moefy.dense_to_moe`` with ``moe_method`` (kmeans | upcycle), ``active_fraction`` (sets the routed top-k),
   ``moe_gate_weights`` and the healing balance ``moe_aux_alpha`` / ``moe_bias_update_speed``. ``direction=gqa`` (the equal-byte
   baselines): ``kv_merge.merge_kv_heads`` to ``kv_heads`` K/V heads (null = keep the source's), then
   the cache quantised to ``kv_quant_bits`` (16 = off) per ``kv_quant_group`` channels.
3. Heal: ``heal`` = ``train(..., model=converted)`` for ``heal_steps`` steps at ``heal_lr`` (None = train.lr),
   warmup min(train.warmup_steps, heal_steps // 10); the other train settings as given. Healing reads
   training batches 0..heal_steps-1 (the data stream restarts; the source saw them early in its
   training; the held-out eval sets are disjoint). ``train.resume=true`` continues an interrupted healing from
   its last checkpoint (``train.checkpoint_every``) over the re-converted model.
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
from typing import Any

import torch

from ..config import ConfigError, ModelConfig
from ..config.model import KV_QUANT_BITS
from ..config.convert import (ALLOCATIONS, DIRECTIONS, FACTORIZATIONS, MOE_METHODS, ROPE_HEADS, ROPE_KEYS, STRATEGIES,
                               TARGETS, ConvertConfig)
from ..interop.hf_io import load_model
from ..data import DataConfig, build_eval_sets, train_batch
from ..models.transformer import Transformer
from .mla import full_latent_rank
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
    # train.resume carries through: the conversion is deterministic, so an interrupted healing continues from its
    # last checkpoint (weights, AdamW state, curve) over the re-converted model instead of refusing the run dir
    tcfg = dataclasses.replace(tcfg, steps=steps, tokens=None, init_from=None)
    out = train(model.cfg, data_cfg, tcfg, run_dir, seed=seed, device=device, model=model)
    return {"before": before, "after": out["metrics"], **out}


def validate_convert(c: ConvertConfig, model_cfg: ModelConfig) -> None:
    """Raise ConfigError naming the first invalid ``convert.*`` value (before anything is trained)."""

    def bad(key: str, allowed: str) -> ConfigError:
        return ConfigError(f"convert.{key}={getattr(c, key)!r} is invalid (allowed: {allowed})")

    choices = {"direction": DIRECTIONS, "allocation": ALLOCATIONS, "strategy": STRATEGIES,
               "target": TARGETS, "factorization": FACTORIZATIONS,
               "moe_method": MOE_METHODS, "rope_heads": ROPE_HEADS, "rope_key": ROPE_KEYS}
    for key, allowed in choices.items():
        if getattr(c, key) not in allowed:
            raise bad(key, " | ".join(allowed))
    if c.calib_examples <= 0:
        raise bad("calib_examples", "an integer > 0")
    if c.calib_offset < 0:
        raise bad("calib_offset", "an integer >= 0")
    if c.heal_steps < 0:
        raise bad("heal_steps", "an integer >= 0")
    if c.heal_lr is not None and c.heal_lr <= 0:
        raise bad("heal_lr", "null or a number > 0")
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
    if c.rope_dims is not None and (c.rope_dims <= 0 or c.rope_dims % 2 or c.rope_dims > d_h):
        raise bad("rope_dims", f"null (all) or an even integer in 2..head_dim={d_h}")
    if sum(x is not None for x in (c.kv_lora_rank, c.kv_budget, c.cache_budget)) != 1:
        raise ConfigError(
            f"convert.kv_lora_rank={c.kv_lora_rank} / convert.kv_budget={c.kv_budget} / convert.cache_budget="
            f"{c.cache_budget}: set exactly one (allowed: a per-layer rank, a total over layers, or cache elements "
            "per token and layer)"
        )
    if c.kv_lora_rank is not None and c.kv_lora_rank <= 0:
        raise bad("kv_lora_rank", "an integer > 0")
    target = resolved_target(c, model_cfg)
    if target == "mla_coupled_rope" and (c.rope_heads != "shared" or c.rope_key == "rorope"):
        key = "rope_heads" if c.rope_heads != "shared" else "rope_key"
        raise bad(key, f"{'shared' if key == 'rope_heads' else 'lstsq | mean'} with target mla_coupled_rope "
                       "(set convert.rope_dims below head_dim or convert.target=mla)")
    if c.rope_key == "rorope" and c.rope_heads != "shared":
        raise bad("rope_key", "lstsq | mean with convert.rope_heads=per_kv_head (RoRoPE builds one shared key)")
    full = full_latent_rank(model_cfg, c.rope_dims, target, c.rope_key)
    if c.cache_budget is not None:
        rope = rope_cache_elements(c, model_cfg)
        if not rope + 1 <= c.cache_budget <= rope + full:
            raise bad("cache_budget", f"{rope + 1}..{rope + full} (rope keys {rope} + latent rank 1..{full}, the "
                                      "source's full K/V rank)")
        if c.factorization == "split" and (c.cache_budget - rope) % 2:
            raise bad("cache_budget", f"a latent rank cache_budget - {rope} that is even with convert.factorization=split")
    # kv_lora_rank may exceed the K/V rank (up to d_model: ballast that keeps the latent norm near the identity)
    top = (2 if c.factorization == "split" else 1) * model_cfg.d_model
    if c.kv_lora_rank is not None and c.kv_lora_rank > top:
        raise bad("kv_lora_rank", f"1..{top} (above d_model the latent holds nothing more of the source)")
    if c.kv_budget is not None and c.allocation != "uniform" and (
            c.strategy == "2norm" or c.rope_heads != "shared" or c.rope_key == "rorope" or c.bkv):
        raise bad("allocation", "uniform with convert.strategy=2norm / rope_heads=per_kv_head / rope_key=rorope / bkv "
                                "(the allocation's latent matrices are those of the shared-key strategies)")
    if c.kv_budget is not None:
        if not L <= c.kv_budget <= L * model_cfg.d_model:
            raise bad("kv_budget", f"{L}..{L * model_cfg.d_model} (n_layers..n_layers * d_model)")
        if c.factorization == "split":
            raise bad("factorization", "joint with convert.kv_budget (allocation is defined for the joint latent)")
    elif c.allocation != "uniform":
        raise bad("allocation", "uniform with convert.kv_lora_rank (set convert.kv_budget to allocate)")
    if c.factorization == "split" and c.kv_lora_rank is not None and c.kv_lora_rank % 2:
        raise bad("kv_lora_rank", "an even integer with convert.factorization=split")


def resolved_target(c: ConvertConfig, model_cfg: ModelConfig) -> str:
    """convert.target with auto resolved as mha_to_mla does (coupled only when every dim keeps RoPE in one key)."""
    if c.target != "auto":
        return str(c.target)
    all_rope = c.rope_dims is None or c.rope_dims == model_cfg.attn_head_dim
    return "mla_coupled_rope" if all_rope and c.rope_heads == "shared" and c.rope_key != "rorope" else "mla"


def rope_cache_elements(c: ConvertConfig, model_cfg: ModelConfig) -> int:
    """Cached RoPE elements per token and layer of the converted model: rope keys x rope_dims (0 for coupled RoPE)."""
    if resolved_target(c, model_cfg) == "mla_coupled_rope":
        return 0
    d_rope = model_cfg.attn_head_dim if c.rope_dims is None else c.rope_dims
    return (model_cfg.kv_heads if c.rope_heads == "per_kv_head" else 1) * d_rope


def calibration(c: ConvertConfig, data_cfg: DataConfig) -> tuple[tuple[torch.Tensor, torch.Tensor], dict[str, Any]]:
    """The calibration (inputs, targets), each (calib_examples, seq_len), and what they are (text, tokens).

    data.source=shakespeare: consecutive windows of the calibration plays (data/shakespeare.py's split); a
    ConfigError naming convert.calib_examples when they hold fewer tokens. Other sources: training batch 0.
    """
    n, T, skip = c.calib_examples, data_cfg.seq_len, c.calib_offset
    if data_cfg.source != "shakespeare":
        if skip:
            raise ConfigError(f"convert.calib_offset={skip} is invalid (allowed: 0 with data.source={data_cfg.source}: "
                              "only the calibration plays of data.source=shakespeare have an offset)")
        inputs, targets = train_batch(data_cfg, 0, n)
        return (inputs, targets), {"convert.calib.text": f"training batch 0 of data.source={data_cfg.source}",
                                   "convert.calib.tokens": int(inputs.numel())}
    from ..data.shakespeare import split_tokens

    stream = split_tokens(data_cfg, "calibration")
    have = (len(stream) - 1) // T  # windows of T inputs and T shifted targets
    if have < skip + n:
        key, value, allowed = (("calib_examples", n, f"1..{have - skip}") if skip < have
                               else ("calib_offset", skip, f"0..{have - n}"))
        raise ConfigError(
            f"convert.{key}={value} is invalid (allowed: {allowed}: the calibration plays hold {len(stream)} "
            f"tokens, {have} windows of data.seq_len={T}, {skip} skipped by convert.calib_offset)"
        )
    first, used = skip * T, (skip + n) * T + 1  # token span [first, used) read
    ids = torch.as_tensor(stream.tokens[first:used], dtype=torch.long)
    inputs, targets = ids[:-1].view(n, T), ids[1:].view(n, T)  # (n, T) each
    plays = [d.name for d, (start, end) in zip(stream.docs, stream.spans) if start < used and end > first]  # read
    return (inputs, targets), {"convert.calib.text": "shakespeare calibration plays: " + ", ".join(plays),
                               "convert.calib.tokens": int(inputs.numel())}


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


def convert_model(c: ConvertConfig, source: Transformer, calib: tuple[torch.Tensor, torch.Tensor], seed: int = 0) -> Transformer:
    """The converted (unhealed) model the ``convert`` node describes."""
    from .mla import collect_calibration_stats, mha_to_mla
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
    ranks, rank, stats = None, c.kv_lora_rank, None
    if c.cache_budget is not None:
        rank = c.cache_budget - rope_cache_elements(c, source.cfg)  # the latent gets what the rope keys leave
    if c.kv_budget is not None:
        # the new strategies allocate uniformly only (validate_convert): their shapes are the shared-key ones
        strategy = c.strategy if c.strategy != "2norm" else "high"
        if c.allocation != "uniform" and c.strategy != "2norm" and not c.bkv:  # one calibration forward for both
            stats = collect_calibration_stats(source, inputs)
        ranks = allocate_ranks(source, c.kv_budget, c.allocation, calib=calib, rope_dims=c.rope_dims,
                               strategy=strategy, covs=None if stats is None else [st["cov"] for st in stats])
        rank = max(1, c.kv_budget // source.cfg.n_layers)  # the config's nominal rank
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frequencies outside the config are reported in conversion_info
        return mha_to_mla(source, rank, rope_dims=c.rope_dims, strategy=c.strategy, calib=inputs,
                          factorization=c.factorization, target=c.target, whiten=c.whiten, kv_lora_ranks=ranks,
                          kv_norm=c.kv_norm, rope_heads=str(c.rope_heads), rope_key=str(c.rope_key), bkv=c.bkv,
                          calib_stats=stats)


def run_convert(c: ConvertConfig, model_cfg: ModelConfig, data_cfg: DataConfig, tcfg: TrainConfig, run_dir: str | Path,
                seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """Source (trained+cached or loaded) -> convert -> heal [-> scratch baseline]; train()-shaped result."""
    validate_convert(c, model_cfg)
    calib = calibration(c, data_cfg) if c.direction in ("mla", "moe") else None  # too little calibration text: before compute
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    timings: dict[str, float] = {}
    t0 = time.time()
    if c.source is not None:
        source = load_model(c.source, device=dev)
        validate_convert(c, source.cfg)
    else:
        source, _ = cached_train("source", model_cfg, data_cfg, tcfg, seed, device, c.cache_dir)
    timings["source_s"] = time.time() - t0
    eval_sets = build_eval_sets(data_cfg)
    metrics: dict[str, Any] = _prefixed("convert.source", evaluate(source, eval_sets, dev, tcfg.eval_batch_size))

    t0 = time.time()
    if calib is None:
        calib = (train_batch(data_cfg, 0, c.calib_examples), {})  # direction=gqa: unused
    (calib, calib_info) = calib
    metrics.update(calib_info)
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


__all__ = ["cached_train", "calibration", "convert_model", "heal", "moe_top_k", "resolved_target", "rope_cache_elements", "run_convert",
           "validate_convert"]
