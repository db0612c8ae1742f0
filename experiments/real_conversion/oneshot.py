"""One-shot (no healing) SmolLM2-135M -> MLA perplexity at cache budgets 192 / 120: shared key vs RoRoPE vs per-KV-head
2-norm, with / without BKV, latent norm on / off.

Calibration: 8 x 512 tokens of the calibration plays (data/shakespeare.py's default split, modern edition, through
convert_job.calibration); evaluation: 2 x 1,024 tokens of Hamlet (an evaluation play, modern edition) from token 3,000.
The calibration statistics are computed once and reused by every conversion (same calib tokens for all).
Run: PYTHONPATH=. python experiments/real_conversion/oneshot.py OUT.json [budget ...]
Environment: KV_NORMS=0,1 (latent norm off / on; default both), BKVS=0,1 (BKV off / on), LAYOUTS=comma list of the names below (default all).
Each conversion took ~600 s on 2 heavily shared cores (load 9) before sym_sqrt was memoised per layer below.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

import mla_analysis.conversion as conversion
from mla_analysis.models.accounting import kv_elements_per_token_layer
from mla_analysis.config import ConvertConfig
from mla_analysis.conversion.job import calibration, convert_model
from mla_analysis.data import DataConfig
from mla_analysis.data.shakespeare import load_shakespeare
from mla_analysis.interop.state_dict import exportable_to_deepseek
from mla_analysis.interop.hf_io import load_model, resolve_hf_dir

torch.set_num_threads(2)
out_path = Path(sys.argv[1] if len(sys.argv) > 1 else "oneshot.json")
budgets = [int(b) for b in sys.argv[2:]] or [192, 120]
hf_dir = resolve_hf_dir("smollm2-135m")
src = load_model("smollm2-135m").float().eval()
data = DataConfig(source="shakespeare", tokenizer=str(hf_dir), vocab_size=src.cfg.vocab_size, seq_len=512,
                  lm_weight=1.0, eval_tasks=[])
calib, about = calibration(ConvertConfig(calib_examples=8), data)
ev = load_shakespeare(str(hf_dir), editions="modern", splits=("evaluation",)).splits["evaluation"]
ham = torch.as_tensor(ev.document_tokens()["hamlet.modern"][3000: 3000 + 2 * 1024 + 1], dtype=torch.long)


@torch.no_grad()
def ppl(model) -> float:
    nll = []
    for w in range(2):
        x = ham[w * 1024: (w + 1) * 1024 + 1]
        logits = model(x[None, :-1])[0]
        nll.append(torch.nn.functional.cross_entropy(logits.float(), x[1:], reduction="sum"))
    return math.exp(float(sum(nll)) / (2 * 1024))


# one calibration pass for all variants: every statistic any variant needs
_stats = {}
_orig = conversion.collect_calibration_stats


def cached_stats(model, calib_ids, pair_norms=False, sample_tokens=0, batch_size=8):
    if "s" not in _stats:
        _stats["s"] = _orig(model, calib_ids, pair_norms=True, sample_tokens=4096, batch_size=batch_size)
    return _stats["s"]


conversion.collect_calibration_stats = cached_stats
_roots = {}
_orig_sqrt = conversion.sym_sqrt


def cached_sqrt(cov, ridge=1e-6):
    """sym_sqrt per covariance object: the cached statistics hand every variant the same tensors."""
    key = (id(cov), ridge)
    if key not in _roots:
        _roots[key] = (cov, _orig_sqrt(cov, ridge))  # keeps cov alive, so its id is not reused
    return _roots[key][1]


conversion.sym_sqrt = cached_sqrt

records = json.loads(out_path.read_text()) if out_path.exists() else []
done = {r["name"] for r in records}
orig = ppl(src)
print(f"calibration: {about}; original ppl {orig:.2f}", flush=True)
LAYOUTS = {  # name -> convert options (rope dims per key)
    "shared+high": dict(rope_dims=16, strategy="high"),
    "shared+rorope": dict(rope_dims=16, strategy="high", rope_key="rorope", target="mla"),
    "perhead+2norm": dict(rope_dims=8, strategy="2norm", rope_heads="per_kv_head"),
    # extras: TransMLA's setting (every pair's principal mixture keeps RoPE), and per-head keys at 16 dims
    "shared+rorope64": dict(rope_dims=64, strategy="high", rope_key="rorope", target="mla"),
    "perhead16+2norm": dict(rope_dims=16, strategy="2norm", rope_heads="per_kv_head"),
}
import os

kv_norms = [bool(int(x)) for x in os.environ.get("KV_NORMS", "0,1").split(",")]
chosen = os.environ.get("LAYOUTS", ",".join(LAYOUTS)).split(",")
for budget in budgets:
    for kv_norm in kv_norms:
        for layout, kw in ((n, LAYOUTS[n]) for n in chosen):
            for bkv in [bool(int(x)) for x in os.environ.get("BKVS", "0,1").split(",")]:
                name = f"{budget}/{layout}/bkv={bkv}/kv_norm={kv_norm}"
                if name in done:
                    continue
                c = ConvertConfig(cache_budget=budget, bkv=bkv, kv_norm=kv_norm, calib_examples=8, **kw)
                t0 = time.time()
                new = convert_model(c, src, calib).eval()
                t1 = time.time()
                p = ppl(new)
                rec = dict(name=name, budget=budget, layout=layout, bkv=bkv, kv_norm=kv_norm, ppl=p, ratio=p / orig,
                           kv_lora_rank=new.cfg.kv_lora_rank, cache=kv_elements_per_token_layer(new.cfg),
                           exportable=exportable_to_deepseek(conversion.to_interleaved_rope(new).cfg)[0],
                           convert_s=round(t1 - t0, 1), eval_s=round(time.time() - t1, 1), orig_ppl=orig, calib=about)
                records.append(rec)
                out_path.write_text(json.dumps(records, indent=1))
                print(f"{name}: ppl {p:.2f} ({p / orig:.2f}x) rank {rec['kv_lora_rank']} cache {rec['cache']} "
                      f"export {rec['exportable']} {rec['convert_s']}s", flush=True)
