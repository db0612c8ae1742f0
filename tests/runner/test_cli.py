"""The ``mla-analysis`` console script's subcommands, and progress bars in a log (no terminal)."""

from __future__ import annotations

import io

import pytest

from mla_analysis import cli
from mla_analysis.data import DataConfig
from mla_analysis.training.trainer import TrainConfig, progress_bar, train


def test_usage_lists_every_subcommand(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in ("run", "report", "figures", "claims", "eval", "convert", "bench"):
        assert f"\n  {name} " in out


@pytest.mark.parametrize("name, prog", [("report", "mla_analysis.report"), ("figures", "mla_analysis.figures"),
                                        ("eval", "mla_analysis.eval"), ("convert", "mla_analysis.convert"),
                                        ("bench", "mla_analysis.bench")])
def test_subcommand_help_is_the_modules_own(name, prog, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert f"usage: python -m {prog}" in capsys.readouterr().out


def test_unknown_subcommand_is_one_line_and_exit_2(capsys):
    assert cli.main(["reprot", "multirun/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'reprot'" in err and "report" in err


def test_report_subcommand_matches_the_module(tmp_path, run_module):
    """``mla-analysis report DIR`` and ``python -m mla_analysis.report DIR`` give the same answer (here: an error)."""
    missing = str(tmp_path / "nothing")
    via_cli = run_module("cli", "report", missing)
    direct = run_module("report", missing)
    assert via_cli.returncode == direct.returncode != 0
    assert via_cli.stderr == direct.stderr


def test_run_and_claims_reach_hydra_with_their_overrides(run_module):
    run = run_module("cli", "run", "model=mqa", "--cfg", "job")  # Hydra prints the composed job config and exits
    assert run.returncode == 0, run.stderr
    assert "attention: mqa" in run.stdout
    bare = run_module("cli", "model=mqa", "--cfg", "job")  # overrides without a subcommand: a run, as before subcommands
    assert bare.returncode == 0 and bare.stdout == run.stdout
    claims = run_module("cli", "claims", "--cfg", "job")  # claims = run +experiment=claims
    assert claims.returncode == 0, claims.stderr
    assert "\nclaims: null" in run.stdout and "\nclaims:\n  " in claims.stdout  # the claims node is set


def test_run_subcommand_bad_override_is_one_line_exit_2(run_module):
    done = run_module("cli", "run", "model=nosuch")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "model" in done.stderr


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_redraws_rarely_without_a_terminal():
    assert progress_bar(10, 0, "x", file=_Tty()).mininterval == 1.0
    log = io.StringIO()
    bar = progress_bar(400, 0, "train", file=log)
    for i in range(400):
        bar.update(1)
        bar.set_postfix(loss=f"{i:.3f}", refresh=False)
    bar.close()
    assert log.getvalue().count("\r") <= 3  # the first draw and the close, not one per step


def test_training_log_without_a_terminal_is_a_few_lines(tmp_path, capsys, tiny_cfg):
    """train() with progress on, stderr captured (not a terminal): a handful of redraws, not one per step."""
    data = DataConfig(vocab_size=128, seq_len=16, lm_weight=1.0, tasks={}, eval_tasks=[], eval_examples=8)
    tcfg = TrainConfig(steps=60, batch_size=2, eval_every=0, eval_batch_size=8, warmup_steps=1, progress=True)
    train(tiny_cfg, data, tcfg, tmp_path, seed=0, device="cpu")
    err = capsys.readouterr().err
    assert "train" in err  # the bar was drawn
    assert err.count("\r") <= 4, err[:500]
