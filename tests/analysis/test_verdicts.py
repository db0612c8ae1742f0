"""The claims audit's verdict rules (mla_analysis.analysis.verdicts) and report's intervals, on constructed groups and
records built to land on each side of every rule. Interval references: closed forms computed here by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from mla_analysis.analysis import verdicts as V
from mla_analysis.analysis import real_experts as X
from mla_analysis.analysis.report import aggregate, censored_median, mean_interval, share_interval
from mla_analysis.training.results import atomic_write_json, make_record

from tests.helpers import EXPERTS_PLAYS, EXPERTS_SHAPE, experts_record

FLOOR = 1.75


def G(name, rank=None, n=5, **metrics):
    """A group: metric=(mean, low, high) or a plain mean (all seeds equal)."""
    g = {"model.name": name, "model.kv_lora_rank": rank, "n_ok": n, "metrics.val_loss_optimal": FLOOR}
    for k, v in metrics.items():
        key = "metrics." + k.replace("__", ".")
        if isinstance(v, tuple):
            g[key], g[key + ".ci"] = v[0], (v[1], v[2])
        else:
            g[key] = v
        g[key + ".n"] = n
    return g


# ---- intervals --------------------------------------------------------------------------------------


def test_mean_interval_is_the_student_t_closed_form():
    x = [1.0, 2.0, 4.0]
    m, s = 7 / 3, math.sqrt(sum((v - 7 / 3) ** 2 for v in x) / 2)
    t975_df2 = 4.302652729911275  # Student-t 0.975 quantile, 2 df (tables)
    lo, hi = mean_interval(x)
    assert lo == pytest.approx(m - t975_df2 * s / math.sqrt(3)) and hi == pytest.approx(m + t975_df2 * s / math.sqrt(3))
    assert mean_interval([5.0]) is None
    # a percentile bootstrap over 3 values can never leave the seed range; the t-interval does
    assert lo < min(x) and hi > max(x)


def test_share_interval_is_the_wilson_closed_form():
    k, n, z = 2, 3, 1.959963984540054
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert share_interval(k, n) == pytest.approx((centre - half, centre + half))
    lo, hi = share_interval(0, 5)
    assert lo == pytest.approx(0, abs=1e-12) and hi == pytest.approx(z * z / (5 + z * z))
    assert share_interval(0, 0) is None


def test_censored_median_counts_unsolved_seeds():
    assert censored_median([100, 200, None], 1500) == (200.0, False)  # sorted: 100, 200, >1500
    assert censored_median([100, None, None], 1500) == (1500, True)  # the middle seed is censored: "> 1500"
    assert censored_median([100, 300, None, None, 200], 1500) == (300.0, False)


def test_aggregate_labels_intervals_and_ties_data_seed_to_seed(tmp_path):
    for i, (em, solved, steps) in enumerate(((0.9, False, None), (1.0, True, 500), (0.995, True, 750))):
        d = tmp_path / str(i)
        d.mkdir()
        config = {"model": {"name": "mha"}, "seed": i, "data": {"seed": i}, "train": {"steps": 1000}}
        atomic_write_json(d / "results.json", make_record("ok", config, {
            "mqar.exact_match": em, "mqar.solved": solved, "mqar.steps_to_solve": steps}))
    from mla_analysis.analysis.report import load_rows, to_markdown

    keys, aggs = aggregate(load_rows([tmp_path]))
    assert "data.seed" not in keys and len(aggs) == 1  # a data seed equal to the seed is a seed, not a factor
    a = aggs[0]
    assert a["metrics.mqar.exact_match.ci_method"] == "95% t" and a["metrics.mqar.exact_match.n"] == 3
    assert a["metrics.mqar.exact_match.ci"][1] == 1.0  # clipped to [0, 1]
    assert a["metrics.mqar.exact_match.ci"][0] == pytest.approx(mean_interval([0.9, 1.0, 0.995])[0])
    assert (a["metrics.mqar.solved.k"], a["metrics.mqar.solved.n"]) == (2, 3)
    assert a["metrics.mqar.solved.ci"] == pytest.approx(share_interval(2, 3))
    assert a["metrics.mqar.steps_to_solve.censored"] == 1 and a["metrics.mqar.steps_to_solve.median"] == 750
    md = to_markdown(keys, aggs)
    assert "95% t" in md and "95% Wilson" in md and "bootstrap" not in md and "1 censored" in md


# ---- claim 9 -----------------------------------------------------------------------------------------------


def test_close_to_reference_within_worse_unresolved():
    mha = G("mha", mqar__exact_match=(0.99, 0.98, 1.0), val_loss=(1.756, 1.755, 1.757))
    within = G("mla", 32, mqar__exact_match=(0.995, 0.99, 1.0), val_loss=(1.755, 1.754, 1.756))
    loss_worse = G("mla", 16, mqar__exact_match=(0.995, 0.99, 1.0), val_loss=(1.770, 1.765, 1.775))  # EM fine, excess 3x
    em_worse = G("mla", 4, mqar__exact_match=(0.2, 0.1, 0.3), val_loss=(1.756, 1.755, 1.757))
    wide = G("mla", 8, mqar__exact_match=(0.9, 0.5, 1.0), val_loss=(1.756, 1.755, 1.757))
    v = V.rule_close_to_reference(mha, [within, loss_worse, em_worse, wide], ["mqar"], 0.01)
    assert v.verdict == V.CONDITIONS and v.metrics["within"] == ["mla r=32"]
    assert set(v.metrics["worse"]) == {"mla r=16", "mla r=4"} and "unresolved: mla r=8" in v.found
    assert V.rule_close_to_reference(mha, [em_worse, loss_worse], ["mqar"], 0.01).verdict == V.FAILS
    assert V.rule_close_to_reference(mha, [wide], ["mqar"], 0.01).verdict == V.INCONCLUSIVE
    # the earlier rule (relative total loss) passes the 3x excess loss that the new rule rejects
    assert V.rule_close_to_reference_earlier(mha, [loss_worse], "mqar", 0.01).verdict == V.CONDITIONS
    # across studies: within on the first, worse on the second -> not within
    second = V.rule_close_to_reference(mha, [G("mla", 32, mqar__exact_match=(0.5, 0.4, 0.6), val_loss=1.756)], ["mqar"], 0.01)
    assert V.combine_close(v, [second]).verdict == V.INCONCLUSIVE
    assert V.combine_close(v, []).verdict == V.CONDITIONS


# ---- claim 10 ------------------------------------------------------------------------------------------------


def test_compression_hurts_needs_interval_below_every_reference():
    mha, full = G("mha", mqar__exact_match=(0.99, 0.97, 1.0)), G("mla", 64, mqar__exact_match=(0.99, 0.98, 1.0))
    r4, r16 = G("mla", 4, mqar__exact_match=0.0), G("mla", 16, mqar__exact_match=(0.97, 0.9, 1.0))
    assert V.rule_compression_hurts([mha, full], [r4, r16], "mqar").metrics["below"] == ["mla r=4"]
    assert V.rule_compression_hurts([mha, full], [r16], "mqar").verdict == V.FAILS
    unlearned = G("mha", mqar__exact_match=(0.3, 0.1, 0.5))
    assert V.rule_compression_hurts([unlearned, full], [r4], "mqar").verdict == V.UNTESTABLE
    # earlier rule: a mean 2% below MHA counted as hurt, though the intervals overlap
    assert V.rule_compression_hurts_earlier(mha, [r16], "mqar", 0.01).verdict == V.HOLDS


# ---- claim 11 ----------------------------------------------------------------------------------------------


def test_fine_detail_reference_is_mha_and_every_variant_is_tested():
    mha = G("mha", copy__exact_match=(0.9, 0.85, 0.95))
    gqa = G("gqa", copy__exact_match=(0.5, 0.4, 0.6))  # non-MLA variants are tested too
    r8, r64 = G("mla", 8, copy__exact_match=0.0), G("mla", 64, copy__exact_match=(0.95, 0.9, 1.0))
    v = V.rule_fine_detail(mha, [gqa, r8, r64], ["copy"])
    assert v.verdict == V.CONDITIONS and v.metrics["worse"] == ["gqa (copy)", "mla r=8 (copy)"]
    assert V.rule_fine_detail(mha, [gqa, r64], ["copy"]).verdict == V.FAILS  # only GQA worse: not compression by MLA
    weak = G("mha", copy__exact_match=(0.45, 0.0, 1.0))
    assert V.rule_fine_detail(weak, [r8], ["copy"]).verdict == V.UNTESTABLE  # the reference did not learn copy
    # the earlier rule (better of MHA and full-rank MLA, MLA rows only) flags r=8 against full-rank MLA
    assert V.rule_fine_detail_earlier(weak, r64, [weak, r8, r64], ["copy"], 0.01).verdict == V.CONDITIONS


def test_seeds_separate_reads_the_ranges():
    a, b = {"metrics.t.range": (0.33, 0.37)}, {"metrics.t.range": (0.27, 0.32)}
    assert V.seeds_separate(a, b, "t") and not V.seeds_separate(b, a, "t")
    assert not V.seeds_separate(a, {"metrics.t.range": (0.2, 0.34)}, "t")


# ---- claim 12 -------------------------------------------------------------------------------------------------


def _lc(name, rank, within, drop):
    return G(name, rank, **{V.WITHIN.replace(".", "__"): within, V.DROP.replace(".", "__"): drop})


def test_long_range_excludes_unlearned_and_compares_intervals():
    mha = _lc("mha", None, 0.88, (0.17, 0.10, 0.24))
    more = _lc("mla", 32, 0.93, (0.40, 0.30, 0.50))
    same = _lc("mla", 16, 0.90, (0.20, 0.05, 0.35))
    never = _lc("mla", 4, 0.04, (0.9, 0.8, 1.0))  # a huge "drop" from a model that never learned: excluded
    v = V.rule_long_range([mha], [more, same, never])
    assert v.verdict == V.CONDITIONS and v.metrics["more"] == ["mla r=32"] and v.metrics["excluded"] == ["mla r=4"]
    assert V.rule_long_range([mha], [same, never]).verdict == V.FAILS
    # the partial-RoPE control as a second reference: MLA must drop more than both
    control = _lc("mha_partial_rope", None, 0.9, (0.45, 0.35, 0.55))
    assert V.rule_long_range([mha, control], [more]).verdict == V.FAILS
    assert V.rule_long_range([_lc("mha", None, 0.3, 0.1)], [more]).verdict == V.UNTESTABLE
    # earlier rule: point means, r=16's mean drop 0.03 above MHA's counted as "more"
    assert V.rule_long_range_earlier(mha, [same], 0.01).verdict == V.CONDITIONS


# ---- claim 13 ---------------------------------------------------------------------------------------------------


def _moe(name, experts, mi, share, frac, delta):
    g = G(name, **{"probe__experts__L0__mi_expert_domain": mi, "probe__experts__L0__top_domain_share": share,
                   "probe__experts__redundancy__r1__fraction": frac, "probe__experts__redundancy__r1__loss_delta": delta})
    for e in range(experts):
        g[f"metrics.probe.experts.L0.load.e{e}"] = 1 / experts
    for d in ("lm", "mqar", "copy", "passkey"):
        g[f"metrics.probe.experts.L0.domspec.{d}.max"] = 0.5
    return g


def test_specialisation_normalises_mi_and_reads_the_redundancy_test():
    top2 = _moe("moe_top2", 8, (0.3, 0.25, 0.35), (0.24, 0.22, 0.26), 0.125, (1.8, 1.5, 2.1))
    assert V.n_experts_domains(top2) == (8, 4)
    assert V.normalised_mi(top2)[0] == pytest.approx(0.3 / math.log(4))
    good = _moe("moe_fine", 31, (0.6, 0.55, 0.65), (0.4, 0.38, 0.42), 0.129, (2.5, 2.3, 2.7))
    assert V.rule_specialisation(good, top2).verdict == V.HOLDS
    redundant = _moe("moe_fine", 31, (0.6, 0.55, 0.65), (0.4, 0.38, 0.42), 0.129, (0.26, 0.17, 0.35))
    assert V.rule_specialisation(redundant, top2).verdict == V.FAILS  # specialises more but more redundant
    less = _moe("moe_fine", 31, (0.1, 0.05, 0.15), (0.15, 0.14, 0.16), 0.129, (1.8, 1.5, 2.1))
    assert V.rule_specialisation(less, top2).verdict == V.FAILS
    overlap = _moe("moe_fine", 31, (0.32, 0.2, 0.4), (0.25, 0.2, 0.3), 0.129, (1.9, 1.4, 2.3))
    assert V.rule_specialisation(overlap, top2).verdict == V.INCONCLUSIVE
    # earlier rule: either fine variant's means above top-2's passes, even when the faithful one loses
    free = _moe("moe_fine_auxfree", 31, (0.31, 0.1, 0.5), (0.25, 0.1, 0.4), 0.129, 0.5)
    assert V.rule_specialisation_earlier([less, free], top2).verdict == V.CONDITIONS
    assert V.rule_specialisation(less, top2).verdict == V.FAILS


# ---- claim 14 ---------------------------------------------------------------------------------------------------


def test_aux_free_is_untestable_with_one_gamma_or_a_short_run():
    aux = G("moe_fine", probe__experts__max_vio_mean=(0.5, 0.3, 0.7), val_loss=(1.753, 1.752, 1.754),
            copy__exact_match=(0.95, 0.9, 1.0))
    free = G("moe_fine_auxfree", probe__experts__max_vio_mean=(0.55, 0.4, 0.7), val_loss=(1.753, 1.752, 1.754),
             copy__exact_match=(0.93, 0.88, 0.98))
    assert V.rule_aux_free(aux, free, [0.001], 800).verdict == V.UNTESTABLE
    assert V.rule_aux_free(aux, free, [0.001, 0.01], 800).verdict == V.UNTESTABLE  # 800 < 1 / 0.001
    assert V.rule_aux_free(aux, free, [0.001, 0.01], 20_000).verdict == V.HOLDS
    unbalanced = dict(free, **{"metrics.probe.experts.max_vio_mean.ci": (1.0, 1.2)})
    assert V.rule_aux_free(aux, unbalanced, [0.001, 0.01], 20_000).verdict == V.FAILS
    copy_worse = dict(free, **{"metrics.copy.exact_match.ci": (0.0, 0.7)})
    assert V.rule_aux_free(aux, copy_worse, [0.001, 0.01], 20_000).verdict == V.FAILS
    assert V.rule_aux_free_earlier(aux, dict(free, **{"metrics.probe.experts.max_vio_mean": 1.1})).verdict == V.FAILS


# ---- claims 1-8, 15 -----------------------------------------------------------------------------------------------


def test_arithmetic_and_timing_rules():
    assert V.rule_reduction({"a": 0.933, "b": 0.932}, 0.933).verdict == V.HOLDS
    assert V.rule_reduction({"a": 0.933, "b": 0.822}, 0.933).verdict == V.CONDITIONS
    assert V.rule_reduction({"a": 0.5}, 0.933).verdict == V.FAILS
    assert V.rule_complexity(278_528, 65_536).verdict == V.FAILS and V.rule_complexity(1, 2).verdict == V.HOLDS
    assert V.rule_needs_measurement(False).verdict == V.UNTESTABLE
    fast, slow = [1.0, 1.1, 1.2], [2.0, 2.1]
    assert V.rule_decompression({"mha": fast, "mla_naive": slow, "mla_absorb": slow}).verdict == V.HOLDS
    assert V.rule_decompression({"mha": fast, "mla_naive": slow, "mla_absorb": [0.9, 1.15]}).verdict == V.CONDITIONS
    assert V.rule_decompression({"mha": fast, "mla_naive": [1.15, 2.0], "mla_absorb": fast}).verdict == V.FAILS
    assert V.rule_moe_compute(0.83, 0.6, True).verdict == V.CONDITIONS
    assert V.rule_moe_compute(0.83, 0.6, False).verdict == V.FAILS
    assert V.rule_moe_compute(0.83, 0.6, None).verdict == V.UNTESTABLE


def test_one_seed_never_resolves_a_comparison():
    one = G("mla", 8, n=1, mqar__exact_match=0.0)
    one["metrics.mqar.exact_match.n"] = 1
    assert V.bounds(one, "mqar.exact_match") == (-math.inf, math.inf)
    ref = G("mha", mqar__exact_match=(0.99, 0.98, 1.0))
    assert V.rule_compression_hurts([ref], [one], "mqar").verdict == V.FAILS and not V.below(
        V.bounds(one, "mqar.exact_match"), V.bounds(ref, "mqar.exact_match"))


# ---- the real-model rules (claims 9-12 on SmolLM2): one run per variant, intervals over windows / examples --------


def R(**stats):
    """A real-model run: probe statistic=(mean, low, high) -> metrics.probe.<stat>.mean/ci_low/ci_high/n."""
    g = {"windows": stats.pop("windows", None)}
    for k, (m, lo, hi) in stats.items():
        key = "metrics.probe." + k.replace("__", ".")
        g.update({key + ".mean": m, key + ".ci_low": lo, key + ".ci_high": hi, key + ".n": 16})
    return g


def ratio(m, lo, hi):
    """A run whose perplexity ratio to the original is (m, lo, hi): its per-window NLL change is their log."""
    return R(kl__delta_nll=(math.log(m), math.log(lo), math.log(hi)), kl__kl=(m - 1, lo - 1, hi - 1))


def test_real_loss_boundaries_budget_choice_and_healing():
    judge = lambda one, healed=(): V.rule_real_loss(one, list(healed), 288, 0.01)  # noqa: E731
    assert judge({192: ratio(1.005, 1.001, 1.0099)}).verdict == V.HOLDS  # upper bound just inside 1.01
    assert judge({192: ratio(1.005, 1.001, 1.0101)}).verdict == V.INCONCLUSIVE  # just outside, lower bound inside
    assert judge({192: ratio(1.02, 1.0101, 1.03)}).verdict == V.FAILS  # the whole interval above 1.01
    assert judge({192: ratio(1.02, 1.0099, 1.03)}).verdict == V.INCONCLUSIVE
    # the nearest measured budget to 288 decides (192, not 120), and a tie goes to the larger cache
    v = judge({192: ratio(1.005, 1.001, 1.009), 120: ratio(3.0, 2.9, 3.1)})
    assert v.verdict == V.HOLDS and v.metrics["budget"] == 192 and "a stricter test" in v.found
    assert V.rule_real_loss({192: ratio(1.005, 1.001, 1.009), 120: ratio(3.0, 2.9, 3.1)}, [], 156, 0.01).metrics["budget"] == 192
    # healing at the judged budget: within -> under conditions; still above -> does not hold, "recovers part"
    one = {192: ratio(1.85, 1.77, 1.95)}
    assert judge(one, [("healed", 192, ratio(1.005, 1.001, 1.009))]).verdict == V.CONDITIONS
    v = judge(one, [("healed", 192, ratio(1.4, 1.3, 1.5))])
    assert v.verdict == V.FAILS and "recovers part" in v.found
    assert "no recovery shown" in judge(one, [("healed", 192, ratio(1.8, 1.7, 1.9))]).found  # overlaps the one-shot
    # healing at another budget is reported, does not decide
    v = judge(one, [("healed", 120, ratio(1.005, 1.001, 1.009))])
    assert v.verdict == V.FAILS and "120" in v.found and "after the one-shot results were seen" in v.rule
    assert judge({}).verdict == V.UNMEASURED


def windows(kl, nll):
    """kl_windows.json of 4 windows of 100 tokens with per-window mean KL / NLL ``kl`` / ``nll``."""
    return {"doc": ["a", "a", "b", "b"], "tokens": [100] * 4, "kl": [100 * x for x in kl], "nll": [100 * x for x in nll]}


def test_paired_diff_is_the_t_interval_of_the_per_window_difference():
    from scipy.stats import t

    a, b = R(windows=windows([1.0, 1.2, 1.1, 1.5], [4.0] * 4)), R(windows=windows([0.5, 0.6, 0.8, 0.7], [3.0] * 4))
    d = [0.5, 0.6, 0.3, 0.8]
    m = sum(d) / 4
    half = t.ppf(0.975, 3) * math.sqrt(sum((x - m) ** 2 for x in d) / 3) / 2
    assert V.paired_diff(a, b, "kl") == pytest.approx((m, m - half, m + half, 4))
    other = R(windows={**windows([0.5] * 4, [3.0] * 4), "doc": ["a", "b", "b", "b"]})
    assert V.paired_diff(a, other, "kl") is None  # different windows: not pairable


def test_real_monotone_holds_flags_rises_and_needs_a_separated_end_to_end_loss():
    def run(k):  # windows that differ by a noisy but consistent amount: k + (0, 0.01, 0.02, 0.03)
        return R(windows=windows([k + e for e in (0, 0.01, 0.02, 0.03)], [3 + k + e for e in (0.03, 0, 0.02, 0.01)]))

    assert V.rule_real_monotone({192: run(0.7), 120: run(1.3), 48: run(2.2)}).verdict == V.HOLDS
    v = V.rule_real_monotone({192: run(0.7), 120: run(0.5), 48: run(2.2)})  # 120 beats 192: a rise, flagged
    assert v.verdict == V.CONDITIONS and v.metrics["rises"] == ["192 -> 120 (kl)", "192 -> 120 (nll)"]
    noisy = R(windows=windows([0.2, 1.4, 0.4, 1.2], [3.2, 4.4, 3.4, 4.2]))  # mean 0.8 but spread: not separated from 0.7
    assert V.rule_real_monotone({192: run(0.7), 48: noisy}).verdict == V.FAILS
    assert V.rule_real_monotone({192: run(0.7)}).verdict == V.UNMEASURED
    # without per-window files: the recorded intervals, apart or overlapping
    big, small = R(kl__kl=(0.7, 0.6, 0.8), kl__delta_nll=(0.6, 0.5, 0.7)), R(kl__kl=(1.3, 0.81, 1.5), kl__delta_nll=(1, 0.9, 1.1))
    assert V.rule_real_monotone({192: big, 48: small}).verdict == V.HOLDS
    small["metrics.probe.kl.kl.ci_low"] = 0.79
    v = V.rule_real_monotone({192: big, 48: small})
    assert v.verdict == V.FAILS and "unpaired" in v.found


def bins(rare, frequent, **extra):
    return R(token_bins__freq0__delta_nll=rare, token_bins__freq4__delta_nll=frequent, **extra)


def test_real_fine_detail_applies_to_every_variant_and_reads_copying():
    hi = (1.8, 1.51, 2.0)
    assert V.rare_excess(bins(hi, (0.7, 0.6, 1.52))) == []  # the intervals overlap by 0.01
    assert V.rare_excess(bins(hi, (0.7, 0.6, 1.50))) == ["freq0"]  # rare lower bound just above frequent upper
    v = V.rule_real_fine_detail([("MLA 120", bins(hi, (0.7, 0.6, 0.8))), ("int4 g32", bins(hi, (0.7, 0.6, 0.8)))], None, [])
    assert v.verdict == V.CONDITIONS and v.metrics["rare_excess"] == ["MLA 120", "int4 g32"] and "copying not measured" in v.found
    # only a baseline shows it: the rule is applied to it too, but the claim is about MLA
    v = V.rule_real_fine_detail([("MLA 120", bins(hi, (1.7, 1.6, 1.8))), ("int4 g32", bins(hi, (0.7, 0.6, 0.8)))], None, [])
    assert v.verdict == V.FAILS and v.metrics["rare_excess"] == ["int4 g32"]
    # copying at the shortest distance: MLA's top-1 interval below the original's
    ref = R(copying__d256__top1=(0.9, 0.85, 0.95), copying__d1024__top1=(0.9, 0.85, 0.95))
    ref["metrics.probe.copying.distances"] = [1024, 256]
    flat = [("MLA 120", bins(hi, (1.7, 1.6, 1.8)))]
    low, near = R(copying__d256__top1=(0.7, 0.6, 0.84)), R(copying__d256__top1=(0.7, 0.6, 0.86))
    v = V.rule_real_fine_detail(flat, ref, [("MLA 120", low)])
    assert v.verdict == V.CONDITIONS and v.metrics["copy_worse"] == ["MLA 120"] and "distance 256" in v.found
    assert V.rule_real_fine_detail(flat, ref, [("MLA 120", near)]).verdict == V.FAILS
    assert V.rule_real_fine_detail([("MLA 120", R())], None, []).verdict == V.UNMEASURED


def copy_run(top1, half=0.05, first=(0.1, 0.05, 0.15), distances=(256, 512, 1024)):
    g = R(copying__first__top1=first, **{f"copying__d{d}__top1": (y, y - half, y + half) for d, y in zip(distances, top1)})
    g["metrics.probe.copying.distances"] = list(distances)
    return g


def test_copy_slope_is_least_squares_per_doubling_with_propagated_error():
    s, lo, hi = V.copy_slope(copy_run([0.9, 0.8, 0.7], half=0.05), "top1", [256, 512, 1024])
    # x = log2 d = 8, 9, 10: weights (x - 9) / 2 = -0.5, 0, 0.5; SE = sqrt(2 (0.5 x 0.05 / 1.959964)^2)
    se = math.sqrt(2 * (0.5 * 0.05 / 1.959964) ** 2)
    assert s == pytest.approx(-0.1) and lo == pytest.approx(-0.1 - 1.959964 * se) and hi == pytest.approx(-0.1 + 1.959964 * se)


def test_real_long_range_earlier_slope_boundaries():
    ref = copy_run([0.9, 0.9, 0.9], half=0.02)
    steep, mild = copy_run([0.9, 0.7, 0.5], half=0.02), copy_run([0.9, 0.88, 0.86], half=0.02)
    v = V.rule_real_long_range_earlier(ref, [("MLA 120", steep), ("int4 g32", mild)])
    assert v.verdict == V.CONDITIONS and v.metrics["more"] == ["MLA 120"]
    assert V.rule_real_long_range_earlier(ref, [("MLA 120", mild)]).verdict == V.FAILS
    # a variant that does not copy (second occurrence no better than the first) is excluded, not counted
    blind = copy_run([0.12, 0.1, 0.05], half=0.02)
    v = V.rule_real_long_range_earlier(ref, [("MLA 48", blind)])
    assert v.verdict == V.FAILS and v.metrics["excluded"] == ["MLA 48"]
    assert V.rule_real_long_range_earlier(copy_run([0.12, 0.1, 0.1]), [("MLA 120", steep)]).verdict == V.UNTESTABLE
    assert V.rule_real_long_range_earlier(None, [("MLA 120", steep)]).verdict == V.UNMEASURED


def test_copy_retention_is_margin_ratio_with_interval_arithmetic():
    g = copy_run([0.9, 0.7, 0.5], half=0.02, first=(0.1, 0.08, 0.12))
    r, lo, hi = V.copy_retention(g, 256, 1024)
    # margins 0.8 [0.76, 0.84] at 256 and 0.4 [0.36, 0.44] at 1024
    assert r == pytest.approx(0.5) and lo == pytest.approx(0.36 / 0.84) and hi == pytest.approx(0.44 / 0.76)
    # no margin at the shortest distance (interval reaches 0): undefined
    assert V.copy_retention(copy_run([0.18, 0.1, 0.1], half=0.02, first=(0.15, 0.13, 0.17)), 256, 1024) is None


def test_real_long_range_retention_boundaries():
    ref = copy_run([0.9, 0.85, 0.8], half=0.02)  # margins 0.8 -> 0.7: retention 0.875 [0.72, 1.05]
    # near the floor: the same raw slope as the original (-0.05 per doubling), but its whole margin (0.1) is gone:
    # retention 0 [-0.67, 0.67]
    floor = copy_run([0.25, 0.17, 0.15], half=0.02, first=(0.15, 0.13, 0.17))
    v = V.rule_real_long_range(ref, [("MLA 120", floor)])
    assert v.verdict == V.CONDITIONS and v.metrics["more"] == ["MLA 120"]
    # the same floor variant passes the earlier slope rule: the floor effect this rule removes
    assert V.rule_real_long_range_earlier(ref, [("MLA 120", floor)]).verdict == V.FAILS
    # same retention as the original (margin 0.4 -> 0.35): does not degrade more
    same = copy_run([0.5, 0.475, 0.45], half=0.01)
    assert V.rule_real_long_range(ref, [("MLA 120", same)]).verdict == V.FAILS
    # a baseline degrading more does not make the claim hold; it is listed
    v = V.rule_real_long_range(ref, [("int4 g32", floor)])
    assert v.verdict == V.FAILS and v.metrics["more"] == ["int4 g32"]
    blind = copy_run([0.12, 0.1, 0.05], half=0.02)
    v = V.rule_real_long_range(ref, [("MLA 48", blind)])
    assert v.verdict == V.FAILS and v.metrics["excluded"] == ["MLA 48"]
    # a variant whose record stops earlier is compared with the original over its own distances
    short = copy_run([0.9, 0.5], half=0.02, distances=(256, 512))
    v = V.rule_real_long_range(ref, [("MLA 72", short)])
    assert v.metrics["more"] == ["MLA 72"] and "d=256-512" in v.found
    assert V.rule_real_long_range(copy_run([0.12, 0.1, 0.1]), [("MLA 120", floor)]).verdict == V.UNTESTABLE
    assert V.rule_real_long_range(None, [("MLA 120", floor)]).verdict == V.UNMEASURED


# ---- the real experts rules (claims 13-14 on SmolLM2 MoEfied): one run per variant, paired over layers / plays -------


def experts_rows(make=None, flats=()) -> dict:
    """real_experts.load's dict: the healed main variants (both balance settings) from make(layout, balance), or flats."""
    flats = list(flats) or [make(lay, bal) for lay in EXPERTS_SHAPE for bal in ("aux", "auxfree")]
    return {X.variant_key(f): {"flat": f, "dir": None, "env": {}} for f in flats}


BASE_AMI = np.linspace(0.02, 0.05, 30)


def spec(fine_ami, deltas=None):
    """make(layout, balance): fine's per-layer AMI = fine_ami (every label), the coarse layouts' BASE_AMI; r=1 deltas."""
    deltas = deltas or {}
    return lambda lay, bal: experts_record(lay, bal, ami=fine_ami if lay == "fine" else BASE_AMI,
                                           delta=deltas.get((lay, bal), 0.5))


def test_real_specialisation_combines_rules_5_and_6_with_their_mirrors():
    less_red = {("fine", "aux"): 1.0, ("fine", "auxfree"): 1.0}  # coarse 0.5 under both: spread 0, margin 0.5
    more_red = {("fine", "aux"): 0.2, ("fine", "auxfree"): 0.2}
    above, below = BASE_AMI + 0.01, BASE_AMI - 0.01
    assert V.rule_real_specialisation(experts_rows(spec(above, less_red))).verdict == V.HOLDS
    assert V.rule_real_specialisation(experts_rows(spec(above))).verdict == V.CONDITIONS  # redundancy alike
    assert V.rule_real_specialisation(experts_rows(spec(BASE_AMI, less_red))).verdict == V.CONDITIONS  # AMI alike
    v = V.rule_real_specialisation(experts_rows(spec(below)))
    assert v.verdict == V.FAILS and v.metrics["less"] == list(X.LABELS)
    assert V.rule_real_specialisation(experts_rows(spec(BASE_AMI, more_red))).verdict == V.FAILS
    assert V.rule_real_specialisation(experts_rows(spec(below, less_red))).verdict == V.INCONCLUSIVE  # pass + mirror
    assert V.rule_real_specialisation(experts_rows(spec(BASE_AMI))).verdict == V.INCONCLUSIVE  # neither
    # more on one label only (kind), alike on the others: still a pass on specialisation
    one = {lab: BASE_AMI for lab in X.LABELS} | {"kind": above}
    v = V.rule_real_specialisation(experts_rows(spec(one, less_red)))
    assert v.verdict == V.HOLDS and v.metrics["more"] == ["kind"]
    # rule 6 at its boundary: fine - coarse_top1 under auxfree = 0.25 = coarse_top1's aux-vs-auxfree spread, not more
    edge = {("fine", "aux"): 1.0, ("fine", "auxfree"): 1.0, ("coarse_top1", "aux"): 0.5, ("coarse_top1", "auxfree"): 0.75}
    assert V.rule_real_specialisation(experts_rows(spec(above, edge))).verdict == V.CONDITIONS
    edge[("fine", "auxfree")] = 1.0625  # margin 0.3125 against the spread max(0.0625, 0.25)
    assert V.rule_real_specialisation(experts_rows(spec(above, edge))).verdict == V.HOLDS


def test_real_specialisation_is_not_measured_before_every_healed_variant_has_a_record():
    rows = experts_rows(spec(BASE_AMI + 0.01))
    del rows[("coarse_top2", "aux", 0.125, "after")]
    v = V.rule_real_specialisation(rows)
    assert v.verdict == V.UNMEASURED and v.metrics["missing"] == ["coarse_top2 aux"]
    before = experts_rows(flats=[experts_record(lay, heal=0) for lay in EXPERTS_SHAPE])  # every layout, unhealed
    assert set(before) == {(lay, "-", 0.125, "before") for lay in EXPERTS_SHAPE}
    assert V.rule_real_specialisation(before).verdict == V.UNMEASURED


def halfwidth(sd: float, n: int) -> float:
    """The 95% t half-width of the mean of n values with sample standard deviation sd (the closed form)."""
    return stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)


def alternating(mean: float, amp: float, n: int) -> np.ndarray:
    """n values mean +- amp, alternating (n even): sample sd = amp * sqrt(n / (n - 1))."""
    return mean + amp * np.array([(-1) ** i for i in range(n)])


def test_real_aux_free_passes_a_layout_unless_an_interval_lies_above_zero():
    n_l, amp = 30, 0.1
    edge = halfwidth(amp * math.sqrt(n_l / (n_l - 1)), n_l)  # MaxVio difference whose lower bound sits at 0

    def make(mv_shift, loss_shift=0.0, layout_hit="coarse_top1"):
        def f(lay, bal):
            shifted = bal == "auxfree" and lay == layout_hit
            mv = 1.0 + (alternating(mv_shift, amp, n_l) if shifted else 0.0)
            plays = {p: 3.7 + (loss_shift if bal == "auxfree" else 0.0) + 0.01 * i for i, p in enumerate(EXPERTS_PLAYS)}
            return experts_record(lay, bal, max_vio=mv, plays=plays)
        return f

    assert V.rule_real_aux_free(experts_rows(make(-0.2))).verdict == V.HOLDS  # auxfree better balanced, same loss
    assert V.rule_real_aux_free(experts_rows(make(0.99 * edge))).verdict == V.HOLDS  # interval still touches 0
    v = V.rule_real_aux_free(experts_rows(make(1.01 * edge)))  # coarse_top1's interval now above 0: that layout fails
    assert v.verdict == V.CONDITIONS and v.metrics["layouts"]["coarse_top1"] == "fails"
    assert "n=30 layers" in v.found and "n=5 plays" in v.found
    assert V.rule_real_aux_free(experts_rows(make(0.0, loss_shift=0.05))).verdict == V.FAILS  # worse on every play
    rows = experts_rows(make(0.0))
    del rows[("fine", "auxfree", 0.125, "after")]
    v = V.rule_real_aux_free(rows)
    assert v.verdict == V.UNMEASURED and "fine: not run" in v.found
    one_play = lambda lay, bal: experts_record(lay, bal, plays={"hamlet.modern": 3.7})  # noqa: E731
    assert V.rule_real_aux_free(experts_rows(one_play)).verdict == V.INCONCLUSIVE  # no interval from one play
