"""Sweep figures: Pareto frontier against brute force, every figure drawn from synthetic run records."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from mla_analysis.analysis.figures import main, make_figures, pareto_front
from mla_analysis.training.results import atomic_write_json, make_record


def test_pareto_front_vs_brute_force():
    rng = np.random.default_rng(0)
    for minimise in (True, False):
        for _ in range(20):
            pts = [(float(x), float(y)) for x, y in rng.integers(0, 6, size=(8, 2))]
            brute = set()
            for i, (x, y) in enumerate(pts):
                dominated = any(
                    (x2 <= x and (y2 <= y if minimise else y2 >= y)) and (x2, y2) != (x, y)
                    and (x2 < x or (y2 < y if minimise else y2 > y))
                    for x2, y2 in pts
                )
                if not dominated:
                    brute.add((x, y))
            assert {pts[i] for i in pareto_front(pts, minimise)} == brute


def _write_run(run_dir, name, attention, rank, seed, em, kv):
    config = {"model": {"name": name, "attention": attention, "kv_lora_rank": rank}, "seed": seed}
    metrics = {"val_loss": 2.0 - em, "mqar.exact_match": em, "kv_bytes_per_token": kv}
    run_dir.mkdir(parents=True)
    atomic_write_json(run_dir / "results.json", make_record("ok", config, metrics))
    cells = [{"task": "mqar", "length": L, "pairs": p, "exact_match": em * (L <= 64)} for L in (32, 64, 128) for p in (2, 4)]
    atomic_write_json(run_dir / "retrieval.json", {"train_len": 64, "cells": cells})
    sv = [{"sv": [4.0, 2.0, 1.0, 0.5]}]
    tensor = "c_kv" if attention == "mla" else "k"
    atomic_write_json(run_dir / "spectra.json", {"attention": attention, "layers": [
        {"activations": {tensor: {"spectra": sv}}} for _ in range(2)]})
    atomic_write_json(run_dir / "experts.json", {"layers": [
        {"layer": i, "load_fraction": [0.25] * 4, "coact": np.eye(4).tolist()} for i in range(2)]})


def test_make_figures_draws_every_figure_png_and_pdf(tmp_path):
    sweep = tmp_path / "sweep"
    for i, ((name, att, rank, kv), seed) in enumerate(itertools.product(
            [("mha", "mha", 32, 512), ("mla", "mla", 8, 64), ("mla", "mla", 16, 96)], (0, 1))):
        _write_run(sweep / str(i), name, att, rank, seed, em=min(1.0, kv / 100) - 0.01 * seed, kv=kv)
    written = make_figures([sweep], tmp_path / "figs", metric="mqar.exact_match")
    names = sorted(p.name for p in written)
    for stem in ("pareto", "rank_accuracy", "retrieval_mqar", "spectra", "experts"):
        png, pdf = tmp_path / "figs" / f"{stem}.png", tmp_path / "figs" / f"{stem}.pdf"
        assert png.name in names and pdf.name in names
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and pdf.read_bytes()[:5] == b"%PDF-"


def test_cli_bad_path_exits_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2


def test_report_extra_columns_select_metrics_by_pattern(tmp_path):
    from mla_analysis.analysis.report import write_tables

    sweep = tmp_path / "sweep"
    for i, seed in enumerate((0, 1)):
        d = sweep / str(i)
        d.mkdir(parents=True)
        metrics = {"val_loss": 1.0 + seed, "mqar.exact_match": 0.5, "probe.retrieval.mqar.beyond_train.exact_match": 0.25 * seed}
        atomic_write_json(d / "results.json", make_record("ok", {"model": {"name": "mha"}, "seed": seed}, metrics))
    out = write_tables([sweep], tmp_path, ("csv",), extra=["probe.retrieval.*.beyond_train.exact_match"], name="lc")
    import csv

    rows = list(csv.DictReader(out["csv"].open()))
    assert len(rows) == 1 and float(rows[0]["metrics.probe.retrieval.mqar.beyond_train.exact_match"]) == 0.125
    assert "metrics.mqar.exact_match" not in rows[0] and float(rows[0]["metrics.val_loss"]) == 1.5


def test_report_ignore_merges_groups_that_differ_only_in_ignored_keys(tmp_path):
    from mla_analysis.analysis.report import aggregate, load_rows

    for i, ranks in enumerate(([5, 11], [6, 10])):  # per-layer ranks chosen per seed by an allocation
        d = tmp_path / str(i)
        d.mkdir()
        config = {"model": {"name": "mla", "kv_lora_ranks": ranks}, "convert": {"allocation": "energy"}, "seed": i}
        atomic_write_json(d / "results.json", make_record("ok", config, {"val_loss": 1.0 + i}))
    rows = load_rows([tmp_path])
    assert len(aggregate(rows)[1]) == 2
    keys, aggs = aggregate(rows, ignore=["model.kv_lora_ranks"])
    assert len(aggs) == 1 and aggs[0]["n_ok"] == 2 and aggs[0]["metrics.val_loss"] == 1.5


def test_records_older_than_a_model_field_group_with_its_default(tmp_path):
    from mla_analysis.analysis.report import aggregate, load_rows

    old = {"model": {"name": "mha", "attention": "mha"}, "seed": 0}  # written before model.pos_emb existed
    new = {"model": {"name": "mha", "attention": "mha", "pos_emb": "rope"}, "seed": 1}
    for i, config in enumerate((old, new)):
        (tmp_path / str(i)).mkdir()
        atomic_write_json(tmp_path / str(i) / "results.json", make_record("ok", config, {"val_loss": 1.0 + i}))
    keys, aggs = aggregate(load_rows([tmp_path]))
    assert len(aggs) == 1 and aggs[0]["n_ok"] == 2 and "model.pos_emb" not in keys
