"""The named job (``job``), the one failure wrapper (bad input -> one line, exit 2) and the typed job result."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mla_analysis.config import ConfigError, Job, check_job
from mla_analysis.run import precheck
from mla_analysis.runner.errors import exit_on_bad_input, one_line
from mla_analysis.training.results import ResultsError


@pytest.mark.parametrize("args,start", [
    (["job=convert"], "job=convert needs a convert node"),
    (["job=claims"], "job=claims needs a claims node"),
    (["+experiment=convert_mha", "hydra.mode=RUN", "job=train"], "job=train is invalid with a convert node set"),
    (["+experiment=claims", "job=convert"], "job=convert needs a convert node"),
    (["job=evaluate"], "job='evaluate' is invalid (allowed: train | convert | claims)"),
])
def test_a_job_without_its_node_or_with_another_is_one_line_naming_job(args, start):
    msg = precheck(args)
    assert msg is not None and msg.startswith(start) and "allowed" in msg and "\n" not in msg


def test_each_job_accepts_exactly_its_own_node():
    check_job(Job.train, {"convert": False, "claims": False})
    check_job(Job.convert, {"convert": True, "claims": False})
    check_job(Job.claims, {"convert": False, "claims": True})
    for job, nodes in [(Job.train, {"claims": True}), (Job.convert, {"convert": True, "claims": True}),
                       (Job.claims, {"convert": False})]:
        with pytest.raises(ConfigError, match=rf"^job={job}"):
            check_job(job, nodes)


def test_the_failure_wrapper_exits_2_on_bad_input_and_re_raises_the_rest(capsys):
    for exc in (ConfigError("model.n_heads=0 is invalid"), ResultsError("run/results.json: file not found")):
        with pytest.raises(SystemExit) as info, exit_on_bad_input():
            raise exc
        assert info.value.code == 2
        assert capsys.readouterr().err == f"error: {exc}\n"
    with pytest.raises(RuntimeError, match="a bug"), exit_on_bad_input():
        raise RuntimeError("a bug")
    assert one_line(RuntimeError("a bug")) is None and one_line(KeyError("x")) is None


def test_a_bad_element_of_a_choice_list_lists_the_choices():
    assert precheck(["probe=cost", "probe.cost.dtypes=[fp32,fp7]"]) == (
        "probe.cost.dtypes[1]='fp7' is invalid (allowed: fp32 | bf16 | fp16)")


def test_a_job_mismatch_on_the_command_line_exits_2_and_makes_no_directory(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "mla_analysis.run", "job=claims", f"hydra.run.dir={out}"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.startswith("error: job=claims needs a claims node") and p.stderr.count("\n") == 1
    assert not out.exists()


def test_run_job_returns_a_typed_result_naming_its_record(tmp_path):
    from hydra import compose, initialize_config_dir

    from mla_analysis.run import CONF_DIR, JobResult, run_job

    overrides = ["train.steps=2", "train.eval_every=0", "data.eval_examples=4", "train.progress=false",
                 "train.batch_size=2", "train.checkpoint_every=0", "device=cpu"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    result = run_job(cfg, tmp_path, multirun=False)
    assert isinstance(result, JobResult) and result.status == "ok" and result.exit_code == 0
    assert result.record == tmp_path / "results.json"
    record = json.loads(result.record.read_text())
    assert record["status"] == "ok" and record["config"]["job"] == "train"
    assert result.metrics["val_loss"] == pytest.approx(record["metrics"]["val_loss"]) and record["metrics"]["steps"] == 2
    again = run_job(_with_resume(cfg), tmp_path, multirun=False)  # a finished run is kept
    assert again.status == "skipped" and again.record == result.record


def _with_resume(cfg):
    from omegaconf import OmegaConf

    cfg = cfg.copy()
    OmegaConf.update(cfg, "train.resume", True)
    return cfg


def test_a_null_node_set_from_the_command_line_is_one_line_and_the_group_sets_it():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from mla_analysis.config import RopeScaling
    from mla_analysis.run import CONF_DIR

    for args in (["model.rope_scaling={type:yarn,factor:4}"], ["model.rope_scaling.factor=4"]):
        msg = precheck(args)
        assert msg.startswith("model.rope_scaling is null by default") and "+model/rope_scaling=yarn" in msg
    working = ["+model/rope_scaling=yarn", "model.rope_scaling.factor=4"]
    assert precheck(working) is None
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        model = OmegaConf.to_object(compose("config", overrides=working).model)
    assert model.rope_scaling == RopeScaling(factor=4.0)  # YaRN with the dataclass's other defaults


def test_a_bad_probe_option_value_stops_before_the_run_directory():
    assert precheck(["probe=retrieval", "probe.retrieval.lengths=[63]"]) == (
        "probe.retrieval.lengths=[63] is invalid (allowed: even integers >= 8 | null)")
    assert precheck(["+probe.retrieval.lenghts=[64]"]).startswith("probe.retrieval.lenghts: unknown key (allowed: ")
