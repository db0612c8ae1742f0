"""Equal-byte KV baselines on SmolLM2-135M, before any healing: quantised caches and merged K/V heads.

    python experiments/kv_baselines/run.py [--windows 2] [--seq-len 1024] [--play hamlet] [--out DIR]

Evaluation: ``--windows`` evenly spaced windows of ``--seq-len`` + 1 tokens of one evaluation play
(modern edition) of ``data.shakespeare``'s default split; all ``--seq-len`` next-token targets of a window
are scored with their in-window context. The original's log-probabilities are kept (fp16) so each
variant runs one forward per window. Per variant: perplexity, mean per-token KL(original || variant), cache bytes per token
per layer (analytic, and measured from the allocated cache tensors) and a cached-decode check (prefill
then token-by-token decode against the full forward of the same variant). The model computes in fp32; the
original's cache is counted in bf16 (2 bytes per element), the quantised caches as stored (codes + fp16
scales + zeros). Writes ``results.json`` (atomically) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from mla_analysis.models.accounting import kv_bytes_per_token_layer
from mla_analysis.data.shakespeare import load_shakespeare, split_plays
from mla_analysis.interop.hf_io import load_model
from mla_analysis.conversion.kv_merge import merge_kv_heads, quantize_kv_cache
from mla_analysis.training.results import atomic_write_json

VARIANTS = [  # name, K/V heads (None = the source's 3), bits, group
    ("original (bf16 cache)", None, 16, 64),
    ("int8 g32", None, 8, 32),
    ("int8 g64", None, 8, 64),
    ("int4 g32", None, 4, 32),
    ("int4 g64", None, 4, 64),
    ("merged 3->1 heads (bf16)", 1, 16, 64),
    ("merged 3->1 + int8 g64", 1, 8, 64),
]


def decode_check(model: torch.nn.Module, ids: torch.Tensor, prefill: int, steps: int) -> dict[str, float]:
    """|logit| differences (max, mean) and greedy-token agreement: prefill + token-by-token cached decode vs full forward."""
    with torch.no_grad():
        full = model(ids[:, : prefill + steps])[:, prefill:]  # (1, steps, V)
        cache = model.new_cache(1, prefill + steps)
        model(ids[:, :prefill], cache=cache)
        out = torch.cat([model(ids[:, t : t + 1], cache=cache) for t in range(prefill, prefill + steps)], 1)
    diff = (out - full).abs()
    return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "argmax_agree": float((out.argmax(-1) == full.argmax(-1)).float().mean())}


def score(model: torch.nn.Module, windows: torch.Tensor, ref_logp: list[torch.Tensor] | None):
    """Per-window mean NLL and mean KL(ref || model) over all targets; also the log-probs (fp16) when ref_logp is None."""
    nll, kl, logps = [], [], []
    with torch.no_grad():
        for i, w in enumerate(windows):
            logp = torch.log_softmax(model(w[None, :-1])[0].float(), -1)  # (L, V)
            nll.append(float(-logp.gather(-1, w[1:, None]).mean()))
            if ref_logp is None:
                logps.append(logp.half())
                kl.append(0.0)
            else:
                ref = ref_logp[i].float()  # (L, V)
                kl.append(float((ref.exp() * (ref - logp)).sum(-1).mean()))
    return nll, kl, logps


def main() -> None:
    """Evaluate every variant and write results.json."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--play", default="hamlet")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = p.parse_args()
    if split_plays().get(args.play) != "evaluation":
        raise SystemExit(f"--play={args.play!r} is not an evaluation play of the default split")
    torch.manual_seed(0)
    source = load_model("smollm2-135m").float().eval()
    data = load_shakespeare("smollm2-135m", editions="modern", splits=("evaluation",))
    tokens = torch.from_numpy(data.splits["evaluation"].document_tokens()[f"{args.play}.modern"])
    starts = torch.linspace(0, len(tokens) - args.seq_len - 1, args.windows).round().long()
    windows = torch.stack([tokens[s : s + args.seq_len + 1] for s in starts.tolist()])  # (W, L + 1)
    rows, ref_logp = [], None
    for name, kv_heads, bits, group in VARIANTS:
        t0 = time.time()
        model = source if kv_heads is None else merge_kv_heads(source, kv_heads)
        if bits != 16:
            model = quantize_kv_cache(model, bits, group)
        nll, kl, logps = score(model, windows, ref_logp)
        ref_logp = ref_logp or logps
        cache = model.new_cache(1, 8, dtype=torch.bfloat16)
        loss = sum(nll) / len(nll)
        rows.append({
            "variant": name, "kv_heads": model.cfg.kv_heads, "kv_quant_bits": bits, "kv_quant_group": group,
            "ppl": math.exp(loss), "loss": loss, "tokens": args.windows * args.seq_len, "kl": sum(kl) / len(kl),
            "per_window_loss": nll, "per_window_kl": kl,
            "bytes_per_token_layer": kv_bytes_per_token_layer(model.cfg, 0, "bf16"),
            "bytes_per_token_layer_measured": cache.bytes_per_token() / model.cfg.n_layers,
            "cached_decode": decode_check(model, windows[:1], 64, 16),
            "wall_s": time.time() - t0,
        })
        print(json.dumps({k: v for k, v in rows[-1].items() if not k.startswith("per_window")}), flush=True)
    record = {"model": "smollm2-135m (Q4_1 GGUF, dequantised)", "play": f"{args.play}.modern", "windows": args.windows,
              "seq_len": args.seq_len, "starts": starts.tolist(), "rows": rows}
    atomic_write_json(Path(args.out) / "results.json", record)
    base = rows[0]
    print("| variant | cache bytes / token / layer | vs bf16 | perplexity | x original | KL (nats/token) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['bytes_per_token_layer']:g} | {r['bytes_per_token_layer'] / base['bytes_per_token_layer']:.1%} "
              f"| {r['ppl']:.2f} | {r['ppl'] / base['ppl']:.3f} | {r['kl']:.4f} |")


if __name__ == "__main__":
    main()
