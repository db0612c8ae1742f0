"""Mapping between the toolkit's models and ``transformers``' DeepSeek-V2/V3 and Llama formats.

Configs and state dicts are translated both ways; weights are never executed or pickled here
(checkpoint I/O goes through safetensors in ``mla_analysis.convert``).

RoPE layout: DeepSeek checkpoints rotate interleaved pairs. transformers' DeepseekV3 (with
``rope_interleave=True``) returns the rotated dims de-interleaved while ours stay interleaved; queries
and keys get the same permutation, so attention logits are identical and no weight permutation is
needed. Llama-family checkpoints use the halves layout (``rope_interleave=False``).
"""

from __future__ import annotations

from typing import Any

import torch

from .config import ConfigError, ModelConfig, RopeScaling, validate_model_config

DEEPSEEK_ARCHS = ("deepseek_v2", "deepseek_v3")
LLAMA_ARCHS = ("llama", "mistral")


# ----------------------------------------------------------------------------------------- configs
def _rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    rs = cfg.rope_scaling
    if rs is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {
        "rope_type": "yarn",
        "rope_theta": cfg.rope_theta,
        "factor": rs.factor,
        "original_max_position_embeddings": rs.original_max_position_embeddings,
        "beta_fast": rs.beta_fast,
        "beta_slow": rs.beta_slow,
        "mscale": rs.mscale,
        "mscale_all_dim": rs.mscale_all_dim,
    }


def to_hf_config(cfg: ModelConfig, arch: str | None = None):
    """A transformers config (DeepseekV3Config for MLA, or V2 with ``arch``; LlamaConfig for MHA/GQA/MQA)."""
    import transformers

    arch = arch or ("deepseek_v3" if cfg.is_mla or cfg.ffn == "moe" else "llama")
    if cfg.is_mla and cfg.kv_lora_ranks is not None and len(set(cfg.kv_lora_ranks)) > 1:
        raise ConfigError(
            f"model.kv_lora_ranks={cfg.kv_lora_ranks} cannot be exported (Hugging Face DeepSeek configs have one "
            "kv_lora_rank for all layers)"
        )
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters=_rope_parameters(cfg),
        attention_bias=False,
    )
    if arch == "llama":
        if cfg.is_mla or cfg.ffn == "moe":
            raise ConfigError(f"model.attention={cfg.attention!r}/ffn={cfg.ffn!r} cannot be exported as llama")
        if cfg.rope_interleave:
            raise ConfigError("model.rope_interleave=True cannot be exported as llama (halves layout only)")
        return transformers.LlamaConfig(
            num_key_value_heads=cfg.kv_heads, head_dim=cfg.attn_head_dim, mlp_bias=False, **common
        )
    if arch not in DEEPSEEK_ARCHS:
        raise ConfigError(f"arch={arch!r} is invalid (allowed: {', '.join(DEEPSEEK_ARCHS + ('llama',))})")
    if cfg.attention != "mla":
        raise ConfigError(f"model.attention={cfg.attention!r} cannot be exported as {arch} (allowed: mla)")
    moe = cfg.ffn == "moe"
    ds = dict(
        num_key_value_heads=cfg.n_heads,
        kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        v_head_dim=cfg.v_head_dim,
        moe_intermediate_size=cfg.moe_d_ff,
        n_shared_experts=cfg.n_shared_experts,
        n_routed_experts=cfg.n_routed_experts,
        num_experts_per_tok=cfg.n_activated_experts,
        routed_scaling_factor=cfg.route_scale,
        first_k_dense_replace=cfg.first_k_dense_replace if moe else cfg.n_layers,
        norm_topk_prob=cfg.norm_topk_prob,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
    )
    if arch == "deepseek_v3":
        if moe and cfg.score_func != "sigmoid":
            raise ConfigError("model.score_func='softmax' cannot be exported as deepseek_v3 (allowed: sigmoid)")
        if not cfg.rope_interleave:
            raise ConfigError("model.rope_interleave=False cannot be exported as deepseek (interleaved only)")
        return transformers.DeepseekV3Config(rope_interleave=True, **ds, **common)
    if moe and cfg.score_func != "softmax":
        raise ConfigError("model.score_func='sigmoid' cannot be exported as deepseek_v2 (allowed: softmax)")
    if moe and cfg.norm_topk_prob:
        raise ConfigError("model.norm_topk_prob=True cannot be exported as deepseek_v2 (allowed: false)")
    topk_method = "group_limited_greedy" if cfg.n_group > 1 else "greedy"
    return transformers.DeepseekV2Config(topk_method=topk_method, **ds, **common)


def from_hf_config(hf_cfg: Any) -> ModelConfig:
    """A ModelConfig equivalent to a transformers DeepseekV2/V3, Llama or Mistral config."""
    mt = hf_cfg.model_type
    rp = dict(getattr(hf_cfg, "rope_parameters", None) or {})
    theta = float(rp.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0)))
    scaling = None
    if rp.get("rope_type", "default") == "yarn":
        scaling = RopeScaling(
            factor=float(rp["factor"]),
            original_max_position_embeddings=int(rp["original_max_position_embeddings"]),
            beta_fast=float(rp.get("beta_fast") or 32.0),
            beta_slow=float(rp.get("beta_slow") or 1.0),
            mscale=float(rp.get("mscale") or 0.0),
            mscale_all_dim=float(rp.get("mscale_all_dim") or 0.0),
        )
    elif rp.get("rope_type", "default") != "default":
        raise ConfigError(f"rope_parameters.rope_type={rp['rope_type']!r} is unsupported (allowed: default, yarn)")
    common = dict(
        name=mt,
        vocab_size=hf_cfg.vocab_size,
        d_model=hf_cfg.hidden_size,
        n_layers=hf_cfg.num_hidden_layers,
        n_heads=hf_cfg.num_attention_heads,
        d_ff=hf_cfg.intermediate_size,
        max_seq_len=hf_cfg.max_position_embeddings,
        rms_norm_eps=hf_cfg.rms_norm_eps,
        tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", False)),
        rope_theta=theta,
        rope_scaling=scaling,
    )
    if mt in LLAMA_ARCHS:
        n_kv = hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads
        attention = "mha" if n_kv == hf_cfg.num_attention_heads else ("mqa" if n_kv == 1 else "gqa")
        head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
        cfg = ModelConfig(
            attention=attention,
            n_kv_heads=None if attention != "gqa" else n_kv,
            head_dim=head_dim,
            rope_interleave=False,
            **common,
        )
        return validate_model_config(cfg)
    if mt not in DEEPSEEK_ARCHS:
        raise ConfigError(f"model_type={mt!r} is unsupported (allowed: {', '.join(DEEPSEEK_ARCHS + LLAMA_ARCHS)})")
    n_layers = hf_cfg.num_hidden_layers
    first_dense = hf_cfg.first_k_dense_replace or 0
    moe = first_dense < n_layers and hf_cfg.n_routed_experts
    if mt == "deepseek_v2":
        grouped = hf_cfg.topk_method == "group_limited_greedy"
        score_func, norm_topk = "softmax", False
    else:
        grouped = (hf_cfg.n_group or 1) > 1
        score_func, norm_topk = "sigmoid", bool(hf_cfg.norm_topk_prob)
    cfg = ModelConfig(
        attention="mla",
        kv_lora_rank=hf_cfg.kv_lora_rank,
        q_lora_rank=hf_cfg.q_lora_rank,
        qk_nope_head_dim=hf_cfg.qk_nope_head_dim,
        qk_rope_head_dim=hf_cfg.qk_rope_head_dim,
        v_head_dim=hf_cfg.v_head_dim,
        rope_interleave=True if mt == "deepseek_v2" else bool(getattr(hf_cfg, "rope_interleave", True)),
        ffn="moe" if moe else "dense",
        first_k_dense_replace=first_dense if moe else 0,
        n_routed_experts=hf_cfg.n_routed_experts or 8,
        n_shared_experts=hf_cfg.n_shared_experts or 0,
        n_activated_experts=hf_cfg.num_experts_per_tok or 2,
        moe_d_ff=hf_cfg.moe_intermediate_size,
        score_func=score_func,
        norm_topk_prob=norm_topk,
        route_scale=float(hf_cfg.routed_scaling_factor),
        n_group=(hf_cfg.n_group or 1) if grouped else 1,
        topk_group=(hf_cfg.topk_group or 1) if grouped else 1,
        **common,
    )
    return validate_model_config(cfg)


# ----------------------------------------------------------------------------------- state dicts
def _layer_map(cfg: ModelConfig, i: int, arch_family: str) -> dict[str, str]:
    """Our parameter name -> HF name for the non-expert weights of layer i."""
    ours, hf = f"layers.{i}.", f"model.layers.{i}."
    m = {ours + "attn_norm.weight": hf + "input_layernorm.weight", ours + "ffn_norm.weight": hf + "post_attention_layernorm.weight"}
    a, ha = ours + "attn.", hf + "self_attn."
    if arch_family == "llama":
        for o, h in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            m[a + o + ".weight"] = ha + h + ".weight"
    else:
        names = [("wkv_a", "kv_a_proj_with_mqa"), ("kv_norm", "kv_a_layernorm"), ("wkv_b", "kv_b_proj"), ("wo", "o_proj")]
        names += [("wq", "q_proj")] if cfg.q_lora_rank is None else [("wq_a", "q_a_proj"), ("q_norm", "q_a_layernorm"), ("wq_b", "q_b_proj")]
        for o, h in names:
            m[a + o + ".weight"] = ha + h + ".weight"
    f, hm = ours + "ffn.", hf + "mlp."
    if cfg.is_moe_layer(i):
        m[f + "gate.weight"] = hm + "gate.weight"
        if cfg.n_shared_experts:
            for o, h in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                m[f + f"shared_experts.{o}.weight"] = hm + f"shared_experts.{h}.weight"
    else:
        for o, h in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            m[f + o + ".weight"] = hm + h + ".weight"
    return m


def _family(cfg: ModelConfig) -> str:
    return "deepseek" if (cfg.is_mla or cfg.ffn == "moe") else "llama"


def state_dict_from_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Translate a transformers state dict to this toolkit's parameter names (missing keys raise)."""
    fam = _family(cfg)
    out: dict[str, torch.Tensor] = {"embed.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["head.weight"] = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.n_layers):
        for ours, hf in _layer_map(cfg, i, fam).items():
            if hf not in sd:
                raise KeyError(f"checkpoint is missing {hf}")
            out[ours] = sd[hf]
        if cfg.is_moe_layer(i):
            hm, f = f"model.layers.{i}.mlp.", f"layers.{i}.ffn."
            bias = sd.get(hm + "gate.e_score_correction_bias")
            out[f + "gate.e_score_correction_bias"] = (
                bias if bias is not None else torch.zeros(cfg.n_routed_experts, dtype=torch.float32)
            )
            gate_up = sd[hm + "experts.gate_up_proj"]  # (E, 2I, D)
            out[f + "w1"], out[f + "w3"] = gate_up.chunk(2, dim=1)  # (E, I, D) each
            out[f + "w2"] = sd[hm + "experts.down_proj"]  # (E, D, I)
    return out


def state_dict_to_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor], arch: str | None = None) -> dict[str, torch.Tensor]:
    """Translate this toolkit's state dict to transformers' parameter names."""
    fam = _family(cfg)
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    out["lm_head.weight"] = sd["embed.weight"] if cfg.tie_embeddings else sd["head.weight"]
    for i in range(cfg.n_layers):
        for ours, hf in _layer_map(cfg, i, fam).items():
            out[hf] = sd[ours]
        if cfg.is_moe_layer(i):
            hm, f = f"model.layers.{i}.mlp.", f"layers.{i}.ffn."
            if (arch or "deepseek_v3") == "deepseek_v3":
                out[hm + "gate.e_score_correction_bias"] = sd[f + "gate.e_score_correction_bias"]
            out[hm + "experts.gate_up_proj"] = torch.cat((sd[f + "w1"], sd[f + "w3"]), dim=1)  # (E, 2I, D)
            out[hm + "experts.down_proj"] = sd[f + "w2"]
    return {k: v.contiguous() for k, v in out.items()}
