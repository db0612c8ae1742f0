"""conf/experiment/real_conversion_gpu.yaml: the GPU healing profile composes into the three variants it promises,
and its healing budget is a whole number of epochs of the training plays counted with SmolLM2's own tokenizer."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

VARIANTS = {"mla120": ("mla", 120, 32), "mla48": ("mla", 48, 16), "original": ("gqa", None, None)}


def _compose(*overrides, experiment: str = "real_conversion_gpu"):
    from hydra import compose, initialize_config_dir

    from mla_analysis.run import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"+experiment={experiment}", *overrides], return_hydra_config=True)


def test_the_profile_sweeps_the_two_mla_budgets_and_the_healed_original_on_cuda():
    cfg = _compose()
    assert cfg.hydra.sweeper.params == {"+heal_variant": ",".join(VARIANTS)}
    assert str(cfg.hydra.mode).endswith("MULTIRUN") and cfg.hydra.launcher.n_jobs == len(VARIANTS)
    base = OmegaConf.to_container(_compose(experiment="real_conversion").convert)  # the study's recipe
    for name, (direction, budget, rope) in VARIANTS.items():
        c = _compose(f"+heal_variant={name}")
        assert c.device == "cuda" and c.job == "convert" and c.convert.source == "smollm2-135m"
        assert c.convert.direction == direction
        if direction == "mla":
            assert (c.convert.cache_budget, c.convert.rope_dims) == (budget, rope)
            # the main recipe around the budget is the CPU study's (rope key, whitening, no latent norm)
            same = ("rope_key", "rope_heads", "factorization", "whiten", "bkv", "kv_norm", "calib_examples")
            assert {k: c.convert[k] for k in same} == {k: base[k] for k in same}
        else:
            assert c.convert.kv_heads is None and c.convert.kv_quant_bits == 16  # the original, unmerged
        assert c.train.trainable == "all" and c.train.resume is True and list(c.probe) == ["kl", "token_bins"]


def test_heal_steps_are_whole_epochs_of_the_training_plays_with_a_checkpoint_each():
    from mla_analysis.assets import AssetError, smollm2_gguf

    cfg = _compose("+heal_variant=mla120")
    t, d = cfg.train, cfg.data
    tokens_per_step = t.batch_size * t.grad_accum * d.seq_len
    assert tokens_per_step == 64 * 1024  # the study's step (scale=real), micro-batched differently
    try:
        gguf = smollm2_gguf()
    except AssetError:
        pytest.skip("the SmolLM2 GGUF is not installed (make assets)")
    from mla_analysis.data import DataConfig
    from mla_analysis.data.shakespeare import ShakespeareConfig, split_tokens
    from mla_analysis.interop.gguf import hf_dir_from_gguf

    sc = ShakespeareConfig(**OmegaConf.to_container(d.shakespeare))
    n = len(split_tokens(DataConfig(source="shakespeare", tokenizer=str(hf_dir_from_gguf(gguf)), shakespeare=sc),
                         "train").tokens)
    assert n == 2_275_346  # the count the yaml states
    per_epoch = math.ceil(n / tokens_per_step)
    epochs, rest = divmod(cfg.convert.heal_steps, per_epoch)
    assert rest == 0 and epochs >= 2, (cfg.convert.heal_steps, per_epoch)
    assert t.checkpoint_every == per_epoch and per_epoch % t.eval_every == 0
