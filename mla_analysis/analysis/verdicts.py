"""The claims audit's verdict rules: small pure functions of aggregated groups (report.aggregate).

A group is one variant's dict: ``metrics.<key>`` (mean over seeds), ``metrics.<key>.ci`` (95% Student-t
interval, absent when every seed gave the same value), ``metrics.<key>.n``, ``metrics.<key>.range``,
``n_ok``, ``model.name``, ``model.kv_lora_rank``. Every rule returns a ``Verdict`` whose ``rule`` text
(the docstring's rule, one line) goes into the claim row's conditions, so a reader sees the rule
beside the verdict. Rules changed after results were seen keep their earlier version here
(``*_earlier``) and the row reports both.

Comparisons are between intervals: "A below B" = A's upper bound < B's lower bound (no overlap of the
95% t-intervals over seeds). A group with one seed has no interval: every comparison with it is
unresolved. A rule that cannot separate its two answers at the given n says ``inconclusive``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

HOLDS, CONDITIONS, FAILS = "holds", "holds only under stated conditions", "does not hold"
UNTESTABLE, UNMEASURED, INCONCLUSIVE = "not testable at this scale", "not measured", "inconclusive at this n"
VERDICTS = (HOLDS, CONDITIONS, FAILS, UNTESTABLE, UNMEASURED, INCONCLUSIVE)
LEARNED = 0.5  # a reference "learns" a task when its mean exact match reaches this (else the task cannot show a loss)

Group = dict[str, Any]


@dataclass
class Verdict:
    """A rule's answer: the verdict, the rule as stated, what it found, and the numbers behind it."""

    verdict: str
    rule: str
    found: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


# ---- intervals ---------------------------------------------------------------------------------------


def bounds(g: Optional[Group], key: str) -> Optional[tuple[float, float]]:
    """(low, high) of a metric's 95% interval; (v, v) when all seeds agree; (-inf, inf) with one seed."""
    if g is None:
        return None
    k = key if key.startswith("metrics.") else f"metrics.{key}"
    v = g.get(k)
    if v is None:
        return None
    ci = g.get(k + ".ci")
    if ci:
        return float(ci[0]), float(ci[1])
    if (g.get(k + ".n") or g.get("n_ok") or 0) < 2:
        return -math.inf, math.inf
    return float(v), float(v)


def below(a: Optional[tuple[float, float]], b: Optional[tuple[float, float]]) -> bool:
    """True when interval a lies entirely below interval b (a's upper bound < b's lower bound)."""
    return a is not None and b is not None and a[1] < b[0]


def label(g: Group) -> str:
    """'mha', 'mla r=32', 'mla_coupled_rope r=32'."""
    rank = g.get("model.kv_lora_rank")
    return str(g.get("model.name")) + (f" r={rank}" if rank else "")


def excess(g: Group, key: str = "val_loss", floor_key: str = "val_loss_optimal") -> Optional[tuple[float, float, float]]:
    """(mean, low, high) of a loss's excess over the language's entropy floor (the floor is one number per study)."""
    b = bounds(g, key)
    floor = g.get(f"metrics.{floor_key}")
    if b is None or floor is None:
        return None
    return g[f"metrics.{key}"] - floor, b[0] - floor, b[1] - floor


# ---- claim 9: "<1% loss", MLA close to MHA ----------------------------------------------------------


def rule_close_to_reference(ref: Group, variants: Sequence[Group], tasks: Sequence[str], tol: float) -> Verdict:
    """Claim 9, one study. On every task the reference (MHA) learns (mean exact match >= 0.5) a variant is
    "within" when the lower bound of its exact-match interval is >= (1 - tol) x the reference's mean, "worse"
    when its upper bound is below that; its excess loss over the entropy floor is "worse" when its interval
    lies above the reference's. Within on every task and not worse on loss = within; worse on any = worse;
    else unresolved. Holds (under conditions) when a compressed variant is within; does not hold when every
    variant is worse; else inconclusive."""
    rule = (f"on every task the reference learns (mean EM >= {LEARNED}): within = EM lower bound >= {1 - tol:g} x the "
            "reference's mean, worse = EM upper bound below it; and the excess loss over the entropy floor not "
            "above the reference's (intervals)")
    learned = [t for t in tasks if (ref.get(f"metrics.{t}.exact_match") or 0) >= LEARNED]
    ref_ex = excess(ref)
    within, worse, unresolved = [], [], []
    for g in variants:
        state, why = "within", []
        for t in learned:
            b, target = bounds(g, f"{t}.exact_match"), (1 - tol) * ref[f"metrics.{t}.exact_match"]
            if b is None or b[1] < target:
                state = "worse"
                why.append(f"{t} EM")
            elif b[0] < target and state == "within":
                state = "unresolved"
        ex = excess(g)
        if ref_ex is not None and ex is not None and ex[1] > ref_ex[2]:
            state = "worse"
            why.append("excess loss")
        {"within": within, "worse": worse, "unresolved": unresolved}[state].append(
            label(g) + (f" ({', '.join(why)})" if why else ""))
    found = (f"within: {', '.join(within) or 'none'}; worse: {', '.join(worse) or 'none'}; unresolved: "
             f"{', '.join(unresolved) or 'none'}; tasks the reference learns: {', '.join(learned) or 'none'}")
    metrics = {"within": within, "worse": [w.split(" (")[0] for w in worse], "tasks_learned": learned}
    if not learned and ref_ex is None:
        return Verdict(UNTESTABLE, rule, "the reference learns no task", metrics)
    verdict = CONDITIONS if within else FAILS if len(worse) == len(variants) else INCONCLUSIVE
    return Verdict(verdict, rule, found, metrics)


def combine_close(primary: Verdict, others: Sequence[Verdict]) -> Verdict:
    """Claim 9 over several studies: holds (under conditions) for the variants within on the primary study and
    not worse on any other; does not hold when none is within anywhere and the primary says so; else inconclusive."""
    keep = [v for v in primary.metrics.get("within", []) if all(v not in o.metrics.get("worse", []) for o in others)]
    rule = primary.rule + "; across studies: within on the primary study and not worse on the others"
    if keep:
        return Verdict(CONDITIONS, rule, f"within on every study: {', '.join(keep)}", {"within": keep})
    if primary.verdict == FAILS:
        return Verdict(FAILS, rule, "no variant within", {"within": []})
    return Verdict(INCONCLUSIVE, rule, "no variant within on the primary study and not worse elsewhere", {"within": []})


def rule_close_to_reference_earlier(ref: Group, variants: Sequence[Group], task: str, tol: float) -> Verdict:
    """Claim 9, earlier rule: mean EM >= (1 - tol) x MHA's and mean total loss <= (1 + tol) x MHA's."""
    rule = f"mean EM >= {1 - tol:g} x MHA's and mean total val loss <= {1 + tol:g} x MHA's"
    em0, loss0 = ref.get(f"metrics.{task}.exact_match"), ref.get("metrics.val_loss")
    within = [label(g) for g in variants if em0 is not None and loss0 is not None
              and (g.get(f"metrics.{task}.exact_match") or 0) >= em0 * (1 - tol)
              and (g.get("metrics.val_loss") or math.inf) <= loss0 * (1 + tol)]
    return Verdict(CONDITIONS if within else FAILS, rule, f"within: {', '.join(within) or 'none'}", {"within": within})


# ---- claim 10: too much compression hurts -------------------------------------------------------------


def rule_compression_hurts(refs: Sequence[Group], variants: Sequence[Group], task: str) -> Verdict:
    """Claim 10. Holds when some compressed variant's exact-match interval lies below that of every reference
    (MHA and full-rank MLA) on a task the references learn; not testable when they do not learn it;
    does not hold when no variant is below."""
    rule = (f"hurts = {task} EM interval below every reference's (MHA, full-rank MLA), on a task each reference "
            f"learns (mean EM >= {LEARNED})")
    if not refs or any((r.get(f"metrics.{task}.exact_match") or 0) < LEARNED for r in refs):
        return Verdict(UNTESTABLE, rule, "a reference does not learn the task", {"below": []})
    hurt = [label(g) for g in variants
            if all(below(bounds(g, f"{task}.exact_match"), bounds(r, f"{task}.exact_match")) for r in refs)]
    return Verdict(HOLDS if hurt else FAILS, rule, f"below every reference: {', '.join(hurt) or 'none'}", {"below": hurt})


def rule_compression_hurts_earlier(ref: Group, variants: Sequence[Group], task: str, tol: float) -> Verdict:
    """Claim 10, earlier rule: some rank's mean EM < (1 - tol) x MHA's mean."""
    em0 = ref.get(f"metrics.{task}.exact_match") or 0
    low = [label(g) for g in variants if g.get(f"metrics.{task}.exact_match") is not None
           and g[f"metrics.{task}.exact_match"] < em0 * (1 - tol)]
    return Verdict(HOLDS if low else FAILS, f"mean EM < {1 - tol:g} x MHA's mean", f"below: {', '.join(low) or 'none'}",
                   {"below": low})


# ---- claim 11: fine detail ------------------------------------------------------------------------------


def rule_fine_detail(ref: Group, variants: Sequence[Group], tasks: Sequence[str]) -> Verdict:
    """Claim 11. Reference fixed a priori: the MHA of the same study. Every other variant (GQA, MQA, every MLA)
    is "worse" on a detail task when its exact-match upper bound is below the reference's lower bound; a
    task the reference does not learn (mean EM < 0.5) cannot show a loss. Holds (under conditions) when a
    compressed MLA variant is worse on a testable task; not testable when no task is testable; else does
    not hold."""
    rule = (f"reference: the study's MHA; worse = EM upper bound < MHA's lower bound, applied to every variant; "
            f"testable = MHA mean EM >= {LEARNED}")
    testable = [t for t in tasks if (ref.get(f"metrics.{t}.exact_match") or 0) >= LEARNED]
    worse = [f"{label(g)} ({t})" for t in testable for g in variants
             if below(bounds(g, f"{t}.exact_match"), bounds(ref, f"{t}.exact_match"))]
    found = f"testable tasks: {', '.join(testable) or 'none'}; worse than MHA: {', '.join(worse) or 'none'}"
    if not testable:
        return Verdict(UNTESTABLE, rule, found, {"worse": [], "testable": []})
    mla_worse = [w for w in worse if w.startswith("mla")]
    return Verdict(CONDITIONS if mla_worse else FAILS, rule, found, {"worse": worse, "testable": testable})


def rule_fine_detail_earlier(ref: Group, full: Optional[Group], variants: Sequence[Group], tasks: Sequence[str],
                             tol: float) -> Verdict:
    """Claim 11, earlier rule: an MLA variant's upper bound < the better mean of MHA and full-rank MLA - tol,
    on tasks some variant learns (mean >= 0.5), applied to MLA rows only."""
    rule = "worse = upper bound < (the better mean of MHA and full-rank MLA) - tol, MLA rows only"
    learned = [t for t in tasks if any((g.get(f"metrics.{t}.exact_match") or 0) >= LEARNED for g in [ref, *variants])]
    worse = []
    for t in learned:
        best = max((r.get(f"metrics.{t}.exact_match") or 0) for r in (ref, full) if r is not None)
        for g in variants:
            b = bounds(g, f"{t}.exact_match")
            if g.get("model.kv_lora_rank") and g is not full and b is not None and b[1] < best - tol and best >= LEARNED:
                worse.append(f"{label(g)} ({t})")
    if not learned:
        return Verdict(UNTESTABLE, rule, "no task learned", {"worse": []})
    return Verdict(CONDITIONS if worse else FAILS, rule, f"worse: {', '.join(worse) or 'none'}", {"worse": worse})


def seeds_separate(a: Group, b: Group, key: str) -> bool:
    """True when every seed of a beats every seed of b on ``key`` (a's minimum > b's maximum)."""
    ra, rb = a.get(f"metrics.{key}.range"), b.get(f"metrics.{key}.range")
    return bool(ra and rb and ra[0] > rb[1])


# ---- claim 12: long-range association -------------------------------------------------------------------


DROP = "probe.retrieval.retrieval.drop_exact_match"  # within - beyond the training length, per seed
WITHIN = "probe.retrieval.retrieval.within_train.exact_match"


def rule_long_range(refs: Sequence[Group], variants: Sequence[Group]) -> Verdict:
    """Claim 12. A variant that never learned the task (mean exact match within the training length < 0.5)
    is excluded. A learned variant "drops more" when its drop (within minus beyond the training length,
    per seed) has a lower bound above every reference's upper bound (MHA; and MHA with partial RoPE, the
    control for MLA's 8-of-24 rotated dims, when measured). Holds (under conditions) when a compressed MLA
    variant drops more; else does not hold; not testable when no reference learned the task."""
    names = ", ".join(label(r) for r in refs) or "none"
    rule = (f"excluded: mean EM within the training length < {LEARNED}; drops more = drop interval above every "
            f"reference's ({names}), applied to every variant")
    refs = [r for r in refs if (r.get(f"metrics.{WITHIN}") or 0) >= LEARNED and bounds(r, DROP) is not None]
    if not refs:
        return Verdict(UNTESTABLE, rule, "no reference learned the task", {"more": []})
    excluded = [label(g) for g in variants if (g.get(f"metrics.{WITHIN}") or 0) < LEARNED]
    learned = [g for g in variants if (g.get(f"metrics.{WITHIN}") or 0) >= LEARNED]
    more = [label(g) for g in learned if all(below(bounds(r, DROP), bounds(g, DROP)) for r in refs)]
    less = [label(g) for g in learned if all(below(bounds(g, DROP), bounds(r, DROP)) for r in refs)]
    mla_more = [m for m in more if m.startswith("mla")]
    return Verdict(CONDITIONS if mla_more else FAILS, rule,
                   f"drop more than the references: {', '.join(more) or 'none'}; less: {', '.join(less) or 'none'}; "
                   f"excluded (never learned): {', '.join(excluded) or 'none'}",
                   {"more": more, "less": less, "excluded": excluded})


def rule_long_range_earlier(ref: Group, variants: Sequence[Group], tol: float) -> Verdict:
    """Claim 12, earlier rule: an MLA variant's mean drop > MHA's mean drop + tol (point means, all variants)."""
    base = ref.get(f"metrics.{DROP}")
    more = [label(g) for g in variants if label(g).startswith("mla") and base is not None
            and (g.get(f"metrics.{DROP}") or -math.inf) > base + tol]
    return Verdict(CONDITIONS if more else FAILS, "an MLA variant's mean drop > MHA's mean drop + tol",
                   f"more: {', '.join(more) or 'none'}", {"more": more})


# ---- claim 13: expert specialisation ---------------------------------------------------------------------


def layer_stat(g: Group, stat: str) -> Optional[tuple[float, float, float]]:
    """(mean, low, high) of an experts-probe per-layer statistic averaged over MoE layers."""
    keys = sorted(k for k in g if k.startswith("metrics.probe.experts.L") and k.endswith("." + stat))
    if not keys:
        return None
    means, lows, highs = [], [], []
    for k in keys:
        b = bounds(g, k)
        means.append(g[k])
        lows.append(b[0])
        highs.append(b[1])
    n = len(keys)
    return sum(means) / n, sum(lows) / n, sum(highs) / n  # bounds of a mean of layers: the mean of the bounds (conservative)


def n_experts_domains(g: Group) -> tuple[int, int]:
    """(routed experts, domains) of the experts probe, counted from layer 0's keys."""
    e = sum(1 for k in g if k.startswith("metrics.probe.experts.L0.load.e") and k.count(".") == 5)
    d = sum(1 for k in g if k.startswith("metrics.probe.experts.L0.domspec.") and k.endswith(".max"))
    return e, d


def normalised_mi(g: Group) -> Optional[tuple[float, float, float]]:
    """MI(expert; domain) / log(min(#routed experts, #domains)): 1 = routing determines the domain."""
    mi = layer_stat(g, "mi_expert_domain")
    e, d = n_experts_domains(g)
    if mi is None or min(e, d) < 2:
        return None
    z = math.log(min(e, d))
    return mi[0] / z, mi[1] / z, mi[2] / z


def redundancy_at(g: Group, fraction: float) -> Optional[tuple[float, float, float, float]]:
    """(fraction, mean, low, high) of the loss increase with the top-r routed experts disabled, r nearest ``fraction``."""
    best = None
    for k in g:
        if k.startswith("metrics.probe.experts.redundancy.r") and k.endswith(".fraction") and ".dense." not in k:
            r = k[len("metrics.probe.experts.redundancy."): -len(".fraction")]
            b = bounds(g, f"probe.experts.redundancy.{r}.loss_delta")
            if b is not None and (best is None or abs(g[k] - fraction) < abs(best[0] - fraction)):
                best = (g[k], g[f"metrics.probe.experts.redundancy.{r}.loss_delta"], b[0], b[1])
    return best


def _compare(a: Optional[tuple], b: Optional[tuple]) -> str:
    """'more' / 'less' / 'unresolved' for (mean, low, high) triples."""
    if a is None or b is None:
        return "unresolved"
    if a[1] > b[2]:
        return "more"
    if a[2] < b[1]:
        return "less"
    return "unresolved"


def rule_specialisation(faithful: Optional[Group], top2: Optional[Group]) -> Verdict:
    """Claim 13. The variant faithful to the DeepSeekMoE paper (fine-grained + shared experts, softmax gate,
    balance loss: moe_fine) against top-2: it specialises more when both its normalised MI(expert; domain)
    (MI / log min(#experts, #domains)) and its top-domain share have intervals above top-2's, and it is less
    redundant (the paper's test) when disabling its top routed experts at the nearest equal fraction costs
    more loss (interval above). Holds when it specialises more and is less redundant; does not hold when it
    specialises less on both metrics or is more redundant; else inconclusive. Another variant winning does
    not pass the claim by itself."""
    rule = ("faithful variant moe_fine vs moe_top2: more = normalised MI and top-domain share intervals above "
            "top-2's; less redundant = loss increase with the top experts disabled, at the nearest equal fraction, "
            "above top-2's")
    if faithful is None or top2 is None:
        return Verdict(UNMEASURED, rule, "experts probe missing", {})
    mi, share = _compare(normalised_mi(faithful), normalised_mi(top2)), _compare(
        layer_stat(faithful, "top_domain_share"), layer_stat(top2, "top_domain_share"))
    t_r = redundancy_at(top2, 1 / 8) if top2 else None
    f_r = redundancy_at(faithful, t_r[0]) if t_r else None
    red = _compare(f_r and f_r[1:], t_r and t_r[1:])  # "more" loss = less redundant
    found = (f"normalised MI: {mi}; top-domain share: {share}; loss increase when its top experts are disabled: {red} "
             "than top-2's (less = more redundant)"
             + (f" ({f_r[0]:.3f} vs {t_r[0]:.3f} of routed experts)" if f_r and t_r else ""))
    metrics = {"mi": mi, "share": share, "redundancy": red}
    if mi == share == "more" and red == "more":
        return Verdict(HOLDS, rule, found, metrics)
    if (mi == share == "less") or red == "less":
        return Verdict(FAILS, rule, found, metrics)
    return Verdict(INCONCLUSIVE, rule, found, metrics)


def rule_specialisation_earlier(fine: Sequence[Group], top2: Optional[Group]) -> Verdict:
    """Claim 13, earlier rule: either fine-grained variant's mean top-domain share and plug-in MI exceed top-2's."""
    rule = "either fine-grained variant's mean top-domain share and plug-in MI above top-2's"
    if top2 is None or layer_stat(top2, "top_domain_share") is None:
        return Verdict(UNMEASURED, rule, "", {})
    t_share, t_mi = layer_stat(top2, "top_domain_share")[0], layer_stat(top2, "mi_expert_domain")[0]
    more = [label(g) for g in fine if layer_stat(g, "top_domain_share") and layer_stat(g, "top_domain_share")[0] > t_share
            and layer_stat(g, "mi_expert_domain")[0] > t_mi]
    return Verdict(CONDITIONS if more else FAILS, rule, f"more: {', '.join(more) or 'none'}", {"more": more})


# ---- claim 14: auxiliary-loss-free balancing ---------------------------------------------------------------


def rule_aux_free(aux: Optional[Group], free: Optional[Group], gammas: Sequence[float], steps: int) -> Verdict:
    """Claim 14. Testable only when the study sweeps at least two bias update speeds (gamma) and trains at least
    1/gamma steps for the smallest (so the bias can move by 1, the scale of the gate logits); else not testable at this scale.
    When testable: holds when aux-free MaxVio is not above the aux-loss variant's (its lower bound <= the
    other's upper bound) and quality is not worse (excess loss interval not above, copy EM interval not
    below); does not hold otherwise."""
    rule = ("testable = >= 2 gammas swept and steps >= 1/(smallest gamma); then holds = MaxVio not above the aux-loss "
            "variant's and neither excess loss above nor copy EM below (intervals)")
    if aux is None or free is None:
        return Verdict(UNMEASURED, rule, "", {})
    gammas = sorted({float(x) for x in gammas if x})
    if len(gammas) < 2 or steps < 1 / min(gammas):
        return Verdict(UNTESTABLE, rule, f"gamma {', '.join(f'{x:g}' for x in gammas) or 'none'} over {steps} steps",
                       {"testable": False})
    mv_f, mv_a = bounds(free, "probe.experts.max_vio_mean"), bounds(aux, "probe.experts.max_vio_mean")
    ex_f, ex_a = excess(free), excess(aux)
    worse_loss = ex_f is not None and ex_a is not None and ex_f[1] > ex_a[2]
    worse_copy = below(bounds(free, "copy.exact_match"), bounds(aux, "copy.exact_match"))
    balanced = mv_f is not None and mv_a is not None and not below(mv_a, mv_f)
    ok = balanced and not worse_loss and not worse_copy
    return Verdict(HOLDS if ok else FAILS, rule, f"balanced: {balanced}; loss worse: {worse_loss}; copy worse: {worse_copy}",
                   {"testable": True})


def rule_aux_free_earlier(aux: Group, free: Group) -> Verdict:
    """Claim 14, earlier rule: mean MaxVio no higher than with the aux loss and the loss CI not above it."""
    mv_f, mv_a = free.get("metrics.probe.experts.max_vio_mean"), aux.get("metrics.probe.experts.max_vio_mean")
    worse = below(bounds(aux, "val_loss"), bounds(free, "val_loss"))
    if mv_f is None or mv_a is None:
        return Verdict(UNMEASURED, "", "", {})
    return Verdict(CONDITIONS if mv_f <= mv_a and not worse else FAILS,
                   "mean MaxVio <= the aux-loss variant's and the loss CI not above it", "", {})


# ---- claim 6: decompression compute --------------------------------------------------------------------------


def rule_decompression(timing: dict[str, Sequence[float]]) -> Verdict:
    """Claim 6. From repeated decode timings (per repeat: the median step time) on one device: holds when
    absorbed MLA is slower than MHA on every repeat (its fastest repeat slower than MHA's slowest); holds
    under conditions when only the naive path is (naive's fastest > MHA's slowest, absorbed not); else
    does not hold."""
    rule = "slower = the variant's fastest repeat slower than MHA's slowest (repeats of the median step time)"
    mha, naive, absorb = (timing.get(k) for k in ("mha", "mla_naive", "mla_absorb"))
    if not mha or not naive or not absorb:
        return Verdict(UNMEASURED, rule, "", {})
    if min(absorb) > max(mha):
        return Verdict(HOLDS, rule, "absorbed MLA slower than MHA on every repeat", {})
    if min(naive) > max(mha):
        return Verdict(CONDITIONS, rule, "only naive MLA (decompressing the cache every step) is slower than MHA", {})
    return Verdict(FAILS, rule, "neither MLA path slower than MHA on every repeat", {})


# ---- arithmetic claims -----------------------------------------------------------------------------------------


def rule_reduction(measured: dict[str, float], claimed: float, tol: float = 0.005) -> Verdict:
    """Claims 1-2. Holds when every stated baseline gives the claimed reduction (within ``tol``); holds under
    conditions when some do; does not hold when none does."""
    rule = f"a baseline matches when its reduction is within {100 * tol:g} points of {100 * claimed:g}%"
    hits = [k for k, v in measured.items() if abs(v - claimed) <= tol]
    verdict = HOLDS if len(hits) == len(measured) else CONDITIONS if hits else FAILS
    return Verdict(verdict, rule, f"matching: {', '.join(hits) or 'none'}", {"matching": hits})


def rule_needs_measurement(measured_at_scale: bool) -> Verdict:
    """Claims 4, 7 and 15's DeepSeek-V3 part: a claim about a system at scale is not testable without a
    measurement of that system; arithmetic from its config bounds it but does not test it."""
    rule = "testable only with a measurement of the system the claim is about (not its config arithmetic)"
    return Verdict(HOLDS if measured_at_scale else UNTESTABLE, rule, "" if measured_at_scale else "no such measurement")


def rule_complexity(mla_flops_per_cached_token: float, mha_flops_per_cached_token: float) -> Verdict:
    """Claim 5. O(n^2 d) -> O(n k d) would need fewer attention FLOPs per cached token than MHA (k < d);
    does not hold when absorbed MLA does at least as many."""
    rule = "holds only if absorbed MLA's attention FLOPs per cached token are below MHA's"
    ratio = mla_flops_per_cached_token / mha_flops_per_cached_token
    return Verdict(HOLDS if ratio < 1 else FAILS, rule, f"ratio {ratio:.2f}x MHA's", {"ratio": ratio})


def rule_moe_compute(flops_saved: float, claimed: float, quality_not_worse: Optional[bool]) -> Verdict:
    """Claim 8. A compute saving at matched quality: the FLOPs ratio alone does not test it. Holds under
    conditions when the FLOPs saving reaches the claim and the tiny MoE study shows quality not worse than
    the dense model; does not hold when its quality is worse; not testable without the study."""
    rule = (f"FLOPs saving >= {100 * claimed:g}% and, at matched quality, the MoE's excess loss not above and copy EM "
            "not below the dense model's (tiny study)")
    if quality_not_worse is None:
        return Verdict(UNTESTABLE, rule, "no quality comparison", {})
    if flops_saved >= claimed and quality_not_worse:
        return Verdict(CONDITIONS, rule, "saving reached, quality not worse at the tiny scale", {})
    return Verdict(FAILS, rule, "saving not reached or quality worse", {})
