"""The real_experts study's tables, verdicts (README rules 5-7) and figures, generated from the run records.

Run: python experiments/real_experts/tables.py [SWEEP_DIR ...]   (default: experiments/real_experts/run)
Reads every results.json (status ok) below the sweep dirs; writes ``results.md`` and
``figures/{load,coact,specialisation,excess_loss}.{png,pdf}`` beside this file (``--out DIR``: into DIR instead).

A record is one variant (layout from convert.n_routed_experts / n_shared_experts, balance from
convert.moe_aux_alpha / moe_bias_update_speed, convert.active_fraction) at one stage: ``convert.heal_steps=0``
-> "before healing" (its probe saw the unhealed model; the two balance settings are one model then, since
balancing acts only while healing), else "after healing" (its probe saw the healed model; the excess loss
before healing comes from its ``convert.before`` eval). Variants of the pre-registered grid without a record
are "not run". Rules as in the README; where a rule needs both balance settings, before healing the one
unhealed model of each layout stands for both (rule 5), and rule 6 (whose only replicate is the balance
setting) is not applicable. Rule 6 reading: under each balance setting, fine's delta minus the coarse
variant's must exceed the larger of the two layouts' aux-vs-auxfree spreads.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import stats

from mla_analysis.training.results import RESULTS_FILE, find_run_dirs, load_record

HERE = Path(__file__).resolve().parent
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


def load(run_dirs: list[Path]) -> dict[tuple, dict]:
    """Finished records keyed (layout, balance, active fraction, stage); a later record of one key replaces an earlier."""
    rows: dict[tuple, dict] = {}
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
    """Mean of the per-layer differences a - b over common layers and its 95% t-interval: (mean, low, high, n)."""
    common = sorted(set(a) & set(b))
    d = np.array([a[l] - b[l] for l in common])
    n = len(d)
    if n < 2:
        return (float(d.mean()) if n else math.nan), math.nan, math.nan, n
    half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half), n


def main_rows(rows: dict, stage: str) -> dict[tuple[str, str], Optional[dict]]:
    """{(layout, balance): flat or None} of the main comparison at a stage."""
    return {(lay, bal): (rows.get((lay, bal, MAIN_FRACTION, stage)) or {}).get("flat")
            for lay in LAYOUTS.values() for bal in stage_balances(stage)}


def rule5(rows: dict, label: str, stage: str) -> tuple[str, list[str]]:
    """Rule 5 verdict on a label at a stage, and one line per fine-vs-coarse comparison."""
    main = main_rows(rows, stage)
    if any(v is None for v in main.values()):
        return "not run", []
    lines, ok = [], True
    for bal in stage_balances(stage):
        fine = main[("fine", bal)]
        for coarse in COARSE:
            other = main[(coarse, bal)]
            a, b = fine[f"{PROBE}spec.{label}.ami_mean"], other[f"{PROBE}spec.{label}.ami_mean"]
            m, lo, hi, n = paired_interval(layer_values(fine, rf"L(\d+)\.spec\.{label}\.ami"),
                                           layer_values(other, rf"L(\d+)\.spec\.{label}\.ami"))
            passed = a > b and (lo > 0 or hi < 0)
            ok &= passed
            lines.append(f"fine vs {coarse} ({bal}): ami_mean {a:.4f} vs {b:.4f}, per-layer difference {m:+.4f} "
                         f"[{lo:+.4f}, {hi:+.4f}] (n={n}){'' if passed else ' (fails)'}")
    return ("fine-grained specialises more" if ok else "not distinguishable"), lines


def rule6(rows: dict, stage: str) -> tuple[str, list[str]]:
    """Rule 6 verdict at a stage (after healing only), and one line per comparison."""
    if stage != AFTER:
        return "not applicable (before healing the balance settings are one model: no replicate)", []
    main = main_rows(rows, stage)
    if any(v is None for v in main.values()):
        return "not run", []
    delta = {k: v[f"{PROBE}redundancy.r1.loss_delta"] for k, v in main.items()}
    spread = {lay: abs(delta[(lay, "aux")] - delta[(lay, "auxfree")]) for lay in LAYOUTS.values()}
    lines, ok = [], True
    for bal in BALANCES:
        for coarse in COARSE:
            margin = delta[("fine", bal)] - delta[(coarse, bal)]
            need = max(spread["fine"], spread[coarse])
            ok &= margin > need
            lines.append(f"fine vs {coarse} ({bal}): delta {delta[('fine', bal)]:.4f} vs {delta[(coarse, bal)]:.4f}, "
                         f"margin {margin:+.4f} against spread {need:.4f}{'' if margin > need else ' (fails)'}")
    return ("fine-grained is less redundant" if ok else "not distinguishable"), lines


def rule7_study(rows: dict, stage: str) -> str:
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


def fmt(v: Optional[float], digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def grid() -> list[tuple]:
    """Every (layout, balance, fraction, stage) the README's commands make (main and sweep; both stages)."""
    keys = []
    for stage in (BEFORE, AFTER):
        for lay in LAYOUTS.values():
            keys += [(lay, bal, MAIN_FRACTION, stage) for bal in stage_balances(stage)]
        bal = "auxfree" if stage == AFTER else NO_BALANCE
        keys += [("fine", bal, f, stage) for f in SWEEP_FRACTIONS if f != MAIN_FRACTION]
    return keys


def variant_table(rows: dict) -> list[str]:
    lines = ["| stage | layout | balance | active fraction | excess loss before | excess loss after | MaxVio (mean) | "
             + " | ".join(f"{lab}: layers / ami_mean" for lab in LABELS) + " | redundancy r=1 delta | "
             "energy-related layers | rule 7 |", "|" + "---|" * (10 + len(LABELS))]
    for key in grid():
        lay, bal, frac, stage = key
        head = f"| {stage} | {lay} | {bal} | {frac:g} |"
        row = rows.get(key)
        if row is None:
            lines.append(head + " not run |" + " |" * (5 + len(LABELS)))
            continue
        f = row["flat"]
        spec = []
        for lab in LABELS:
            n, of = specialising_layers(f, lab)
            spec.append(f"{n}/{of} / {fmt(f.get(f'{PROBE}spec.{lab}.ami_mean'), 4)}")
        rel, tested = related_layers(f)
        lines.append(f"{head} {fmt(excess(f, BEFORE))} | {fmt(excess(f, AFTER))} | {fmt(f.get(PROBE + 'max_vio_mean'))} | "
                     + " | ".join(spec) + f" | {fmt(f.get(PROBE + 'redundancy.r1.loss_delta'), 4)} | {rel}/{tested} | "
                     f"{rule7_variant(f) if tested else '—'} |")
    return lines


def report(rows: dict) -> list[str]:
    """results.md lines: the variant table, the verdicts of rules 5-7 per stage, the full-activation check, provenance."""
    lines = ["# real_experts: results (generated by tables.py from the run records; do not edit)", "",
             "Excess loss = val_loss - convert.source.val_loss (nats/token, the original on the same evaluation "
             "windows; rule 4). Layers / ami_mean: MoE layers that specialise on the label (p <= 0.01 and AMI >= 0.01; "
             "rule 5) of those with the statistic, and spec.<label>.ami_mean. Energy-related layers: rule 7. "
             "Probe metrics of a 'before' row are of the unhealed model, of an 'after' row of the healed one.", ""]
    lines += variant_table(rows)
    for stage in (BEFORE, AFTER):
        lines += ["", f"## Verdicts {stage} healing", ""]
        for lab in LABELS:
            verdict, detail = rule5(rows, lab, stage)
            lines.append(f"- Rule 5, {lab}: **{verdict}**")
            lines += [f"  - {d}" for d in detail]
        verdict, detail = rule6(rows, stage)
        lines.append(f"- Rule 6 (redundancy): **{verdict}**")
        lines += [f"  - {d}" for d in detail]
        lines.append(f"- Rule 7 (KV rank vs routing), study: **{rule7_study(rows, stage)}**")
    full = rows.get(("fine", NO_BALANCE, 1.0, BEFORE)) or rows.get(("fine", "auxfree", 1.0, AFTER))
    lines += ["", "## Check: at active fraction 1 the unhealed model is the original (rule 2)", ""]
    if full is None:
        lines.append("not run")
    else:
        e = excess(full["flat"], BEFORE)
        lines.append(f"excess loss before healing {e:+.2e} nats/token: {'pass' if abs(e) < 1e-3 else 'FAIL'} (|.| < 1e-3)")
    commits = sorted({r["env"].get("git_commit", "?") for r in rows.values()})
    lines += ["", f"Provenance (rule 8): records from commit(s) {', '.join(commits) or 'none'}."]
    return lines


def main(argv: list[str]) -> None:
    out = HERE
    if "--out" in argv:
        i = argv.index("--out")
        out, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2:]
    rows = load([Path(a) for a in argv] or [HERE / "run"])
    lines = report(rows)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "results.md")
    figures(rows, out / "figures")
    print("\n".join(lines))


# ---- figures --------------------------------------------------------------------------------------------


def shown(rows: dict) -> list[tuple[str, dict]]:
    """(title, row) of the main variants to draw: after healing where recorded, else before."""
    out = []
    for lay in LAYOUTS.values():
        for bal in BALANCES:
            row = rows.get((lay, bal, MAIN_FRACTION, AFTER))
            if row is not None:
                out.append((f"{lay} {bal} (healed)", row))
        row = rows.get((lay, NO_BALANCE, MAIN_FRACTION, BEFORE))
        if row is not None and not any(t.startswith(lay + " ") for t, _ in out):
            out.append((f"{lay} (unhealed)", row))
    return out


def load_matrix(flat: dict) -> np.ndarray:
    """(layers, experts) load fraction times E (1 = perfect balance) from the L<l>.load.e<i> keys."""
    rx = re.compile(re.escape(PROBE) + r"L(\d+)\.load\.e(\d+)$")
    cells = [(int(m.group(1)), int(m.group(2)), v) for k, v in flat.items() if (m := rx.match(k))]
    layers = sorted({c[0] for c in cells})
    n_exp = max(c[1] for c in cells) + 1
    mat = np.zeros((len(layers), n_exp))
    for l, e, v in cells:
        mat[layers.index(l), e] = v * n_exp
    return mat


def figures(rows: dict, out: Path) -> None:
    """Load and co-activation heat maps, specialisation per layer, excess loss vs active fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)

    def save(fig, name: str) -> None:
        for ext in ("png", "pdf"):
            fig.savefig(out / f"{name}.{ext}", bbox_inches="tight", dpi=120)
        plt.close(fig)

    panels = shown(rows)
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
        for ax, (title, row) in zip(axes[0], panels):
            im = ax.imshow(load_matrix(row["flat"]), aspect="auto", cmap="viridis", vmin=0, vmax=3)
            ax.set(title=title, xlabel="expert", ylabel="layer")
            ax.title.set_fontsize(8)
        fig.colorbar(im, ax=axes[0].tolist(), label="load x E (1 = balanced)")
        save(fig, "load")

        coact = []
        for title, row in panels:
            rec = row["dir"] / "experts.json"
            if rec.exists():
                layers = json.loads(rec.read_text())["layers"]
                mid = layers[len(layers) // 2]
                coact.append((f"{title}, layer {mid['layer']}", np.array(mid["coact"])))
        if coact:
            fig, axes = plt.subplots(1, len(coact), figsize=(3.2 * len(coact), 3.2), squeeze=False)
            for ax, (title, co) in zip(axes[0], coact):
                ax.imshow(co, cmap="magma", vmin=0, vmax=1)
                ax.set(title=title, xlabel="expert j", ylabel="expert i")
                ax.title.set_fontsize(8)
            save(fig, "coact")

        fig, axes = plt.subplots(1, len(LABELS), figsize=(4 * len(LABELS), 3.4), squeeze=False)
        for ax, lab in zip(axes[0], LABELS):
            for title, row in panels:
                ami = layer_values(row["flat"], rf"L(\d+)\.spec\.{lab}\.ami")
                ax.plot(sorted(ami), [ami[l] for l in sorted(ami)], marker=".", label=title)
            ax.axhline(AMI_MIN, color="grey", lw=0.8, ls=":")
            ax.set(title=f"specialisation on {lab}", xlabel="layer", ylabel="AMI (expert; label)")
        axes[0][0].legend(fontsize=6)
        save(fig, "specialisation")

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for stage, style in ((BEFORE, "--"), (AFTER, "-")):
        pts = []
        for f in SWEEP_FRACTIONS:
            row = rows.get(("fine", "auxfree", f, AFTER)) or (rows.get(("fine", NO_BALANCE, f, BEFORE))
                                                              if stage == BEFORE else None)
            e = None if row is None else excess(row["flat"], stage)
            if e is not None:
                pts.append((f, e))
        if pts:
            ax.plot(*zip(*pts), style, marker="o", label=f"fine auxfree, {stage} healing")
        for lay, marker in (("coarse_top1", "s"), ("coarse_top2", "^")):
            row = rows.get((lay, "auxfree", MAIN_FRACTION, AFTER)) or (
                rows.get((lay, NO_BALANCE, MAIN_FRACTION, BEFORE)) if stage == BEFORE else None)
            e = None if row is None else excess(row["flat"], stage)
            if e is not None:
                ax.plot([MAIN_FRACTION], [e], marker, fillstyle="none" if stage == BEFORE else "full",
                        label=f"{lay} auxfree, {stage}")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="active fraction of the FFN width", ylabel="excess loss (nats/token)",
           title="SmolLM2-135M MoEfied: cost vs active fraction")
    ax.legend(fontsize=6)
    save(fig, "excess_loss")


if __name__ == "__main__":
    main(sys.argv[1:])
