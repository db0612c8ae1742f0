"""``probe=kl``: per-token KL(reference || model) and the NLL change on the held-out plays, with intervals over windows.

The evaluation plays of the run's data config (``data.source=shakespeare``, ``data.shakespeare.eval_edition``)
are cut into sliding windows (``mla_analysis.metrics.perplexity.document_windows``: ``seq_len`` tokens, a new window
every ``stride``, every token scored once, at most ``max_windows`` windows evenly spread over the plays). Each
batch of windows runs through both models and the next-token distributions are compared at the scored
positions, chunk by chunk (the reference's logits are recomputed per chunk, never stored; neither model's full
[B, L, V] logits exist at once). The reference is ``reference`` (a run dir, HF dir, .gguf or model name) or,
when null, data.tokenizer's model (``data.tokenizer=model`` resolves to train.init_from: the source of a
converted or fine-tuned model).

Options: ``mla_analysis.config.probes.KlConfig`` (conf/probe/kl.yaml).

Keys (under ``probe.kl.``; statistics as ``<name>.mean/.ci_low/.ci_high/.n/.tokens``, units = windows,
mla_analysis/probes/_text.py): ``kl`` (nats/token), ``delta_nll`` (NLL(model) - NLL(reference)), ``nll``,
``nll_ref``, ``top1_agree`` (argmax of both models equal), ``kl.<doc>`` (per-play mean KL), ``seq_len``,
``stride``, ``windows``, ``interval.method/.level/.resamples/.unit``. ``kl_windows.json`` in the run dir: per-window
sums of kl / nll / nll_ref and token counts, for paired comparisons of runs scored on the same windows.
Functions: :func:`compare_tokens` (the [n, L] tensors), :func:`window_sums`, :func:`kl_metrics`.
"""

from __future__ import annotations

from pathlib import Path
import weakref
from typing import Any

import numpy as np
import torch

from ..config import ConfigError
from ..training.results import atomic_write_json
from . import register
from ._common import options
from ._text import autocast, flat, head_chunks, interval_fields, load_reference, ratio_interval, shakespeare_split

IGNORE = -100

# one entry: kl and token_bins in one run share the two models' forward passes; the key holds a weak reference to
# the model (a dead or different model misses) and its parameters' version counters (an in-place edit misses)
_MEMO: dict[str, Any] = {}


@torch.no_grad()
def compare_tokens(model: torch.nn.Module, reference: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
                   device: torch.device, batch_size: int = 4, max_logits: int = 1 << 25) -> dict[str, torch.Tensor]:
    """Per scored position: ``kl`` = KL(reference || model), ``nll``, ``nll_ref``, ``agree`` (argmaxes equal); [n, L] fp32."""
    if model.head.out_features != reference.head.out_features:
        raise ValueError(f"compare_tokens: vocabularies differ ({model.head.out_features} vs {reference.head.out_features})")
    names = ("kl", "nll", "nll_ref", "agree")
    out = {k: torch.zeros(inputs.shape, dtype=torch.float32) for k in names}
    states = [(m, m.training) for m in (model, reference)]
    for m, _ in states:
        m.eval()
    try:
        for i in range(0, inputs.shape[0], batch_size):
            x, y = inputs[i: i + batch_size].to(device), targets[i: i + batch_size].to(device)
            mask = y != IGNORE
            t = y[mask]  # (R,)
            with autocast(device):
                h = model(x, return_hidden=True)[mask]  # (R, D)
                h_ref = reference(x, return_hidden=True)[mask]  # (R, D)
            vals = {k: torch.empty(t.shape[0], dtype=torch.float32, device=device) for k in names}
            for (sl, logits), (_, ref) in zip(head_chunks(model, h, max_logits), head_chunks(reference, h_ref, max_logits)):
                logq, logp = torch.log_softmax(logits, -1), torch.log_softmax(ref, -1)  # (rows, V)
                vals["kl"][sl] = (logp.exp() * (logp - logq)).sum(-1)
                vals["nll"][sl] = -logq.gather(-1, t[sl, None]).squeeze(-1)
                vals["nll_ref"][sl] = -logp.gather(-1, t[sl, None]).squeeze(-1)
                vals["agree"][sl] = (logq.argmax(-1) == logp.argmax(-1)).float()
            for k in names:
                block = torch.zeros(x.shape, dtype=torch.float32, device=device)
                block[mask] = vals[k]
                out[k][i: i + batch_size] = block.cpu()
    finally:
        for m, was in states:
            m.train(was)
    return out


def window_sums(values: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per window: (sum of values over the positions in mask, their count), float64 [n]."""
    m = mask.to(torch.float64)
    return (values.double() * m).sum(1).numpy(), m.sum(1).numpy()


def eval_windows(data_cfg: Any, probe: str, p: dict):
    """The held-out windows of the run (EvalWindows) for seq_len / stride / max_windows of ``p``."""
    from ..metrics.perplexity import document_windows

    seq_len = p["seq_len"] or data_cfg.seq_len
    stride = p["stride"] or seq_len
    if stride > seq_len:
        raise ConfigError(f"probe.{probe}.stride={stride} is invalid (allowed: 1..seq_len={seq_len})")
    docs = shakespeare_split(data_cfg, probe).document_tokens()
    return document_windows(docs, seq_len, stride, p["max_windows"])


def compared(model: torch.nn.Module, p: dict, data_cfg: Any, device: torch.device, probe: str):
    """(windows, compare_tokens output) for the run, computed once per (model, reference, windows) in a process."""
    windows = eval_windows(data_cfg, probe, p)
    ref_spec = p["reference"] if p["reference"] is not None else getattr(data_cfg, "tokenizer", None)
    key = (str(ref_spec), windows[0].shape, int(windows[0].sum()), int(windows[1].sum()), str(device),
           sum(t._version for t in model.parameters()))
    ref = _MEMO.get("model")
    if _MEMO.get("key") != key or ref is None or ref() is not model:
        reference = load_reference(p["reference"], data_cfg, probe, device)
        _MEMO.clear()
        _MEMO.update(key=key, model=weakref.ref(model),
                     tokens=compare_tokens(model, reference, windows[0], windows[1], device, p["batch_size"]))
        del reference
    return windows, _MEMO["tokens"]


def kl_metrics(tokens: dict[str, torch.Tensor], windows, p: dict) -> dict[str, Any]:
    """The flat ``kl`` record of compare_tokens output over windows (intervals over windows)."""
    targets = windows[1]
    mask = targets != IGNORE
    iv = dict(method=p["interval"], level=p["confidence_level"], resamples=p["resamples"], seed=p["seed"])
    out: dict[str, Any] = {}
    delta = tokens["nll"] - tokens["nll_ref"]
    for name, v in (("kl", tokens["kl"]), ("delta_nll", delta), ("nll", tokens["nll"]), ("nll_ref", tokens["nll_ref"]),
                    ("top1_agree", tokens["agree"])):
        out.update(flat(name, ratio_interval(*window_sums(v, mask), **iv)))
    doc = np.asarray(windows.doc)
    s, c = window_sums(tokens["kl"], mask)
    for j, name in enumerate(windows.names):
        if c[doc == j].sum() > 0:
            out[f"kl.{name}"] = float(s[doc == j].sum() / c[doc == j].sum())
    out.update({"seq_len": int(targets.shape[1]), "stride": int(windows.stride), "windows": int(targets.shape[0])})
    out.update(interval_fields(p, "window"))
    return out


@register("kl")
def run(model: torch.nn.Module, params: dict, data_cfg: Any, run_dir: Path, device: torch.device) -> dict:
    """KL(reference || model), the NLL change and top-1 agreement on the held-out plays, with intervals over windows."""
    from ._common import unwrap

    p = options("kl", params)  # KlConfig
    windows, tokens = compared(unwrap(model), p, data_cfg, device, "kl")
    write_windows(tokens, windows, run_dir / "kl_windows.json")
    return kl_metrics(tokens, windows, p)


def write_windows(tokens: dict[str, torch.Tensor], windows, path: Path) -> None:
    """Per-window sums and token counts (kl, nll, nll_ref) to ``path``: paired comparisons between runs on the same windows."""
    mask = windows[1] != IGNORE
    out: dict[str, Any] = {"doc": [windows.names[j] for j in np.asarray(windows.doc)], "stride": int(windows.stride)}
    for name in ("kl", "nll", "nll_ref"):
        s, c = window_sums(tokens[name], mask)
        out[name] = [float(x) for x in s]
        out["tokens"] = [int(x) for x in c]
    atomic_write_json(path, out)
