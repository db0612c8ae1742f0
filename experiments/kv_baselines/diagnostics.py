"""Two checks behind experiments/kv_baselines/README.md: python experiments/kv_baselines/diagnostics.py

1. The quantised cache's decode differences in fp32 are rounding ties (a code moved by one step when the
   prefill and the one-token path compute K/V with different matmul shapes): in float64 they vanish.
2. Why merging 3 -> 1 K/V heads breaks SmolLM2 before healing: per layer, ||X_h - mean_h X_h|| / ||X_h|| of
   K (after RoPE) and V over 512 Hamlet tokens; sqrt(2/3) = 0.816 is the value for 3 orthogonal heads of
   equal norm, 0 for identical heads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import decode_check  # noqa: E402

from mla_analysis.data.shakespeare import load_shakespeare  # noqa: E402
from mla_analysis.interop.hf_io import load_model  # noqa: E402
from mla_analysis.conversion.kv_merge import quantize_kv_cache  # noqa: E402


def main() -> None:
    """Print both checks as JSON."""
    src = load_model("smollm2-135m").float().eval()
    data = load_shakespeare("smollm2-135m", editions="modern", splits=("evaluation",))
    toks = torch.from_numpy(data.splits["evaluation"].document_tokens()["hamlet.modern"])
    f64 = decode_check(quantize_kv_cache(src, 4, 64).double(), toks[None, 1000:1080], 64, 16)
    print(json.dumps({"int4_g64_float64_decode_check": f64}))
    T, H_kv, d_h = 512, src.cfg.kv_heads, src.cfg.attn_head_dim
    errs: dict[str, list[float]] = {"k": [], "v": []}
    with torch.no_grad():
        h = src.embed(toks[None, 2000 : 2000 + T])  # (1, T, D)
        cos, sin = src.rope(torch.arange(T))
        for blk in src.layers:
            a, xn = blk.attn, blk.attn_norm(h)
            k = src.rope.rotate(a.wk(xn).view(1, T, H_kv, d_h), cos, sin)  # (1, T, H_kv, d_h)
            v = a.wv(xn).view(1, T, H_kv, d_h)  # (1, T, H_kv, d_h)
            for name, t in (("k", k), ("v", v)):
                errs[name].append(float((t - t.mean(2, keepdim=True)).norm() / t.norm()))
            h = blk(h, src.rope, cos, sin)
    print(json.dumps({"merge_rel_err_per_layer": {n: [round(e, 3) for e in es] for n, es in errs.items()},
                      "merge_rel_err_mean": {n: round(sum(es) / len(es), 3) for n, es in errs.items()}}))


if __name__ == "__main__":
    main()
