"""DeepSeekMoE feed-forward layer: shared experts + fine-grained routed experts (DeepSeek-V2 / V3).

Layout follows DeepSeek-V3 ``inference/model.py`` (``Gate``, ``MoE``, ``w1``/``w3``/``w2``); routing matches
the Hugging Face references ``DeepseekV2TopkRouter`` (softmax, greedy / group_limited_greedy) and
``DeepseekV3TopkRouter`` (sigmoid, group score = sum of the top-2 biased scores). Definitions of the
balance losses: DeepSeek-V2 (arXiv:2405.04434); the auxiliary-loss-free bias: DeepSeek-V3 (arXiv:2412.19437)
and Wang et al. 2024 (arXiv:2408.15664), which also defines MaxVio.

Notation (paper): N tokens (= B*T), E routed experts, k = experts per token, I = expert hidden size,
s [N, E] affinities, b [E] the aux-loss-free bias, D devices (``n_devices`` groups of E/D experts).

Training-time side products of ``MoE.forward`` (read by the trainer / probes):

* ``aux_loss`` -- alpha1*L_ExpBal + alpha2*L_DevBal + alpha3*L_CommBal (0 in eval or with all alphas 0).
* ``last_load`` -- [E] assignments per routed expert in the last training forward (before dropping).
* ``last_dropped`` -- fraction of (token, expert) assignments dropped by the capacity factor.
* ``update_bias()`` -- one step of auxiliary-loss-free balancing from the loads since the last call.
* with ``record_routing = True`` (train or eval): ``last_indices`` [B, T, k], ``last_weights`` [B, T, k],
  ``last_scores`` [B, T, E] (unbiased affinities), detached.

Routed experts run as one matmul per expert over its block of expert-sorted rows (``experts_loop``; on CPU
``grouped_mm`` has no faster kernel), or on CUDA in bf16 as three grouped GEMMs over all experts
(``experts_grouped``, ``F.grouped_mm``, no host sync); ``MoE.grouped_mm`` forces either.

Choices where the references leave room:

* f_i of the expert/device/communication losses counts the routing decision. For the sigmoid (V3)
  complementary loss the paper defines f_i on the top-k of the UNBIASED scores, so with a non-zero bias we
  re-run the selection (same group limit) on the unbiased scores; with softmax (V2) f_i counts the
  experts actually selected.
* Communication loss: f''_d = D/(M T) * #tokens sent to device d, with M = the most devices one token can
  reach: min(topk_group, k) when device-limited routing is on (n_group == n_devices > 1), else min(k, D).
  V2 uses M = topk_group = 3 <= k = 6, so this equals the paper there; the min keeps f'' = 1 under
  perfect balance in tiny configs where topk_group > k.
* Token dropping (V2, training only): per device budget = ceil(capacity_factor * k * N / D) assignments;
  on an overloaded device the assignments with the lowest unbiased affinity s_{i,t} go first (ties: the
  later token). Kept assignments are not renormalised. V2's "~10% of sequences never dropped" is not
  implemented. Loads for the bias update are counted before dropping (they measure the router).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .mlp import SwiGLU


# ---- pure helpers (usable by probes and tests) ---------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` computes in: autocast's where it is on, else ``x``'s."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def routing_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """Affinities s from router logits: softmax over experts (V2) or element-wise sigmoid (V3), in fp32."""
    if score_func == "softmax":
        return logits.softmax(dim=-1, dtype=torch.float32)
    if score_func == "sigmoid":
        return logits.float().sigmoid()
    raise ValueError(f"score_func={score_func!r} (allowed: softmax | sigmoid)")


def group_limited_mask(
    scores_for_choice: torch.Tensor, n_group: int, topk_group: int, score_func: str
) -> torch.Tensor:
    """Bool mask [N, E] of the experts inside each token's ``topk_group`` best groups."""
    n, n_experts = scores_for_choice.shape
    grouped = scores_for_choice.view(n, n_group, n_experts // n_group)  # [N, G, E/G]
    if score_func == "softmax":
        group_scores = grouped.amax(dim=-1)  # [N, G]; V2 group_limited_greedy
    else:
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [N, G]; V3 (biased scores)
    group_idx = group_scores.topk(topk_group, dim=-1, sorted=False)[1]  # [N, topk_group]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)  # [N, G]
    return group_mask.unsqueeze(-1).expand(n, n_group, n_experts // n_group).reshape(n, n_experts)  # [N, E]


def routing_load(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments per expert [E] (float) from routing indices of any shape."""
    return torch.bincount(indices.reshape(-1), minlength=n_experts).float()  # [E]


def max_vio(load: torch.Tensor) -> float:
    """MaxVio = (max_i load_i - mean load) / mean load; the mean is the perfect-balance load k*N/E."""
    load = load.float()
    mean = load.mean()
    return float((load.max() - mean) / mean) if mean > 0 else 0.0


def expert_frequency(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """f [S, E] = E/(k T) * #tokens of each sequence selecting expert i, from indices [S, T, k]."""
    n_seq, n_tok, k = indices.shape
    counts = torch.zeros(n_seq, n_experts, device=indices.device)
    flat = indices.reshape(n_seq, n_tok * k)  # [S, T*k]
    counts.scatter_add_(1, flat, torch.ones(flat.shape, device=indices.device))  # [S, E]
    return counts * (n_experts / (k * n_tok))  # [S, E]


def mean_affinity(scores: torch.Tensor) -> torch.Tensor:
    """P [S, E] = (1/T) sum_t s'_{i,t} from (already normalised, if needed) scores [S, T, E]."""
    return scores.mean(dim=1)


def expert_balance_loss(f: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Unweighted L_ExpBal = sum_i f_i P_i, averaged over the S rows of f, P [S, E]."""
    return (f * p).sum(dim=-1).mean()


def device_balance_loss(f: torch.Tensor, p: torch.Tensor, n_devices: int) -> torch.Tensor:
    """Unweighted L_DevBal = sum_d mean_{i in d}(f_i) * sum_{i in d}(P_i), averaged over rows of f, P [S, E]."""
    n_seq, n_experts = f.shape
    f_dev = f.view(n_seq, n_devices, n_experts // n_devices).mean(dim=-1)  # [S, D]
    p_dev = p.view(n_seq, n_devices, n_experts // n_devices).sum(dim=-1)  # [S, D]
    return (f_dev * p_dev).sum(dim=-1).mean()


def device_frequency(indices: torch.Tensor, n_experts: int, n_devices: int, m: int) -> torch.Tensor:
    """f'' [S, D] = D/(M T) * #tokens sent to device d (each token counted once per device), indices [S, T, k]."""
    n_seq, n_tok, _ = indices.shape
    device = indices // (n_experts // n_devices)  # [S, T, k]
    sent = torch.zeros(n_seq, n_tok, n_devices, dtype=torch.bool, device=indices.device)
    sent.scatter_(2, device, True)  # [S, T, D]
    return sent.sum(dim=1).float() * (n_devices / (m * n_tok))  # [S, D]


def comm_balance_loss(f_comm: torch.Tensor, p: torch.Tensor, n_devices: int) -> torch.Tensor:
    """Unweighted L_CommBal = sum_d f''_d * sum_{i in d}(P_i), with f_comm [S, D], P [S, E]."""
    n_seq, n_experts = p.shape
    p_dev = p.view(n_seq, n_devices, n_experts // n_devices).sum(dim=-1)  # [S, D]
    return (f_comm * p_dev).sum(dim=-1).mean()


def comm_devices_per_token(cfg: ModelConfig) -> int:
    """M of the communication loss: the most devices one token can be sent to (see module docstring)."""
    k, n_dev = cfg.n_activated_experts, cfg.n_devices
    if cfg.n_group == n_dev > 1:
        return min(cfg.topk_group, k)
    return min(k, n_dev)


def capacity_keep_mask(
    indices: torch.Tensor, affinity: torch.Tensor, n_experts: int, n_devices: int, capacity_factor: float
) -> torch.Tensor:
    """Bool mask [N, k]: False for the lowest-affinity assignments beyond each device's budget."""
    n, k = indices.shape
    budget = math.ceil(capacity_factor * k * n / n_devices - 1e-9)  # the epsilon absorbs float error in cf*k*N
    device = (indices // (n_experts // n_devices)).reshape(-1)  # [N*k]
    # order = assignments grouped by device, highest affinity first inside a device (stable: ties keep token order)
    order = torch.argsort(affinity.reshape(-1), descending=True, stable=True)  # [N*k]
    order = order[torch.argsort(device[order], stable=True)]  # [N*k]
    counts = torch.bincount(device, minlength=n_devices)  # [D]
    starts = torch.cumsum(counts, 0) - counts  # [D]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n * k, device=indices.device) - starts[device[order]]  # rank inside its device
    return (rank < budget).view(n, k)  # [N, k]


# ---- modules ---------------------------------------------------------------------------------------------


class Gate(nn.Module):
    """Router: affinities s, biased (group-limited) top-k selection, gate weights from the unbiased s."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dim = cfg.d_model
        self.n_experts = cfg.n_routed_experts
        self.topk = cfg.n_activated_experts
        self.n_groups = cfg.n_group
        self.topk_groups = cfg.topk_group
        self.score_func = cfg.score_func
        self.norm_topk_prob = cfg.norm_topk_prob
        self.route_scale = cfg.route_scale
        self.unit_weights = cfg.gate_weights == "unit"
        # fp32 like the references (HF keeps gate.weight and the bias in fp32 under bf16)
        self.weight = nn.Parameter(torch.empty(self.n_experts, self.dim, dtype=torch.float32))
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(self.n_experts, dtype=torch.float32), persistent=True
        )
        # DeepSeekMoE redundancy probe (Fig. 4): exclude each token's r highest-affinity experts; 0 = off
        self.mask_top_r = 0
        nn.init.normal_(self.weight, std=cfg.init_std)

    def select(self, scores_for_choice: torch.Tensor, scores: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Top-k expert indices [N, k] from selection scores [N, E] (group-limited when n_groups > 1)."""
        if self.mask_top_r > 0:
            ranking = scores if scores is not None else scores_for_choice
            top_r = ranking.topk(self.mask_top_r, dim=-1)[1]  # [N, r]
            scores_for_choice = scores_for_choice.scatter(1, top_r, float("-inf"))
        if self.n_groups > 1:
            allowed = group_limited_mask(scores_for_choice, self.n_groups, self.topk_groups, self.score_func)
            scores_for_choice = scores_for_choice.masked_fill(~allowed, float("-inf"))
        return scores_for_choice.topk(self.topk, dim=-1, sorted=False)[1]  # [N, k]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, k] fp32, indices [N, k], unbiased scores s [N, E] fp32)."""
        logits = F.linear(x.float(), self.weight.float())  # [N, E]
        scores = routing_scores(logits, self.score_func)  # [N, E]
        indices = self.select(scores + self.e_score_correction_bias, scores)  # the bias steers selection only
        weights = scores.gather(1, indices)  # [N, k]
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if self.unit_weights:
            # forward value exactly 1 (MoEfication's unweighted sum); gradient to the router as for the
            # score weights (straight-through), so healing still trains the gate
            return 1.0 + weights - weights.detach(), indices, scores
        return weights * self.route_scale, indices, scores

    def extra_repr(self) -> str:
        return (
            f"experts={self.n_experts}, topk={self.topk}, groups={self.n_groups}/{self.topk_groups}, "
            f"score_func={self.score_func}"
        )


class MoE(nn.Module):
    """DeepSeekMoE layer: routed SwiGLU experts (stacked weights) + always-on shared experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dim = cfg.d_model
        self.n_routed_experts = cfg.n_routed_experts
        self.n_activated_experts = cfg.n_activated_experts
        self.moe_inter_dim = cfg.moe_d_ff
        self.gate = Gate(cfg)
        e, i, d = cfg.n_routed_experts, cfg.moe_d_ff, cfg.d_model
        self.w1 = nn.Parameter(torch.empty(e, i, d))  # gate proj of every routed expert
        self.w3 = nn.Parameter(torch.empty(e, i, d))  # up proj
        self.w2 = nn.Parameter(torch.empty(e, d, i))  # down proj
        self.shared_experts = SwiGLU(d, cfg.n_shared_experts * i) if cfg.n_shared_experts > 0 else None

        self.score_func = cfg.score_func
        self.aux_alpha = cfg.aux_alpha
        self.device_alpha = cfg.device_alpha
        self.comm_alpha = cfg.comm_alpha
        self.seq_aux = cfg.seq_aux
        self.n_devices = cfg.n_devices
        self.comm_m = comm_devices_per_token(cfg)
        self.bias_update_speed = cfg.bias_update_speed
        self.capacity_factor = cfg.capacity_factor

        self.grouped_mm: Optional[bool] = None  # experts via F.grouped_mm; None: on CUDA in bf16 (use_grouped_mm)
        self.record_routing = False
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.last_load: Optional[torch.Tensor] = None
        self.last_dropped = 0.0
        self.last_indices: Optional[torch.Tensor] = None
        self.last_weights: Optional[torch.Tensor] = None
        self.last_scores: Optional[torch.Tensor] = None
        self._load_since_update: Optional[torch.Tensor] = None
        self.reset_parameters(cfg.init_std)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        """Normal(0, std) init of router, routed and shared expert weights (the stacked ones are not nn.Linear)."""
        for p in (self.gate.weight, self.w1, self.w3, self.w2):
            nn.init.normal_(p, std=std)
        if self.shared_experts is not None:
            for lin in (self.shared_experts.w1, self.shared_experts.w3, self.shared_experts.w2):
                nn.init.normal_(lin.weight, std=std)

    # ---- routed experts --------------------------------------------------------------------------------

    def routed(
        self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, keep: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Weighted sum of routed expert outputs: x [N, D], weights/indices/keep [N, k] -> [N, D]."""
        n, k = indices.shape
        expert_idx = indices.reshape(-1)  # [N*k]
        token_idx = torch.arange(n, device=x.device).repeat_interleave(k)  # [N*k]
        gate_w = weights.reshape(-1)  # [N*k]
        if keep is not None:
            keep = keep.reshape(-1)  # [N*k]
            expert_idx, token_idx, gate_w = expert_idx[keep], token_idx[keep], gate_w[keep]
        # sorted by expert, every expert's tokens are one contiguous block of rows
        order = torch.argsort(expert_idx, stable=True)  # [A]
        token_idx, gate_w = token_idx[order], gate_w[order]
        counts = torch.bincount(expert_idx, minlength=self.n_routed_experts)  # [E]
        x_sorted = x.index_select(0, token_idx)  # [A, D]
        if self.use_grouped_mm(x_sorted):
            y_sorted = self.experts_grouped(x_sorted, counts)  # [A, D]
        else:
            y_sorted = self.experts_loop(x_sorted, counts.tolist())  # [A, D]
        y = torch.zeros_like(x)  # [N, D]
        y.index_add_(0, token_idx, y_sorted * gate_w.to(x.dtype).unsqueeze(-1))
        return y

    def use_grouped_mm(self, x_sorted: torch.Tensor) -> bool:
        """Whether ``experts_grouped`` runs: ``grouped_mm`` set, or (None) on CUDA in bf16 where its kernel exists."""
        if self.grouped_mm is not None:
            return self.grouped_mm
        dtype = _compute_dtype(x_sorted)
        aligned = all(n * dtype.itemsize % 16 == 0 for n in (self.dim, self.moe_inter_dim))  # kernel's stride rule
        return x_sorted.is_cuda and dtype == torch.bfloat16 and aligned and hasattr(F, "grouped_mm")

    def experts_loop(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """SwiGLU of each expert on its block of rows, one matmul per expert with tokens: [A, D] -> [A, D]."""
        # unbind views avoid per-expert slicing of the stacked weights, whose backward would
        # zero-fill and accumulate a full [E, ...] gradient once per expert
        w1, w3, w2 = self.w1.unbind(0), self.w3.unbind(0), self.w2.unbind(0)
        outs = []
        for e, x_e in enumerate(x_sorted.split(counts)):  # x_e [n_e, D]
            if x_e.shape[0] == 0:
                continue
            h = F.silu(F.linear(x_e, w1[e])) * F.linear(x_e, w3[e])  # [n_e, I]
            outs.append(F.linear(h, w2[e]))  # [n_e, D]
        return torch.cat(outs, dim=0) if outs else x_sorted.new_zeros(x_sorted.shape)

    def experts_grouped(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``experts_loop`` as three grouped GEMMs over all experts (no host sync, one kernel each): [A, D] -> [A, D]."""
        # grouped_mm is not autocast-aware: cast to the compute dtype by hand, as autocast would for F.linear
        dtype = _compute_dtype(x_sorted)
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)  # [E] end row of each expert's block
        x_sorted = x_sorted.to(dtype)
        w1, w3, w2 = (w.to(dtype).transpose(1, 2) for w in (self.w1, self.w3, self.w2))  # [E, in, out] views
        h = F.silu(F.grouped_mm(x_sorted, w1, offs=offs)) * F.grouped_mm(x_sorted, w3, offs=offs)  # [A, I]
        return F.grouped_mm(h, w2, offs=offs)  # [A, D]

    # ---- balance -----------------------------------------------------------------------------------------

    def balance_loss(self, scores: torch.Tensor, indices: torch.Tensor, batch: int) -> torch.Tensor:
        """alpha-weighted sum of the expert/device/communication losses; scores [N, E], indices [N, k]."""
        n, n_experts = scores.shape
        n_seq = batch if self.seq_aux else 1
        if self.score_func == "sigmoid":
            if bool((self.gate.e_score_correction_bias != 0).any()):
                indices = self.gate.select(scores, scores)  # f_i on the unbiased top-k (V3 complementary loss)
            scores = scores / scores.sum(dim=-1, keepdim=True)  # s' = s / sum_j s_j
        scores = scores.view(n_seq, n // n_seq, n_experts)  # [S, T, E]
        indices = indices.view(n_seq, n // n_seq, -1)  # [S, T, k]
        f = expert_frequency(indices, n_experts)  # [S, E]
        p = mean_affinity(scores)  # [S, E]
        loss = scores.new_zeros(())
        if self.aux_alpha > 0:
            loss = loss + self.aux_alpha * expert_balance_loss(f, p)
        if self.device_alpha > 0:
            loss = loss + self.device_alpha * device_balance_loss(f, p, self.n_devices)
        if self.comm_alpha > 0:
            f_comm = device_frequency(indices, n_experts, self.n_devices, self.comm_m)  # [S, D]
            loss = loss + self.comm_alpha * comm_balance_loss(f_comm, p, self.n_devices)
        return loss

    @torch.no_grad()
    def update_bias(self, all_reduce=None) -> None:
        """Aux-loss-free balancing step: b_i += gamma * sign(mean load - load_i) over loads since the last call.

        ``all_reduce`` (e.g. ``torch.distributed.all_reduce``) sums the loads over data-parallel ranks
        first, so every rank applies the same update and the biases stay identical.
        """
        load, self._load_since_update = self._load_since_update, None
        if self.bias_update_speed == 0 or load is None:
            return
        if all_reduce is not None:
            all_reduce(load)
        self.gate.e_score_correction_bias.add_(self.bias_update_speed * torch.sign(load.mean() - load))

    # ---- forward -----------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> [B, T, D] = routed experts + shared experts."""
        batch, seq, dim = x.shape
        x_flat = x.reshape(batch * seq, dim)  # [N, D]
        weights, indices, scores = self.gate(x_flat)  # [N, k], [N, k], [N, E]
        keep = None
        self.aux_loss = x.new_zeros((), dtype=torch.float32)
        self.last_dropped = 0.0
        if self.training:
            with torch.no_grad():
                load = routing_load(indices, self.n_routed_experts)  # [E]
                self.last_load = load
                prev = self._load_since_update
                self._load_since_update = load if prev is None else prev + load
                if self.capacity_factor is not None:
                    keep = capacity_keep_mask(
                        indices, scores.gather(1, indices), self.n_routed_experts, self.n_devices,
                        self.capacity_factor,
                    )
                    self.last_dropped = 1.0 - keep.float().mean().item()
            if self.aux_alpha > 0 or self.device_alpha > 0 or self.comm_alpha > 0:
                self.aux_loss = self.balance_loss(scores, indices, batch)
        if self.record_routing:
            self.last_indices = indices.detach().view(batch, seq, -1)  # [B, T, k]
            self.last_weights = weights.detach().view(batch, seq, -1)  # [B, T, k]
            self.last_scores = scores.detach().view(batch, seq, -1)  # [B, T, E]
        y = self.routed(x_flat, weights, indices, keep).view(batch, seq, dim)  # [B, T, D]
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, routed={self.n_routed_experts}, active={self.n_activated_experts}, "
            f"moe_inter_dim={self.moe_inter_dim}"
        )


__all__ = [
    "Gate",
    "MoE",
    "capacity_keep_mask",
    "comm_balance_loss",
    "comm_devices_per_token",
    "device_balance_loss",
    "device_frequency",
    "expert_balance_loss",
    "expert_frequency",
    "group_limited_mask",
    "max_vio",
    "mean_affinity",
    "routing_load",
    "routing_scores",
]
