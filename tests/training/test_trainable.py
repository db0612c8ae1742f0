"""train.trainable: frozen parameters stay bitwise unchanged, the optimizer holds only the selected ones."""

from __future__ import annotations

import pytest
import torch

from mla_analysis.config import ConfigError, tiny
from mla_analysis.data import DataConfig
from mla_analysis.models.transformer import Transformer
from mla_analysis.training.trainer import TrainConfig, make_optimizer, train

DATA = DataConfig(vocab_size=128, seq_len=16, lm_weight=1.0, tasks={}, eval_tasks=[], eval_examples=4)


def _tcfg(**kw) -> TrainConfig:
    base = dict(steps=2, batch_size=4, eval_every=0, eval_batch_size=4, warmup_steps=1, lr=1e-2, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _mla_kv_count(c) -> int:
    """Closed form: per layer W^DKV (+ W^KR) [D, d_c + d_rope], the latent norm [d_c], W^UKV [d_c, H (d_nope + d_v)]."""
    per_layer = c.d_model * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank \
        + c.kv_lora_rank * c.n_heads * (c.qk_nope_head_dim + c.v_head_dim)
    return c.n_layers * per_layer


def _attention_count(c) -> int:
    """Closed form: the MLA KV part plus W^Q [D, H d_qk] and W^O [H d_v, D], per layer."""
    qo = c.d_model * c.n_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim) + c.n_heads * c.v_head_dim * c.d_model
    return _mla_kv_count(c) + c.n_layers * qo


@pytest.mark.parametrize("trainable", ["attention", "mla"])
def test_only_selected_parameters_change(tmp_path, trainable):
    cfg = tiny(attention="mla", name="mla")
    torch.manual_seed(0)
    model = Transformer(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = train(cfg, DATA, _tcfg(trainable=trainable), tmp_path / "run", seed=0, device="cpu", model=model)
    after = out["model"].state_dict()
    if trainable == "mla":
        selected = lambda k: k.split(".")[3] in ("wkv_a", "kv_norm", "wkv_b") if k.startswith("layers.") else False
        expected = _mla_kv_count(cfg)
    else:
        selected = lambda k: k.startswith("layers.") and k.split(".")[2] == "attn"
        expected = _attention_count(cfg)
    assert out["metrics"]["params_trainable"] == expected
    for k in before:
        changed = not torch.equal(before[k], after[k])
        # norms start at ones and may move little, but AdamW moves every trained element by ~lr on step 1
        assert changed == selected(k), k
    # the optimizer's state covers exactly the selected tensors
    opt = make_optimizer(out["model"], _tcfg())
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == expected


def test_all_trains_every_parameter_and_counts_tied_once(tmp_path):
    cfg = tiny(attention="mha", name="mha", tie_embeddings=True)
    out = train(cfg, DATA, _tcfg(), tmp_path / "run", seed=0, device="cpu")
    model = out["model"]
    unique = {id(p): p.numel() for p in model.parameters()}
    assert out["metrics"]["params_trainable"] == sum(unique.values())
    assert all(p.requires_grad for p in model.parameters())


def test_mla_on_a_non_mla_model_is_a_config_error_before_training(tmp_path):
    cfg = tiny(attention="gqa", n_kv_heads=2, name="gqa")
    with pytest.raises(ConfigError, match=r"train\.trainable=mla .*allowed: all, attention"):
        train(cfg, DATA, _tcfg(trainable="mla"), tmp_path / "run", seed=0, device="cpu")
    assert not (tmp_path / "run" / "checkpoints").exists()
