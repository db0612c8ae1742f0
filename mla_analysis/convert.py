"""Import from / export to Hugging Face checkpoint directories (config.json + safetensors).

``from_hf(path)`` reads DeepseekV2/V3, Llama and Mistral checkpoints without executing any code
from the directory (no ``trust_remote_code``; weights through safetensors only).
``to_hf(model, out_dir)`` writes a directory ``transformers.AutoModelForCausalLM`` loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import CheckpointError
from .config import ConfigError
from .hf import from_hf_config, state_dict_from_hf, state_dict_to_hf, to_hf_config
from .results import atomic_write_text


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


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files (pickled .bin checkpoints are not loaded)")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # safetensors raises several types for damaged files
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from None
    return sd


def from_hf(path: str | os.PathLike) -> torch.nn.Module:
    """Load a local Hugging Face checkpoint directory into the toolkit's Transformer (fp32)."""
    from .models.transformer import Transformer

    path = Path(path)
    cfg = from_hf_config(_read_hf_config(path))
    model = Transformer(cfg)
    sd = {k: v.float() for k, v in state_dict_from_hf(cfg, _read_hf_weights(path)).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def to_hf(model: torch.nn.Module, out_dir: str | os.PathLike, arch: str | None = None) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory (DeepseekV3/V2 for MLA, Llama for MHA/GQA)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    hf_cfg = to_hf_config(cfg, arch)
    sd = state_dict_to_hf(cfg, model.state_dict(), arch or hf_cfg.model_type)
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    tmp = out / ".model.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    atomic_write_text(out / "config.json", hf_cfg.to_json_string())
    return out
