"""Expert redundancy test (DeepSeekMoE section 4.5, Fig. 4): mask each token's top-r routed experts, and the dense
baseline whose top FFN units are zeroed instead; ``probe.py`` defines the reported keys.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from ...config import ConfigError
from ...models.moe import MoE
from .. import ProbeError
from .._common import model_config, moe_blocks, unwrap


@contextlib.contextmanager
def masked_top_experts(model: torch.nn.Module, r: int):
    """Within the block every MoE layer skips each token's r highest-affinity routed experts (Gate.mask_top_r)."""
    blocks = moe_blocks(model)
    saved = [m.gate.mask_top_r for _, m in blocks]
    try:
        for _, m in blocks:
            m.gate.mask_top_r = r
        yield
    finally:
        for (_, m), v in zip(blocks, saved):
            m.gate.mask_top_r = v


def eval_losses(model: torch.nn.Module, eval_sets: dict, batch_size: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Per eval set: mean next-token cross-entropy over scored positions (and exact match for task sets)."""
    from ...training.trainer import evaluate

    res = evaluate(model, eval_sets, device, batch_size)
    out: dict[str, dict[str, float]] = {}
    for name in eval_sets:
        if name == "lm":
            out[name] = {"loss": res["val_loss"]}
        else:
            out[name] = {"loss": res[f"{name}.loss"], "exact_match": res[f"{name}.exact_match"]}
    return out


@torch.no_grad()
def _check_masked_routing(model: torch.nn.Module, x: torch.Tensor, r: int, device: torch.device) -> None:
    """ProbeError if a masked expert was still selected (group-limited routing left fewer than k experts)."""
    core = unwrap(model)
    blocks = moe_blocks(core)
    saved = [m.record_routing for _, m in blocks]
    was_training = core.training
    core.eval()
    try:
        for _, m in blocks:
            m.record_routing = True
        core(x.to(device))
        for li, m in blocks:
            top_r = m.last_scores.topk(r, dim=-1)[1]  # (B, T, r)
            hit = (m.last_indices[..., :, None] == top_r[..., None, :]).any()
            if bool(hit):
                raise ProbeError(
                    f"experts: redundancy_r={r} leaves fewer than k={m.n_activated_experts} selectable experts in layer {li} "
                    "(group-limited routing); use a smaller r"
                )
    finally:
        for (_, m), v in zip(blocks, saved):
            m.record_routing = v
            m.last_indices = m.last_weights = m.last_scores = None
        core.train(was_training)


def redundancy(model: torch.nn.Module, eval_sets: dict, rs: list[int], batch_size: int, device: torch.device) -> dict:
    """Eval losses unmasked ("base") and with each token's top-r routed experts masked in every MoE layer."""
    out: dict[str, Any] = {"base": eval_losses(model, eval_sets, batch_size, device), "masked": {}}
    first = next(iter(eval_sets.values()))[0][:batch_size]
    for r in rs:
        with masked_top_experts(model, r):
            _check_masked_routing(model, first, r, device)
            out["masked"][r] = eval_losses(model, eval_sets, batch_size, device)
    return out


def dense_neuron_fraction(r: int, n_experts: int, top_k: int, n_shared: int, mode: str) -> float:
    """Share of a dense FFN's hidden units matched to masking r routed experts (module docstring, "redundancy")."""
    if mode == "active":
        return min(1.0, r / (top_k + n_shared))
    if mode == "routed":
        return min(1.0, r / n_experts)
    raise ValueError(f"dense_neuron_fraction: mode={mode!r} (allowed: active | routed)")


def _dense_ffns(model: torch.nn.Module, layers: list[int]) -> list[tuple[int, torch.nn.Module]]:
    """The dense FFN of each listed block (anything with a ``w2`` down projection that is not a MoE)."""
    core = unwrap(model)
    out = []
    for i in layers:
        ffn = core.layers[i].ffn
        if isinstance(ffn, MoE) or not isinstance(getattr(ffn, "w2", None), torch.nn.Linear):
            raise ValueError(f"layer {i} has no dense FFN with a w2 down projection")
        out.append((i, ffn))
    return out


@torch.no_grad()
def ffn_neuron_activity(
    model: torch.nn.Module, layers: list[int], eval_sets: dict, batch_size: int, device: torch.device
) -> dict[int, torch.Tensor]:
    """Mean |activation| [d_ff] (float64) of every hidden unit (the input of w2) per layer, over all eval tokens."""
    core = unwrap(model)
    sums: dict[int, torch.Tensor] = {}
    count = [0]
    handles = []
    for li, ffn in _dense_ffns(core, layers):

        def fn(module, args, li=li):
            h = args[0].detach()
            h = h.reshape(-1, h.shape[-1]).double().abs()  # (B*T, d_ff)
            sums[li] = sums.get(li, 0) + h.sum(0).cpu()
            if li == layers[0]:
                count[0] += h.shape[0]

        handles.append(ffn.w2.register_forward_pre_hook(fn))
    was_training = core.training
    core.eval()
    try:
        for x, _ in eval_sets.values():
            for i in range(0, x.shape[0], batch_size):
                core(x[i : i + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        core.train(was_training)
    return {li: s / count[0] for li, s in sums.items()}


@contextlib.contextmanager
def zeroed_neurons(model: torch.nn.Module, neurons: dict[int, torch.Tensor]):
    """Within the block the listed hidden units (input columns of w2) of each layer's dense FFN output 0."""
    handles = []
    try:
        for li, ffn in _dense_ffns(model, list(neurons)):
            idx = neurons[li]

            def fn(module, args, idx=idx):
                return (args[0].index_fill(-1, idx.to(args[0].device), 0.0),)

            handles.append(ffn.w2.register_forward_pre_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


def top_neurons(activity: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the round(fraction * d_ff) units with the largest mean |activation| (ties: lower index first)."""
    n = int(math.floor(fraction * activity.numel() + 0.5))
    return torch.argsort(activity, descending=True, stable=True)[:n]


def dense_redundancy(
    dense_model: torch.nn.Module, layers: list[int], eval_sets: dict, fractions: dict[int, float],
    batch_size: int, device: torch.device,
) -> dict:
    """Eval losses of the dense model unablated ("base") and with the top units of each layer zeroed per r."""
    activity = ffn_neuron_activity(dense_model, layers, eval_sets, batch_size, device)
    out: dict[str, Any] = {"base": eval_losses(dense_model, eval_sets, batch_size, device), "masked": {}, "n_zeroed": {}}
    for r, f in fractions.items():
        neurons = {li: top_neurons(a, f) for li, a in activity.items()}
        out["n_zeroed"][r] = {li: int(n.numel()) for li, n in neurons.items()}
        with zeroed_neurons(dense_model, neurons):
            out["masked"][r] = eval_losses(dense_model, eval_sets, batch_size, device)
    return out


def main_set(losses: dict) -> str:
    return "lm" if "lm" in losses else next(iter(losses))


def redundancy_section(model: torch.nn.Module, eval_xy: dict, p: dict, device: torch.device) -> tuple[dict, dict]:
    """Metrics ``redundancy.*`` and the experts.json record of the redundancy test (and its dense baseline)."""
    from ...models.accounting import count_params

    cfg = model_config(model)
    blocks = moe_blocks(model)
    n_experts, top_k = blocks[0][1].n_routed_experts, blocks[0][1].n_activated_experts
    rs = p["redundancy_r"]
    res = redundancy(model, eval_xy, rs, p["batch_size"], device)
    main = main_set(res["base"])
    metrics: dict[str, Any] = {"redundancy.base.loss": res["base"][main]["loss"], "redundancy.active_params": count_params(cfg, active=True)}
    for name, v in res["base"].items():
        metrics[f"redundancy.base.{name}.loss"] = v["loss"]
    for r in rs:
        m = res["masked"][r]
        metrics[f"redundancy.r{r}.fraction"] = r / n_experts
        metrics[f"redundancy.r{r}.loss_delta"] = m[main]["loss"] - res["base"][main]["loss"]
        for name, v in m.items():
            metrics[f"redundancy.r{r}.{name}.loss_delta"] = v["loss"] - res["base"][name]["loss"]
            if "exact_match" in v:
                metrics[f"redundancy.r{r}.{name}.exact_match_delta"] = v["exact_match"] - res["base"][name]["exact_match"]
    record: dict[str, Any] = {
        "r": rs,
        "main_set": main,
        "definition": "each token's r highest-affinity routed experts masked in every MoE layer at once, top-k "
        "chosen among the rest (Gate.mask_top_r); gate weights keep the unmasked affinities (renormalised only "
        "when norm_topk_prob); fraction = r / E (paper's x-axis)",
        "moe": {"base": res["base"], "masked": {str(r): v for r, v in res["masked"].items()}},
        "dense": None,
    }
    if p["dense_baseline"] is None:
        return metrics, record

    from ...interop.hf_io import load_model

    path = str(p["dense_baseline"])
    dense = load_model(path, device)
    dcfg = model_config(dense)
    key = f"probe.experts.dense_baseline={path!r}"
    if moe_blocks(dense):
        raise ConfigError(f"{key}: the model has MoE layers (allowed: a run with a dense FFN)")
    if dcfg.n_layers != cfg.n_layers or dcfg.vocab_size != cfg.vocab_size:
        raise ConfigError(
            f"{key}: n_layers/vocab_size {dcfg.n_layers}/{dcfg.vocab_size} differ from the MoE model's {cfg.n_layers}/{cfg.vocab_size}"
        )
    layers = [i for i, _ in blocks]
    try:
        _dense_ffns(dense, layers)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
    fractions = {r: dense_neuron_fraction(r, n_experts, top_k, cfg.n_shared_experts, p["dense_fraction"]) for r in rs}
    dres = dense_redundancy(dense, layers, eval_xy, fractions, p["batch_size"], device)
    metrics["redundancy.dense.base.loss"] = dres["base"][main]["loss"]
    metrics["redundancy.dense.active_params"] = count_params(dcfg, active=True)
    for name, v in dres["base"].items():
        metrics[f"redundancy.dense.base.{name}.loss"] = v["loss"]
    for r in rs:
        m = dres["masked"][r]
        metrics[f"redundancy.dense.r{r}.neuron_fraction"] = fractions[r]
        metrics[f"redundancy.dense.r{r}.loss_delta"] = m[main]["loss"] - dres["base"][main]["loss"]
        for name, v in m.items():
            metrics[f"redundancy.dense.r{r}.{name}.loss_delta"] = v["loss"] - dres["base"][name]["loss"]
            if "exact_match" in v:
                metrics[f"redundancy.dense.r{r}.{name}.exact_match_delta"] = v["exact_match"] - dres["base"][name]["exact_match"]
    record["dense"] = {
        "run_dir": path,
        "layers": layers,
        "fraction_mode": p["dense_fraction"],
        "definition": "in the dense model's FFN of every layer that is MoE in the probed model, the "
        "round(f * d_ff) hidden units with the largest mean |activation| over the eval tokens are zeroed for "
        "every token; f = min(1, r/(k + n_shared)) (active) or min(1, r/E) (routed)",
        "fractions": {str(r): f for r, f in fractions.items()},
        "n_zeroed": {str(r): v for r, v in dres["n_zeroed"].items()},
        "active_params": {"moe": metrics["redundancy.active_params"], "dense": metrics["redundancy.dense.active_params"]},
        "base": dres["base"],
        "masked": {str(r): v for r, v in dres["masked"].items()},
    }
    return metrics, record
