"""Command line for Hugging Face interop and MHA -> MLA conversion (the library half is ``mla_analysis.interop.hf_io``).

Command line (every output directory is written under a temporary name and renamed when complete;
bad input ends with one line on stderr and exit code 2)::

    python -m mla_analysis.convert from-hf SRC OUT_RUN_DIR     (SRC: an HF dir, a .gguf file or a model name)
    python -m mla_analysis.convert to-hf RUN_DIR OUT_HF_DIR [--arch llama|qwen2|gpt2|deepseek_v3|deepseek_v2]
    python -m mla_analysis.convert mha-to-mla RUN_DIR OUT_RUN_DIR --kv-lora-rank R [--rope-dims N]
        [--strategy high|low|uniform|norm] [--factorization joint|split] [--target auto|mla|mla_coupled_rope]
        [--calib-examples N] [--no-kv-norm]
    python -m mla_analysis.convert merge-kv-heads RUN_DIR OUT_RUN_DIR --kv-heads N   (kv_merge.merge_kv_heads)

A run directory (``model_config.json`` + ``checkpoints/``) is what ``hf_io.load_model`` reads.
``--calib-examples N`` calibrates on the first N training sequences of the run's data config
(``RUN_DIR/results.json``), never on its held-out eval set.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..training.checkpoint import CheckpointError
from ..config import ConfigError
from ..interop.state_dict import EXPORT_ARCHS, to_hf_config
from ..interop.hf_io import (INDEX_FILE, TOKENIZER_FILES, from_hf, has_tokenizer, load_model, load_tokenizer,  # noqa: F401
                    resolve_hf_dir, save_tokenizer, to_hf)  # the library half, importable from here as before
from ..training.results import ResultsError, atomic_write_json, read_json


# --------------------------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the whole usage otherwise)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _write_dir(out: Path, fill: Callable[[Path], None]) -> Path:
    """Fill a sibling temporary directory, then rename it to ``out``: no half-written output on failure."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: already exists and is not an empty directory (not overwritten)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _save_run(run_dir: Path, model: torch.nn.Module, state: dict) -> None:
    from ..training.checkpoint import save_checkpoint, save_model_config

    save_model_config(run_dir, model.cfg)
    save_checkpoint(run_dir, model, None, step=0, state=state)


def _calibration_ids(run_dir: Path, n: int) -> torch.Tensor:
    """The first n training sequences [n, L] of the run's data config (RUN_DIR/results.json)."""
    from omegaconf import OmegaConf

    from ..data import DataConfig, build_train_batches

    record_path = run_dir / "results.json"
    record = read_json(record_path)
    data = (record.get("config") or {}).get("data") if isinstance(record, dict) else None
    if not isinstance(data, dict):
        raise ResultsError(f"{record_path}: no config.data (needed for --calib-examples)")
    try:
        data_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), data))
    except Exception as e:  # OmegaConf raises several types for unknown keys / wrong types
        raise ResultsError(f"{record_path}: config.data does not fit DataConfig ({type(e).__name__})") from None
    return build_train_batches(data_cfg, n).batch_at(0)[0]


def _cmd_from_hf(args: argparse.Namespace) -> Path:
    src = resolve_hf_dir(args.src)  # a .gguf or a model name -> its cached HF dir
    model = from_hf(src)
    source = args.src if not Path(args.src).exists() else str(Path(args.src).resolve())
    state = {"source": source, "command": "from-hf"}

    def fill(tmp: Path) -> None:
        _save_run(tmp, model, state)
        save_tokenizer(src, tmp)  # a run dir made from a tokenised source carries its tokenizer

    return _write_dir(Path(args.out), fill)


def _cmd_to_hf(args: argparse.Namespace) -> Path:
    if args.arch is not None and args.arch not in EXPORT_ARCHS:
        raise ConfigError(f"--arch={args.arch!r} is invalid (allowed: {', '.join(EXPORT_ARCHS)})")
    model = load_model(resolve_hf_dir(args.run))  # a run or HF dir, a .gguf, a model name
    to_hf_config(model.cfg, args.arch)  # fail on an unexportable config before anything is written
    return _write_dir(Path(args.out), lambda tmp: to_hf(model, tmp, args.arch))


def _cmd_mha_to_mla(args: argparse.Namespace) -> Path:
    from .mla import mha_to_mla

    run = resolve_hf_dir(args.run)
    if args.calib_examples is not None and args.calib_examples <= 0:
        raise ConfigError(f"--calib-examples={args.calib_examples} is invalid (allowed: an integer > 0)")
    model = load_model(run)
    calib = _calibration_ids(run, args.calib_examples) if args.calib_examples else None
    new = mha_to_mla(
        model,
        args.kv_lora_rank,
        rope_dims=args.rope_dims,
        strategy=args.strategy,
        calib=calib,
        factorization=args.factorization,
        target=args.target,
        kv_norm=not args.no_kv_norm,
    )
    info = dict(source=str(run.resolve()), args={k: v for k, v in vars(args).items() if k != "func"})
    info.update(new.conversion_info)

    def fill(tmp: Path) -> None:
        _save_run(tmp, new, {"source": info["source"], "command": "mha-to-mla"})
        atomic_write_json(tmp / "conversion.json", info)

    return _write_dir(Path(args.out), fill)


def _cmd_merge_kv_heads(args: argparse.Namespace) -> Path:
    from .kv_merge import merge_kv_heads

    run = resolve_hf_dir(args.run)
    model = load_model(run)
    new = merge_kv_heads(model, args.kv_heads, key="--kv-heads")  # ConfigError (exit 2) unless kv_heads divides the source's
    info = {"source": str(run.resolve()), "command": "merge-kv-heads", "kv_heads": [model.cfg.kv_heads, args.kv_heads]}

    def fill(tmp: Path) -> None:
        _save_run(tmp, new, {"source": info["source"], "command": "merge-kv-heads"})
        atomic_write_json(tmp / "conversion.json", info)

    return _write_dir(Path(args.out), fill)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m mla_analysis.convert`` argument parser (subcommands from-hf, to-hf, mha-to-mla, merge-kv-heads)."""
    parser = _Parser(prog="python -m mla_analysis.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("from-hf", help="Hugging Face checkpoint dir, .gguf file or model name -> toolkit run dir")
    p.add_argument("src")
    p.add_argument("out")
    p.set_defaults(func=_cmd_from_hf)
    p = sub.add_parser("to-hf", help="toolkit run dir -> Hugging Face checkpoint dir")
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--arch", default=None, help=f"one of {', '.join(EXPORT_ARCHS)} (default: from the config)")
    p.set_defaults(func=_cmd_to_hf)
    p = sub.add_parser("mha-to-mla", help="MHA/GQA/MQA run dir -> MLA run dir by SVD (conversion.mha_to_mla)")
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--kv-lora-rank", type=int, required=True)
    p.add_argument("--rope-dims", type=int, default=None, help="rotary dims kept per head (default: all)")
    p.add_argument("--strategy", default="high", help="high | low | uniform | norm")
    p.add_argument("--factorization", default="joint", help="joint | split")
    p.add_argument("--target", default="auto", help="auto | mla | mla_coupled_rope")
    p.add_argument("--calib-examples", type=int, default=None, help="training sequences for whitening")
    p.add_argument("--no-kv-norm", action="store_true",
                   help="no latent RMSNorm: exact at the source's K/V rank (not exportable as DeepSeek)")
    p.set_defaults(func=_cmd_mha_to_mla)
    p = sub.add_parser("merge-kv-heads", help="MHA/GQA run dir -> fewer K/V heads by mean-pooling (kv_merge.merge_kv_heads)")
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--kv-heads", type=int, required=True, help="K/V heads after merging (a divisor of the source's)")
    p.set_defaults(func=_cmd_merge_kv_heads)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns 0 on success, 2 on bad input (one line on stderr, nothing written)."""
    args = build_parser().parse_args(argv)
    try:
        out = args.func(args)
    except (ValueError, KeyError, OSError) as e:  # ConfigError / CheckpointError / ResultsError are ValueErrors
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {' '.join(msg.split())}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
