"""Real-model benchmarks (issue 22): SmolLM2-135M and its MLA conversions, toolkit vs transformers, side by side.

``python -m mla_analysis.bench --real`` (``--quick``: a smoke run of every figure on the first 2 layers, numbers not
assessed) writes the "real model" section of BENCHMARKS.md (``real-cpu`` / ``real-cuda``). Every figure is
a ratio of two candidates timed in alternation in one process (``bench.time_interleaved``), on the same
weights, dtype and inputs; before timing, the candidates must agree (logits / NLL to fp32 tolerance).

1. Generation with a compressed cache: tokens/s of greedy decoding at each context and batch, with the
   cache filled with random values instead of a prefill (decode time does not depend on its contents):
   ``LlamaForCausalLM.generate`` on the original GQA model with its own ``DynamicCache`` (cropped back after
   every call) vs the toolkit's GQA decode of the same model (the implementation's share) vs the toolkit's
   MLA conversions (absorbed decode) at cache budgets 120 and 48 elements per token per layer, in the
   DeepseekV3-exportable variant (one shared RoPE key, the latent norm; ``conversion.mha_to_mla`` with
   target "mla", ``kv_norm=True``, rope dims 16 / 8 so that rank + rope = budget). KV bytes per step are
   measured (bytes of the cache tensors that hold the context) and must equal the analytic count
   (``accounting.kv_bytes_per_token`` x context x batch). The bound: (weight bytes + KV bytes) / the measured
   copy bandwidth (read + write bytes of a large ``copy_``). Target: MLA-48 >= 2x the original (transformers)
   at the longest context and batch 8, and within 2x of its bound.
2. Healing step: tokens/s of forward + backward + AdamW (torch's fused AdamW for both, fp32 on CPU), the
   toolkit vs transformers on the original weights; the toolkit on MLA-120 for information. Target >= 1.2x.
3. Real-text evaluation: perplexity windows of Shakespeare's evaluation plays per second,
   ``perplexity.scored_nll`` vs a transformers forward + cross-entropy. Target >= 1.0x.
4. Probing: the spectra probe (``probes.spectra.run``) over N tokens vs a plain forward of the same
   windows: overhead <= 15%; peak memory at N/10 and N, flat (ratio <= 1.10).
5. Conversion: wall time and peak memory of ``mha_to_mla`` (budget 120, whitened) with N calibration tokens.
torch.profiler tables (``bench.profile_top``) explain figures 1 and 2. On CUDA (``--device cuda``): bf16,
and the toolkit's decode steps timed as CUDA-graph replays (launch overhead would otherwise hide the
kernels; transformers' ``DynamicCache`` grows by concatenation and is not capturable, so its rows are eager).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..models.accounting import kv_bytes_per_token
from . import (PeakMemory, fill_cache_, machine_info, measure_copy_bandwidth, median, profile_top, sync,
                    time_interleaved, write_report)
from ..models.transformer import Transformer

MODEL_NAME = "smollm2-135m"
BUDGETS = {120: 16, 48: 8}  # cache elements per token per layer -> rope dims of the shared key (rank = rest)
TARGETS = {"generation": 2.0, "generation_bound": 0.5, "healing": 1.2, "perplexity": 1.0, "probe_overhead": 0.15,
           "probe_memory": 1.10}


@dataclasses.dataclass
class RealSizes:
    """Sizes of every figure (full: the issue's; quick: a smoke run)."""

    contexts: list[int]
    batches: list[int]
    new_tokens: int  # greedy tokens per timed generate call
    reps: int
    heal_batch: int
    heal_seq: int
    heal_reps: int
    ppl_windows: int
    ppl_seq: int
    probe_tokens: int  # the large count; memory is also taken at a tenth of it
    probe_seq: int
    calib_tokens: int  # figure 5
    copy_bytes: int
    layers: Optional[int] = None  # keep the first N of SmolLM2's 30 layers (quick: 2; the per-layer shapes are real)


def real_sizes(quick: bool) -> RealSizes:
    """The issue's sizes, or a smoke run (< 3 min on 2 cores)."""
    if quick:
        return RealSizes(contexts=[256], batches=[1, 2], new_tokens=2, reps=1, heal_batch=1, heal_seq=64, heal_reps=2,
                         ppl_windows=4, ppl_seq=64, probe_tokens=2048, probe_seq=256, calib_tokens=1024, copy_bytes=64 << 20, layers=2)
    return RealSizes(contexts=[512, 2048, 8192], batches=[1, 8], new_tokens=4, reps=3, heal_batch=4, heal_seq=512,
                     heal_reps=3, ppl_windows=32, ppl_seq=512, probe_tokens=100_000, probe_seq=1024,
                     calib_tokens=65_536, copy_bytes=512 << 20)


# ------------------------------------------------------------------------------------------ models, data
def load_pair(device: torch.device, dtype: torch.dtype, layers: Optional[int] = None
              ) -> tuple[Transformer, torch.nn.Module, Path]:
    """The toolkit's and transformers' SmolLM2 from the same HF directory (the dequantised GGUF).

    ``layers``: both keep only their first N decoder layers (a smoke run; every layer has the same shapes).
    """
    from transformers import LlamaForCausalLM

    from ..interop.hf_io import load_model, resolve_hf_dir

    hf_dir = resolve_hf_dir(MODEL_NAME)
    ours = load_model(MODEL_NAME).eval()
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if layers is not None and layers < ours.cfg.n_layers:
        ours.layers = ours.layers[:layers]
        ours.cfg = dataclasses.replace(ours.cfg, n_layers=layers)  # caches and accounting follow cfg
        hf.model.layers = hf.model.layers[:layers]
        hf.config.num_hidden_layers = layers
    return ours.to(device=device, dtype=dtype), hf.to(device=device, dtype=dtype), hf_dir


def check_logits(ours: Transformer, hf: torch.nn.Module, ids: torch.Tensor, atol: float) -> float:
    """Max |logit difference| of the two models on ``ids``; raises when above ``atol`` (the comparison would be void)."""
    with torch.inference_mode():
        a, b = ours(ids).float(), hf(ids).logits.float()  # (B, T, V) each
    diff = float((a - b).abs().max())
    if diff > atol:
        raise RuntimeError(f"toolkit and transformers logits differ by {diff:.3g} > {atol}: the comparison is void")
    return diff


def text_tokens(hf_dir: Path, split: str, n: int) -> torch.Tensor:
    """The first ``n`` SmolLM2 tokens of a Shakespeare split (calibration / evaluation plays) as int64."""
    from ..data import load_shakespeare

    tokens = load_shakespeare(str(hf_dir), splits=(split,)).splits[split].tokens
    if len(tokens) < n:
        raise ValueError(f"the {split} plays hold {len(tokens)} tokens, fewer than the {n} asked")
    return torch.from_numpy(tokens[:n].astype("int64"))


def windows(tokens: torch.Tensor, seq: int) -> torch.Tensor:
    """Consecutive windows [n, seq] of a token stream (the remainder dropped)."""
    n = tokens.numel() // seq
    return tokens[: n * seq].reshape(n, seq)  # (n, seq)


def convert(source: Transformer, budget: int, calib: Optional[torch.Tensor]) -> Transformer:
    """The DeepseekV3-exportable MLA at ``budget`` cache elements per token per layer (shared RoPE key, latent norm)."""
    from ..conversion.mla import mha_to_mla

    rope = BUDGETS[budget]
    was = next(source.parameters())
    model = mha_to_mla(source.cpu().float(), kv_lora_rank=budget - rope, rope_dims=rope, strategy="high",
                       calib=calib, target="mla", kv_norm=True)
    source.to(device=was.device, dtype=was.dtype)
    return model.eval().to(device=was.device, dtype=was.dtype)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters (tied ones once): what a decode step reads besides the cache."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---------------------------------------------------------------------------------------- figure 1
def hf_filled_cache(hf: torch.nn.Module, batch: int, context: int, seed: int = 0):
    """A transformers DynamicCache holding ``context`` random positions (no prefill)."""
    from transformers import DynamicCache

    c = hf.config
    cache = DynamicCache(config=c)
    g = torch.Generator().manual_seed(seed)
    p = next(hf.parameters())
    for i in range(c.num_hidden_layers):
        k = torch.randn(batch, c.num_key_value_heads, context, c.head_dim, generator=g)  # (B, H_kv, S, d_h)
        cache.update(k.to(p.device, p.dtype), k.to(p.device, p.dtype).neg(), i)
    return cache


def hf_cache_bytes(cache: Any, context: int) -> int:
    """Bytes of a DynamicCache's key and value tensors over the first ``context`` positions."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            total += t[:, :, :context].numel() * t.element_size()
    return total


def cache_bytes(cache: Any, context: int) -> int:
    """Bytes of the toolkit KVCache's buffers that hold the first ``context`` positions."""
    return sum(buf[:, :context].numel() * buf.element_size() for layer in cache.layers for buf in layer.values())


def hf_generate_fn(hf: torch.nn.Module, batch: int, context: int, new_tokens: int, seed: int = 0) -> tuple[Callable, Any]:
    """``generate`` of ``new_tokens`` greedy tokens after ``context`` cached ones; the cache is cropped back after."""
    cache = hf_filled_cache(hf, batch, context, seed)
    g = torch.Generator().manual_seed(seed + 1)
    dev = next(hf.parameters()).device
    ids = torch.randint(0, hf.config.vocab_size, (batch, context + 1), generator=g).to(dev)  # last one is uncached
    mask = torch.ones_like(ids)

    def fn() -> torch.Tensor:
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        cache.crop(context - cache.get_seq_length())  # negative: drop what this call appended
        return out

    return fn, cache


def ours_generate_fn(model: Transformer, batch: int, context: int, new_tokens: int, seed: int = 0,
                     graph: bool = False) -> tuple[Callable, Any]:
    """Greedy decoding of ``new_tokens`` tokens after ``context`` random cached positions (cache rewound after).

    ``graph``: the single-token step is captured once as a CUDA graph and replayed (positions are fixed
    per replay, so each replay is one step at the same context; the bench rewinds between calls anyway).
    """
    cache = model.new_cache(batch, context + new_tokens + 1)
    fill_cache_(cache, context, seed)
    dev = model.embed.weight.device
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, model.cfg.vocab_size, (batch, 1), generator=g).to(dev)  # (B, 1)
    if graph:
        static = ids.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm the allocator outside the graph
                cache.seq_len = context
                model(static, cache=cache)
        torch.cuda.current_stream().wait_stream(stream)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.inference_mode():
            cache.seq_len = context
            with torch.cuda.graph(cuda_graph):
                logits = model(static, cache=cache)[:, -1]  # (B, V)

        def fn() -> torch.Tensor:
            for _ in range(new_tokens):
                cuda_graph.replay()
                static.copy_(logits.argmax(-1, keepdim=True))
            return static

        return fn, cache

    def fn() -> torch.Tensor:
        cache.seq_len = context
        x = ids
        with torch.inference_mode():
            for _ in range(new_tokens):
                x = model(x, cache=cache)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        return x

    return fn, cache


def bench_generation(models: dict[str, Any], sizes: RealSizes, device: torch.device, copy_bw: float,
                     log: Callable[[str], None], profile: bool = True) -> list[dict[str, Any]]:
    """Figure 1 rows: per (context, batch), tokens/s of every candidate, KV bytes (measured, analytic), bound."""
    rows = []
    graph = device.type == "cuda"
    for context in sizes.contexts:
        for batch in sizes.batches:
            fns: dict[str, Callable] = {}
            kv: dict[str, dict[str, float]] = {}
            caches = []
            for name, m in models.items():
                if name == "hf":
                    fn, cache = hf_generate_fn(m, batch, context, sizes.new_tokens)
                    fn()  # allocate the appended positions once
                    measured = hf_cache_bytes(cache, context)
                    analytic = kv_bytes_per_token(models["ours"].cfg, next(m.parameters()).dtype) * context * batch
                else:
                    fn, cache = ours_generate_fn(m, batch, context, sizes.new_tokens, graph=graph)
                    measured = cache_bytes(cache, context)
                    analytic = kv_bytes_per_token(m.cfg, cache.layers[0][next(iter(cache.layers[0]))].dtype) \
                        * context * batch
                caches.append(cache)
                fns[name] = fn
                bound = (weight_bytes(m) + measured) / copy_bw
                kv[name] = {"kv_bytes": measured, "kv_bytes_analytic": analytic, "bound_s": bound}
            times = time_interleaved(fns, device, warmup=1, iters=sizes.reps)
            row: dict[str, Any] = {"context": context, "batch": batch, "candidates": {}}
            for name, ts in times.items():
                step_s = median(ts) / sizes.new_tokens
                row["candidates"][name] = {**kv[name], "step_s": step_s, "tok_s": batch / step_s,
                                           "bound_fraction": kv[name]["bound_s"] / step_s}
            if profile and context == sizes.contexts[-1] and batch == sizes.batches[-1]:
                row["profile"] = {name: profile_top(fns[name], device, reps=1) for name in ("hf", "mla48") if name in fns}
            c = row["candidates"]
            log(f"   context {context:,} batch {batch}: " + ", ".join(f"{k} {v['tok_s']:.2f} tok/s" for k, v in c.items()))
            rows.append(row)
            del fns, caches
    return rows


# ---------------------------------------------------------------------------------------- figure 2
def make_heal_step(model: torch.nn.Module, ids: torch.Tensor, is_hf: bool) -> Callable[[], None]:
    """One forward + backward + fused AdamW step (the trainer's optimizer) on next-token cross-entropy."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    x, y = ids[:, :-1], ids[:, 1:]  # (B, T) each

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = model(x).logits if is_hf else model(x)  # (B, T, V)
        F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
        opt.step()

    return step


def bench_healing(ours: Transformer, hf: torch.nn.Module, mla: Optional[Transformer], tokens: torch.Tensor,
                  sizes: RealSizes, device: torch.device) -> dict[str, Any]:
    """Figure 2: toolkit vs transformers training steps on copies of the same weights (the originals stay intact)."""
    import copy

    ids = windows(tokens, sizes.heal_seq + 1)[: sizes.heal_batch].to(device)  # (B, T + 1)
    models = {"ours": copy.deepcopy(ours).train(), "hf": copy.deepcopy(hf).train()}
    if mla is not None:
        models["ours_mla120"] = copy.deepcopy(mla).train()
    steps = {k: make_heal_step(m, ids, k == "hf") for k, m in models.items()}
    times = time_interleaved(steps, device, warmup=1, iters=sizes.heal_reps)
    tok = ids.shape[0] * (ids.shape[1] - 1)
    tok_s = {k: tok / median(v) for k, v in times.items()}
    out = {"batch": ids.shape[0], "seq": ids.shape[1] - 1, "tok_s": tok_s, "ratio": tok_s["ours"] / tok_s["hf"],
           "profile": {k: profile_top(steps[k], device, reps=1) for k in ("ours", "hf")}}
    return out


# ---------------------------------------------------------------------------------------- figure 3
def bench_perplexity(ours: Transformer, hf: torch.nn.Module, tokens: torch.Tensor, sizes: RealSizes,
                     device: torch.device) -> dict[str, Any]:
    """Figure 3: windows/s of the toolkit's scored NLL vs transformers' forward + cross-entropy (same NLL first)."""
    from ..metrics.perplexity import scored_nll

    w = windows(tokens, sizes.ppl_seq + 1)[: sizes.ppl_windows]  # (n, L + 1)
    x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
    batch = min(8, x.shape[0])

    def ours_fn() -> torch.Tensor:
        return scored_nll(ours, x, y, device, batch)

    def hf_fn() -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for i in range(0, x.shape[0], batch):
                logits = hf(x[i: i + batch].to(device)).logits.float()  # (b, L, V)
                out.append(F.cross_entropy(logits.transpose(1, 2), y[i: i + batch].to(device), reduction="none").cpu())
        return torch.cat(out)

    a, b = ours_fn(), hf_fn()
    diff = float((a.double().mean() - b.double().mean()).abs())
    times = time_interleaved({"ours": ours_fn, "hf": hf_fn}, device, warmup=0, iters=sizes.reps)
    rate = {k: x.shape[0] / median(v) for k, v in times.items()}
    return {"windows": x.shape[0], "seq": x.shape[1], "windows_s": rate, "ratio": rate["ours"] / rate["hf"],
            "mean_nll": float(a.double().mean()), "mean_nll_diff": diff}


# ---------------------------------------------------------------------------------------- figure 4
def bench_probe(ours: Transformer, hf_dir: Path, sizes: RealSizes, device: torch.device) -> dict[str, Any]:
    """Figure 4: the spectra probe vs a plain forward over the same evaluation windows; peak memory at N/10 and N."""
    from ..data import DataConfig, prepare_data_config
    from ..probes import spectra

    out: dict[str, Any] = {"seq": sizes.probe_seq, "runs": {}}
    for n in (sizes.probe_tokens // 10, sizes.probe_tokens):
        n_win = max(1, n // sizes.probe_seq)
        data = prepare_data_config(DataConfig(source="shakespeare", tokenizer="model", seq_len=sizes.probe_seq,
                                              eval_examples=n_win, lm_weight=1.0, eval_tasks=[]),
                                   str(hf_dir), ours.cfg.max_seq_len)
        params = {"max_tokens": n_win * sizes.probe_seq, "batch_size": 4, "figures": False}
        with tempfile.TemporaryDirectory() as tmp, PeakMemory(device) as mem:
            t0 = time.perf_counter()
            spectra.run(ours, params, data, Path(tmp), device)
            probe_s = time.perf_counter() - t0
        out["runs"][n] = {"tokens": n_win * sizes.probe_seq, "probe_s": probe_s, "peak_bytes": mem.bytes}
    big = out["runs"][sizes.probe_tokens]
    inputs = windows(text_tokens(hf_dir, "evaluation", big["tokens"]), sizes.probe_seq)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, inputs.shape[0], 4):
            ours(inputs[i: i + 4].to(device), return_hidden=True)
    sync(device)
    big["forward_s"] = time.perf_counter() - t0
    small = out["runs"][sizes.probe_tokens // 10]
    out["overhead"] = big["probe_s"] / big["forward_s"] - 1
    out["memory_ratio"] = (big["peak_bytes"] / small["peak_bytes"]
                           if big["peak_bytes"] and small["peak_bytes"] else None)
    return out


# ---------------------------------------------------------------------------------------- figure 5
def bench_conversion(ours: Transformer, hf_dir: Path, sizes: RealSizes, device: torch.device) -> dict[str, Any]:
    """Figure 5: wall time and peak memory of mha_to_mla at budget 120 with ``calib_tokens`` calibration tokens."""
    calib = windows(text_tokens(hf_dir, "calibration", sizes.calib_tokens), 512 if sizes.calib_tokens >= 512 else 64)
    with PeakMemory(torch.device("cpu")) as mem:
        t0 = time.perf_counter()
        convert(ours, 120, calib)
        wall = time.perf_counter() - t0
    return {"calib_tokens": int(calib.numel()), "wall_s": wall, "peak_bytes": mem.bytes}


# ---------------------------------------------------------------------------------------- report
def _fmt(x: Optional[float], digits: int = 2, unit: str = "") -> str:
    return "-" if x is None else f"{x:,.{digits}f}{unit}"


def _status(value: Optional[float], target: float, quick: bool, lower_is_better: bool = False) -> str:
    if value is None:
        return "not measured"
    if quick:
        return "quick run: not assessed"
    return "met" if (value <= target if lower_is_better else value >= target) else "MISSED"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]


def render_real(res: dict[str, Any], argv: Sequence[str]) -> str:
    """The BENCHMARKS.md "real model" section: one summary table (figure, measured, target, status), then details."""
    q = res["quick"]
    m = res["machine"]
    out = [f"## Real model ({MODEL_NAME}, {res['layers']} layers, {res['device']}, {m['dtype']})", "",
           f"`python -m mla_analysis.bench {' '.join(argv)}` on {m['cpu']}, {m['threads']} threads"
           + (f"; {res['note']}" if res.get("note") else "") + f"; wall {res['wall_s']:.0f} s.", ""]
    if q:
        out += ["**Quick run (smoke sizes, shared cores): the numbers below are not the figures and are not assessed.**", ""]
    rows = []
    gen = res.get("generation")
    if gen:
        last = [r for r in gen if r["context"] == max(x["context"] for x in gen)]
        big = max(last, key=lambda r: r["batch"])
        c = big["candidates"]
        ratio = c["mla48"]["tok_s"] / c["hf"]["tok_s"] if "mla48" in c else None
        rows.append([f"1. generation, MLA-48 / transformers GQA at {big['context']:,}, batch {big['batch']}",
                     _fmt(ratio, unit="x"), f">= {TARGETS['generation']}x", _status(ratio, TARGETS["generation"], q)])
        frac = c.get("mla48", {}).get("bound_fraction")
        rows.append([f"1. MLA-48 step / its bandwidth bound (bound time / step time)", _fmt(frac),
                     f">= {TARGETS['generation_bound']} (within 2x)", _status(frac, TARGETS["generation_bound"], q)])
    h = res.get("healing")
    if h:
        rows.append([f"2. healing step, toolkit / transformers (batch {h['batch']} x {h['seq']})", _fmt(h["ratio"], unit="x"),
                     f">= {TARGETS['healing']}x", _status(h["ratio"], TARGETS["healing"], q)])
    p = res.get("perplexity")
    if p:
        rows.append([f"3. perplexity windows/s, toolkit / transformers ({p['windows']} x {p['seq']})",
                     _fmt(p["ratio"], unit="x"), f">= {TARGETS['perplexity']}x", _status(p["ratio"], TARGETS["perplexity"], q)])
    pr = res.get("probe")
    if pr:
        n = max(pr["runs"])
        rows.append([f"4. spectra probe overhead vs a forward ({pr['runs'][n]['tokens']:,} tokens)",
                     _fmt(100 * pr["overhead"], 1, "%"), f"<= {TARGETS['probe_overhead']:.0%}",
                     _status(pr["overhead"], TARGETS["probe_overhead"], q, lower_is_better=True)])
        small = min(pr["runs"])
        rows.append([f"4. probe peak memory, {pr['runs'][n]['tokens']:,} / {pr['runs'][small]['tokens']:,} tokens", _fmt(pr["memory_ratio"], 3),
                     f"<= {TARGETS['probe_memory']}", _status(pr["memory_ratio"], TARGETS["probe_memory"], q, True)])
    cv = res.get("conversion")
    if cv:
        rows.append([f"5. mha_to_mla (budget 120) with {cv['calib_tokens']:,} calibration tokens",
                     f"{cv['wall_s']:.1f} s, peak {_fmt((cv['peak_bytes'] or 0) / 2**30, 2, ' GiB')}", "report", "reported"])
    out += _table(["figure", "measured", "target", "status"], rows) + [""]
    if gen:
        out += ["### 1. Generation (greedy, cache filled without prefill)", "",
                f"Copy bandwidth {res['copy_bw'] / 1e9:.2f} GB/s (read + write). Bound = (weights + KV bytes) / copy bandwidth.", ""]
        grow = []
        for r in gen:
            for name, c in r["candidates"].items():
                grow.append([f"{r['context']:,}", r["batch"], LABELS.get(name, name), _fmt(c["tok_s"]),
                             _fmt(c["step_s"] * 1e3, 1), f"{c['kv_bytes'] / 2**20:,.1f}",
                             "yes" if c["kv_bytes"] == c["kv_bytes_analytic"] else f"NO ({c['kv_bytes_analytic'] / 2**20:,.1f})",
                             _fmt(c["bound_s"] * 1e3, 1), _fmt(c["bound_fraction"])])
        out += _table(["context", "batch", "model", "tok/s", "ms/step", "KV MiB/step", "= analytic", "bound ms",
                       "bound / step"], grow) + [""]
    if h:
        out += ["### 2. Healing step", "", _fmt_dict(h["tok_s"], "tok/s"), ""]
    if p:
        out += ["### 3. Perplexity", "", _fmt_dict(p["windows_s"], "windows/s")
                + f"; mean NLL {p['mean_nll']:.4f}, |toolkit - transformers| {p['mean_nll_diff']:.2e}", ""]
    if pr:
        out += ["### 4. Probe", ""] + _table(
            ["tokens", "probe s", "forward s", "peak MiB"],
            [[f"{r['tokens']:,}", _fmt(r["probe_s"], 1), _fmt(r.get("forward_s"), 1),
              _fmt((r["peak_bytes"] or 0) / 2**20, 1)] for r in pr["runs"].values()]) + [""]
    profiles = {}
    for r in gen or []:
        for name, prof in (r.get("profile") or {}).items():
            profiles[f"figure 1, {LABELS.get(name, name)}, context {r['context']:,} batch {r['batch']}"] = prof
    for name, prof in ((h or {}).get("profile") or {}).items():
        profiles[f"figure 2, healing step, {'transformers GQA' if name == 'hf' else LABELS.get(name, name)}"] = prof
    if profiles:
        out += ["### Profiles (torch.profiler, top ops by self time)", ""]
        for name, prof in profiles.items():
            out += [f"{name}:", ""] + _table(["op", "self ms per call", "share"],
                                             [[e["op"], f"{e['self_ms_per_call_of_fn']:.1f}", f"{e['share']:.0%}"] for e in prof]) + [""]
    return "\n".join(out).rstrip() + "\n"


LABELS = {"hf": "transformers GQA (generate)", "ours": "toolkit GQA", "mla120": "toolkit MLA-120 (absorbed)",
          "mla48": "toolkit MLA-48 (absorbed)", "ours_mla120": "toolkit MLA-120"}


def _fmt_dict(d: dict[str, float], unit: str) -> str:
    labels = {**LABELS, "hf": "transformers GQA"}  # figures 2-3: a forward, not generate
    return ", ".join(f"{labels.get(k, k)} {v:,.2f} {unit}" for k, v in d.items())


# ---------------------------------------------------------------------------------------- main
ALL_FIGURES = {"1", "2", "3", "4", "5"}


def selected_figures(sections: str) -> set[str]:
    """The figure numbers of a ``--sections`` value ("1,3" -> {"1", "3"})."""
    return {x.strip() for x in sections.split(",")}


def run_real(args: argparse.Namespace, log: Callable[[str], None] = print,
             on_figure: Optional[Callable[[dict[str, Any]], None]] = None) -> dict[str, Any]:
    """Every selected figure of the real-model section; returns the measurements.

    ``on_figure(res)`` is called after each finished figure (``res["wall_s"]`` so far), so that a run killed later
    (out of memory on a shared machine, a time limit) keeps the figures it finished.
    """
    t_start = time.perf_counter()

    def done() -> None:
        res["wall_s"] = time.perf_counter() - t_start
        if on_figure is not None:
            on_figure(res)

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = real_sizes(args.quick)
    figures = selected_figures(args.sections)
    res: dict[str, Any] = {"quick": args.quick, "device": str(device), "machine": machine_info(device, dtype),
                           "note": args.note, "sizes": dataclasses.asdict(sizes)}
    log(f"real-model bench ({MODEL_NAME}, {device}, {dtype}) ...")
    ours, hf, hf_dir = load_pair(device, dtype, sizes.layers)
    res["layers"] = ours.cfg.n_layers
    evaluation = text_tokens(hf_dir, "evaluation", max(4096, sizes.ppl_windows * (sizes.ppl_seq + 1),
                                                      sizes.heal_batch * (sizes.heal_seq + 1)))
    res["parity_max_abs"] = check_logits(ours, hf, evaluation[:64].reshape(1, -1).to(device),
                                         1e-3 if dtype == torch.float32 else 0.5)
    mla: dict[int, Transformer] = {}
    if figures & {"1", "2"}:
        for budget in BUDGETS:  # unwhitened: decode and training speed do not depend on the calibration
            mla[budget] = convert(ours, budget, None)
    if "1" in figures:
        log("1. generation ...")
        res["copy_bw"] = measure_copy_bandwidth(device, sizes.copy_bytes, 5)["median_bw"]
        models = {"hf": hf, "ours": ours, "mla120": mla[120], "mla48": mla[48]}
        res["generation"] = bench_generation(models, sizes, device, res["copy_bw"], log, profile=True)
        del models
        done()
    mla.pop(48, None)  # only figure 1 decodes MLA-48: its weights need not stay beside figure 2's optimizer states
    if "2" in figures:
        log("2. healing step ...")
        res["healing"] = bench_healing(ours, hf, mla.get(120), evaluation, sizes, device)
        log("   " + _fmt_dict(res["healing"]["tok_s"], "tok/s"))
        done()
    if "3" in figures:
        log("3. perplexity ...")
        res["perplexity"] = bench_perplexity(ours, hf, evaluation, sizes, device)
        log("   " + _fmt_dict(res["perplexity"]["windows_s"], "windows/s"))
        done()
    if "4" in figures:
        log("4. spectra probe ...")
        res["probe"] = bench_probe(ours, hf_dir, sizes, device)
        log(f"   overhead {res['probe']['overhead']:.1%}, memory ratio {_fmt(res['probe']['memory_ratio'], 3)}")
        done()
    if "5" in figures:
        log("5. conversion ...")
        res["conversion"] = bench_conversion(ours, hf_dir, sizes, device)
        log(f"   {res['conversion']['wall_s']:.1f} s")
    res["wall_s"] = time.perf_counter() - t_start
    return res


def parse_real_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The ``--real`` command line (``python -m mla_analysis.bench --real [--quick] ...``)."""
    p = argparse.ArgumentParser(prog="python -m mla_analysis.bench --real", description=__doc__.split("\n\n")[0])
    p.add_argument("--real", action="store_true", help="(the switch that selects this bench)")
    p.add_argument("--quick", action="store_true", help="smoke sizes (< 3 min on 2 cores); numbers not assessed")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--sections", default="1,2,3,4,5", help="figures to run, e.g. 1,2")
    p.add_argument("--out", default=None, help="report file (default BENCHMARKS.md; none with --quick)")
    p.add_argument("--note", default=None)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run, print and (unless --quick without --out) record the real-model section."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_real_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    out = args.out if args.out else (None if args.quick else "BENCHMARKS.md")
    key = f"real-{torch.device(args.device).type}"
    chosen = selected_figures(args.sections)
    if chosen != ALL_FIGURES:  # a subset has its own section: it does not replace a whole run's figures
        key += "-fig" + "".join(sorted(chosen))

    def partial(res: dict[str, Any]) -> None:  # the figures finished so far, marked as a partial run
        if out:
            write_report(out, key, render_real({**res, "note": "; ".join(
                x for x in (res.get("note"), "partial: the figures finished before the run ended") if x)}, argv))

    res = run_real(args, on_figure=partial)
    body = render_real(res, argv)
    print()
    print(body)
    if out:
        print(f"wrote {write_report(out, key, body)}")
    res["markdown"] = body
    return res


if __name__ == "__main__":
    main()
