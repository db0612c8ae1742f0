"""Spectra of SmolLM2-135M's keys and values per layer, and whether they predict each layer's conversion damage.

Run (the full setting, ~10 min on 2 shared cores; see the README for the measured cost):
    PYTHONPATH=. python experiments/real_conversion/spectra.py
Smoke: PYTHONPATH=. python experiments/real_conversion/spectra.py --windows 1 --seq 128 --layers 2 --out /tmp/spectra \
    convert.calib_examples=1
Options: ``--windows N --seq L`` evaluation windows, ``--layers N`` only the first N layers (each layer's teacher-forced
numbers depend only on the layers before it, so they equal the full run's; not with convert.strategy=norm, which pools
its scores over all layers), ``--converted DIR`` a converted checkpoint
(run dir) instead of converting here, ``--out DIR`` (default: beside this file), trailing ``key=value`` Hydra overrides
of the study's config (default ``+experiment=real_conversion convert.cache_budget=120 convert.rope_dims=32``: the main
recipe at 120, as its run).

1. The original (``convert.source``) runs over N full windows (no padding) of the evaluation plays, evenly spaced as
   the kl probe spaces them (``probes.kl.eval_windows``; the kl probe's 16 windows may include a play's short last
   window, which is dropped here). Forward hooks (``probes.spectra.attach``) stream, per layer, the Grams of every KV
   head side by side: K before RoPE (``k_pre_all``, 3 x 64 = 192 wide), K after RoPE (``k_all``), V (``v_all``) and
   [K_pre; V] (``kv_pre_all``, 384: what the joint latent factorises; with RoRoPE the latent takes every dim's
   un-rotated key minus the mixed RoPE key, so this is the latent's input up to that one shared key). Uncentred, as
   cached. Measures: effective rank (Roy & Vetterli: exp of the entropy of sigma / sum sigma), energy ranks r90 / r99
   (smallest r with >= 90% / 99% of sum sigma^2), and the energy of [K_pre; V] beyond the layer's latent rank
   (``tail_r<rank>``: what the best rank-r truncation of the evaluation activations discards; the whitened SVD is
   that truncation on the calibration activations).
2. Damage, in the same pass (``conversion.layer_error.attach``): each converted attention on the original's own input
   of that layer, ||attn_mla(x) - attn_orig(x)|| / ||attn_orig(x)|| over all tokens. With an in-process conversion also
   the energy the whitened truncation discards on the calibration text (``kv_weighted_rel_err``^2 of the conversion).
3. Spearman's rho (scipy.stats.spearmanr) of each measure against the damage over the layers, with a paired bootstrap
   over layers (BCa, ``probes.head_ablation.spearman_ci``); K vs V: per-layer paired differences of the effective
   and energy ranks with a Student-t interval over layers. Layers of one model are not independent samples: the
   intervals are descriptive.
4. Writes ``spectra.json`` (atomic), ``spectra.md`` and ``figures/spectra.{png,pdf}`` with the git commit.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import OmegaConf

from mla_analysis.analysis.figures import figure, save_figure
from mla_analysis.analysis.report import mean_interval
from mla_analysis.config import ConfigError
from mla_analysis.conversion import layer_error
from mla_analysis.conversion.job import calibration, convert_model
from mla_analysis.data import prepare_data_config
from mla_analysis.interop.hf_io import load_model
from mla_analysis.probes import spectra
from mla_analysis.probes.head_ablation import spearman_ci
from mla_analysis.probes.kl import IGNORE, eval_windows
from mla_analysis.run import CONF_DIR, precheck
from mla_analysis.runner.job_config import check_config
from mla_analysis.training.checkpoint import CheckpointError
from mla_analysis.training.forward_hooks import run_hooked
from mla_analysis.training.results import atomic_write_json, atomic_write_text, git_commit, read_json

HERE = Path(__file__).resolve().parent
STUDY = ["+experiment=real_conversion", "convert.cache_budget=120", "convert.rope_dims=32"]
TENSORS = {"k_pre_all": "K pre-RoPE", "k_all": "K post-RoPE", "v_all": "V", "kv_pre_all": "[K_pre; V]"}
TAUS = (0.9, 0.99)
ENERGY_RANKS = (8, 16, 32, 64, 128)  # the spectrum's shape in the record: energy share of the top r
ACCUMULATED = ("kv_pre_all", "k_all")  # the other tensors' Grams are blocks of these
CONFIDENCE = 0.95


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line (see the module doc)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8, help="evaluation windows (default 8)")
    ap.add_argument("--seq", type=int, default=None, help="tokens per window (default data.seq_len: 1024)")
    ap.add_argument("--layers", type=int, default=None, help="only the first N layers (smoke runs)")
    ap.add_argument("--converted", type=Path, default=None, help="a converted run dir instead of converting here")
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: beside this script)")
    ap.add_argument("--batch", type=int, default=1, help="windows per forward")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resamples", type=int, default=1999, help="bootstrap resamples of the correlations")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the study config")
    a = ap.parse_args(argv)
    if a.converted is not None and not a.converted.is_dir():
        raise ConfigError(f"--converted={a.converted} is invalid (allowed: a converted run directory)")
    for key in ("windows", "batch", "threads", "resamples"):
        if getattr(a, key) < 1:
            raise ConfigError(f"--{key}={getattr(a, key)} is invalid (allowed: an integer >= 1)")
    for key in ("seq", "layers"):
        if getattr(a, key) is not None and getattr(a, key) < 1:
            raise ConfigError(f"--{key}={getattr(a, key)} is invalid (allowed: an integer >= 1)")
    return a


def study_config(overrides: list[str]):
    """The composed study config (checked as a run's would be)."""
    from hydra import compose, initialize_config_dir

    err = precheck(overrides)
    if err is not None:
        raise ConfigError(err)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    check_config(cfg)
    return cfg


def first_layers(model: torch.nn.Module, n: Optional[int]) -> torch.nn.Module:
    """The model cut to its first n blocks in place (the final norm and head kept: their outputs are unused here)."""
    if n is None or n >= len(model.layers):
        return model
    cfg = model.cfg
    ranks = None if cfg.kv_lora_ranks is None else cfg.kv_lora_ranks[:n]
    model.layers = model.layers[:n]
    model.cfg = dataclasses.replace(cfg, n_layers=n, kv_lora_ranks=ranks)
    return model


def converted_recipe(run_dir: Path) -> str:
    """': cache_budget=..., rope_dims=..., ...' from the run's record, when it has one (else '')."""
    path = run_dir / "results.json"
    if not path.is_file():
        return ""
    c = read_json(path).get("config", {}).get("convert") or {}
    keys = ("cache_budget", "rope_dims", "rope_key", "factorization", "whiten", "kv_norm", "heal_steps")
    return ": " + ", ".join(f"{k}={c.get(k)}" for k in keys)


def full_windows(data_cfg, seq_len: int, n: int) -> tuple[torch.Tensor, list[str]]:
    """n windows [n, seq_len] of the evaluation plays with every position a real token, evenly spaced; and their plays."""
    w = eval_windows(data_cfg, "spectra", {"seq_len": seq_len, "stride": None, "max_windows": None})
    full = (w[1] != IGNORE).all(1)
    inputs = w[0][full]
    if inputs.shape[0] < n:
        raise ConfigError(f"--windows={n} is invalid (allowed: 1..{inputs.shape[0]} full windows of {seq_len} tokens)")
    keep = np.unique(np.linspace(0, inputs.shape[0] - 1, n).round().astype(np.int64))
    docs = [w.names[d] for d in np.asarray(w.doc)[full.numpy()][keep]]
    return inputs[keep], docs


def layer_measures(st: spectra.LayerStats, rank: int, head_dim: int) -> dict[str, Any]:
    """Effective rank, r90 / r99, the energy held by the top r (ENERGY_RANKS) and beyond ``rank`` of one layer's tensors.

    Only [K_pre; V] and K post-RoPE are accumulated (ACCUMULATED); K_pre, V and every head are diagonal blocks of
    their Grams."""
    kv, k = st.layer["kv_pre_all"], st.layer["k_all"]
    w = k.dim  # H_kv * d_h
    grams = {"k_pre_all": kv.block(slice(0, w)), "k_all": k, "v_all": kv.block(slice(w, 2 * w)), "kv_pre_all": kv}
    out: dict[str, Any] = {}
    ranks = sorted({*ENERGY_RANKS, rank})
    for name in TENSORS:
        e = spectra.spectrum_stats(grams[name].spectrum(), TAUS, ranks, rtol=1e-6)
        out[name] = {"dim": grams[name].dim, "erank": e["erank"], "r90": e["r90"], "r99": e["r99"],
                     "tail": 1.0 - e[f"energy_r{rank}"], "energy_top": {r: e[f"energy_r{r}"] for r in ranks}}
    for name, whole in (("k_pre", grams["k_pre_all"]), ("k", k), ("v", grams["v_all"])):  # per KV head (KV-CoRE)
        heads = [whole.block(slice(h, h + head_dim)) for h in range(0, w, head_dim)]
        out[f"{name}_per_head_erank"] = [spectra.effective_rank(a.spectrum()) for a in heads]
    return out


def predictors(layers: list[dict]) -> dict[str, list[float]]:
    """Per-layer spectrum measures correlated with the damage: {label: [value per layer]}."""
    out = {}
    for name, label in TENSORS.items():
        for key in ("erank", "r90", "r99"):
            out[f"{label} {key}"] = [l["spectra"][name][key] for l in layers]
    rank = layers[0]["latent_rank"]
    same = all(l["latent_rank"] == rank for l in layers)
    out[f"[K_pre; V] energy beyond rank {rank if same else 'r_l'} (eval)"] = [l["spectra"]["kv_pre_all"]["tail"] for l in layers]
    if all(l.get("calib_discarded") is not None for l in layers):
        out["energy discarded by the whitened truncation (calibration)"] = [l["calib_discarded"] for l in layers]
    if all(l.get("rorope_energy") is not None for l in layers):
        out["RoRoPE: kept pairs' key energy on the rotated key (calibration)"] = [l["rorope_energy"] for l in layers]
    return out


def k_vs_v(layers: list[dict]) -> list[dict]:
    """Paired per-layer differences K - V of erank / r90 / r99 with a t-interval over layers."""
    rows = []
    for k_name in ("k_pre_all", "k_all"):
        for key in ("erank", "r90", "r99"):
            d = [l["spectra"][k_name][key] - l["spectra"]["v_all"][key] for l in layers]
            iv = mean_interval(d, CONFIDENCE)
            rows.append({"comparison": f"{TENSORS[k_name]} - V, {key}", "mean": float(np.mean(d)),
                         "ci_low": None if iv is None else iv[0], "ci_high": None if iv is None else iv[1],
                         "n_layers": len(d), "layers_k_below_v": int(sum(x < 0 for x in d)),
                         "layers_k_above_v": int(sum(x > 0 for x in d))})
    return rows


def markdown(rec: dict) -> str:
    """spectra.md: the per-layer table, K vs V and the correlations."""
    m = rec["meta"]
    lines = [
        "# SmolLM2-135M: K / V spectra per layer vs conversion damage (generated by `spectra.py`)",
        "",
        f"Commit {m['commit']}; {m['n_windows']} full windows x {m['seq_len']} tokens of the evaluation plays "
        f"({m['n_tokens']} tokens: {', '.join(sorted(set(m['window_docs'])))}); converted model: {m['converted']}. "
        "Spectra are of the original (uncentred, every KV head side by side: K and V 192 wide, [K_pre; V] 384). "
        "Damage: teacher-forced relative error ||attn_mla(x) - attn_orig(x)|| / ||attn_orig(x)|| of each layer on the "
        "original's own input of that layer.",
        "",
        "| layer | erank K pre | erank K post | erank V | erank [K_pre; V] | r90 K pre / post / V | r99 K pre / post / V "
        "| r99 [K_pre; V] | tail beyond rank (eval) | discarded (calib) | RoRoPE energy (calib) | damage |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for l in rec["layers"]:
        s = l["spectra"]
        cd, ro = ("—" if l.get(k) is None else f"{l[k]:.4f}" for k in ("calib_discarded", "rorope_energy"))
        lines.append(
            f"| {l['layer']} | {s['k_pre_all']['erank']:.1f} | {s['k_all']['erank']:.1f} | {s['v_all']['erank']:.1f} "
            f"| {s['kv_pre_all']['erank']:.1f} | {s['k_pre_all']['r90']} / {s['k_all']['r90']} / {s['v_all']['r90']} "
            f"| {s['k_pre_all']['r99']} / {s['k_all']['r99']} / {s['v_all']['r99']} | {s['kv_pre_all']['r99']} "
            f"| {s['kv_pre_all']['tail']:.4f} (r={l['latent_rank']}) | {cd} | {ro} | {l['damage']:.4f} |")
    lines += ["", f"## K vs V (paired over layers; mean difference, {100 * CONFIDENCE:g}% t-interval over layers)", "",
              "| comparison | mean | interval | layers K < V | layers K > V |", "|---|---|---|---|---|"]
    for r in rec["k_vs_v"]:
        iv = "—" if r["ci_low"] is None else f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]"
        lines.append(f"| {r['comparison']} | {r['mean']:+.2f} | {iv} | {r['layers_k_below_v']} / {r['n_layers']} "
                     f"| {r['layers_k_above_v']} / {r['n_layers']} |")
    lines += ["", f"## Does a layer's spectrum predict its damage? Spearman over {len(rec['layers'])} layers", "",
              "| measure | rho | bootstrap interval | p |", "|---|---|---|---|"]
    for name, r in rec["correlations"].items():
        if r is None:
            lines.append(f"| {name} | — (constant or < 3 layers) | | |")
        else:
            lines.append(f"| {name} | {r['rho']:+.3f} | [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | {r['p_value']:.2g} |")
    lines += ["", rec["notes"]["intervals"], ""]
    return "\n".join(lines)


def plot(rec: dict, out: Path) -> list[str]:
    """figures/spectra.{png,pdf}: effective ranks per layer (top), damage and the tail energy (bottom)."""
    layers = rec["layers"]
    x = [l["layer"] for l in layers]
    fig, axes = figure(2, 1, 7.5, 6.5)
    top, bottom = axes[0, 0], axes[1, 0]
    for name, marker in (("k_pre_all", "o"), ("k_all", "s"), ("v_all", "^")):
        top.plot(x, [l["spectra"][name]["erank"] for l in layers], marker=marker, label=f"{TENSORS[name]} (of 192)")
    top.plot(x, [l["spectra"]["kv_pre_all"]["erank"] / 2 for l in layers], ls="--", color="grey",
             label="[K_pre; V] / 2 (of 384 / 2)")
    top.set_ylabel("effective rank (Roy & Vetterli)")
    top.set_title(f"SmolLM2-135M per-layer K/V effective rank ({rec['meta']['n_tokens']} evaluation tokens)")
    top.grid(True, alpha=0.3)
    top.legend(fontsize=8)
    bottom.plot(x, [l["damage"] for l in layers], marker="o", color="C3", label="damage (teacher-forced rel. error)")
    bottom.set_xlabel("layer")
    bottom.set_ylabel("||attn_mla(x) - attn(x)|| / ||attn(x)||", color="C3")
    bottom.grid(True, alpha=0.3)
    twin = bottom.twinx()
    twin.plot(x, [l["spectra"]["kv_pre_all"]["tail"] for l in layers], marker=".", ls=":", color="C4",
              label=f"[K_pre; V] energy beyond rank {layers[0]['latent_rank']}")
    twin.set_ylabel("energy fraction beyond the latent rank", color="C4")
    h1, l1 = bottom.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    bottom.legend(h1 + h2, l1 + l2, fontsize=8)
    bottom.set_title(f"per-layer damage of the converted model (latent rank {layers[0]['latent_rank']})", fontsize=10)
    for ax in (top, bottom):
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    return [save_figure(fig, fig_dir / f"spectra.{ext}", dpi=150).name for ext in ("png", "pdf")]


def main(argv: list[str]) -> None:
    """Measure, analyse and write (see the module doc)."""
    a = parse(argv)
    torch.set_num_threads(a.threads)
    t_start = time.time()
    cfg = study_config(STUDY + a.overrides)
    c = OmegaConf.to_object(cfg.convert)
    source = load_model(c.source).float().eval()
    data_cfg = prepare_data_config(OmegaConf.to_object(cfg.data), c.source, source.cfg.max_seq_len)
    seq = a.seq or data_cfg.seq_len
    inputs, docs = full_windows(data_cfg, seq, a.windows)
    first_layers(source, a.layers)

    t0 = time.time()
    if a.converted is not None:
        try:
            converted = load_model(a.converted).float().eval()
        except (CheckpointError, OSError, ValueError) as e:
            raise ConfigError(f"--converted={a.converted}: {e}") from None
        first_layers(converted, a.layers)
        info, about = None, f"checkpoint {a.converted}" + converted_recipe(a.converted)
    else:
        calib, calib_info = calibration(c, data_cfg)
        converted = convert_model(c, source, calib).eval()
        info = converted.conversion_info
        about = (f"MLA at cache_budget={c.cache_budget} (rope_dims={c.rope_dims}, {str(c.rope_key)}, {str(c.factorization)}, "
                 f"whiten={c.whiten}, kv_norm={c.kv_norm}), calibration {calib_info['convert.calib.text']} "
                 f"({calib_info['convert.calib.tokens']} tokens)")
    t_convert = time.time() - t0
    if not converted.cfg.is_mla or len(converted.layers) != len(source.layers):
        raise ConfigError(f"--converted={a.converted}: {str(converted.cfg.attention)} with {len(converted.layers)} layers "
                          f"(allowed: an MLA conversion of {c.source} with its {len(source.layers)} layers)")

    t0 = time.time()
    stats, h_spec = spectra.attach(source, max_joint_dim=1024, names=ACCUMULATED)
    errors, h_err = layer_error.attach(source, converted)
    run_hooked(source, h_spec + h_err, inputs, a.batch, torch.device("cpu"), return_hidden=True)  # logits unused
    t_pass = time.time() - t0

    layers = []
    for st, err, blk in zip(stats, errors, converted.layers):
        rank = blk.attn.kv_lora_rank
        row = {"layer": st.idx, "latent_rank": rank, "spectra": layer_measures(st, rank, source.cfg.attn_head_dim), "damage": err.rel_err(),
               "damage_per_window": err.per_sequence().tolist()}
        linfo = {} if info is None else info["layers"][st.idx]
        if "kv_weighted_rel_err" in linfo:
            row["calib_discarded"] = linfo["kv_weighted_rel_err"] ** 2
        if "rorope_energy" in linfo:
            row["rorope_energy"] = float(np.mean(linfo["rorope_energy"]))
        layers.append(row)
    damage = [l["damage"] for l in layers]
    for l in layers:
        if not math.isfinite(l["damage"]):
            raise RuntimeError(f"layer {l['layer']}: damage is not finite")
    correlations = {name: spearman_ci(v, damage, n_resamples=a.resamples, confidence_level=CONFIDENCE)
                    for name, v in predictors(layers).items()}
    rec = {
        "meta": {
            "commit": git_commit(), "model": c.source, "converted": about, "n_windows": int(inputs.shape[0]),
            "seq_len": int(seq), "n_tokens": int(inputs.numel()), "window_docs": docs, "n_layers": len(layers),
            "overrides": STUDY + a.overrides, "threads": a.threads,
            "timings_s": {"convert": round(t_convert, 1), "pass": round(t_pass, 1),
                          "total": round(time.time() - t_start, 1)},
        },
        "notes": {
            "erank": "Roy & Vetterli: exp(entropy of sigma / sum(sigma)), sigma = singular values of the stacked rows",
            "r_tau": "smallest r with sum_{i<=r} sigma_i^2 >= tau * sum sigma^2",
            "tail": "1 - energy of the top latent_rank singular values of [K_pre; V] / total (evaluation windows)",
            "calib_discarded": "kv_weighted_rel_err^2 of the conversion: E||(W - BA)u||^2 / E||Wu||^2 on the calibration "
                               "text (the whitened truncation's discarded energy, RoRoPE's rope key removed first)",
            "rorope_energy": "mean over the kept RoPE pairs of the share of the pair's key energy (whitened, over the "
                             "3 KV heads) that RoRoPE's one rotated key carries; the rest loses its rotation",
            "damage": "sqrt(sum ||attn_mla(x) - attn_orig(x)||^2 / sum ||attn_orig(x)||^2), x = the original's input of "
                      "that layer (teacher-forced: no earlier layer's error reaches it)",
            "intervals": "Correlations: Spearman's rho (scipy.stats.spearmanr) with a paired bootstrap over layers "
                         f"(BCa, {a.resamples} resamples, seed 0); K vs V: Student-t over layers. Layers of one model "
                         "are not independent samples (neighbouring layers resemble each other), so these intervals "
                         "are descriptive, not inference about other models; the correlations are many and not "
                         "corrected for multiplicity.",
        },
        "layers": layers,
        "k_vs_v": k_vs_v(layers),
        "correlations": correlations,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    rec["meta"]["figures"] = plot(rec, a.out)
    atomic_write_json(a.out / "spectra.json", rec)
    atomic_write_text(a.out / "spectra.md", markdown(rec))
    print(f"wrote {a.out / 'spectra.json'}, spectra.md, figures/spectra.png/.pdf "
          f"(convert {t_convert:.0f} s, pass {t_pass:.0f} s, total {time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
