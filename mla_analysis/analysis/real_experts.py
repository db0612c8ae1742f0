"""The real_experts study's records and its pre-registered rules 5-7 (experiments/real_experts/README.md).

Shared by the study's tables (experiments/real_experts/tables.py) and the claims audit (rows 13-14's real-model
line), so both read the records the same way. A record is one variant (layout from convert.n_routed_experts /
n_shared_experts, balance from convert.moe_aux_alpha / moe_bias_update_speed, convert.active_fraction) at one stage:
``convert.heal_steps=0`` -> "before healing" (its probe saw the unhealed model; the two balance settings are one model
then, since balancing acts only while healing), else "after healing". ``rows`` below is always ``load``'s dict:
(layout, balance, active fraction, stage) -> {"flat", "dir", "env"}. Where a rule needs both balance settings, before
healing the one unhealed model of each layout stands for both (rule 5), and rule 6 (whose only replicate is the
balance setting) is not applicable. Rule 6 reading: under each balance setting, fine's delta minus the coarse
variant's must exceed the larger of the two layouts' aux-vs-auxfree spreads.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..training.results import RESULTS_FILE, find_run_dirs, load_record
from .report import mean_interval

PROBE = "metrics.probe.experts."
LABELS = ("genre", "play", "kind", "token_class")
LAYOUTS = {(62, 2): "fine", (8, 0): "coarse_top1", (16, 0): "coarse_top2"}
COARSE = ("coarse_top1", "coarse_top2")
BALANCES = ("aux", "auxfree")
MAIN_FRACTION = 0.125
SWEEP_FRACTIONS = (0.0625, 0.125, 0.25, 0.5, 1.0)  # fine, auxfree (rule 2's secondary sweep)
BEFORE, AFTER = "before", "after"
NO_BALANCE = "-"  # before healing the balance setting has not acted yet
P_MAX, AMI_MIN = 0.01, 0.01  # rules 5 and 7: a layer specialises / is related when p <= 0.01 and AMI >= 0.01
SUPPORTED_MIN, NOT_SUPPORTED_MAX = 15, 3  # rule 7: of the 30 attention layers

Rows = dict[tuple, dict[str, Any]]


def load(run_dirs: list[Path]) -> Rows:
    """Finished records keyed (layout, balance, active fraction, stage); a later record of one key replaces an earlier."""
    rows: Rows = {}
    for run in find_run_dirs(run_dirs):
        if not (run / RESULTS_FILE).exists():
            continue  # a run that has not written its record yet
        rec = load_record(run)
        key = variant_key(rec["flat"]) if rec["status"] == "ok" else None
        if key is not None:
            rows[key] = {"flat": rec["flat"], "dir": run, "env": rec.get("env", {})}
    return rows


def variant_key(flat: dict) -> Optional[tuple]:
    """(layout, balance, active fraction, stage) of a record; None for a record outside the study's layouts."""
    layout = LAYOUTS.get((flat.get("convert.n_routed_experts"), flat.get("convert.n_shared_experts")))
    if layout is None or flat.get("convert.direction") != "moe":
        return None
    stage = BEFORE if not flat.get("convert.heal_steps") else AFTER
    if stage == BEFORE:
        balance = NO_BALANCE
    elif flat.get("convert.moe_aux_alpha", 0.0) > 0:
        balance = "aux"
    elif flat.get("convert.moe_bias_update_speed", 0.0) > 0:
        balance = "auxfree"
    else:
        balance = "none"
    frac = flat.get("convert.active_fraction")
    if frac is None:  # set by n_activated_experts instead: the same share (k + S) / (E + S)
        e, s = flat["convert.n_routed_experts"], flat["convert.n_shared_experts"]
        frac = (flat["convert.n_activated_experts"] + s) / (e + s)
    return layout, balance, float(frac), stage


def stage_balances(stage: str) -> tuple[str, ...]:
    """The balance settings a stage distinguishes."""
    return BALANCES if stage == AFTER else (NO_BALANCE,)


def layer_values(flat: dict, pattern: str) -> dict[int, float]:
    """{layer: value} of the probe keys matching ``pattern`` with one ``(\\d+)`` group for the layer."""
    rx = re.compile(re.escape(PROBE) + pattern + "$")
    return {int(m.group(1)): v for k, v in flat.items() if (m := rx.match(k))}


def specialising_layers(flat: dict, label: str) -> tuple[int, int]:
    """Rule 5: (layers with p <= 0.01 and AMI >= 0.01 on the label, MoE layers with the statistic)."""
    ami = layer_values(flat, rf"L(\d+)\.spec\.{label}\.ami")
    p = layer_values(flat, rf"L(\d+)\.spec\.{label}\.p_value")
    return sum(p[l] <= P_MAX and ami[l] >= AMI_MIN for l in ami), len(ami)


def related_layers(flat: dict) -> tuple[int, int]:
    """Rule 7: (attention layers whose energy bins relate to routing: p <= 0.01 and AMI >= 0.01, layers tested)."""
    ami = layer_values(flat, r"energy_routing\.layer(\d+)\.bins\.ami")
    p = layer_values(flat, r"energy_routing\.layer(\d+)\.bins\.p_value")
    return sum(p[l] <= P_MAX and ami[l] >= AMI_MIN for l in ami), len(ami)


def rule7_variant(flat: dict) -> str:
    """Rule 7 per variant: supported (>= 15 related layers), not supported (<= 3), mixed otherwise."""
    n, _ = related_layers(flat)
    return "supported" if n >= SUPPORTED_MIN else "not supported" if n <= NOT_SUPPORTED_MAX else "mixed"


def paired_interval(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, float, int]:
    """Mean of the per-unit differences a - b over common keys and its 95% t-interval: (mean, low, high, n)."""
    d = np.array([a[k] - b[k] for k in sorted(set(a) & set(b))])
    n = len(d)
    ci = mean_interval(d) if n >= 2 else None
    mean = float(d.mean()) if n else math.nan
    return (mean, *ci, n) if ci else (mean, math.nan, math.nan, n)


def main_rows(rows: Rows, stage: str) -> dict[tuple[str, str], Optional[dict]]:
    """{(layout, balance): flat or None} of the main comparison at a stage."""
    return {(lay, bal): (rows.get((lay, bal, MAIN_FRACTION, stage)) or {}).get("flat")
            for lay in LAYOUTS.values() for bal in stage_balances(stage)}


def missing(rows: Rows, stage: str) -> list[str]:
    """'coarse_top1 aux', ... : the main variants of a stage without a record."""
    return [f"{lay} {bal}" if bal != NO_BALANCE else lay for (lay, bal), v in main_rows(rows, stage).items() if v is None]


def rule5_pairs(rows: Rows, label: str, stage: str) -> Optional[list[dict[str, Any]]]:
    """Rule 5's fine-vs-coarse comparisons on a label at a stage (None when a main variant has no record): per
    balance setting and coarse layout, the two ami_means, the paired per-layer difference's (mean, low, high, n),
    ``more`` (rule 5's test) and ``less`` (its mirror: fine's mean below, the interval below 0)."""
    main = main_rows(rows, stage)
    if any(v is None for v in main.values()):
        return None
    out = []
    for bal in stage_balances(stage):
        fine = main[("fine", bal)]
        for coarse in COARSE:
            other = main[(coarse, bal)]
            a, b = fine[f"{PROBE}spec.{label}.ami_mean"], other[f"{PROBE}spec.{label}.ami_mean"]
            m, lo, hi, n = paired_interval(layer_values(fine, rf"L(\d+)\.spec\.{label}\.ami"),
                                           layer_values(other, rf"L(\d+)\.spec\.{label}\.ami"))
            out.append({"balance": bal, "coarse": coarse, "fine": a, "other": b, "mean": m, "low": lo, "high": hi,
                        "n": n, "more": a > b and (lo > 0 or hi < 0), "less": a < b and hi < 0})
    return out


def rule5(rows: Rows, label: str, stage: str) -> tuple[str, list[str]]:
    """Rule 5 verdict on a label at a stage, and one line per fine-vs-coarse comparison."""
    pairs = rule5_pairs(rows, label, stage)
    if pairs is None:
        return "not run", []
    lines = [f"fine vs {c['coarse']} ({c['balance']}): ami_mean {c['fine']:.4f} vs {c['other']:.4f}, per-layer "
             f"difference {c['mean']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] (n={c['n']})"
             f"{'' if c['more'] else ' (fails)'}" for c in pairs]
    return ("fine-grained specialises more" if all(c["more"] for c in pairs) else "not distinguishable"), lines


def rule6_pairs(rows: Rows, stage: str) -> Optional[list[dict[str, Any]]]:
    """Rule 6's comparisons after healing (None when a main variant has no record or before healing): per balance
    setting and coarse layout, the two deltas, the margin, the spread it must exceed, ``less`` (less redundant: rule
    6's test) and ``more`` (its mirror: fine's delta below the coarse one's by more than the spread)."""
    main = main_rows(rows, stage)
    if stage != AFTER or any(v is None for v in main.values()):
        return None
    delta = {k: v[f"{PROBE}redundancy.r1.loss_delta"] for k, v in main.items()}
    spread = {lay: abs(delta[(lay, "aux")] - delta[(lay, "auxfree")]) for lay in LAYOUTS.values()}
    out = []
    for bal in BALANCES:
        for coarse in COARSE:
            margin, need = delta[("fine", bal)] - delta[(coarse, bal)], max(spread["fine"], spread[coarse])
            out.append({"balance": bal, "coarse": coarse, "fine": delta[("fine", bal)], "other": delta[(coarse, bal)],
                        "margin": margin, "spread": need, "less": margin > need, "more": -margin > need})
    return out


def rule6(rows: Rows, stage: str) -> tuple[str, list[str]]:
    """Rule 6 verdict at a stage (after healing only), and one line per comparison."""
    if stage != AFTER:
        return "not applicable (before healing the balance settings are one model: no replicate)", []
    pairs = rule6_pairs(rows, stage)
    if pairs is None:
        return "not run", []
    lines = [f"fine vs {c['coarse']} ({c['balance']}): delta {c['fine']:.4f} vs {c['other']:.4f}, margin "
             f"{c['margin']:+.4f} against spread {c['spread']:.4f}{'' if c['less'] else ' (fails)'}" for c in pairs]
    return ("fine-grained is less redundant" if all(c["less"] for c in pairs) else "not distinguishable"), lines


def rule7_study(rows: Rows, stage: str) -> str:
    """Rule 7 study verdict at a stage: the answer every main variant gives, else why there is none."""
    main = main_rows(rows, stage)
    have = [v for v in main.values() if v is not None]
    if len(have) < len(main):
        return f"not run ({len(have)} of {len(main)} main variants have records)"
    answers = {rule7_variant(v) for v in have}
    return answers.pop() if len(answers) == 1 else "no single verdict (the main variants disagree: " + \
        ", ".join(sorted(answers)) + ")"


def excess(flat: dict, stage: str) -> Optional[float]:
    """Rule 4: excess loss (nats/token) over the original on the same windows, before or after healing."""
    key = "metrics.convert.before.val_loss" if stage == BEFORE else "metrics.val_loss"
    if stage == AFTER and not flat.get("convert.heal_steps"):
        return None
    return flat[key] - flat["metrics.convert.source.val_loss"]


def play_losses(flat: dict) -> dict[str, float]:
    """{evaluation play: loss} of a record's final eval (``metrics.eval.<play>.<edition>.loss``)."""
    rx = re.compile(r"metrics\.eval\.(.+)\.loss$")
    return {m.group(1): v for k, v in flat.items() if (m := rx.match(k))}
