"""Hugging Face checkpoint directories on disk: read (``from_hf``), write (``to_hf``), tokenizers, ``load_model``.

``from_hf(path)`` reads DeepseekV2/V3, Llama, Mistral, Qwen2 and GPT-2 checkpoints as ``save_pretrained``
writes them (per-expert DeepSeek keys, sharded with ``model.safetensors.index.json``, tied embeddings,
bf16/fp16 files loaded as fp32) without executing any code from the directory (no ``trust_remote_code``;
weights through safetensors only). ``path`` may also be a ``.gguf`` file or a named model
(``smollm2-135m``): ``resolve_hf_dir`` turns it into a cached HF directory (``mla_analysis.interop.gguf``).
``to_hf(model, out_dir)`` writes the directory ``save_pretrained`` would, which
``transformers.AutoModelForCausalLM`` loads. ``load_model`` takes any of these or a run directory
(``mla_analysis.training.checkpoint``). The config and weight-name mapping is ``mla_analysis.interop.state_dict``; the command line
is ``mla_analysis.conversion.cli``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..training.checkpoint import MODEL_CONFIG_FILE, CKPT_DIR, CheckpointError, latest_checkpoint, load_checkpoint
from ..config import ConfigError, ModelConfig
from .state_dict import from_hf_config, state_dict_from_hf, state_dict_to_hf, to_hf_config
from ..training.results import atomic_write_text, read_json

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
    from ..models.transformer import Transformer

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
    from ..assets import NAMED_MODELS, resolve_named_model
    from .gguf import hf_dir_from_gguf

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


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model of a run directory (its last checkpoint), a Hugging Face checkpoint dir, a .gguf file or a model name."""
    from ..models.transformer import Transformer

    path = Path(path)
    if (path / MODEL_CONFIG_FILE).exists():
        cfg = ModelConfig.from_dict(read_json(path / MODEL_CONFIG_FILE))
        model = Transformer(cfg)
        folder = latest_checkpoint(path)
        if folder is None:
            raise CheckpointError(f"{path / CKPT_DIR / 'LATEST'}: run has no checkpoint")
        load_checkpoint(folder, model)
        return model.to(device).eval()
    hf_dir = resolve_hf_dir(path)  # a .gguf file or a named model -> its cached HF dir
    if (hf_dir / "config.json").exists():
        return from_hf(hf_dir).to(device).eval()
    raise CheckpointError(f"{path}: neither a run directory ({MODEL_CONFIG_FILE}) nor a Hugging Face checkpoint (config.json)")
