"""Register ``model="mla_analysis"`` with lm-eval without importing lm-eval (``import mla_analysis`` stays cheap).

Importing ``lm_eval.api.registry`` costs tens of milliseconds (it pulls in the ``lm_eval`` package), so
``mla_analysis/__init__.py`` only calls :func:`install`: when lm-eval is already imported the lazy entry is
added at once, otherwise a one-shot import hook adds it right after ``lm_eval.api.registry`` executes.
The entry is lm-eval's own lazy placeholder (``"module:Class"``): the adapter module
(``mla_analysis.evaluation.lm_eval_model``, which imports torch and lm-eval) loads only when lm-eval asks for the model.
"""

from __future__ import annotations

import sys

MODEL_NAME = "mla_analysis"
TARGET = "mla_analysis.evaluation.lm_eval_model:MLAnalysisLM"
_REGISTRY = "lm_eval.api.registry"


def register(registry_module) -> None:
    """Add the lazy ``mla_analysis`` entry to lm-eval's model registry (lm-eval >= 0.4.9 Registry API)."""
    reg = getattr(registry_module, "model_registry", None)
    if reg is None or not hasattr(reg, "register") or MODEL_NAME in reg:
        return  # older lm-eval: `import mla_analysis.evaluation.lm_eval_model` registers the class directly
    # get_model() imports lm_eval.models (hf, vllm, ...) only while the registry is empty; our entry
    # would make it non-empty, so load lm-eval's own (lazy, cheap) entries first
    import lm_eval.models  # noqa: F401

    reg.register(MODEL_NAME, target=TARGET)


class _Loader:
    """Wraps the registry module's loader: run it, then register (other attributes go to the real loader)."""

    def __init__(self, inner, finder: "_Finder"):
        self._inner, self._finder = inner, finder

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module) -> None:
        self._inner.exec_module(module)
        self._finder.remove()
        try:
            register(module)
        except Exception as e:  # never break `import lm_eval` because of the toolkit's entry
            import warnings

            warnings.warn(f"mla_analysis: could not register with lm-eval ({type(e).__name__}: {e})", stacklevel=2)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class _Finder:
    """A meta-path finder that only intercepts ``lm_eval.api.registry`` and delegates the search."""

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname != _REGISTRY:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader, self)
        return spec

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Register now if lm-eval's registry is loaded, else arm the one-shot import hook (idempotent)."""
    if _REGISTRY in sys.modules:
        register(sys.modules[_REGISTRY])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
