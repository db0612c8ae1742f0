"""Held-out perplexity and per-token KL on real text, computed in chunks.

Sliding windows (the Hugging Face "perplexity of fixed-length models" recipe): a document of N
tokens is cut into windows of ``seq_len + 1`` tokens starting every ``stride`` tokens; each window
scores only the tokens the previous window did not reach, so every token but the document's first
is scored exactly once, with the (up to ``seq_len``) tokens before it in its window as context. In
the toolkit's (inputs, targets) form a window is ``inputs = w[:-1]`` ([seq_len], padded) and
``targets = w[1:]`` with -100 on the context-only part and the padding: the loss equals
transformers' ``model(w, labels=w with -100 on the context part).loss`` window by window.

Full logits of a real vocabulary are never materialised for a batch (256 x 1,024 x 49,152 fp32 would
be 51 GB): the model returns its final hidden states (``return_hidden=True``) and the output head is
applied to chunks of at most ``max_logits`` logits at the scored positions only.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

IGNORE = -100
MAX_LOGITS = 1 << 25  # logits per chunk (128 MiB in fp32): 682 positions of a 49,152-token vocabulary


class EvalWindows(tuple):
    """``(inputs [n, L], targets [n, L])`` that also name the document of each window (``doc``, ``names``).

    A plain 2-tuple everywhere eval sets are unpacked; :func:`lm_metrics` adds per-document values.
    """

    def __new__(cls, inputs: torch.Tensor, targets: torch.Tensor, doc: np.ndarray, names: Sequence[str], stride: int):
        obj = super().__new__(cls, (inputs, targets))
        obj.doc, obj.names, obj.stride = np.asarray(doc, dtype=np.int64), list(names), int(stride)
        return obj


def sliding_windows(tokens: np.ndarray, seq_len: int, stride: int) -> Tuple[np.ndarray, np.ndarray]:
    """The windows of one document: (inputs [n, seq_len], targets [n, seq_len]) int64, -100 = unscored."""
    if not 1 <= stride <= seq_len:
        raise ValueError(f"data.eval_stride={stride} is invalid (allowed: 1..data.seq_len={seq_len})")
    tokens = np.asarray(tokens, dtype=np.int64)
    N, M = len(tokens), seq_len + 1  # M: the window in the recipe's terms (inputs and the shifted labels)
    xs, ys = [], []
    prev_end = 0
    for begin in range(0, N, stride):
        end = min(begin + M, N)
        trg_len = end - prev_end  # tokens this window scores (the recipe's labels[-trg_len:])
        w = tokens[begin:end]
        if len(w) >= 2:
            x = np.zeros(seq_len, dtype=np.int64)
            y = np.full(seq_len, IGNORE, dtype=np.int64)
            x[: len(w) - 1] = w[:-1]
            y[: len(w) - 1] = w[1:]
            # label j+1 of the window is scored iff j+1 >= len(w) - trg_len
            y[: max(0, len(w) - trg_len - 1)] = IGNORE
            xs.append(x)
            ys.append(y)
        prev_end = end
        if end == N:
            break
    if not xs:
        return np.zeros((0, seq_len), dtype=np.int64), np.zeros((0, seq_len), dtype=np.int64)
    return np.stack(xs), np.stack(ys)


def document_windows(docs: Mapping[str, np.ndarray], seq_len: int, stride: Optional[int] = None,
                     max_windows: Optional[int] = None) -> EvalWindows:
    """Sliding windows of every document (windows never cross documents), optionally an even subset.

    ``stride`` None = ``seq_len`` (non-overlapping windows). With ``max_windows`` below the total,
    that many windows are kept, evenly spaced over all documents in order; each kept window still
    scores its tokens with its own context, so the subset is an unbiased sample of the positions.
    """
    stride = seq_len if stride is None else stride
    names = list(docs)
    xs, ys, ds = [], [], []
    for j, name in enumerate(names):
        x, y = sliding_windows(docs[name], seq_len, stride)
        xs.append(x)
        ys.append(y)
        ds.append(np.full(len(x), j, dtype=np.int64))
    x = np.concatenate(xs) if xs else np.zeros((0, seq_len), dtype=np.int64)
    y = np.concatenate(ys) if ys else np.zeros((0, seq_len), dtype=np.int64)
    d = np.concatenate(ds) if ds else np.zeros(0, dtype=np.int64)
    if max_windows is not None and len(x) > max_windows:
        keep = np.unique(np.linspace(0, len(x) - 1, max_windows).round().astype(np.int64))
        x, y, d = x[keep], y[keep], d[keep]
    return EvalWindows(torch.from_numpy(x), torch.from_numpy(y), d, names, stride)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _head_chunks(model: torch.nn.Module, h: torch.Tensor, max_logits: int):
    """Yield (slice, fp32 logits) of the head applied to rows of h [R, D] in chunks of <= max_logits logits."""
    V = model.head.out_features
    rows = max(1, max_logits // V)
    for i in range(0, h.shape[0], rows):
        yield slice(i, i + rows), model.head(h[i: i + rows]).float()  # (rows, V)


def _scored_hidden(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Final hidden states at the scored positions (R, D) and their targets (R,)."""
    h = model(x, return_hidden=True)  # (B, T, D)
    mask = y != IGNORE
    return h[mask], y[mask], mask


def _scatter_scored(models: Sequence[torch.nn.Module], inputs: torch.Tensor, targets: torch.Tensor,
                    device: torch.device, batch_size: int, per_rows) -> torch.Tensor:
    """[n, L] fp32 (CPU) of ``per_rows(x, y) -> (values at scored positions, mask [b, L])`` per batch, 0 elsewhere.

    The models run in eval mode (their training flags are restored after).
    """
    states = [(m, m.training) for m in models]
    for m, _ in states:
        m.eval()
    out = torch.zeros(inputs.shape, dtype=torch.float32)
    try:
        for i in range(0, inputs.shape[0], batch_size):
            x = inputs[i: i + batch_size].to(device)
            y = targets[i: i + batch_size].to(device)
            with _autocast(device):
                values, mask = per_rows(x, y)
            block = torch.zeros(x.shape, dtype=torch.float32, device=device)
            block[mask] = values
            out[i: i + batch_size] = block.cpu()
    finally:
        for m, was in states:
            m.train(was)
    return out


@torch.no_grad()
def scored_nll(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device,
               batch_size: int, max_logits: int = MAX_LOGITS) -> torch.Tensor:
    """Next-token negative log-likelihood (nats) [n, L] fp32 at scored positions, 0 elsewhere (CPU)."""

    def nll_rows(x: torch.Tensor, y: torch.Tensor):
        h, t, mask = _scored_hidden(model, x, y)
        nll = torch.empty(t.shape[0], dtype=torch.float32, device=device)
        for sl, logits in _head_chunks(model, h, max_logits):
            nll[sl] = torch.logsumexp(logits, -1) - logits.gather(-1, t[sl, None]).squeeze(-1)
        return nll, mask

    return _scatter_scored([model], inputs, targets, device, batch_size, nll_rows)


@torch.no_grad()
def token_kl(model: torch.nn.Module, reference: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor,
             device: torch.device, batch_size: int, max_logits: int = MAX_LOGITS) -> torch.Tensor:
    """KL(reference || model) in nats [n, L] fp32 of the next-token distributions at scored positions (0 elsewhere).

    Both models run on the same windows; their heads are applied chunk by chunk, so neither
    model's full logits are held at once. The two vocabularies must be the same size.
    """
    if model.head.out_features != reference.head.out_features:
        raise ValueError(
            f"token_kl: vocabularies differ ({model.head.out_features} vs reference {reference.head.out_features})"
        )

    def kl_rows(x: torch.Tensor, y: torch.Tensor):
        h, _, mask = _scored_hidden(model, x, y)
        h_ref, _, _ = _scored_hidden(reference, x, y)
        kl = torch.empty(h.shape[0], dtype=torch.float32, device=device)
        for (sl, logits), (_, ref) in zip(_head_chunks(model, h, max_logits), _head_chunks(reference, h_ref, max_logits)):
            logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(logits, -1)  # (rows, V)
            kl[sl] = (logp.exp() * (logp - logq)).sum(-1)
        return kl, mask

    return _scatter_scored([model, reference], inputs, targets, device, batch_size, kl_rows)


def _per_doc(values: torch.Tensor, targets: torch.Tensor, doc: np.ndarray, names: Sequence[str]) -> Dict[str, Tuple[float, int]]:
    """name -> (mean of values over the document's scored positions, count)."""
    mask = (targets != IGNORE).numpy()
    v = values.numpy().astype(np.float64)
    sums = np.bincount(doc, weights=(v * mask).sum(1), minlength=len(names))
    counts = np.bincount(doc, weights=mask.sum(1), minlength=len(names)).astype(np.int64)
    return {n: (float(sums[j] / counts[j]), int(counts[j])) for j, n in enumerate(names) if counts[j] > 0}


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


@dataclass
class PerplexityResult:
    """Sliding-window perplexity: totals, per document, and the per-token NLL for later intervals."""

    loss: float  # mean NLL (nats/token) over all scored tokens
    ppl: float
    tokens: int
    seq_len: int
    stride: int
    per_doc: Dict[str, Dict[str, float]]  # name -> {"loss", "ppl", "tokens"}
    nll: torch.Tensor  # [n_windows, seq_len] (0 where unscored)
    windows: EvalWindows

    def metrics(self, prefix: str = "eval") -> Dict[str, float]:
        """Flat metrics: ``{prefix}.loss/.ppl/.tokens/.stride`` and ``{prefix}.{doc}.loss/.ppl/.tokens``."""
        out: Dict[str, float] = {f"{prefix}.loss": self.loss, f"{prefix}.ppl": self.ppl,
                                 f"{prefix}.tokens": self.tokens, f"{prefix}.stride": self.stride}
        for name, v in self.per_doc.items():
            for k, x in v.items():
                out[f"{prefix}.{name}.{k}"] = x
        return out


def _result(nll: torch.Tensor, windows: EvalWindows) -> PerplexityResult:
    inputs, targets = windows
    n = int((targets != IGNORE).sum())
    loss = float(nll.double().sum()) / max(1, n)
    per_doc = {name: {"loss": l, "ppl": _ppl(l), "tokens": c}
               for name, (l, c) in _per_doc(nll, targets, windows.doc, windows.names).items()}
    return PerplexityResult(loss, _ppl(loss), n, inputs.shape[1], windows.stride, per_doc, nll, windows)


def perplexity(model: torch.nn.Module, docs: Mapping[str, np.ndarray] | EvalWindows, seq_len: Optional[int] = None,
               stride: Optional[int] = None, device: str | torch.device = "cpu", batch_size: int = 8,
               max_windows: Optional[int] = None) -> PerplexityResult:
    """Sliding-window perplexity of ``model`` over documents (name -> token ids) or prepared windows."""
    device = torch.device(device)
    if isinstance(docs, EvalWindows):
        windows = docs
    else:
        if seq_len is None:
            raise ValueError("perplexity: seq_len is required with documents")
        windows = document_windows(docs, seq_len, stride, max_windows)
    return _result(scored_nll(model, windows[0], windows[1], device, batch_size), windows)


def kl_divergence(model: torch.nn.Module, reference: torch.nn.Module, windows: EvalWindows,
                  device: str | torch.device = "cpu", batch_size: int = 8) -> Dict[str, object]:
    """Per-token KL(reference || model) over windows: mean, per-document means and the [n, L] tensor."""
    kl = token_kl(model, reference, windows[0], windows[1], torch.device(device), batch_size)
    targets = windows[1]
    n = int((targets != IGNORE).sum())
    per_doc = {name: {"kl": m, "tokens": c} for name, (m, c) in _per_doc(kl, targets, windows.doc, windows.names).items()}
    return {"kl": float(kl.double().sum()) / max(1, n), "tokens": n, "per_doc": per_doc, "token_kl": kl}


def lm_metrics(model: torch.nn.Module, eval_set: Sequence[torch.Tensor], device: torch.device, batch_size: int) -> Dict[str, float]:
    """``val_loss``/``val_ppl`` of an "lm" eval set (chunked), plus ``eval.*`` per document for EvalWindows."""
    inputs, targets = eval_set
    nll = scored_nll(model, inputs, targets, device, batch_size)
    n = int((targets != IGNORE).sum())
    loss = float(nll.double().sum()) / max(1, n)
    out = {"val_loss": loss, "val_ppl": _ppl(loss)}
    if isinstance(eval_set, EvalWindows):
        out.update(_result(nll, eval_set).metrics("eval"))
    return out
