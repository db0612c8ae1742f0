"""The committed studies' configs compose and name their job, and the MoE study's variants match in FFN width."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import mla_analysis.runner.schema  # noqa: F401  (registers the schema and the idiv resolver)
from mla_analysis.config import ConfigError, ModelConfig
from mla_analysis.runner.job_config import check_job_nodes
from mla_analysis.runner.schema import _idiv

CONF = str(Path(__file__).resolve().parents[2] / "conf")
EXPERIMENTS = sorted(p.stem for p in Path(CONF, "experiment").glob("*.yaml"))


def _model(*overrides: str) -> ModelConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return OmegaConf.to_object(cfg.model)


def _ffn_neurons(cfg: ModelConfig, active: bool) -> int:
    if cfg.ffn == "dense":
        return cfg.d_ff
    routed = cfg.n_activated_experts if active else cfg.n_routed_experts
    return cfg.moe_d_ff * (routed + cfg.n_shared_experts)


def test_moe_study_variants_have_equal_active_and_total_ffn_width():
    dense, top2, fine, free = (_model(f"model={m}") for m in ("moe_dense", "moe_top2", "moe_fine", "moe_fine_auxfree"))
    assert _ffn_neurons(dense, True) == _ffn_neurons(top2, True) == _ffn_neurons(fine, True) == _ffn_neurons(free, True)
    assert _ffn_neurons(top2, False) == _ffn_neurons(fine, False) == _ffn_neurons(free, False)
    assert fine.moe_d_ff * 4 == top2.moe_d_ff  # granularity m = 4
    assert (free.score_func, fine.score_func) == ("sigmoid", "softmax") and free.bias_update_speed > 0


# experiments whose sweeper is an optional plugin (the [dev] / [optuna] extras install it)
PLUGINS = {"rank_search": "hydra_plugins.hydra_optuna_sweeper"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    if experiment in PLUGINS:
        pytest.importorskip(PLUGINS[experiment])
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=[f"+experiment={experiment}"])
    assert cfg.experiment == experiment
    # the job is named by the file that sets the job's node (read as plain YAML, not through the schema)
    own = yaml.safe_load(Path(CONF, "experiment", f"{experiment}.yaml").read_text())
    expected = "convert" if "convert" in own else "claims" if "claims" in own else own.get("job", "train")
    assert cfg.job == expected and own.get("job", "train") == expected
    assert cfg.job == "train" or cfg.get(str(cfg.job.value if hasattr(cfg.job, "value") else cfg.job)) is not None
    assert check_job_nodes(cfg) == expected


def test_idiv_rejects_non_divisors():
    assert _idiv(256, 8) == 32
    with pytest.raises(ConfigError, match="not divisible"):
        _idiv(256, 3)
