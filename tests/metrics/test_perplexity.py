"""Sliding-window perplexity and KL (mla_analysis.metrics.perplexity) against transformers' own loss and brute force."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mla_analysis.conversion.cli import from_hf
from mla_analysis.metrics.perplexity import (
    IGNORE,
    document_windows,
    kl_divergence,
    lm_metrics,
    perplexity,
    scored_nll,
    sliding_windows,
    token_kl,
)

CPU = torch.device("cpu")
VOCAB = 97


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A small random Llama written by transformers' save_pretrained."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # a less uniform next-token distribution than the default init gives
        model.lm_head.weight.mul_(20.0)
    out = tmp_path_factory.mktemp("llama")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_model(llama_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(llama_dir):
    return from_hf(llama_dir)


def doc(n: int, seed: int = 0) -> np.ndarray:
    return np.random.Generator(np.random.PCG64(seed)).integers(0, VOCAB, size=n)


def hf_recipe(hf_model, tokens: np.ndarray, max_length: int, stride: int) -> tuple[float, int, list[float]]:
    """The Hugging Face "perplexity of fixed-length models" loop: (total NLL, scored tokens, per-window losses)."""
    ids = torch.from_numpy(tokens)[None]
    seq_len = ids.shape[1]
    total, count, losses, prev_end = 0.0, 0, [], 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = float(hf_model(input_ids, labels=target_ids).loss)
        n_valid = int((target_ids[:, 1:] != -100).sum())  # transformers shifts the labels
        total += loss * n_valid
        count += n_valid
        losses.append(loss)
        prev_end = end
        if end == seq_len:
            break
    return total, count, losses


@pytest.mark.parametrize("n,seq_len,stride", [(300, 64, 24), (300, 64, 64), (130, 64, 1 + 63), (200, 48, 17)])
def test_sliding_window_loss_equals_transformers(hf_model, model, n, seq_len, stride):
    tokens = doc(n, seed=n + stride)
    total, count, losses = hf_recipe(hf_model, tokens, seq_len + 1, stride)
    res = perplexity(model, {"d": tokens}, seq_len=seq_len, stride=stride, batch_size=3)
    assert res.tokens == count == n - 1
    assert res.loss * res.tokens == pytest.approx(total, rel=1e-4)
    assert res.ppl == pytest.approx(np.exp(total / count), rel=1e-4)
    # window by window too
    inputs, targets = res.windows
    per_window = (res.nll.sum(1) / (targets != IGNORE).sum(1)).tolist()
    assert per_window == pytest.approx(losses, rel=1e-4)


def test_each_token_scored_once_with_its_window_context():
    tokens = np.arange(1, 201)  # token value = its position + 1: targets name their positions
    for seq_len, stride in [(32, 32), (32, 10), (32, 1), (50, 49)]:
        x, y = sliding_windows(tokens, seq_len, stride)
        scored = y[y != IGNORE]
        assert sorted(scored.tolist()) == list(range(2, 201))  # every token but the first, once
        for xi, yi in zip(x, y):  # inputs are the tokens just before each target
            m = yi != IGNORE
            assert np.array_equal(yi[m] - 1, xi[m])


def test_head_applied_in_chunks_and_result_unchanged(model):
    x, y = (torch.from_numpy(a) for a in sliding_windows(doc(400, 3), 64, 32))
    seen = []
    handle = model.head.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    try:
        small = scored_nll(model, x, y, CPU, batch_size=4, max_logits=VOCAB * 5)
    finally:
        handle.remove()
    assert seen and all(s[0] <= 5 and len(s) == 2 for s in seen)  # never more than 5 positions' logits
    big = scored_nll(model, x, y, CPU, batch_size=64)
    assert torch.allclose(small, big, atol=1e-6)
    # brute force: full logits, cross-entropy at the scored positions
    with torch.no_grad():
        ref = F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1), ignore_index=IGNORE, reduction="none").view(y.shape)
    assert torch.allclose(big, ref, atol=1e-5)


def test_per_document_values(model):
    docs = {"a": doc(150, 1), "b": doc(260, 2)}
    both = perplexity(model, docs, seq_len=40, stride=20, batch_size=5)
    for name, tokens in docs.items():
        alone = perplexity(model, {name: tokens}, seq_len=40, stride=20)
        assert both.per_doc[name]["loss"] == pytest.approx(alone.loss, rel=1e-6)
        assert both.per_doc[name]["tokens"] == len(tokens) - 1
    m = both.metrics()
    assert m["eval.tokens"] == 149 + 259 and m["eval.a.tokens"] == 149 and m["eval.stride"] == 20
    # lm_metrics (what train.evaluate calls for "lm") agrees and adds the eval.* block for windows
    lm = lm_metrics(model, both.windows, CPU, 7)
    assert lm["val_loss"] == pytest.approx(both.loss, rel=1e-6) and lm["eval.b.ppl"] == pytest.approx(both.per_doc["b"]["ppl"])


def test_max_windows_keeps_an_even_subset():
    w = document_windows({"a": np.arange(1000), "b": np.arange(1000)}, 20, 20, max_windows=10)
    assert w[0].shape == (10, 20) and set(w.doc.tolist()) == {0, 1}


def test_kl_to_reference(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    windows = document_windows({"a": doc(120, 4), "b": doc(90, 5)}, 32, 16)
    assert float(token_kl(model, model, windows[0], windows[1], CPU, 4).abs().max()) < 1e-5
    res = kl_divergence(other, model, windows, batch_size=3)
    x, y = windows
    with torch.no_grad():  # brute force KL(ref || model) with full logits
        logp = torch.log_softmax(model(x), -1)
        logq = torch.log_softmax(other(x), -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
    mask = y != IGNORE
    assert res["kl"] == pytest.approx(float(kl[mask].double().mean()), rel=1e-4)
    d = torch.from_numpy(windows.doc)[:, None].expand_as(y)
    for j, name in enumerate(windows.names):
        sel = mask & (d == j)
        assert res["per_doc"][name]["kl"] == pytest.approx(float(kl[sel].double().mean()), rel=1e-4)
        assert res["per_doc"][name]["tokens"] == int(sel.sum())
    assert res["kl"] > 0


def test_bad_stride():
    with pytest.raises(ValueError, match="data.eval_stride=0"):
        sliding_windows(np.arange(10), 8, 0)
