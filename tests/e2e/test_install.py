"""The package as pip installs it: a wheel (no -e) and an editable install, each in a fresh virtual environment.

Each venv sees the machine's packages (``--system-site-packages``: torch, hydra, ... are not downloaded) but
gets its own copy of mla-analysis, built from a copy of this checkout (``--without-pip``: the machine's pip and
setuptools build it, as a venv's bundled setuptools may be too old for this pyproject); the commands run from an unrelated
directory with no PYTHONPATH, so nothing is imported from the source tree unless the install points there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("pyproject.toml", "README.md", "mla_analysis", "conf", "hydra_plugins")


def _venv(tmp: Path, editable: bool) -> tuple[Path, Path]:
    """(python of a fresh venv with mla-analysis installed from a copy of the checkout, that copy)."""
    src = tmp / "src"
    src.mkdir()
    for name in SHIPPED:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(tmp / "venv")], check=True)
    py = tmp / "venv" / "bin" / "python"
    cmd = [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--disable-pip-version-check"]
    subprocess.run(cmd + (["-e", str(src)] if editable else [str(src)]), check=True, cwd=tmp, env=_env(),
                   capture_output=True)
    return py, src


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="session")
def wheel_venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    return _venv(tmp, editable=False)


@pytest.fixture(scope="session")
def editable_venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("editable")
    return _venv(tmp, editable=True)


def _train_then_report(py: Path, elsewhere: Path) -> Path:
    run_dir = elsewhere / "runs" / "mha"
    done = _run([str(py), "-m", "mla_analysis.run", "model=mha", "train.steps=2", "train.progress=false",
                 f"hydra.run.dir={run_dir}"], elsewhere)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "ok"
    script = py.parent / "mla-analysis"
    report = _run([str(script), "report", str(run_dir)], elsewhere)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "mha" in report.stdout
    return run_dir


@pytest.mark.slow
def test_wheel_install_runs_and_reports_from_an_unrelated_directory(wheel_venv, tmp_path):
    py, src = wheel_venv
    where = _run([str(py), "-c", "import mla_analysis.run as r; print(r.__file__); print(r.CONF_DIR)"], tmp_path)
    module, conf = where.stdout.split()
    assert "site-packages" in module and not module.startswith(str(src)) and not module.startswith(str(ROOT))
    assert Path(conf) == Path(module).parent / "conf"  # the packaged copy of conf/, not a checkout's
    shipped = sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml"))
    assert sorted(p.relative_to(conf).as_posix() for p in Path(conf).rglob("*.yaml")) == shipped
    _train_then_report(py, tmp_path)
    # the sweep launchers ship too: a two-job sweep through the validating basic launcher
    sweep = tmp_path / "sweep"
    done = _run([str(py), "-m", "mla_analysis.run", "-m", "model=mha,mqa", "train.steps=1", "train.progress=false",
                 f"hydra.sweep.dir={sweep}"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (sweep / "comparison.md").is_file()


@pytest.mark.slow
def test_editable_install_reads_the_checkout(editable_venv, tmp_path):
    py, src = editable_venv
    where = _run([str(py), "-c", "import mla_analysis.run as r; print(r.__file__); print(r.CONF_DIR)"], tmp_path)
    module, conf = where.stdout.split()
    assert Path(module).is_relative_to(src) and Path(conf) == src / "conf"
    _train_then_report(py, tmp_path)


def test_pyproject_lists_every_package_of_the_tree():
    """The packages are listed by hand (conf/ is mapped into the package): a new subpackage must be added."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mla_analysis").rglob("__init__.py")}
    found |= {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "hydra_plugins").rglob("__init__.py")}
    found = {p for p in found if "__pycache__" not in p}
    assert found | {"mla_analysis.conf"} == listed
    assert cfg["package-dir"]["mla_analysis.conf"] == "conf"
    script = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["mla-analysis"]
    assert re.fullmatch(r"mla_analysis\.cli:console", script)
