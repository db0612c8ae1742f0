"""experiments/real_experts/tables.py on synthetic records: the README's rule boundaries (5-7), "not run", provenance."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import EXPERTS_SHAPE, experts_record

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("real_experts_tables", ROOT / "experiments/real_experts/tables.py")
T = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T)

SHAPE = EXPERTS_SHAPE
P = "metrics.probe.experts."
_flat = experts_record


def _rows(flats: list[dict]) -> dict:
    return {T.variant_key(f): {"flat": f, "dir": Path("."), "env": {}} for f in flats}


def _main(make) -> dict:
    """The 6 healed main variants, flat dicts from make(layout, balance)."""
    return _rows([make(lay, bal) for lay in SHAPE for bal in T.BALANCES])


def test_a_layer_specialises_at_p_0_01_and_ami_0_01_inclusive():
    ami = np.full(30, 0.5)
    p = np.full(30, 0.5)
    ami[:3], p[:3] = 0.01, 0.01  # on both boundaries: counted
    ami[3], p[3] = 0.0099, 0.001  # AMI just below
    ami[4], p[4] = 0.5, 0.0101  # p just above
    assert T.specialising_layers(_flat("fine", ami=ami, p=p), "genre") == (3, 30)


@pytest.mark.parametrize("related,verdict", [(15, "supported"), (14, "mixed"), (4, "mixed"), (3, "not supported"),
                                             (0, "not supported")])
def test_rule7_per_variant_boundaries(related, verdict):
    f = _flat("fine", energy_related=related)
    assert T.related_layers(f) == (related, 30) and T.rule7_variant(f) == verdict


def test_rule7_study_needs_every_main_variant_to_agree():
    rows = _main(lambda lay, bal: _flat(lay, bal, energy_related=20))
    assert T.rule7_study(rows, T.AFTER) == "supported"
    rows[("coarse_top2", "aux", 0.125, T.AFTER)]["flat"] = _flat("coarse_top2", "aux", energy_related=10)
    assert T.rule7_study(rows, T.AFTER).startswith("no single verdict")
    del rows[("coarse_top2", "aux", 0.125, T.AFTER)]
    assert T.rule7_study(rows, T.AFTER).startswith("not run (5 of 6")
    # before healing: one model per layout (the balance setting has not acted)
    before = _rows([_flat(lay, "auxfree", heal=0, energy_related=2) for lay in SHAPE])
    assert T.rule7_study(before, T.BEFORE) == "not supported"


def test_rule5_fine_must_exceed_both_coarse_under_both_balances_with_a_paired_interval_above_zero():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.02, 0.05, 30)

    def make(lay, bal, fine_gain=0.01, noise=0.0):
        return _flat(lay, bal, ami=base + (fine_gain + noise * rng.normal(size=30) if lay == "fine" else 0.0))

    rows = _main(make)
    verdict, lines = T.rule5(rows, "genre", T.AFTER)
    assert verdict == "fine-grained specialises more" and len(lines) == 4
    # one coarse variant, under one balance setting, equal to fine on average: not distinguishable
    key = ("coarse_top2", "aux", 0.125, T.AFTER)
    rows[key]["flat"] = _flat("coarse_top2", "aux", ami=base + 0.01)
    assert T.rule5(rows, "genre", T.AFTER)[0] == "not distinguishable"
    # fine's mean above but the per-layer differences scatter around it: the t-interval covers 0
    noisy = _main(lambda lay, bal: make(lay, bal, fine_gain=0.002, noise=0.05))
    f, c = noisy[("fine", "aux", 0.125, T.AFTER)]["flat"], noisy[("coarse_top1", "aux", 0.125, T.AFTER)]["flat"]
    m, lo, hi, n = T.paired_interval(T.layer_values(f, r"L(\d+)\.spec\.genre\.ami"),
                                     T.layer_values(c, r"L(\d+)\.spec\.genre\.ami"))
    assert n == 30 and lo < 0 < hi
    assert T.rule5(noisy, "genre", T.AFTER)[0] == "not distinguishable"
    del rows[("fine", "auxfree", 0.125, T.AFTER)]
    assert T.rule5(rows, "genre", T.AFTER)[0] == "not run"


def test_rule6_margin_must_exceed_the_balance_spread_strictly():
    # coarse_top1's deltas 0.5 (aux) and 0.75 (auxfree): spread 0.25; fine's 1.0 and 1.0: spread 0
    deltas = {("fine", "aux"): 1.0, ("fine", "auxfree"): 1.0, ("coarse_top1", "aux"): 0.5,
              ("coarse_top1", "auxfree"): 0.75, ("coarse_top2", "aux"): 0.5, ("coarse_top2", "auxfree"): 0.5}
    rows = _main(lambda lay, bal: _flat(lay, bal, delta=deltas[(lay, bal)]))
    verdict, lines = T.rule6(rows, T.AFTER)
    assert verdict == "not distinguishable"  # fine - coarse_top1 under auxfree = 0.25 = the spread, not more
    assert sum("(fails)" in x for x in lines) == 1
    deltas[("fine", "auxfree")] = 1.0625  # margin 0.3125 against spread max(0.0625, 0.25)
    rows = _main(lambda lay, bal: _flat(lay, bal, delta=deltas[(lay, bal)]))
    assert T.rule6(rows, T.AFTER)[0] == "fine-grained is less redundant"
    assert T.rule6(rows, T.BEFORE)[0].startswith("not applicable")


def test_tables_write_not_run_rows_verdicts_check_and_provenance(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(T, "figures", lambda rows, out: drawn.append((len(rows), out)))  # matplotlib: seconds
    runs = tmp_path / "run"
    flats = [_flat(lay, bal, energy_related=20) for lay in SHAPE for bal in T.BALANCES]
    flats.append(_flat("fine", "auxfree", frac=1.0, heal=0, before=3.5 + 2e-4))  # the full-activation check
    for i, f in enumerate(flats):
        (runs / str(i)).mkdir(parents=True)
        (runs / str(i) / "results.json").write_text(json.dumps({"status": "ok", "flat": f, "metrics": {},
                                                                "env": {"git_commit": "abc123-dirty"}}))
    (runs / "9").mkdir()
    (runs / "9" / "results.json").write_text(json.dumps({"status": "failed", "flat": _flat("fine", frac=0.25),
                                                          "metrics": {}}))
    out = tmp_path / "out"
    T.main([str(runs), "--out", str(out)])
    text = (out / "results.md").read_text()
    assert "| after | fine | auxfree | 0.25 | not run |" in text  # the failed record does not count
    assert "| before | coarse_top1 | - | 0.125 | not run |" in text
    assert "| after | fine | aux | 0.125 | 0.500 | 0.200 |" in text  # excess before / after (rule 4)
    assert "Rule 7 (KV rank vs routing), study: **supported**" in text
    assert "pass (|.| < 1e-3)" in text and "abc123-dirty" in text
    assert drawn == [(7, out / "figures")]


def test_load_heat_map_is_the_load_fraction_times_the_expert_count():
    f = _flat("coarse_top1")
    f[P + "L3.load.e5"], f[P + "L3.load.e0"] = 0.25, 0.0
    mat = T.load_matrix(f)
    assert mat.shape == (30, 8) and mat[0].tolist() == [1.0] * 8
    assert mat[3, 5] == 2.0 and mat[3, 0] == 0.0
