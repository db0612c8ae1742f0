"""Lazy exports of a subpackage: its public names, imported from their modules on first use.

Importing one submodule (or ``import mla_analysis``) then does not import the whole stage (torch models,
transformers, matplotlib); the names stay importable as ``from mla_analysis.<stage> import name``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable, Mapping, Sequence


def lazy_exports(package: str, exports: Mapping[str, Sequence[str]]) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for ``package``, from {submodule (relative): names it exports}."""
    where = {name: module for module, names in exports.items() for name in names}
    public = sorted(where)

    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(import_module(f"{package}.{where[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(public) | set(vars(import_module(package))))

    return __getattr__, __dir__, public
