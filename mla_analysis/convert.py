"""Import from / export to Hugging Face checkpoint directories (config.json + safetensors), and a CLI.

``from_hf(path)`` reads DeepseekV2/V3, Llama, Mistral, Qwen2 and GPT-2 checkpoints as ``save_pretrained``
writes them (per-expert DeepSeek keys, sharded with ``model.safetensors.index.json``, tied embeddings,
bf16/fp16 files loaded as fp32) without executing any code from the directory (no ``trust_remote_code``;
weights through safetensors only). ``path`` may also be a ``.gguf`` file or a named model
(``smollm2-135m``): ``resolve_hf_dir`` turns it into a cached HF directory (``mla_analysis.gguf_import``).
``to_hf(model, out_dir)`` writes the directory ``save_pretrained`` would, which
``transformers.AutoModelForCausalLM`` loads.

Command line (every output directory is written under a temporary name and renamed when complete;
bad input ends with one line on stderr and exit code 2)::

    python -m mla_analysis.convert from-hf SRC OUT_RUN_DIR     (SRC: an HF dir, a .gguf file or a model name)
    python -m mla_analysis.convert to-hf RUN_DIR OUT_HF_DIR [--arch llama|qwen2|gpt2|deepseek_v3|deepseek_v2]
    python -m mla_analysis.convert mha-to-mla RUN_DIR OUT_RUN_DIR --kv-lora-rank R [--rope-dims N]
        [--strategy high|low|uniform|norm] [--factorization joint|split] [--target auto|mla|mla_coupled_rope]
        [--calib-examples N]

A run directory (``model_config.json`` + ``checkpoints/``) is what ``checkpoint.load_model`` reads.
``--calib-examples N`` calibrates on the first N training sequences of the run's data config
(``RUN_DIR/results.json``), never on its held-out eval set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from safetensors.torch import load_file

from .checkpoint import CheckpointError
from .config import ConfigError
from .hf import EXPORT_ARCHS, from_hf_config, state_dict_from_hf, state_dict_to_hf, to_hf_config
from .results import ResultsError, atomic_write_json, atomic_write_text, read_json

INDEX_FILE = "model.safetensors.index.json"
# what AutoTokenizer.save_pretrained writes (a fast tokenizer's tokenizer.json, or a slow one's files)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _read_hf_config(path: Path):
    import transformers

    cfg_path = path / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{cfg_path}: file not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: corrupt JSON ({e})") from None
    model_type = raw.get("model_type")
    try:
        return transformers.AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if k != "model_type"})
    except (ValueError, KeyError) as e:
        raise ConfigError(f"{cfg_path}: model_type={model_type!r} is not supported ({e})") from None


def _load_safetensors(f: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors raises several types for damaged files
        raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from None


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint dir: the shards its ``model.safetensors.index.json`` names, else every *.safetensors."""
    index = path / INDEX_FILE
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: shard named by {index.name} not found")
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (pickled .bin checkpoints are not loaded)")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(_load_safetensors(f))
    return sd


def from_hf(path: str | os.PathLike) -> torch.nn.Module:
    """Load a Hugging Face checkpoint dir, a .gguf file or a named model into the toolkit's Transformer (fp32)."""
    from .models.transformer import Transformer

    path = resolve_hf_dir(path)
    cfg = from_hf_config(_read_hf_config(path))
    model = Transformer(cfg)
    try:
        hf_sd = state_dict_from_hf(cfg, _read_hf_weights(path))
    except KeyError as e:
        raise CheckpointError(f"{path}: {e.args[0] if e.args else e}") from None
    sd = {k: v.float() for k, v in hf_sd.items()}  # bf16 / fp16 files load as fp32
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def resolve_hf_dir(path: str | os.PathLike) -> Path:
    """A local checkpoint dir for ``path``: an HF or run dir as is, a .gguf -> its cached HF dir, a model name -> resolved."""
    from .assets import NAMED_MODELS, resolve_named_model
    from .gguf_import import hf_dir_from_gguf

    p = Path(path)
    if not p.exists():
        named = resolve_named_model(str(path))  # AssetError (one line, how to install) if its package is missing
        if named is None:
            raise CheckpointError(
                f"{p}: not found (a Hugging Face or run directory, a .gguf file, or one of: {', '.join(NAMED_MODELS)})"
            )
        p = named
    if p.is_file() and p.suffix.lower() == ".gguf":
        return hf_dir_from_gguf(p)
    if not p.is_dir():
        raise CheckpointError(f"{p}: neither a checkpoint directory nor a .gguf file")
    return p


def has_tokenizer(hf_dir: str | os.PathLike) -> bool:
    """Whether a checkpoint or run dir holds a saved tokenizer (files as ``save_pretrained`` writes them)."""
    return any((Path(hf_dir) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved with a checkpoint, run dir, .gguf file or named model (``transformers.AutoTokenizer``)."""
    import transformers

    hf_dir = resolve_hf_dir(path)
    if not has_tokenizer(hf_dir):
        raise CheckpointError(f"{hf_dir}: no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{hf_dir}: unreadable tokenizer ({' '.join(str(e).split())[:160]})") from None


def save_tokenizer(src: str | os.PathLike, out_dir: str | os.PathLike) -> bool:
    """Save the tokenizer of ``src`` (checkpoint, run dir, .gguf, model name) into ``out_dir``; False if it has none."""
    hf_dir = resolve_hf_dir(src)
    if not has_tokenizer(hf_dir):
        return False
    load_tokenizer(hf_dir).save_pretrained(str(out_dir))
    return True


def to_hf(
    model: torch.nn.Module, out_dir: str | os.PathLike, arch: str | None = None, max_shard_size: int | str = "50GB"
) -> Path:
    """Write ``model`` as transformers' ``save_pretrained`` would (DeepseekV3/V2, Llama, Qwen2 or GPT-2; see hf.default_arch).

    The layout is the on-disk one (per-expert keys, tied ``lm_head`` left out, shards over
    ``max_shard_size`` with ``model.safetensors.index.json``, transformers' default size).
    """
    from huggingface_hub import save_torch_state_dict
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = Path(out_dir)
    cfg = model.cfg
    hf_cfg = to_hf_config(cfg, arch)
    hf_cfg.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[hf_cfg.model_type]]
    hf_cfg.dtype = "float32"
    sd = state_dict_to_hf(cfg, model.state_dict(), arch or hf_cfg.model_type, layout="checkpoint")
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    out.mkdir(parents=True, exist_ok=True)
    # shards go to a temporary folder first, then into place: a crash leaves no index naming absent shards
    tmp = out / f".weights.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_torch_state_dict(
            {k: v.detach().cpu().contiguous() for k, v in sd.items()}, tmp, max_shard_size=max_shard_size,
            metadata={"format": "pt"},
        )
        for old in list(out.glob("model*.safetensors")) + [out / INDEX_FILE]:
            old.unlink(missing_ok=True)  # a previous export's shards must not mix with these
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == INDEX_FILE):  # the index last
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(out / "config.json", hf_cfg.to_json_string())
    return out


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
    from .checkpoint import save_checkpoint, save_model_config

    save_model_config(run_dir, model.cfg)
    save_checkpoint(run_dir, model, None, step=0, state=state)


def _calibration_ids(run_dir: Path, n: int) -> torch.Tensor:
    """The first n training sequences [n, L] of the run's data config (RUN_DIR/results.json)."""
    from omegaconf import OmegaConf

    from .data import DataConfig, build_train_batches

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
    from .checkpoint import load_model

    if args.arch is not None and args.arch not in EXPORT_ARCHS:
        raise ConfigError(f"--arch={args.arch!r} is invalid (allowed: {', '.join(EXPORT_ARCHS)})")
    model = load_model(resolve_hf_dir(args.run))  # a run or HF dir, a .gguf, a model name
    to_hf_config(model.cfg, args.arch)  # fail on an unexportable config before anything is written
    return _write_dir(Path(args.out), lambda tmp: to_hf(model, tmp, args.arch))


def _cmd_mha_to_mla(args: argparse.Namespace) -> Path:
    from .checkpoint import load_model
    from .conversion import mha_to_mla

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
    )
    info = dict(source=str(run.resolve()), args={k: v for k, v in vars(args).items() if k != "func"})
    info.update(new.conversion_info)

    def fill(tmp: Path) -> None:
        _save_run(tmp, new, {"source": info["source"], "command": "mha-to-mla"})
        atomic_write_json(tmp / "conversion.json", info)

    return _write_dir(Path(args.out), fill)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m mla_analysis.convert`` argument parser (subcommands from-hf, to-hf, mha-to-mla)."""
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
    p.set_defaults(func=_cmd_mha_to_mla)
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
