"""GGUF files as Hugging Face checkpoint directories, dequantised once into the cache root.

transformers reads a GGUF file (``from_pretrained(dir, gguf_file=name)``, through the ``gguf`` package)
and dequantises its weights to fp32, but that takes ~30 s (most of it converting the tokenizer) and its
result refuses ``save_pretrained``. ``hf_dir_from_gguf`` does it once per file and keeps the result as a
normal local HF directory under ``<cache root>/gguf/<sha256 of the file>/``: ``model.safetensors`` (the
state dict, tied ``lm_head.weight`` left out), ``config.json`` (no ``quantization_config``), the
tokenizer as ``save_pretrained`` writes it, and ``gguf_source.json``. The directory is built under a
temporary name and a file lock (``assets.build_dir``), so two jobs asking at once build it once and a
failure leaves nothing behind. A corrupt or truncated file, or an architecture the toolkit does not
import, is refused (one line naming the file) before anything is written.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from ..assets import build_dir, cache_root, file_digest
from ..training.checkpoint import CheckpointError
from ..config import ConfigError
from ..training.results import atomic_write_json

# GGUF ``general.architecture`` values whose transformers model the toolkit imports (hf.IMPORT_ARCHS);
# llama.cpp writes Mistral models as "llama" (transformers renames them by the model name)
GGUF_ARCHS = ("llama", "mistral", "qwen2", "gpt2")
GGUF_CACHE = "gguf"


@functools.lru_cache(maxsize=32)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return file_digest(path)  # size and mtime key the memo: a rewritten file is hashed again


def gguf_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a GGUF file (its cache address), computed once per process per file version."""
    st = os.stat(path)
    return _digest(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def gguf_architecture(path: str | os.PathLike) -> tuple[str, bool]:
    """(``general.architecture``, whether it carries a tokenizer) of a GGUF file; CheckpointError if unreadable."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))  # parses every header and tensor extent: truncation fails here
        arch = reader.fields["general.architecture"].contents()
    except KeyError:
        raise CheckpointError(f"{path}: GGUF file without general.architecture") from None
    except (ValueError, OSError, IndexError, TypeError) as e:  # numpy / struct errors on damaged bytes
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file ({' '.join(str(e).split())[:160]})") from None
    return str(arch), "tokenizer.ggml.model" in reader.fields


def hf_dir_from_gguf(path: str | os.PathLike) -> Path:
    """The cached HF directory of a GGUF file (model fp32, config, tokenizer), converting it on first use."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    target = cache_root() / GGUF_CACHE / gguf_digest(path)
    if target.is_dir():
        return target
    arch, has_tok = gguf_architecture(path)  # refuse a bad file before the slow load and before any cache entry
    if arch not in GGUF_ARCHS:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is unsupported (allowed: {', '.join(GGUF_ARCHS)})")

    def fill(tmp: Path) -> None:
        import torch
        import transformers
        from safetensors.torch import save_file

        where = dict(gguf_file=path.name, local_files_only=True)
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **where)
            tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), **where) if has_tok else None
        except (ValueError, OSError, KeyError, RuntimeError, NotImplementedError, TypeError) as e:
            raise CheckpointError(f"{path}: transformers cannot load it ({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None
        config = model.config
        sd = model.state_dict()
        if getattr(config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)  # the same tensor as the input embedding (safetensors refuses aliases)
        save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights are dequantised: a plain fp32 checkpoint now
        config.dtype = "float32"
        config.save_pretrained(str(tmp))
        if tok is not None:
            tok.save_pretrained(str(tmp))
        atomic_write_json(tmp / "gguf_source.json", {"file": str(path.resolve()), "sha256": target.name, "architecture": arch})

    return build_dir(target, fill)
