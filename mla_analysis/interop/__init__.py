"""Interoperability with other formats: Hugging Face checkpoint directories and GGUF files.

``hf_io`` reads and writes model directories as ``save_pretrained`` writes them (``from_hf``, ``to_hf``,
``load_model`` for any model source: run dir, HF dir, ``.gguf`` file or a named model); ``state_dict``
maps configs and weight names between this toolkit and the DeepseekV2/V3, Llama, Qwen2, Mistral and GPT-2
formats; ``gguf`` dequantises a GGUF file once into a cached HF directory. The command line is
``mla_analysis.conversion.cli`` (``python -m mla_analysis.convert``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:  # the names below, for readers and type checkers; imported on first use
    from .hf_io import (INDEX_FILE, TOKENIZER_FILES, from_hf, to_hf, load_model, resolve_hf_dir, has_tokenizer,
        load_tokenizer, save_tokenizer)
    from .state_dict import (EXPORT_ARCHS, IMPORT_ARCHS, to_hf_config, from_hf_config, state_dict_from_hf,
        state_dict_to_hf)
    from .gguf import hf_dir_from_gguf

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "hf_io": ("INDEX_FILE", "TOKENIZER_FILES", "from_hf", "to_hf", "load_model", "model_config_of", "resolve_hf_dir", "has_tokenizer",
        "load_tokenizer", "save_tokenizer"),
    "state_dict": ("EXPORT_ARCHS", "IMPORT_ARCHS", "to_hf_config", "from_hf_config", "state_dict_from_hf",
        "state_dict_to_hf"),
    "gguf": ("hf_dir_from_gguf",),
})
