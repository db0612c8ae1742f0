"""bench_real's measuring pieces on tiny models: cache bytes against closed forms, generate leaves the cache as found,
and the report's status per figure. (No timings are asserted; the real-model figures live in BENCHMARKS.md.)"""

from __future__ import annotations

import pytest
import torch

from mla_analysis.bench.real import (TARGETS, cache_bytes, hf_cache_bytes, hf_generate_fn, ours_generate_fn,
                                     render_real)
from mla_analysis.config import tiny
from mla_analysis.models.transformer import Transformer


def test_toolkit_cache_bytes_match_closed_forms():
    context, batch, steps = 20, 3, 2
    gqa = Transformer(tiny(attention="gqa", n_kv_heads=2, name="gqa")).eval()
    fn, cache = ours_generate_fn(gqa, batch, context, steps)
    out = fn()
    assert out.shape == (batch, 1) and cache.seq_len == context + steps
    c = gqa.cfg
    assert cache_bytes(cache, context) == c.n_layers * 2 * 2 * (c.d_model // c.n_heads) * context * batch * 4
    mla = Transformer(tiny(attention="mla", name="mla")).eval()
    _, cache = ours_generate_fn(mla, batch, context, steps)
    m = mla.cfg  # only the latent and the shared RoPE key are cached
    assert cache_bytes(cache, context) == m.n_layers * (m.kv_lora_rank + m.qk_rope_head_dim) * context * batch * 4


def test_transformers_generate_appends_then_is_cropped_back():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    hf = LlamaForCausalLM(cfg).eval()
    context, batch, new = 10, 2, 3
    fn, cache = hf_generate_fn(hf, batch, context, new)
    out = fn()
    assert out.shape == (batch, context + 1 + new)  # the prompt (context + the uncached token) and the new tokens
    assert cache.get_seq_length() == context  # the next call decodes at the same context
    assert hf_cache_bytes(cache, context) == 2 * 2 * 2 * 8 * context * batch * 4  # layers x (K, V) x H_kv x d_h


def test_report_marks_each_figure_against_its_target():
    cand = lambda tok_s, frac: {"tok_s": tok_s, "step_s": 1 / tok_s, "kv_bytes": 8, "kv_bytes_analytic": 8,
                                "bound_s": frac / tok_s, "bound_fraction": frac}
    res = {"quick": False, "device": "cpu", "layers": 30, "note": None, "wall_s": 1.0, "copy_bw": 1e10,
           "machine": {"dtype": "torch.float32", "cpu": "x", "threads": 2},
           "generation": [{"context": 8192, "batch": 8, "candidates": {"hf": cand(1.0, 0.9), "mla48": cand(2.5, 0.3)}}],
           "healing": {"batch": 1, "seq": 8, "tok_s": {"ours": 1.1, "hf": 1.0}, "ratio": 1.1},
           "perplexity": {"windows": 1, "seq": 8, "windows_s": {"ours": 1.0, "hf": 1.0}, "ratio": 1.0,
                          "mean_nll": 1.0, "mean_nll_diff": 0.0},
           "probe": {"runs": {100: {"tokens": 100, "probe_s": 1, "peak_bytes": 10},
                              1000: {"tokens": 1000, "probe_s": 1.1, "forward_s": 1.0, "peak_bytes": 10}},
                     "overhead": 0.1, "memory_ratio": 1.0}}
    rows = {line.split(" | ")[0]: line for line in render_real(res, ["--real"]).splitlines() if line.startswith("| ")}
    status = lambda prefix: next(v for k, v in rows.items() if k.startswith(f"| {prefix}")).rstrip(" |").split(" | ")[-1]
    assert status("1. generation") == "met"  # 2.5x >= 2x
    assert status("1. MLA-48 step") == "MISSED"  # 0.3 of its bound < 0.5
    assert status("2. healing") == "MISSED"  # 1.1x < 1.2x
    assert status("3. perplexity") == "met"
    assert status("4. spectra probe overhead") == "met" and status("4. probe peak memory") == "met"
    assert TARGETS["healing"] == 1.2


def test_a_run_killed_after_a_figure_keeps_that_figure_in_the_report(tmp_path, monkeypatch):
    import mla_analysis.bench.real as real

    def fake_run(args, log=print, on_figure=None):  # figure 3 finishes, then the run dies (as the OOM killer would)
        res = {"quick": False, "device": "cpu", "note": None, "layers": 30, "wall_s": 12.0,
               "machine": {"cpu": "test cpu", "threads": 2, "dtype": "torch.float32"}}
        on_figure(res)
        raise MemoryError("killed after figure 3")

    monkeypatch.setattr(real, "run_real", fake_run)
    out = tmp_path / "BENCHMARKS.md"
    with pytest.raises(MemoryError):
        real.main(["--real", "--out", str(out)])
    text = out.read_text()
    assert "partial: the figures finished before the run ended" in text and "## Real model" in text


def test_a_subset_of_figures_writes_its_own_section(tmp_path, monkeypatch):
    import mla_analysis.bench.real as real

    def fake_run(args, log=print, on_figure=None):
        return {"quick": False, "device": "cpu", "note": None, "layers": 30, "wall_s": 1.0,
                "machine": {"cpu": "test cpu", "threads": 1, "dtype": "torch.float32"}}

    monkeypatch.setattr(real, "run_real", fake_run)
    out = tmp_path / "BENCHMARKS.md"
    real.main(["--real", "--out", str(out)])
    real.main(["--real", "--sections", "5,4", "--out", str(out)])
    text = out.read_text()
    assert "<!-- bench:real-cpu:begin -->" in text and "<!-- bench:real-cpu-fig45:begin -->" in text
