"""Chance-corrected expert-label MI on constructed routings (known MI, known null), the permutation nulls, the
real-domain labels (token classes, windows) and the energy-bin MI; references: closed forms, sklearn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mla_analysis.probes.experts import (FUNCTION_WORDS, TOKEN_CLASSES, assignment_table, calibrated_mi,
                                         energy_bins_mi, permuted_labels, play_windows, table_mi, token_classes,
                                         window_ids)


def _hb(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_table_mi_matches_sklearn_on_the_expanded_pairs():
    from sklearn.metrics import mutual_info_score

    rng = np.random.default_rng(0)
    idx = torch.from_numpy(rng.integers(0, 6, size=(500, 1)))  # top-1 routing
    lab = (idx[:, 0].numpy() + rng.integers(0, 3, 500)) % 4
    ref = mutual_info_score(lab, idx[:, 0].numpy())
    assert table_mi(assignment_table(idx, lab, 4, 6)) == pytest.approx(ref, rel=1e-12)
    # top-2: each (token, chosen expert) is one sample
    idx2 = torch.stack([idx[:, 0], (idx[:, 0] + 1) % 6], 1)
    ref2 = mutual_info_score(np.repeat(lab, 2), idx2.reshape(-1).numpy())
    assert table_mi(assignment_table(idx2, lab, 4, 6)) == pytest.approx(ref2, rel=1e-12)


def test_noisy_channel_has_the_closed_form_mi_and_the_null_removes_the_bias():
    """Binary label, top-1 expert = label with prob 0.9, else the other of 2 experts: MI = log 2 - H_b(0.1)."""
    rng = np.random.default_rng(1)
    n = 20000
    lab = rng.integers(0, 2, n)
    expert = np.where(rng.random(n) < 0.9, lab, 1 - lab)
    st = calibrated_mi(torch.from_numpy(expert[:, None]), lab, 2, n_resamples=99, seed=0)
    assert st["mi"] == pytest.approx(math.log(2) - _hb(0.1), abs=3e-3)
    assert st["p_value"] == pytest.approx(1 / 100)  # no permutation reaches it
    assert 0 <= st["null_mean"] < 1e-3  # plug-in bias ~ (L-1)(E-1)/(2N)
    # ami: excess over the ceiling min(H_label, H_expert) ~ log 2 (the empirical marginals)
    assert st["ami"] == pytest.approx((st["mi"] - st["null_mean"]) / (math.log(2) - st["null_mean"]), rel=1e-4)


def test_label_fixing_the_expert_has_ami_one_and_independent_routing_has_ami_zero():
    rng = np.random.default_rng(2)
    lab = rng.integers(0, 4, 4000)
    exact = calibrated_mi(torch.from_numpy(lab[:, None]), lab, 4, n_resamples=49)
    assert exact["mi"] == pytest.approx(exact["h_label"]) and exact["ami"] == pytest.approx(1.0, abs=1e-3)
    # known null: routing independent of the label; raw MI > 0 (plug-in bias), adjusted MI ~ 0
    idx = torch.from_numpy(rng.integers(0, 62, size=(4000, 6)))
    null = calibrated_mi(idx, lab, 62, n_resamples=199, seed=3)
    assert null["mi"] > 0 and abs(null["ami"]) < 2e-3 and null["p_value"] > 0.05
    assert null["excess"] == pytest.approx(null["mi"] - null["null_mean"])


def test_ami_agrees_with_sklearn_adjusted_mi_min_for_top1():
    """The permutation expectation approximates the analytic one (sklearn, average_method='min')."""
    from sklearn.metrics import adjusted_mutual_info_score

    rng = np.random.default_rng(4)
    lab = rng.integers(0, 3, 600)
    expert = np.where(rng.random(600) < 0.3, lab, rng.integers(0, 8, 600))
    st = calibrated_mi(torch.from_numpy(expert[:, None]), lab, 8, n_resamples=400, seed=0)
    ref = adjusted_mutual_info_score(lab, expert, average_method="min")
    assert st["ami"] == pytest.approx(ref, abs=0.01)


def test_negative_labels_are_left_out():
    idx = torch.tensor([[0], [1], [0], [1], [1]])
    lab = np.array([0, 1, 0, 1, -1])
    st = calibrated_mi(idx, lab, 2, n_resamples=9)
    assert st["n_tokens"] == 4 and st["mi"] == pytest.approx(math.log(2))


def test_within_window_null_keeps_window_composition_and_unit_null_moves_whole_windows():
    rng = np.random.default_rng(5)
    strata = np.repeat(np.arange(10), 8)
    lab = rng.integers(0, 3, 80)
    perm = permuted_labels(lab, rng, strata=strata)
    for w in range(10):  # same multiset in every window
        assert sorted(perm[strata == w]) == sorted(lab[strata == w])
    assert not np.array_equal(perm, lab)
    win_lab = np.repeat(rng.integers(0, 2, 10), 8)  # constant in each window
    perm_u = permuted_labels(win_lab, rng, units=strata)
    assert all(len(set(perm_u[strata == w])) == 1 for w in range(10))
    assert sorted(perm_u) == sorted(win_lab)


def test_window_level_routing_is_significant_under_token_shuffle_but_not_within_windows():
    """Routing set by the window, a label constant in each window: the token-shuffle null calls it specialisation,
    the within-window null (the probe's for token-level labels) cannot (p = 1)."""
    rng = np.random.default_rng(6)
    strata = np.repeat(np.arange(40), 25)
    expert = np.repeat(rng.integers(0, 4, 40), 25)
    lab = (np.repeat(rng.integers(0, 4, 40), 25) + (expert == 0)) % 4  # label depends on the window's expert
    tok = calibrated_mi(torch.from_numpy(expert[:, None]), lab, 4, n_resamples=99, seed=0)
    within = calibrated_mi(torch.from_numpy(expert[:, None]), lab, 4, n_resamples=99, seed=0, strata=strata)
    assert tok["p_value"] == pytest.approx(0.01)
    assert within["p_value"] == 1.0 and within["ami"] == pytest.approx(0.0, abs=1e-9)


def test_token_classes_names_numerals_function_words():
    text = "Then Hamlet spake three words to thee, and there was none"
    words = [(m.start(), m.end()) for m in __import__("re").finditer(r"\S+", text)]
    offsets = np.array(words)
    cls = [TOKEN_CLASSES[c] for c in token_classes(text, offsets, ["Hamlet"])]
    # Then Hamlet spake three words to thee, and there was none
    assert cls == ["function", "name", "word", "numeral", "word", "function", "function", "function", "function",
                   "function", "word"]
    assert "there" in FUNCTION_WORDS and "three" not in FUNCTION_WORDS


class _Labelled:
    def __init__(self, lengths):
        self.eos_count = 1
        self.spans, pos = [], 0
        for n in lengths:
            self.spans.append((pos, pos + n + 1))
            pos += n + 1
        self.tokens = np.arange(pos)


def test_play_windows_stay_inside_documents_and_are_evenly_spaced():
    lab = _Labelled([25, 7, 41])  # windows of 8: 3, 0, 5
    x, pos = play_windows(lab, 8, None)
    assert x.shape == (8, 8) and np.array_equal(x.numpy(), pos)
    for row in pos:
        assert any(s <= row[0] and row[-1] < e - 1 for s, e in lab.spans)  # no window crosses a document or its EOS
    _, few = play_windows(lab, 8, 2)
    assert [r[0] for r in few] == [0, 16, 34, 66]  # first and last window of each long document


def test_energy_bins_mi_detects_energy_dependent_routing():
    rng = np.random.default_rng(7)
    energy = rng.random(2000)
    expert = np.where(rng.random(2000) < 0.1, 2, np.where((energy > 0.5) & (rng.random(2000) < 0.8), 1, 0))
    st = energy_bins_mi(energy, torch.from_numpy(expert[:, None]), 3, 4, window_ids([torch.zeros(80, 25)]), 99, 0)
    assert st["p_value"] == pytest.approx(0.01) and st["ami"] > 0.1
    indep = energy_bins_mi(energy, torch.from_numpy(rng.integers(0, 3, (2000, 1))), 3, 4,
                           window_ids([torch.zeros(80, 25)]), 99, 0)
    assert indep["p_value"] > 0.05 and abs(indep["ami"]) < 0.01
