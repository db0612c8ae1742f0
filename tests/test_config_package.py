"""The config package: closed choices as Enums OmegaConf checks, and the old import paths of the dataclasses."""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from mla_analysis.config import ConvertConfig, SearchConfig
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
    from mla_analysis import config, convert, hf_io, rank_allocation
    from mla_analysis.claims import ClaimsConfig
    from mla_analysis.loggers import LoggerConfig
    from mla_analysis.schema import ConvertConfig as SchemaConvert
    from mla_analysis.schema import check_finite, validate_train
    from mla_analysis.search import SearchConfig as Search
    from mla_analysis.train import TrainConfig

    assert (TrainConfig, ClaimsConfig, Search, LoggerConfig, SchemaConvert) == (
        config.TrainConfig, config.ClaimsConfig, config.SearchConfig, config.LoggerConfig, config.ConvertConfig)
    assert (validate_train, check_finite) == (config.validate_train, config.check_finite)
    assert (convert.from_hf, convert.to_hf, convert.load_model) == (hf_io.from_hf, hf_io.to_hf, hf_io.load_model)
    assert rank_allocation.METHODS == Allocation.values() == ("uniform", "energy", "fisher", "whitened")
