"""Mapping between the toolkit's models and ``transformers``' DeepSeek-V2/V3, Llama, Qwen2, GPT-2 formats.

Configs and state dicts are translated both ways; weights are never executed or pickled here
(checkpoint I/O goes through safetensors in ``mla_analysis.conversion.cli``).

RoPE layout: DeepSeek checkpoints rotate interleaved pairs. transformers' DeepseekV3 (with
``rope_interleave=True``) returns the rotated dims de-interleaved while ours stay interleaved; queries
and keys get the same permutation, so attention logits are identical and no weight permutation is
needed. Llama-family checkpoints use the halves layout (``rope_interleave=False``).

Qwen2 is Llama with biases on q/k/v (``attn_qkv_bias``). GPT-2 maps to ``pos_emb="learned"``,
``norm="layernorm"``, ``mlp="gelu"``, ``bias=True``; its ``Conv1D`` weights are stored (in, out), so
they are transposed, and its fused ``c_attn`` is split into wq/wk/wv.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ConfigError, ModelConfig, RopeScaling, validate_model_config

DEEPSEEK_ARCHS = ("deepseek_v2", "deepseek_v3")
LLAMA_ARCHS = ("llama", "mistral")
EXPORT_ARCHS = ("deepseek_v3", "deepseek_v2", "llama", "qwen2", "gpt2")
IMPORT_ARCHS = DEEPSEEK_ARCHS + LLAMA_ARCHS + ("qwen2", "gpt2")
# what a Llama-layout (RoPE, RMSNorm, SwiGLU, bias-free) model has; GPT-2 has the other choice of each
_LLAMA_LAYOUT = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, rope_inv_freq=None,
                     kv_quant_bits=16)  # a quantised cache is a runtime setting HF configs do not carry


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


def default_arch(cfg: ModelConfig) -> str:
    """The transformers model_type ``to_hf`` writes for ``cfg`` when no arch is asked for."""
    if cfg.is_mla or cfg.ffn == "moe":
        return "deepseek_v3"
    if cfg.pos_emb == "learned" or cfg.norm == "layernorm" or cfg.mlp == "gelu" or cfg.bias:
        return "gpt2"
    return "qwen2" if cfg.attn_qkv_bias else "llama"


def _require(cfg: ModelConfig, arch: str, **wanted: Any) -> None:
    # one line naming the first field the target architecture cannot express
    for key, value in wanted.items():
        if getattr(cfg, key) != value:
            shown = "set" if key == "rope_inv_freq" else repr(getattr(cfg, key))
            raise ConfigError(f"model.{key}={shown} cannot be exported as {arch} (allowed: {value!r})")


def _gpt2_config(cfg: ModelConfig):
    import transformers

    _require(cfg, "gpt2", attention="mha", ffn="dense", pos_emb="learned", norm="layernorm", mlp="gelu", bias=True,
             kv_quant_bits=16)
    if cfg.attn_head_dim * cfg.n_heads != cfg.d_model:
        raise ConfigError(f"model.head_dim={cfg.head_dim} cannot be exported as gpt2 (allowed: d_model / n_heads)")
    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.d_ff,
        activation_function="gelu_new",
        layer_norm_epsilon=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,  # GPT-2's 50256 would lie outside a small vocabulary
        eos_token_id=None,
    )


def to_hf_config(cfg: ModelConfig, arch: str | None = None):
    """A transformers config: DeepseekV3 (MLA/MoE; V2 with ``arch``), Llama, Qwen2 (q/k/v biases) or GPT-2."""
    import transformers

    arch = arch or default_arch(cfg)
    if arch not in EXPORT_ARCHS:
        raise ConfigError(f"arch={arch!r} is invalid (allowed: {', '.join(EXPORT_ARCHS)})")
    if arch == "gpt2":
        return _gpt2_config(cfg)
    _require(cfg, arch, **_LLAMA_LAYOUT)
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
    if arch in ("llama", "qwen2"):
        if cfg.is_mla or cfg.ffn == "moe":
            raise ConfigError(f"model.attention={cfg.attention!r}/ffn={cfg.ffn!r} cannot be exported as {arch}")
        if cfg.rope_interleave:
            raise ConfigError(f"model.rope_interleave=True cannot be exported as {arch} (halves layout only)")
        if arch == "qwen2":  # Qwen2 always has q/k/v biases; a bias-free model exports zeros
            common.pop("attention_bias")
            return transformers.Qwen2Config(
                num_key_value_heads=cfg.kv_heads, head_dim=cfg.attn_head_dim, use_sliding_window=False, **common
            )
        _require(cfg, arch, attn_qkv_bias=False)
        return transformers.LlamaConfig(
            num_key_value_heads=cfg.kv_heads, head_dim=cfg.attn_head_dim, mlp_bias=False, **common
        )
    if cfg.attention != "mla":
        raise ConfigError(f"model.attention={cfg.attention!r} cannot be exported as {arch} (allowed: mla)")
    _require(cfg, arch, kv_norm=True)  # DeepSeek checkpoints always have kv_a_layernorm
    # one k_rope shared by all heads, rotated by the config's frequencies in every layer
    _require(cfg, arch, qk_rope_heads=1, rope_layer_freqs=False)
    moe = cfg.ffn == "moe"
    if moe and cfg.gate_weights != "score":
        raise ConfigError(f"model.gate_weights={cfg.gate_weights!r} cannot be exported as {arch} (allowed: score)")
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


def exportable_to_deepseek(cfg: ModelConfig, arch: str = "deepseek_v3") -> tuple[bool, str]:
    """Whether ``cfg`` exports to DeepSeek's HF format, and if not the one-line reason ``to_hf_config`` gives.

    DeepseekV3 (and V2) have the latent norm (kv_a_layernorm), one shared RoPE key, one kv_lora_rank for all layers,
    frequencies from rope_theta / rope_scaling only and interleaved RoPE pairs (V3): converted variants without
    the norm, with per-KV-head RoPE keys, per-layer frequencies or ranks, or kept pairs rope_theta cannot express
    do not export.
    """
    if arch not in DEEPSEEK_ARCHS:
        raise ValueError(f"arch={arch!r} is invalid (allowed: {', '.join(DEEPSEEK_ARCHS)})")
    try:
        to_hf_config(cfg, arch)
    except ConfigError as e:
        return False, str(e)
    return True, ""


def _gpt2_from_hf_config(hf_cfg: Any) -> ModelConfig:
    act = hf_cfg.activation_function
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(f"activation_function={act!r} is unsupported (allowed: gelu_new, gelu_pytorch_tanh)")
    if not hf_cfg.scale_attn_weights or hf_cfg.scale_attn_by_inverse_layer_idx:
        raise ConfigError(
            "scale_attn_weights=False / scale_attn_by_inverse_layer_idx=True is unsupported (allowed: 1/sqrt(d_h) scale)"
        )
    if getattr(hf_cfg, "add_cross_attention", False):
        raise ConfigError("add_cross_attention=True is unsupported (decoder-only models)")
    cfg = ModelConfig(
        name="gpt2",
        attention="mha",
        vocab_size=hf_cfg.vocab_size,
        d_model=hf_cfg.n_embd,
        n_layers=hf_cfg.n_layer,
        n_heads=hf_cfg.n_head,
        d_ff=hf_cfg.n_inner or 4 * hf_cfg.n_embd,
        max_seq_len=hf_cfg.n_positions,
        pos_emb="learned",
        norm="layernorm",
        mlp="gelu",
        bias=True,
        rms_norm_eps=hf_cfg.layer_norm_epsilon,
        tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", True)),
    )
    return validate_model_config(cfg)


def from_hf_config(hf_cfg: Any) -> ModelConfig:
    """A ModelConfig equivalent to a transformers DeepseekV2/V3, Llama, Mistral, Qwen2 or GPT-2 config."""
    mt = hf_cfg.model_type
    if mt == "gpt2":
        return _gpt2_from_hf_config(hf_cfg)
    if mt not in IMPORT_ARCHS:
        raise ConfigError(f"model_type={mt!r} is unsupported (allowed: {', '.join(IMPORT_ARCHS)})")
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
    if mt in LLAMA_ARCHS + ("qwen2",):
        if mt in LLAMA_ARCHS:
            for key in ("attention_bias", "mlp_bias"):
                if getattr(hf_cfg, key, False):
                    raise ConfigError(f"{key}=True is unsupported for {mt} (allowed: false)")
        if "sliding_attention" in (getattr(hf_cfg, "layer_types", None) or ()):
            raise ConfigError(f"use_sliding_window=True is unsupported for {mt} (allowed: full attention)")
        n_kv = hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads
        attention = "mha" if n_kv == hf_cfg.num_attention_heads else ("mqa" if n_kv == 1 else "gqa")
        head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
        cfg = ModelConfig(
            attention=attention,
            n_kv_heads=None if attention != "gqa" else n_kv,
            head_dim=head_dim,
            rope_interleave=False,
            attn_qkv_bias=mt == "qwen2",
            **common,
        )
        return validate_model_config(cfg)
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
        if cfg.attn_qkv_bias:  # Qwen2
            for o, h in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj")):
                m[a + o + ".bias"] = ha + h + ".bias"
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
    arch = default_arch(cfg)
    return "deepseek" if arch in DEEPSEEK_ARCHS else ("gpt2" if arch == "gpt2" else "llama")


def _gpt2_map(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter name -> GPT-2 name for everything but the fused c_attn (split separately)."""
    t = "transformer."
    m = {"embed.weight": t + "wte.weight", "pos_embed.weight": t + "wpe.weight"}
    for p in ("weight", "bias"):
        m[f"norm.{p}"] = t + f"ln_f.{p}"
        for i in range(cfg.n_layers):
            ours, h = f"layers.{i}.", t + f"h.{i}."
            m[ours + f"attn_norm.{p}"] = h + f"ln_1.{p}"
            m[ours + f"ffn_norm.{p}"] = h + f"ln_2.{p}"
            m[ours + f"attn.wo.{p}"] = h + f"attn.c_proj.{p}"
            m[ours + f"ffn.w1.{p}"] = h + f"mlp.c_fc.{p}"
            m[ours + f"ffn.w2.{p}"] = h + f"mlp.c_proj.{p}"
    return m


def _is_conv1d_weight(hf_name: str) -> bool:
    # GPT-2's Conv1D stores (in, out), the transpose of nn.Linear's (out, in)
    return hf_name.endswith(".weight") and (".attn." in hf_name or ".mlp." in hf_name)


def _gpt2_from_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "transformer.wte.weight" not in sd and "wte.weight" in sd:  # GPT2Model checkpoints (e.g. the hub's gpt2)
        sd = {"transformer." + k: v for k, v in sd.items()}
    out: dict[str, torch.Tensor] = {}
    for ours, hf in _gpt2_map(cfg).items():
        if hf not in sd:
            raise KeyError(f"checkpoint is missing {hf}")
        out[ours] = sd[hf].T if _is_conv1d_weight(hf) else sd[hf]
    D = cfg.d_model
    for i in range(cfg.n_layers):
        h, a = f"transformer.h.{i}.attn.c_attn.", f"layers.{i}.attn."
        if h + "weight" not in sd:
            raise KeyError(f"checkpoint is missing {h}weight")
        w = sd[h + "weight"].T  # (3D, D): q, k, v rows
        for j, name in enumerate(("wq", "wk", "wv")):
            out[a + name + ".weight"] = w[j * D : (j + 1) * D]  # (D, D)
            out[a + name + ".bias"] = sd[h + "bias"][j * D : (j + 1) * D]  # (D,)
    if not cfg.tie_embeddings:
        out["head.weight"] = sd.get("lm_head.weight", sd["transformer.wte.weight"])
    return {k: v.contiguous() for k, v in out.items()}


def _gpt2_to_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {hf: (sd[ours].T if _is_conv1d_weight(hf) else sd[ours]) for ours, hf in _gpt2_map(cfg).items()}
    for i in range(cfg.n_layers):
        h, a = f"transformer.h.{i}.attn.c_attn.", f"layers.{i}.attn."
        out[h + "weight"] = torch.cat([sd[a + n + ".weight"] for n in ("wq", "wk", "wv")]).T  # (D, 3D)
        out[h + "bias"] = torch.cat([sd[a + n + ".bias"] for n in ("wq", "wk", "wv")])  # (3D,)
    out["lm_head.weight"] = sd["embed.weight"] if cfg.tie_embeddings else sd["head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def state_dict_from_hf(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Translate a transformers state dict (in-memory or on-disk expert layout) to this toolkit's names (missing keys raise)."""
    fam = _family(cfg)
    if fam == "gpt2":
        return _gpt2_from_hf(cfg, sd)
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
            out[f + "w1"], out[f + "w3"], out[f + "w2"] = _experts_from_hf(sd, hm + "experts.", cfg.n_routed_experts)
    return out


def _experts_from_hf(sd: dict[str, torch.Tensor], he: str, n_experts: int) -> tuple[torch.Tensor, ...]:
    """Routed experts (w1, w3, w2), each (E, out, in), from the fused in-memory or the per-expert on-disk layout."""
    if he + "gate_up_proj" in sd:  # transformers 5 modules: experts.gate_up_proj (E, 2I, D), experts.down_proj (E, D, I)
        w1, w3 = sd[he + "gate_up_proj"].chunk(2, dim=1)  # (E, I, D) each
        if he + "down_proj" not in sd:
            raise KeyError(f"checkpoint is missing {he}down_proj")
        return w1, w3, sd[he + "down_proj"]
    # checkpoints as saved (save_pretrained, the published DeepSeek files): experts.{e}.{gate,up,down}_proj.weight
    stacked = []
    for h in ("gate_proj", "up_proj", "down_proj"):
        names = [f"{he}{e}.{h}.weight" for e in range(n_experts)]
        for name in names:
            if name not in sd:
                raise KeyError(f"checkpoint is missing {name}")
        stacked.append(torch.stack([sd[name] for name in names]))  # (E, out, in)
    return tuple(stacked)


def state_dict_to_hf(
    cfg: ModelConfig, sd: dict[str, torch.Tensor], arch: str | None = None, layout: str = "model"
) -> dict[str, torch.Tensor]:
    """Translate this toolkit's state dict to transformers' names: ``layout`` "model" (in memory) or "checkpoint" (on disk).

    The two differ for routed experts only: transformers 5 modules hold them fused (``experts.gate_up_proj``
    (E, 2I, D), ``experts.down_proj`` (E, D, I)); ``save_pretrained`` writes, and the published DeepSeek
    checkpoints hold, one set of keys per expert (``experts.{e}.gate_proj.weight`` ...).
    """
    if layout not in ("model", "checkpoint"):
        raise ValueError(f"layout={layout!r} is invalid (allowed: model, checkpoint)")
    arch = arch or default_arch(cfg)
    if arch == "gpt2":
        return _gpt2_to_hf(cfg, sd)
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
            elif bool((sd[f + "gate.e_score_correction_bias"] != 0).any()):  # dropping it would change the routing
                raise ConfigError(
                    f"{f}gate.e_score_correction_bias is nonzero: it cannot be exported as {arch} (no routing bias there)"
                )
            if layout == "model":
                out[hm + "experts.gate_up_proj"] = torch.cat((sd[f + "w1"], sd[f + "w3"]), dim=1)  # (E, 2I, D)
                out[hm + "experts.down_proj"] = sd[f + "w2"]
            else:
                for o, h in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                    for e, w in enumerate(sd[f + o].unbind(0)):  # (E, out, in) -> E x (out, in)
                        out[hm + f"experts.{e}.{h}.weight"] = w.clone()  # own storage: safetensors refuses shared views
        if arch == "qwen2" and not cfg.attn_qkv_bias:  # Qwen2 has q/k/v biases: zeros add nothing
            ha = f"model.layers.{i}.self_attn."
            for h in ("q_proj", "k_proj", "v_proj"):
                out[ha + h + ".bias"] = sd[f"layers.{i}.attn.w{h[0]}.weight"].new_zeros(out[ha + h + ".weight"].shape[0])
    return {k: v.contiguous() for k, v in out.items()}
