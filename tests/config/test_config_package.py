"""The config package: closed choices as Enums OmegaConf checks, and the old import paths of the dataclasses."""

from __future__ import annotations

import dataclasses
import json

import pytest

from omegaconf import OmegaConf

from mla_analysis.config import ConfigError, ConvertConfig, SearchConfig
from mla_analysis.config.convert import Allocation, Strategy
from mla_analysis.run import precheck


def test_a_choice_composes_from_its_name_and_reads_as_a_string():
    cfg = OmegaConf.merge(OmegaConf.structured(ConvertConfig), {"allocation": "whitened", "strategy": "norm"})
    c = OmegaConf.to_object(cfg)
    assert c.allocation is Allocation.whitened and c.strategy is Strategy.norm
    assert c.allocation == "whitened" and f"{c.allocation}" == "whitened" and str(c.strategy) == "norm"
    assert json.loads(json.dumps({"a": c.allocation})) == {"a": "whitened"}  # records hold the plain string
    assert "allocation: whitened" in OmegaConf.to_yaml(cfg)  # as Hydra saves .hydra/config.yaml


def test_a_value_outside_the_choice_is_one_line_naming_key_and_choices():
    assert precheck(["+experiment=convert_mha", "hydra.mode=RUN", "convert.strategy=middle"]) == (
        "convert.strategy='middle' is invalid (allowed: high | low | uniform | norm | 2norm)")
    assert precheck(["+experiment=rank_search", "search.mode=maxx"]) == "search.mode='maxx' is invalid (allowed: min | max)"
    assert OmegaConf.to_object(OmegaConf.structured(SearchConfig)).mode == "min"


def test_old_import_paths_name_the_same_classes():
    from mla_analysis import config, convert
    from mla_analysis.conversion import rank_allocation
    from mla_analysis.interop import hf_io
    from mla_analysis.analysis.claims import ClaimsConfig
    from mla_analysis.training.loggers import LoggerConfig
    from mla_analysis.runner.schema import ConvertConfig as SchemaConvert
    from mla_analysis.runner.schema import check_finite, validate_train
    from mla_analysis.analysis.search import SearchConfig as Search
    from mla_analysis.training.trainer import TrainConfig

    assert (TrainConfig, ClaimsConfig, Search, LoggerConfig, SchemaConvert) == (
        config.TrainConfig, config.ClaimsConfig, config.SearchConfig, config.LoggerConfig, config.ConvertConfig)
    assert (validate_train, check_finite) == (config.validate_train, config.check_finite)
    assert (convert.from_hf, convert.to_hf, convert.load_model) == (hf_io.from_hf, hf_io.to_hf, hf_io.load_model)
    assert rank_allocation.METHODS == Allocation.values() == ("uniform", "energy", "fisher", "whitened")


# ---- ModelConfig's closed choices ------------------------------------------------------------------

from mla_analysis.config import Attention, ModelConfig  # noqa: E402
from mla_analysis.config.checks import Choice, choice_fields  # noqa: E402

MODEL_CHOICES = sorted(choice_fields(ModelConfig).items())


def test_every_closed_string_field_of_the_model_is_a_choice():
    # the fields listed by hand: a new closed str field must become a Choice too (or be added here as free)
    assert [name for name, _ in MODEL_CHOICES] == sorted(
        ["attention", "ffn", "gate_weights", "mla_decode", "mlp", "norm", "pos_emb", "score_func"])
    assert all(issubclass(c, Choice) and not many for _, (c, many) in MODEL_CHOICES)


def _choice_keys():
    from mla_analysis.config.data import DataConfig, NIAHConfig, ShakespeareConfig

    groups = [("model", ModelConfig), ("data", DataConfig), ("data.shakespeare", ShakespeareConfig),
              ("data.niah", NIAHConfig)]
    return [(f"{prefix}.{name}", choice) for prefix, cls in groups for name, (choice, _) in choice_fields(cls).items()]


@pytest.mark.parametrize("key,choice", _choice_keys(), ids=[k for k, _ in _choice_keys()])
def test_a_bad_choice_is_rejected_when_the_config_composes(key, choice):
    assert precheck([f"{key}=bogus"]) == f"{key}='bogus' is invalid (allowed: {' | '.join(m.value for m in choice)})"


def test_a_bad_choice_on_the_command_line_exits_2_with_one_line(run_module, tmp_path):
    out = tmp_path / "run"
    p = run_module("run", "model.attention=bogus", f"hydra.run.dir={out}", "train.steps=1")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "error: model.attention='bogus' is invalid (allowed: mha | gqa | mqa | mla | mla_coupled_rope)"]
    assert not out.exists()  # before any compute or output


def test_model_choices_are_members_in_python_and_plain_strings_in_records():
    cfg = ModelConfig(attention="mla", ffn="moe", score_func="sigmoid")  # as Python callers and records build it
    assert cfg.attention is Attention.mla and cfg.is_mla
    d = cfg.to_dict()
    assert {type(d[k]) for k, _ in MODEL_CHOICES} == {str}
    assert (d["attention"], d["ffn"], d["score_func"]) == ("mla", "moe", "sigmoid")
    assert ModelConfig.from_dict(d) == cfg
    assert ModelConfig(attention="mhla").attention == "mhla"  # building never raises: validation names the key
    with pytest.raises(ConfigError, match=r"^model\.attention='mhla' is invalid \(allowed: mha \| gqa"):
        ModelConfig.from_dict({**d, "attention": "mhla"})


def test_records_written_with_choices_group_with_old_records(tmp_path):
    from hydra import compose, initialize_config_dir

    from mla_analysis.analysis.report import aggregate, load_rows
    from mla_analysis.training.results import atomic_write_json, make_record
    from mla_analysis.run import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model=mla", "seed=1"])
    new = OmegaConf.to_container(cfg, resolve=True)  # as run.py records the composed config
    assert new["model"]["attention"] is Attention.mla
    old = json.loads(json.dumps(new))  # a record of before the Enums: the same values, plain strings
    old["seed"] = 0
    assert type(old["model"]["attention"]) is str
    for i, config in enumerate((old, new)):
        (tmp_path / str(i)).mkdir()
        atomic_write_json(tmp_path / str(i) / "results.json", make_record("ok", config, {"val_loss": 1.0 + i}))
    text = (tmp_path / "1" / "results.json").read_text()
    assert '"attention": "mla"' in text and '"mlp": "swiglu"' in text
    keys, aggs = aggregate(load_rows([tmp_path]))
    assert len(aggs) == 1 and aggs[0]["n_ok"] == 2 and aggs[0]["metrics.val_loss"] == 1.5


def test_data_config_lives_in_the_config_package_and_keeps_its_old_paths():
    from mla_analysis import data
    from mla_analysis.config import DataConfig, Source
    from mla_analysis.data import mixture, shakespeare, tasks, text

    assert data.DataConfig is mixture.DataConfig is DataConfig
    assert (tasks.NIAHConfig, text.HFConfig, shakespeare.ShakespeareConfig) == (
        DataConfig().niah.__class__, DataConfig().hf.__class__, DataConfig().shakespeare.__class__)
    c = DataConfig(source="shakespeare")
    assert c.source is Source.shakespeare and c.shakespeare.train_edition == "both"
    assert shakespeare.EDITION_CHOICES == ("modern", "folio", "both") and mixture.SOURCES == (
        "synthetic", "text", "hf", "shakespeare")
    with pytest.raises(ConfigError, match=r"^data\.source='web' is invalid \(allowed: synthetic \| text"):
        data.validate_data_config(DataConfig(source="web"))


# ---- probe options: one dataclass per probe ---------------------------------------------------------

from mla_analysis.config.checks import plain  # noqa: E402
from mla_analysis.config.probes import PROBE_CONFIGS, probe_config  # noqa: E402


def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    from mla_analysis.run import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("name", sorted(PROBE_CONFIGS))
def test_probe_yaml_equals_its_dataclass_defaults(name):
    from mla_analysis.run import CONF_DIR

    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "probe" / f"{name}.yaml"))
    assert raw.pop("defaults") == [f"{name}_schema", "_self_"]
    cls = PROBE_CONFIGS[name][0]
    assert raw == {name: plain(dataclasses.asdict(cls()))}
    node = _compose(f"probe={name}").probe
    assert OmegaConf.get_type(node[name]) is cls  # typed by the ConfigStore schema
    composed = OmegaConf.to_container(node, resolve=True)
    # the record holds what the YAML says, types included (6 stays 6, 1 stays 1: grouping compares repr)
    assert repr(json.loads(json.dumps(composed))) == repr(raw)


def test_several_probes_compose_and_an_unselected_probe_is_not_recorded():
    probe = OmegaConf.to_container(_compose("probe=[spectra,cost]", "probe.cost.quick=true").probe)
    assert sorted(probe) == ["cost", "spectra"] and probe["cost"]["quick"] is True
    assert OmegaConf.to_container(_compose().probe) == {}  # probe=none: the record's probe is {} as before


@pytest.mark.parametrize("override,line", [
    ("probe.experts.dense_fraction=all", "probe.experts.dense_fraction='all' is invalid (allowed: active | routed)"),
    ("probe.experts.energy_rank=abc", "probe.experts.energy_rank='abc' is invalid (allowed: a value of type int)"),
    ("probe.experts.bogus=1", "probe.experts.bogus: unknown key (allowed: batch_size, compare_to,"),
    ("probe.kl.interval=normal", "probe.kl.interval='normal' is invalid (allowed: bootstrap | t)"),
])
def test_probe_overrides_are_type_checked_when_the_config_composes(override, line):
    assert precheck([f"probe={override.split('.')[1]}", override]).startswith(line)


@pytest.mark.parametrize("override,key", [
    ("probe.cost.dtypes=[fp7]", "probe.cost.dtypes[0]"),
    ("probe.retrieval.tasks=[mqar,needle]", "probe.retrieval.tasks[1]"),
    ("probe.retrieval.detail_tasks=[sort]", "probe.retrieval.detail_tasks[0]"),
    ("probe.needles.tasks=[passkey,sort]", "probe.needles.tasks[1]"),
])
def test_a_bad_choice_in_a_probe_list_names_the_element(override, key):
    msg = precheck([f"probe={override.split('.')[1]}", override])
    assert msg.startswith(f"{key}=") and " is invalid (allowed: " in msg and "\n" not in msg


@pytest.mark.parametrize("name,params,message", [
    ("spectra", {"taus": [0.5, 1.5]}, r"^probe\.spectra\.taus=\[0\.5, 1\.5\] is invalid \(allowed: a list of numbers"),
    ("retrieval", {"lengths": [63]}, r"^probe\.retrieval\.lengths=\[63\] is invalid \(allowed: even integers >= 8"),
    ("retrieval", {"tasks": [], "detail_tasks": []}, r"^probe\.retrieval\.tasks=\[\] is invalid"),
    ("lm_eval", {"num_fewshot": -1}, r"^probe\.lm_eval\.num_fewshot=-1 is invalid"),
    ("experts", {"dense_fraction": "all"}, r"^probe\.experts\.dense_fraction='all' is invalid \(allowed: active \| routed\)"),
    ("head_ablation", {"layers": []}, r"^probe\.head_ablation\.layers=\[\] is invalid"),
    ("cost", {"claim_bits": 0}, r"^probe\.cost\.claim_bits=0 is invalid \(allowed: a number > 0\)"),
    ("cost", {"dtype": ["fp32"]}, r"^probe\.cost\.dtype: unknown key \(allowed: batch_sizes, claim_bits,"),
    ("kl", {"interval": "normal"}, r"^probe\.kl\.interval='normal' is invalid \(allowed: bootstrap \| t\)$"),
    ("kl", {"stride": 0}, r"^probe\.kl\.stride=0 is invalid \(allowed: an integer > 0\)$"),
    ("kl", {"reference": 3}, r"^probe\.kl\.reference=3 is invalid"),
    ("token_bins", {"bins": 0}, r"^probe\.token_bins\.bins=0 is invalid"),
    ("token_bins", {"confidence_level": 1.0}, r"^probe\.token_bins\.confidence_level=1\.0 is invalid"),
    ("copying", {"passage_len": 1}, r"^probe\.copying\.passage_len=1 is invalid \(allowed: an integer >= 2\)$"),
    ("copying", {"resamples": 0}, r"^probe\.copying\.resamples=0 is invalid"),
    ("needles", {"tasks": ["kv", "sort"]}, r"^probe\.needles\.tasks='sort' is invalid \(allowed: passkey \| kv\)$"),
    ("needles", {"depths": [1.5]}, r"^probe\.needles\.depths=\[1\.5\] is invalid"),
    ("needles", {"kv_needles": 31}, r"^probe\.needles\.kv_needles=31 is invalid \(allowed: 1\.\.30\)$"),
    ("next_line", {"length_tolerance": 0}, r"^probe\.next_line\.length_tolerance=0 is invalid"),
    ("next_line", {"resamples": 10}, r"^probe\.next_line\.resamples: unknown key"),
])
def test_probe_options_are_checked_beside_their_dataclass(name, params, message):
    with pytest.raises(ConfigError, match=message):
        probe_config(name, params)


def test_probe_options_are_normalised_and_their_choices_match_the_registries():
    from mla_analysis.data.tasks import NIAH_PRESETS
    from mla_analysis.probes import cost, retrieval

    r = probe_config("retrieval", {"tasks": "passkey", "depths": [1, 0, 1], "lengths": [64, 32, 64]})
    assert (r.tasks, r.depths, r.lengths) == (["passkey"], [0.0, 1.0], [32, 64])
    assert retrieval.GRID_TASKS == ("mqar", "passkey", "niah", *NIAH_PRESETS)  # the data package's presets
    assert set(cost.TORCH_DTYPES) == set(probe_config("cost", {"dtypes": ["fp32", "bf16", "fp16"]}).dtypes)
    assert probe_config("cost", {"dtypes": "bf16"}).dtypes == ["bf16"]
    from mla_analysis.config.probes import NEEDLE_KEYS, IntervalMethod, NeedleTask
    from mla_analysis.probes import needles

    n = probe_config("needles", {"tasks": "kv", "depths": [1, 0, 1], "lengths": [64, 32, 64]})
    assert (n.tasks, n.depths, n.lengths) == ([NeedleTask.kv], [0.0, 1.0], [32, 64])
    assert len(needles.KEYS) == NEEDLE_KEYS  # kv_needles' bound is the probe's word list
    assert probe_config("copying", {"distances": [512, 256, 512]}).distances == [256, 512]
    t = probe_config("token_bins", {"interval": "t", "bins": 3})  # KlConfig's keys and its own
    assert t.interval is IntervalMethod.t and (t.bins, t.max_windows) == (3, 64)
