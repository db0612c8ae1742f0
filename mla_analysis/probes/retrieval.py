"""``probe=retrieval``: retrieval accuracy over a context-length x needle-depth grid, and where it is lost.

Tasks (generators in ``mla_analysis/data/tasks.py``, knobs from the run's data config):

- retrieval grid, scored per cell (length L, depth d) with ``score_logits`` (exact match = every scored
  token of the example right; token_acc = mean per-example fraction of scored tokens right):
  ``passkey`` and the RULER NIAH presets (``niah_single_1`` ..., ``niah`` = ``data.niah`` as given) over
  ``lengths`` x ``depths`` (the ``depth`` knob of make_passkey / make_niah); ``mqar`` over ``lengths`` x
  ``num_kv_pairs`` (Zoology: each key asked once, ``num_queries`` = None whatever the data config says;
  MQAR accuracy in Zoology's sense is ``token_acc``).
- "detail" tasks ``copy`` and ``arithmetic`` over ``lengths`` (copy: the filler gap grows with L;
  arithmetic: more packed problems), exact match and token accuracy.

Lengths: ``lengths`` (explicit, even, each <= model.max_seq_len, else ConfigError) or, when null,
``length_factors`` x data.seq_len rounded to even; factor-derived lengths above model.max_seq_len are
dropped with a warning. Limits of the model: with RoPE, ``Transformer.forward`` accepts any length (RoPE /
YaRN cos-sin are computed for whatever positions are asked, there is no position table), so
``model.max_seq_len`` is only the declared limit (validate_model_config checks the training context
against it); with learned absolute positions (``pos_emb: learned``) the table has max_seq_len rows and
longer inputs cannot run. The probe therefore never goes past max_seq_len. YaRN's
``original_max_position_embeddings`` only shapes the frequencies. Attention memory grows as L^2.

Attention mass (``attention: true``): forward hooks on every layer's attention module take the module's
input x (and the rope, cos, sin it is called with) and recompute the attention probabilities without
SDPA: q and k formed as the module forms them (MHA/GQA/MQA: RoPE on the whole head, K/V heads repeated
per query group as SDPA's enable_gqa; MLA: [q_nope; RoPE(q_rope)] against [W^UK c_kv; RoPE(k_rope)];
MLA coupled RoPE: RoPE on the last qk_rope_head_dim dims of the up-projected key), scaled by the module's
``scale``, causal, softmax in fp32. For each example the *query rows* and the *needle* are:

- passkey / NIAH / copy: rows = the scored positions of the first answer (passkey: the QUERY token and
  the digits before the last; NIAH: ANSWER and the first value's tokens; copy: the second COPY and the
  span); needle = the tokens of the statement that holds that answer (``[PASSKEY d.. EOS]``,
  ``[KV key IS value EOS]``, ``[COPY span SEP]``), found by exact pattern search before the rows. For
  niah_multivalue the traced needle is the asked key's haystack-first value, which the ``depth`` knob
  does not pin (it pins needle 0).
- mqar: rows = every query position; needle of a row = its key and value in the context (2 tokens).
- arithmetic: no needle (not traced).

mass = sum of the row's probabilities over the needle tokens, averaged over heads, over the rows of an
example, then over examples; ``uniform`` is the same average of |needle| / (row + 1), the mass of
uniform causal attention (the chance line).

Keys (``<cell>`` = ``len<L>.depth<d:.2f>`` or, for mqar, ``len<L>.pairs<P>``; detail tasks ``len<L>``):
``<task>.<cell>.exact_match``, ``<task>.<cell>.token_acc``, ``attn_mass.<task>.<cell>.layer<i>``,
``attn_mass.<task>.<cell>.uniform``, ``attn_mass.<task>.layer<i>`` and ``attn_mass.<task>.uniform``
(means over the task's cells), ``<task>.within_train.<m>`` / ``<task>.beyond_train.<m>`` (mean over cells
with L <= / > data.seq_len, m in exact_match, token_acc), ``retrieval.within_train.<m>`` /
``retrieval.beyond_train.<m>`` (mean over the grid tasks of those), ``train_len``, ``max_seq_len``,
``n_examples``, ``mqar_power_a`` (the MQAR query placement used: ``mqar_power_a`` or data.mqar.power_a).
Cells a task does not fit (too short) are skipped and listed in retrieval.json.
retrieval.json (atomic) holds every cell, the skipped cells and the figure names; PNGs
``retrieval_grid.png`` (heat map per task + detail curves) and ``retrieval_attn.png`` (mass per layer).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..config import ConfigError
from ..config.probes import DetailTask, GridTask
from ..data.language import get_language
from ..data.mixture import make_vocab
from ..data.scoring import IGNORE, score_predictions
from ..data.tasks import TASK_FAMILY, TASK_KNOBS, SeqLenError, make_task
from ..data.text import load_text_corpora
from ..data.vocab import COPY, EOS, IS, KV, PASSKEY, QUERY, SEP
from ..models.attention import Attention
from ..models.mla import MLA, MLACoupledRoPE
from ..training.results import atomic_write_json
from . import ProbeError, register
from ._common import figure, model_config, options, save_figure, unwrap

GRID_TASKS = GridTask.values()  # mqar, passkey, niah and the NIAH_PRESETS (a test checks they match)
DETAIL_TASKS = DetailTask.values()
_STREAM = 0x5E7A  # tags the probe's rng stream apart from the training / eval streams of the data



# ---- parameters ---------------------------------------------------------------------------------------


def _err(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"probe.retrieval.{key}={value!r} is invalid (allowed: {allowed})")


def parse_params(params: dict) -> dict:
    """The options (``mla_analysis.config.probes.RetrievalConfig``) checked and normalised, as a dict."""
    return options("retrieval", params)


def resolve_lengths(p: dict, train_len: int, max_seq_len: int) -> list[int]:
    """Grid lengths: explicit ``lengths`` (ConfigError past max_seq_len) or factors x train_len (capped, warned)."""
    if p["lengths"] is not None:
        over = [v for v in p["lengths"] if v > max_seq_len]
        if over:
            raise _err("lengths", p["lengths"], f"lengths <= model.max_seq_len={max_seq_len}; {over} exceed it")
        return list(p["lengths"])
    wanted = sorted({max(8, 2 * round(f * train_len / 2)) for f in p["length_factors"]})
    kept = [v for v in wanted if v <= max_seq_len]
    if len(kept) < len(wanted):
        warnings.warn(
            f"probe.retrieval: lengths {[v for v in wanted if v > max_seq_len]} exceed model.max_seq_len="
            f"{max_seq_len} and are dropped",
            stacklevel=2,
        )
    if not kept:
        raise _err("length_factors", p["length_factors"], f"factors giving lengths <= model.max_seq_len={max_seq_len}")
    return kept


def resolve_pairs(p: dict, data_cfg: Any) -> list[int]:
    """MQAR pair counts: ``num_kv_pairs`` or data.mqar.num_kv_pairs x {1/2, 1, 2}."""
    if p["num_kv_pairs"] is not None:
        return list(p["num_kv_pairs"])
    base = int(data_cfg.mqar.num_kv_pairs)
    return sorted({max(1, base // 2), base, 2 * base})


# ---- cells and their data -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    """One grid cell: a task at context length ``length`` with a depth (passkey/NIAH) or pair count (mqar)."""

    task: str
    length: int
    depth: Optional[float] = None
    pairs: Optional[int] = None

    @property
    def key(self) -> str:
        """Metric-key fragment ``<task>.len<L>[.depth<d>|.pairs<P>]``."""
        k = f"{self.task}.len{self.length}"
        if self.depth is not None:
            k += f".depth{self.depth:.2f}"
        if self.pairs is not None:
            k += f".pairs{self.pairs}"
        return k


def grid_cells(p: dict, lengths: list[int], pairs: list[int]) -> list[Cell]:
    """Every cell of the grid, grid tasks first, then detail tasks."""
    cells = []
    for task in p["tasks"]:
        for L in lengths:
            if task == "mqar":
                cells += [Cell(task, L, pairs=P) for P in pairs]
            else:
                cells += [Cell(task, L, depth=d) for d in p["depths"]]
    for task in p["detail_tasks"]:
        cells += [Cell(task, L) for L in lengths]
    return cells


def eval_filler(data_cfg: Any):
    """The held-out token source of the data config (the synthetic language or the text val corpus)."""
    if data_cfg.source == "synthetic":
        return get_language(make_vocab(data_cfg), data_cfg.language, data_cfg.language_seed)
    return load_text_corpora(data_cfg)[1]


def _knobs(data_cfg: Any, cell: Cell, mqar_power_a: Optional[float] = None) -> dict:
    family = TASK_FAMILY[cell.task]
    knobs = getattr(data_cfg, family)
    kw = {f: (knobs[f] if isinstance(knobs, dict) else getattr(knobs, f)) for f in TASK_KNOBS[family].__dataclass_fields__}
    if cell.depth is not None:
        kw["depth"] = cell.depth
    if cell.task == "mqar":
        kw.update(num_kv_pairs=cell.pairs, num_queries=None)  # Zoology: every key asked exactly once
        if mqar_power_a is not None:
            kw["power_a"] = float(mqar_power_a)
    return kw


def cell_rng(data_cfg: Any, seed: int, cell: Cell) -> np.random.Generator:
    """Deterministic generator of one cell: (data.seed, probe seed, task, length, depth/pairs)."""
    extra = cell.pairs if cell.pairs is not None else (-1 if cell.depth is None else round(cell.depth * 10_000))
    key = [int(data_cfg.seed), seed, _STREAM, zlib.crc32(cell.task.encode()), cell.length, extra + 1]
    return np.random.Generator(np.random.PCG64(key))


def cell_data(data_cfg: Any, cell: Cell, n: int, seed: int, filler=None,
              mqar_power_a: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` [n, L] of one cell; SeqLenError when the task does not fit the length."""
    filler = eval_filler(data_cfg) if filler is None else filler
    knobs = _knobs(data_cfg, cell, mqar_power_a)
    try:
        return make_task(cell.task, n, cell_rng(data_cfg, seed, cell), make_vocab(data_cfg), cell.length, knobs, filler)
    except SeqLenError:
        raise
    except ValueError as e:  # a knob the grid set is impossible (e.g. more MQAR pairs than key ids)
        key = "num_kv_pairs" if cell.task == "mqar" else "tasks"
        raise ConfigError(f"probe.retrieval.{key}: {cell.key} cannot be generated ({e})") from e


# ---- needles ------------------------------------------------------------------------------------------


def _find(row: np.ndarray, pattern: np.ndarray, end: int) -> int:
    """First start index of ``pattern`` in ``row[:end]`` or -1."""
    if len(pattern) > end:
        return -1
    win = np.lib.stride_tricks.sliding_window_view(row[:end], len(pattern))  # (end-len+1, len)
    hits = np.flatnonzero((win == pattern).all(axis=1))
    return int(hits[0]) if len(hits) else -1


def locate_needles(task: str, inputs: torch.Tensor, targets: torch.Tensor, pairs: Optional[int] = None):
    """Query rows [N, Q] (-1 = padding) and needle masks [N, Q, L] (bool) per example; None for untraced tasks."""
    if task not in GRID_TASKS and task != "copy":
        return None
    x, y = inputs.cpu().numpy(), targets.cpu().numpy()
    N, L = x.shape
    per_rows: list[list[int]] = []
    per_needles: list[list[np.ndarray]] = []
    for i in range(N):
        scored = np.flatnonzero(y[i] != IGNORE)
        if not len(scored):
            raise ProbeError(f"retrieval: {task} example {i} has no scored position")
        if task == "mqar":
            ctx_keys = x[i, 0 : 2 * pairs : 2]
            rows, needles = [], []
            for r in scored:
                j = np.flatnonzero(ctx_keys == x[i, r])
                if not len(j):
                    raise ProbeError(f"retrieval: mqar example {i} query at {r} has no key in the context")
                rows.append(int(r))
                needles.append(np.array([2 * j[0], 2 * j[0] + 1]))
        else:
            t0 = int(scored[0])
            n_ans = int(np.argmax(np.diff(np.append(scored, L + 1)) != 1)) + 1  # first contiguous block
            value = x[i, t0 + 1 : t0 + 1 + n_ans]
            if task == "passkey":
                pattern = np.concatenate([[PASSKEY], value, [EOS]])
            elif task == "copy":
                pattern = np.concatenate([[COPY], value, [SEP]])
            else:  # NIAH: [QUERY key ANSWER] sits right before the first value
                q = int(np.flatnonzero(x[i, :t0] == QUERY)[-1])
                pattern = np.concatenate([[KV], x[i, q + 1 : t0], [IS], value, [EOS]])
            s = _find(x[i], pattern, t0)
            if s < 0:
                raise ProbeError(f"retrieval: {task} example {i}: the needle holding the answer is not in the context")
            rows = list(range(t0, t0 + n_ans))
            needles = [np.arange(s, s + len(pattern))] * n_ans
        per_rows.append(rows)
        per_needles.append(needles)
    Q = max(len(r) for r in per_rows)
    rows_t = torch.full((N, Q), -1, dtype=torch.long)
    mask = torch.zeros((N, Q, L), dtype=torch.bool)
    for i, (rows, needles) in enumerate(zip(per_rows, per_needles)):
        rows_t[i, : len(rows)] = torch.tensor(rows)
        for j, nd in enumerate(needles):
            mask[i, j, torch.from_numpy(nd)] = True
    return rows_t, mask


# ---- attention recomputation --------------------------------------------------------------------------


def _gather_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """t (B, T, H, d) at rows (B, Q) -> (B, Q, H, d)."""
    return t[torch.arange(t.shape[0], device=t.device)[:, None], rows]


def attention_qkv(attn: torch.nn.Module, x: torch.Tensor, rope, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, T, H, d_qk), k (B, S, H, d_qk), v (B, S, H, d_v) as the module forms them (K/V repeated per head)."""
    B, T, _ = x.shape
    if isinstance(attn, Attention):
        q = attn.wq(x).view(B, T, attn.n_heads, attn.head_dim)  # (B, T, H, d_h)
        k = attn.wk(x).view(B, T, attn.n_kv_heads, attn.head_dim)  # (B, T, H_kv, d_h)
        if rope is not None:  # None: learned absolute positions, no rotation
            q, k = rope.rotate(q, cos, sin), rope.rotate(k, cos, sin)
        v = attn.wv(x).view(B, T, attn.n_kv_heads, attn.head_dim)  # (B, T, H_kv, d_h)
        g = attn.n_heads // attn.n_kv_heads  # query head h reads K/V head h // g, as SDPA's enable_gqa
        return q, k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    if isinstance(attn, MLA):  # both MLA variants share the query path
        H = attn.n_heads
        q_nope, q_rope = attn.query(x).split([attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
        q = torch.cat((q_nope, rope.rotate(q_rope, cos, sin)), dim=-1)  # (B, T, H, d_qk)
        if isinstance(attn, MLACoupledRoPE):
            c_kv = attn.kv_norm(attn.wkv_a(x))  # (B, T, d_c)
            kv = attn.wkv_b(c_kv).view(B, T, H, attn.qk_head_dim + attn.v_head_dim)  # (B, T, H, d_qk + d_v)
            k, v = kv.split([attn.qk_head_dim, attn.v_head_dim], dim=-1)
            k_nope, k_rope = k.split([attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
            return q, torch.cat((k_nope, rope.rotate(k_rope, cos, sin)), dim=-1), v  # k: (B, T, H, d_qk)
        c_kv, k_rope = attn.wkv_a(x).split([attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
        c_kv = attn.kv_norm(c_kv)  # (B, T, d_c)
        k_rope = rope.rotate(k_rope.unsqueeze(2), cos, sin)  # (B, T, 1, d_rope): one key shared by all heads
        kv = attn.wkv_b(c_kv).view(B, T, H, attn.qk_nope_head_dim + attn.v_head_dim)  # (B, T, H, d_nope + d_v)
        k_nope, v = kv.split([attn.qk_nope_head_dim, attn.v_head_dim], dim=-1)
        return q, torch.cat((k_nope, k_rope.expand(B, T, H, attn.qk_rope_head_dim)), dim=-1), v  # k: (B, T, H, d_qk)
    raise ConfigError(f"probe.retrieval: attention module {type(attn).__name__} is not supported")


def attention_probs(
    attn: torch.nn.Module, x: torch.Tensor, rope, cos, sin, rows: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention probabilities (B, H, Q, S) of query ``rows`` [B, Q] (None = all), fp32, and v (B, H, S, d_v).

    Rows may hold -1 (padding); their probabilities are those of row 0 and must be masked by the caller.
    """
    q, k, v = attention_qkv(attn, x, rope, cos, sin)
    B, T = x.shape[:2]
    if rows is None:
        rows = torch.arange(T, device=x.device).expand(B, T)
    rows = rows.to(x.device).clamp(min=0)
    q = _gather_rows(q, rows)  # (B, Q, H, d_qk)
    scores = torch.einsum("bqhd,bshd->bhqs", q.float(), k.float()) * attn.scale  # (B, H, Q, S)
    future = torch.arange(k.shape[1], device=x.device)[None, None, :] > rows[:, :, None]  # (B, Q, S)
    scores = scores.masked_fill(future[:, None], float("-inf"))
    return scores.softmax(dim=-1), v.transpose(1, 2)  # (B, H, Q, S), (B, H, S, d_v)


def attention_output(attn: torch.nn.Module, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The module's output (B, Q, D) from probabilities (B, H, Q, S) and values (B, H, S, d_v)."""
    o = probs.to(v.dtype) @ v  # (B, H, Q, d_v)
    B, H, Q, d_v = o.shape
    return attn.wo(o.transpose(1, 2).reshape(B, Q, H * d_v))  # (B, Q, D)


def needle_mass(probs: torch.Tensor, rows: torch.Tensor, needles: torch.Tensor) -> torch.Tensor:
    """Per example: mean over valid rows of the head-mean mass on the needle; probs (B,H,Q,S) -> (B,)."""
    mass = (probs * needles[:, None].to(probs)).sum(-1).mean(1)  # (B, Q)
    valid = (rows >= 0).to(mass)  # (B, Q)
    return (mass * valid).sum(1) / valid.sum(1)


def uniform_mass(rows: torch.Tensor, needles: torch.Tensor) -> torch.Tensor:
    """Per example: the same mass under uniform causal attention, |needle| / (row + 1); (B,)."""
    valid = (rows >= 0).double()
    m = needles.sum(-1).double() / (rows.clamp(min=0).double() + 1)  # (B, Q)
    return (m * valid).sum(1) / valid.sum(1)


def _arg(args: tuple, kwargs: dict, i: int, name: str) -> Any:
    return args[i] if len(args) > i else kwargs[name]


class _MassHooks:
    """Forward hooks that add each layer's per-example needle mass of the current batch to running sums."""

    def __init__(self, core: torch.nn.Module):
        self.layers = list(core.layers)
        self.sums = [0.0] * len(self.layers)
        self.rows: Optional[torch.Tensor] = None
        self.needles: Optional[torch.Tensor] = None
        self.handles = [b.attn.register_forward_hook(self._hook(i), with_kwargs=True) for i, b in enumerate(self.layers)]

    def _hook(self, idx: int):
        def fn(module, args, kwargs, output):
            if self.rows is None:
                return
            x = _arg(args, kwargs, 0, "x")
            rope, cos, sin = (_arg(args, kwargs, i, n) for i, n in ((1, "rope"), (2, "cos"), (3, "sin")))
            probs, _ = attention_probs(module, x, rope, cos, sin, self.rows)
            if not torch.isfinite(probs).all():
                raise ProbeError(f"retrieval: layer {idx} attention probabilities are not finite")
            self.sums[idx] += float(needle_mass(probs, self.rows, self.needles).sum())

        return fn

    def remove(self) -> None:
        """Detach every hook."""
        for h in self.handles:
            h.remove()


def evaluate_cell(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    needles: Optional[tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
    device: torch.device,
) -> dict:
    """exact_match, token_acc and (with ``needles``) the per-layer needle mass of one cell's examples."""
    core = unwrap(model)
    hooks = _MassHooks(core) if needles is not None else None
    preds = []
    was_training = core.training
    core.eval()
    try:
        with torch.no_grad():
            for s in range(0, inputs.shape[0], batch_size):
                if hooks is not None:
                    hooks.rows = needles[0][s : s + batch_size].to(device)
                    hooks.needles = needles[1][s : s + batch_size].to(device)
                logits = model(inputs[s : s + batch_size].to(device))  # (b, L, V)
                if not torch.isfinite(logits).all():
                    raise ProbeError("retrieval: the model produced non-finite logits")
                preds.append(logits.argmax(-1).cpu())
    finally:
        if hooks is not None:
            hooks.remove()
        core.train(was_training)
    # score_logits(logits) == score_predictions(argmax); the argmax is taken per batch to keep memory O(batch)
    out = score_predictions(torch.cat(preds), targets)
    if hooks is not None:
        n = inputs.shape[0]
        out["attn_mass"] = [v / n for v in hooks.sums]
        out["attn_uniform"] = float(uniform_mass(*needles).mean())
    return out


# ---- summaries and figures ----------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def summarise(cells: list[dict], grid_tasks: list[str], detail_tasks: list[str], train_len: int) -> dict:
    """Within/beyond-training-length means per task and over the grid tasks (keys without the prefix)."""
    out: dict[str, float] = {}
    per_task: dict[str, dict[str, float]] = {}
    for task in [*grid_tasks, *detail_tasks]:
        done = [c for c in cells if c["task"] == task]
        for part, keep in (("within_train", lambda c: c["length"] <= train_len), ("beyond_train", lambda c: c["length"] > train_len)):
            sel = [c for c in done if keep(c)]
            if not sel:
                continue
            for m in ("exact_match", "token_acc"):
                v = _mean([c[m] for c in sel])
                out[f"{task}.{part}.{m}"] = v
                if task in grid_tasks:
                    per_task.setdefault(f"{part}.{m}", {})[task] = v
    for key, by_task in per_task.items():
        out[f"retrieval.{key}"] = _mean(list(by_task.values()))
    return out


def _plot_grid(cells: list[dict], p: dict, lengths: list[int], pairs: list[int], train_len: int, title: str, path: Path) -> str:
    """Heat map of exact match per grid task (length x depth / pairs) and detail-task curves; PNG name."""
    import matplotlib

    panels = list(p["tasks"]) + (["detail"] if p["detail_tasks"] else [])
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = figure(nrows, ncols, 4.2 * ncols, 3.4 * nrows)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")  # grey: cells the task does not fit
    # boundary between lengths within and beyond training, in column units
    n_within = sum(L <= train_len for L in lengths)
    for ax, task in zip(axes.flat, panels):
        if task == "detail":
            for t in p["detail_tasks"]:
                for m, style in (("exact_match", "-o"), ("token_acc", "--s")):
                    pts = sorted((c["length"], c[m]) for c in cells if c["task"] == t)
                    if pts:
                        ax.plot(*zip(*pts), style, label=f"{t} {m}")
            ax.axvline(train_len, color="k", ls=":", lw=1)
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("accuracy (fraction)")
            ax.set_title("detail tasks (dotted: training length)")
            ax.legend(fontsize=7)
            continue
        ys = pairs if task == "mqar" else p["depths"]
        grid = np.full((len(ys), len(lengths)), np.nan)
        for c in cells:
            if c["task"] == task:
                yi = ys.index(c["pairs"] if task == "mqar" else c["depth"])
                grid[yi, lengths.index(c["length"])] = c["exact_match"]
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, aspect="auto", origin="lower")
        for (yi, xi), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(xi, yi, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.5 else "k")
        if 0 < n_within < len(lengths):
            ax.axvline(n_within - 0.5, color="r", ls="--", lw=1)
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(ys)), [str(y) if task == "mqar" else f"{y:.2f}" for y in ys])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("KV pairs" if task == "mqar" else "needle depth (fraction of haystack)")
        ax.set_title(f"{task}: exact match")
        fig.colorbar(im, ax=ax, label="exact match (fraction of examples)")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{title}; red dashes: training length {train_len}; grey: task does not fit")
    return save_figure(fig, path)


def _plot_attn(mass: dict[str, list[float]], uniform: dict[str, float], title: str, path: Path) -> str:
    """Heat map of the mean attention mass on the needle per task (rows) and layer (columns); PNG name."""
    tasks = list(mass)
    n_layers = len(next(iter(mass.values())))
    grid = np.array([mass[t] for t in tasks])  # (tasks, layers)
    fig, axes = figure(1, 1, max(7.0, 1.2 * n_layers + 4.0), 0.45 * len(tasks) + 1.8)
    ax = axes[0, 0]
    im = ax.imshow(grid, cmap="magma", vmin=0, vmax=max(1e-9, float(grid.max())), aspect="auto")
    for (ti, li), v in np.ndenumerate(grid):
        ax.text(li, ti, f"{v:.3f}", ha="center", va="center", fontsize=7, color="w" if v < grid.max() / 2 else "k")
    ax.set_xticks(range(n_layers), [f"layer {i}" for i in range(n_layers)])
    ax.set_yticks(range(len(tasks)), [f"{t} (uniform {uniform[t]:.3f})" for t in tasks])
    ax.set_xlabel("layer")
    ax.set_title(f"{title}\nattention mass of the answer rows on the needle\n(mean over heads, examples, cells)")
    fig.colorbar(im, ax=ax, label="attention mass (fraction of the row)")
    return save_figure(fig, path)


# ---- the probe ----------------------------------------------------------------------------------------


@register("retrieval")
def run(model: torch.nn.Module, params: dict, data_cfg: Any, run_dir: Path, device: torch.device) -> dict:
    """Retrieval accuracy over length x depth (x pairs), detail-task scores, needle attention mass; JSON + PNGs."""
    p = parse_params(params)
    cfg = model_config(model)
    train_len = int(data_cfg.seq_len)
    lengths = resolve_lengths(p, train_len, cfg.max_seq_len)
    pairs = resolve_pairs(p, data_cfg) if "mqar" in p["tasks"] else []
    filler = eval_filler(data_cfg)
    n_layers = len(unwrap(model).layers)

    metrics: dict[str, Any] = {"train_len": train_len, "max_seq_len": cfg.max_seq_len, "n_examples": p["examples"],
                               "mqar_power_a": float(p["mqar_power_a"] if p["mqar_power_a"] is not None
                                                     else _knobs(data_cfg, Cell("mqar", train_len, pairs=1))["power_a"])}
    done: list[dict] = []
    skipped: list[dict] = []
    for cell in grid_cells(p, lengths, pairs):
        try:
            inputs, targets = cell_data(data_cfg, cell, p["examples"], p["seed"], filler, p["mqar_power_a"])
        except SeqLenError as e:
            skipped.append({"cell": cell.key, "reason": str(e)})
            continue
        needles = locate_needles(cell.task, inputs, targets, cell.pairs) if p["attention"] else None
        res = evaluate_cell(model, inputs, targets, needles, p["batch_size"], device)
        rec = {**dataclasses.asdict(cell), "key": cell.key, **res}
        done.append(rec)
        metrics[f"{cell.key}.exact_match"] = res["exact_match"]
        metrics[f"{cell.key}.token_acc"] = res["token_acc"]
        if "attn_mass" in res:
            for li, v in enumerate(res["attn_mass"]):
                metrics[f"attn_mass.{cell.key}.layer{li}"] = v
            metrics[f"attn_mass.{cell.key}.uniform"] = res["attn_uniform"]
    metrics.update(summarise(done, p["tasks"], p["detail_tasks"], train_len))

    mass: dict[str, list[float]] = {}
    uniform: dict[str, float] = {}
    for task in [*p["tasks"], *p["detail_tasks"]]:
        traced = [c for c in done if c["task"] == task and "attn_mass" in c]
        if traced:
            mass[task] = [_mean([c["attn_mass"][li] for c in traced]) for li in range(n_layers)]
            uniform[task] = _mean([c["attn_uniform"] for c in traced])
            for li, v in enumerate(mass[task]):
                metrics[f"attn_mass.{task}.layer{li}"] = v
            metrics[f"attn_mass.{task}.uniform"] = uniform[task]
    for key, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ProbeError(f"retrieval: {key} is not finite")

    figures = []
    if p["figures"] and done:
        title = f"{cfg.name} ({cfg.attention})"
        figures.append(_plot_grid(done, p, lengths, pairs, train_len, title, Path(run_dir) / "retrieval_grid.png"))
        if mass:
            figures.append(_plot_attn(mass, uniform, title, Path(run_dir) / "retrieval_attn.png"))
    atomic_write_json(
        Path(run_dir) / "retrieval.json",
        {
            "attention": cfg.attention,
            "model": cfg.name,
            "train_len": train_len,
            "max_seq_len": cfg.max_seq_len,
            "lengths": lengths,
            "depths": p["depths"],
            "num_kv_pairs": pairs,
            "examples": p["examples"],
            "seed": p["seed"],
            "cells": done,
            "skipped": skipped,
            "attn_mass": mass,
            "attn_uniform": uniform,
            "figures": figures,
            "notes": {
                "exact_match": "fraction of examples with every scored token right (score_predictions)",
                "token_acc": "mean per-example fraction of scored tokens right (Zoology MQAR accuracy)",
                "attn_mass": "per layer: sum of the answer rows' attention probabilities on the needle tokens, "
                "mean over heads, rows of an example, examples (recomputed from the module's q/k, not SDPA)",
                "attn_uniform": "the same mass under uniform causal attention: |needle| / (row + 1)",
                "lengths": "lengths > model.max_seq_len are not evaluated (explicit: error; factor-derived: dropped)",
            },
        },
    )
    return metrics
