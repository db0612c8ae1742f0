"""probe=retrieval: recomputed attention against the modules, needle mass against brute force and closed
forms, scoring with rigged models (perfect / random), the probe end to end, and bad parameters."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mla_analysis.models.attention as attention_mod
import mla_analysis.models.mla as mla_mod
from mla_analysis.config import ConfigError, ModelConfig, tiny
from mla_analysis.data import DataConfig, SeqLenError
from mla_analysis.data.tasks import MQARConfig
from mla_analysis.data.vocab import PASSKEY, Vocab
from mla_analysis.models.transformer import Transformer
from mla_analysis.probes import run_probes
from mla_analysis.probes.retrieval import (
    Cell,
    attention_output,
    attention_probs,
    cell_data,
    evaluate_cell,
    grid_cells,
    locate_needles,
    parse_params,
    resolve_lengths,
    resolve_pairs,
    run,
)

from tests.helpers import CPU, PNG_MAGIC

DATA = DataConfig(vocab_size=128, seq_len=32, eval_examples=8, mqar=MQARConfig(num_kv_pairs=2))
VARIANTS = {
    "mha": dict(attention="mha"),
    "gqa": dict(attention="gqa", n_kv_heads=2),
    "mqa": dict(attention="mqa"),
    "mla": dict(attention="mla", q_lora_rank=8, rope_interleave=True),
    "mla_coupled_rope": dict(attention="mla_coupled_rope"),
    # GPT-2 style (no RoPE, biases), where the model config has these fields
    "mha_learned_pos_bias": dict(attention="mha", pos_emb="learned", bias=True),
}


def _model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**kw)).eval()


class _RecordSDPA:
    """Patches ``attend`` in the model modules: records SDPA's own probabilities, computed from the q/k the
    module built, as SDPA(q, k, V = identity) (row s of the identity picks key s), then attends as before."""

    def __init__(self, monkeypatch):
        self.probs: list[torch.Tensor] = []
        self.orig = attention_mod.attend
        self.depth = 0
        monkeypatch.setattr(attention_mod, "attend", self)
        monkeypatch.setattr(mla_mod, "attend", self)

    def __call__(self, q, k, v, scale, start):
        if self.depth == 0:  # attend re-enters itself on CPU to pad v; record the outer call only
            B, H_kv, S, _ = k.shape
            eye = torch.eye(S, dtype=q.dtype).expand(B, H_kv, S, S)
            gqa = H_kv != q.shape[1]
            self.probs.append(F.scaled_dot_product_attention(q, k, eye, is_causal=True, scale=scale, enable_gqa=gqa))
        self.depth += 1
        try:
            return self.orig(q, k, v, scale, start)
        finally:
            self.depth -= 1


# ---- attention recomputation ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_recomputed_attention_reproduces_module_output(variant, monkeypatch):
    if not set(VARIANTS[variant]) <= {f.name for f in dataclasses.fields(ModelConfig)}:
        pytest.skip(f"ModelConfig has no {sorted(VARIANTS[variant])} fields")
    model = _model(1, init_std=0.3, **VARIANTS[variant])  # large weights: peaked, position-dependent attention
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.normal_(m.bias, std=0.3)  # biases start at zero; make them count
    sdpa = _RecordSDPA(monkeypatch)
    seen = []
    hooks = [
        b.attn.register_forward_hook(lambda m, a, kw, out: seen.append((m, a, out)), with_kwargs=True) for b in model.layers
    ]
    ids = torch.randint(0, 128, (2, 13))
    with torch.no_grad():
        model(ids)
        for h in hooks:
            h.remove()
        assert len(seen) == len(sdpa.probs) == 2
        for (module, args, out), ref in zip(seen, sdpa.probs):
            x, rope, cos, sin = args[:4]
            probs, v = attention_probs(module, x, rope, cos, sin)
            assert probs.shape == (2, 4, 13, 13)
            torch.testing.assert_close(attention_output(module, probs, v), out, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(probs, ref, atol=1e-5, rtol=1e-4)  # SDPA's probabilities from the module's q/k
            assert probs.max() > 0.5  # the check is not on near-uniform rows only
            rows = torch.tensor([[3, 12], [0, 7]])
            sub, _ = attention_probs(module, x, rope, cos, sin, rows)
            torch.testing.assert_close(sub, probs[torch.arange(2)[:, None], :, rows].transpose(1, 2))


# ---- needle mass ---------------------------------------------------------------------------------------


def _brute_mass(probs_per_layer, needles_of):
    """Mean over examples of mean over rows of mean over heads of sum over needle keys, with python loops."""
    out = []
    for P in probs_per_layer:  # (N, H, T, S)
        per_ex = []
        for i in range(P.shape[0]):
            rows = needles_of(i)
            per_ex.append(
                sum(sum(float(P[i, h, r, s]) for s in nd) for r, nd in rows for h in range(P.shape[1])) / (P.shape[1] * len(rows))
            )
        out.append(sum(per_ex) / len(per_ex))
    return out


def test_needle_mass_matches_brute_force_passkey_and_mqar(monkeypatch):
    model = _model(2, init_std=0.3, attention="gqa", n_kv_heads=2)
    sdpa = _RecordSDPA(monkeypatch)
    n_digits = DATA.passkey.n_digits

    x, y = cell_data(DATA, Cell("passkey", 48, depth=0.3), 6, seed=5)
    res = evaluate_cell(model, x, y, locate_needles("passkey", x, y), batch_size=4, device=CPU)
    # calls: batch 0 (layers 0, 1), batch 1 (layers 0, 1)
    layers = [torch.cat([sdpa.probs[0], sdpa.probs[2]]), torch.cat([sdpa.probs[1], sdpa.probs[3]])]

    def passkey_needles(i):
        row = x[i].tolist()
        s = row.index(PASSKEY)  # the statement is the first PASSKEY; the query repeats it at the end
        L = len(row)
        return [(r, range(s, s + n_digits + 2)) for r in range(L - n_digits - 1, L - 1)]

    assert res["attn_mass"] == pytest.approx(_brute_mass(layers, passkey_needles), rel=1e-5)

    sdpa.probs.clear()
    P = 4
    x, y = cell_data(DATA, Cell("mqar", 32, pairs=P), 5, seed=5)
    res = evaluate_cell(model, x, y, locate_needles("mqar", x, y, P), batch_size=8, device=CPU)

    def mqar_needles(i):
        row = x[i].tolist()
        keys = row[0 : 2 * P : 2]
        return [(r, (2 * keys.index(row[r]), 2 * keys.index(row[r]) + 1)) for r in range(len(row)) if y[i, r] != -100]

    assert res["attn_mass"] == pytest.approx(_brute_mass(sdpa.probs, mqar_needles), rel=1e-5)
    assert min(float(P.max()) for P in sdpa.probs) > 0.5  # peaked rows: the sums are not of a uniform table


def test_uniform_attention_gives_the_closed_form_mass():
    model = _model(3)
    for b in model.layers:
        nn.init.zeros_(b.attn.wq.weight)  # q = 0: every causal row is uniform
    n, L, d = DATA.passkey.n_digits, 40, 0.5
    x, y = cell_data(DATA, Cell("passkey", L, depth=d), 3, seed=1)
    H = L - 2 * (n + 2)
    start = round(d * H)  # make_passkey's placement
    assert (x[:, start] == PASSKEY).all()
    expected = np.mean([(n + 2) / (r + 1) for r in range(L - n - 1, L - 1)])
    res = evaluate_cell(model, x, y, locate_needles("passkey", x, y), batch_size=2, device=CPU)
    assert res["attn_mass"] == pytest.approx([expected, expected], rel=1e-6)
    assert res["attn_uniform"] == pytest.approx(expected, rel=1e-12)


def test_niah_needle_located_where_the_generator_puts_it():
    L, d = 64, 0.5
    x, y = cell_data(DATA, Cell("niah_single_2", L, depth=d), 4, seed=2)
    klen, vlen = 2, 7
    needle_len, query_len = klen + vlen + 3, klen + 2 + vlen
    H = L - needle_len - query_len
    start = int(np.abs(np.arange(H + 1) - d * H).argmin())  # make_niah's depth rule for a token haystack
    rows, mask = locate_needles("niah_single_2", x, y)
    assert (rows == torch.arange(L - vlen - 1, L - 1)).all()  # ANSWER and the value's tokens but the last
    expected = torch.zeros(L, dtype=torch.bool)
    expected[start : start + needle_len] = True
    assert (mask == expected).all()


# ---- scoring with rigged models ------------------------------------------------------------------------


class _Rigged(nn.Module):
    """Wraps a tiny Transformer (so the probe finds its layers, config and hooks) and replaces its logits."""

    def __init__(self, inner: Transformer, table: dict | None = None, choices=None, seed: int = 0):
        super().__init__()
        self.module = inner
        self.table, self.choices = table, choices
        self.gen = torch.Generator().manual_seed(seed)

    def forward(self, ids):
        logits = self.module(ids)  # runs the attention modules (hooks)
        out = torch.zeros_like(logits)
        if self.table is not None:  # oracle: one-hot of the target wherever one is scored
            for b, row in enumerate(ids):
                tgt = self.table[row.numpy().tobytes()]
                pos = torch.nonzero(tgt != -100).flatten()
                out[b, pos, tgt[pos]] = 1.0
        else:  # uniform over `choices`, independent of the input
            out.fill_(-1e9)
            out[..., self.choices] = torch.rand(*ids.shape, len(self.choices), generator=self.gen)
        return out


def test_oracle_model_scores_one_everywhere(tmp_path):
    params = {"examples": 6, "depths": [0.0, 0.5, 1.0], "tasks": ["mqar", "passkey", "niah_single_1", "niah_multivalue"], "figures": False}
    p = parse_params(params)
    lengths = resolve_lengths(p, DATA.seq_len, 128)
    table = {}
    for cell in grid_cells(p, lengths, resolve_pairs(p, DATA)):
        try:
            x, y = cell_data(DATA, cell, p["examples"], p["seed"])
        except SeqLenError:
            continue
        table.update({xr.numpy().tobytes(): yr for xr, yr in zip(x, y)})
    out = run(_Rigged(_model(4), table=table), params, DATA, tmp_path, CPU)
    scores = {k: v for k, v in out.items() if k.endswith((".exact_match", ".token_acc"))}
    assert len(scores) > 50 and all(v == 1.0 for v in scores.values()), {k: v for k, v in scores.items() if v != 1.0}
    assert "niah_multivalue.len128.depth0.50.exact_match" in out and "copy.len64.token_acc" in out


def test_random_model_scores_chance(tmp_path):
    params = {"examples": 32, "tasks": ["passkey"], "detail_tasks": ["arithmetic"], "attention": False, "figures": False}
    vocab = Vocab(DATA.vocab_size)
    run(_Rigged(_model(5), choices=list(vocab.digit_ids), seed=7), params, DATA, tmp_path, CPU)
    cells = json.loads((tmp_path / "retrieval.json").read_text())["cells"]
    hits = total = 0
    for c in cells:
        # every example of a cell has the same number of scored digits, so token_acc x tokens = hits
        _, y = cell_data(DATA, Cell(c["task"], c["length"], depth=c["depth"]), 32, seed=0)
        n_tok = int((y != -100).sum())
        hits += c["token_acc"] * n_tok
        total += n_tok
        assert c["exact_match"] <= 1 / 32  # >= 4 digits all right by chance: p <= 1e-4 per example
    p_hat, chance = hits / total, 0.1  # 10 digit tokens to choose from
    assert total > 2000
    assert abs(p_hat - chance) < 4 * math.sqrt(chance * (1 - chance) / total), (p_hat, total)


# ---- the probe end to end ------------------------------------------------------------------------------


def test_probe_runs_via_run_probes_and_writes_keys_json_png(tmp_path):
    model = _model(6, attention="mla")
    params = {"examples": 4, "depths": [0.0, 1.0], "tasks": ["mqar", "passkey", "niah_single_2"], "num_kv_pairs": [2, 8]}
    out = run_probes(model, {"retrieval": params}, DATA, tmp_path, CPU)
    pre = "probe.retrieval."
    for key in (
        "mqar.len64.pairs8.exact_match",
        "mqar.len16.pairs2.token_acc",
        "passkey.len16.depth0.00.exact_match",
        "passkey.len128.depth1.00.token_acc",
        "niah_single_2.len32.depth1.00.exact_match",
        "copy.len128.exact_match",
        "arithmetic.len16.token_acc",
        "attn_mass.passkey.len64.depth0.00.layer1",
        "attn_mass.passkey.layer0",
        "attn_mass.passkey.uniform",
        "attn_mass.mqar.layer1",
        "attn_mass.copy.layer0",
        "passkey.within_train.exact_match",
        "passkey.beyond_train.token_acc",
        "retrieval.within_train.exact_match",
        "retrieval.beyond_train.token_acc",
    ):
        assert pre + key in out, key
    assert pre + "niah_single_2.len16.depth0.00.exact_match" not in out  # 23 tokens needed: skipped
    assert not any("attn_mass.arithmetic" in k for k in out)
    assert out[pre + "train_len"] == 32 and out[pre + "max_seq_len"] == 128
    for k, v in out.items():
        if k.endswith((".exact_match", ".token_acc")) or ".layer" in k:
            assert 0.0 <= v <= 1.0, k
    js = json.loads((tmp_path / "retrieval.json").read_text())
    assert js["lengths"] == [16, 32, 64, 128] and js["num_kv_pairs"] == [2, 8]
    assert {s["cell"] for s in js["skipped"]} >= {"niah_single_2.len16.depth0.00", "mqar.len16.pairs8", "copy.len16"}
    assert js["figures"] == ["retrieval_grid.png", "retrieval_attn.png"]
    for name in js["figures"]:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    # within/beyond summary = mean over the cells on each side of data.seq_len
    within = [c["exact_match"] for c in js["cells"] if c["task"] == "passkey" and c["length"] <= 32]
    assert out[pre + "passkey.within_train.exact_match"] == pytest.approx(np.mean(within))


# ---- parameters ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value",
    [
        ("lengths", [0]),
        ("lengths", [33]),
        ("lengths", "long"),
        ("length_factors", [0]),
        ("depths", [1.5]),
        ("depths", []),
        ("num_kv_pairs", [0]),
        ("tasks", ["bogus"]),
        ("detail_tasks", ["mqar"]),
        ("examples", 0),
        ("batch_size", -1),
        ("seed", -1),
        ("attention", "yes"),
        ("mqar_power_a", 0),
        ("bogus_key", 1),
    ],
)
def test_bad_parameters_raise_config_error_naming_the_key(key, value, tmp_path):
    with pytest.raises(ConfigError, match=rf"probe\.retrieval\.{key}"):
        run(_model(0), {key: value}, DATA, tmp_path, CPU)
    assert not (tmp_path / "retrieval.json").exists()


def test_lengths_past_max_seq_len_explicit_error_derived_dropped_with_warning():
    p = parse_params({"lengths": [64, 256]})
    with pytest.raises(ConfigError, match=r"probe\.retrieval\.lengths.*max_seq_len=128.*\[256\]"):
        resolve_lengths(p, 32, 128)
    p = parse_params({"length_factors": [0.5, 1, 4, 8]})
    with pytest.warns(UserWarning, match=r"\[256\] exceed model\.max_seq_len=128"):
        assert resolve_lengths(p, 32, 128) == [16, 32, 128]
    with pytest.raises(ConfigError, match=r"probe\.retrieval\.length_factors"):
        with pytest.warns(UserWarning):
            resolve_lengths(parse_params({"length_factors": [8]}), 32, 128)


def test_impossible_mqar_pairs_raise_config_error():
    with pytest.raises(ConfigError, match=r"probe\.retrieval\.num_kv_pairs"):
        cell_data(DATA, Cell("mqar", 256, pairs=60), 2, seed=0)  # 48 key ids in a 128-token vocab


def test_cells_are_deterministic_and_seed_dependent():
    c = Cell("niah_multikey_1", 64, depth=0.25)
    a, b, other = cell_data(DATA, c, 3, 0), cell_data(DATA, c, 3, 0), cell_data(DATA, c, 3, 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], other[0])


def test_mqar_power_a_places_queries_uniformly_over_the_context():
    L, P, n = 128, 2, 400
    g = (L - 2 * P) // 2  # query slots after the pairs

    def slots(power_a):
        _, targets = cell_data(DATA, Cell("mqar", L, pairs=P), n, seed=0, mqar_power_a=power_a)
        pos = (targets >= 0).nonzero()[:, 1].float()  # scored positions = the query slots
        return (pos - 2 * P) / 2

    uniform, default = slots(1.0), slots(None)
    # 800 slots drawn uniformly (2 distinct per example): mean (g - 1) / 2 (sd ~ 0.6), a quarter in the first quarter
    assert abs(float(uniform.mean()) - (g - 1) / 2) < 3
    assert abs(float((uniform < g / 4).float().mean()) - 0.25) < 0.06
    assert float((default < g / 4).float().mean()) > 0.5  # the data's power law (a = 0.01) crowds them at the start
