"""Figure 1: training throughput, the toolkit's MLA + MoE step against transformers' DeepseekV3 step."""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..models.transformer import Transformer
from ..metrics.timing import BenchError, median, time_interleaved
from .sizes import Sizes


def cast_params_(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast parameters to ``dtype``, keeping what the references keep in fp32: RoPE frequencies (buffers
    are not touched) and the MoE router weights (``gate.weight``)."""
    if dtype != torch.float32:
        for name, p in model.named_parameters():
            if not name.endswith("gate.weight"):
                p.data = p.data.to(dtype)
    return model


# --------------------------------------------------------------------------- figure 1: training
def randomise_router_bias(model: Transformer, seed: int) -> None:
    """Non-zero aux-loss-free biases, so the bias path of the router is exercised (and copied to HF)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for moe in model.moe_layers():
            b = moe.gate.e_score_correction_bias
            b.copy_(0.01 * torch.randn(b.shape, generator=g).to(b.device))


def build_train_pair(cfg: ModelConfig, device: torch.device, seed: int = 0, attn_implementation: Optional[str] = None,
                     experts_implementation: Optional[str] = None) -> tuple[Transformer, torch.nn.Module]:
    """(ours, HF DeepseekV3ForCausalLM) with identical weights, fp32, on ``device``; HF's attention and experts
    implementations are its defaults unless named (e.g. ``"eager"``)."""
    import transformers

    from ..interop.state_dict import state_dict_to_hf, to_hf_config

    torch.manual_seed(seed)
    ours = Transformer(cfg)
    randomise_router_bias(ours, seed)
    hf_cfg = to_hf_config(cfg, "deepseek_v3")
    if attn_implementation is not None:
        hf_cfg._attn_implementation = attn_implementation
    if experts_implementation is not None:
        hf_cfg._experts_implementation = experts_implementation
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg)
    hf.load_state_dict(state_dict_to_hf(cfg, ours.state_dict(), "deepseek_v3"), strict=True)
    return ours.to(device), hf.to(device)


def hf_implementations(hf: torch.nn.Module) -> str:
    """HF's attention and experts implementations, as a label: "`sdpa` attention, `grouped_mm` experts"."""
    attn = getattr(hf.config, "_attn_implementation", None) or "eager"
    experts = getattr(hf.config, "_experts_implementation", None) or "eager"
    return f"`{attn}` attention, `{experts}` experts"


# HF baselines besides its defaults, for information: name -> build_train_pair keywords
HF_VARIANTS = {
    "hf_eager_attention": dict(attn_implementation="eager"),
    "hf_eager_experts": dict(experts_implementation="eager"),
}


def random_batch(cfg: ModelConfig, batch: int, seq: int, device: torch.device, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
    return ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)


def forward_logits(model: torch.nn.Module, ids: torch.Tensor, is_hf: bool) -> torch.Tensor:
    if is_hf:
        return model(input_ids=ids, use_cache=False).logits
    return model(ids)


def check_train_parity(ours: Transformer, hf: torch.nn.Module, ids: torch.Tensor, atol: float = 1e-4) -> float:
    """Max |logit difference| of the two models on ``ids`` (eval mode); raises BenchError above ``atol``."""
    was = ours.training, hf.training
    ours.eval()
    hf.eval()
    with torch.no_grad():
        got = forward_logits(ours, ids, False).float()
        ref = forward_logits(hf, ids, True).float()
    ours.train(was[0])
    hf.train(was[1])
    try:
        torch.testing.assert_close(got, ref, atol=atol, rtol=atol)
    except AssertionError as e:
        raise BenchError(f"ours and HF DeepseekV3 disagree before timing, so the comparison is void:\n{e}") from None
    return float((got - ref).abs().max())


def make_train_step(model: torch.nn.Module, ids: torch.Tensor, targets: torch.Tensor, is_hf: bool) -> Callable[[], None]:
    """One forward + backward + AdamW step on a fixed batch (the same loss for both models)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step() -> None:
        logits = forward_logits(model, ids, is_hf)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_train(sizes: Sizes, device: torch.device, dtype: torch.dtype, seed: int,
                hf_variants: Sequence[str] = tuple(HF_VARIANTS)) -> dict[str, Any]:
    """Figure 1: tokens/s of ours vs HF with its default implementations (and, for information, ``hf_variants``)."""
    cfg = sizes.train_cfg
    ids, targets = random_batch(cfg, sizes.train_batch, sizes.train_seq, device, seed + 1)
    ours, hf = build_train_pair(cfg, device, seed)
    contenders: dict[str, tuple[torch.nn.Module, bool]] = {"ours": (ours, False), "hf": (hf, True)}
    labels = {"hf": hf_implementations(hf)}
    for name in hf_variants:
        _, other = build_train_pair(cfg, device, seed, **HF_VARIANTS[name])
        if hf_implementations(other) != labels["hf"]:  # skip a variant that is HF's default already
            contenders[name], labels[name] = (other, True), hf_implementations(other)
    diffs = {k: check_train_parity(ours, m, ids) for k, (m, is_hf) in contenders.items() if is_hf}
    if device.type == "cuda":  # for information: what grouped-GEMM experts (CUDA's default) buy over the loop
        loop = copy.deepcopy(ours)
        for moe in loop.moe_layers():
            moe.grouped_mm = False
        contenders["ours_loop_experts"] = (loop, False)
    for m, _ in contenders.values():
        cast_params_(m, dtype)
    steps = {k: make_train_step(m, ids, targets, is_hf) for k, (m, is_hf) in contenders.items()}
    times = time_interleaved(steps, device, sizes.train_warmup, sizes.train_iters)
    tokens = sizes.train_batch * sizes.train_seq
    tok_s = {k: tokens / median(v) for k, v in times.items()}
    ratios = {k: tok_s["ours"] / tok_s[k] for k in tok_s if k.startswith("hf_")}  # ours over each other HF
    if "ours_loop_experts" in tok_s:
        ratios["ours_loop_experts"] = tok_s["ours_loop_experts"] / tok_s["hf"]  # that variant of ours over HF
    return {
        "config": cfg, "batch": sizes.train_batch, "seq": sizes.train_seq, "tokens_per_step": tokens,
        "hf_implementations": labels, "max_logit_diff": diffs, "times": times, "tok_s": tok_s,
        "ratio": tok_s["ours"] / tok_s["hf"], "ratios": ratios, "_steps": steps,
    }
