"""The package's import graph, read from the source with ``ast`` (imports inside functions count too).

A lazy import that breaks a cycle at run time is still a cycle in the design, so every ``import`` and
``from ... import`` anywhere in a module is an edge. The graph must have no cycle, the config modules
(``mla_analysis.config``) must import nothing else of the package, and no private name (``_x``) may be
imported from another module.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "mla_analysis"


def _modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package's __init__)."""
    out = {}
    for path in PKG.rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _imports(name: str, path: Path, is_pkg: bool, modules: dict) -> list[tuple[str, str]]:
    """(imported module of this package, imported name or '') for every import statement in the file."""
    package = name if is_pkg else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for a in node.names:  # `from pkg import submodule` is an import of the submodule
                sub = f"{module}.{a.name}"
                found.append((sub, "") if sub in modules else (module, a.name))
    out = []
    for module, what in found:
        while module and module not in modules:
            module = module.rpartition(".")[0]
        if module and module != name:
            out.append((module, what))
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m, _ in _imports(name, p, pkg, modules)} for name, (p, pkg) in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_reader_sees_lazy_imports_and_cycles():
    """The reader itself: an import inside a function is an edge, and a two-module loop is a cycle."""
    graph = _graph()
    assert "mla_analysis.interop.hf_io" in graph["mla_analysis.run"]  # a top-level import
    assert "mla_analysis.analysis.claims" in graph["mla_analysis.run"]  # imported inside _run_job only
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_import_graph_has_no_cycle():
    assert _cycles(_graph()) == []


def test_config_imports_nothing_above_it():
    graph = _graph()
    config = [m for m in graph if m == "mla_analysis.config" or m.startswith("mla_analysis.config.")]
    assert config
    for m in config:
        above = sorted(d for d in graph[m] if not (d == "mla_analysis.config" or d.startswith("mla_analysis.config.")))
        assert above == [], f"{m} imports {above}"


# The layers, bottom first, as the code after the restructuring has them (every edge below was read from it).
# A module may import its own layer and the layers below; a module is in the layer of its longest prefix.
#  - files and measures: records and checkpoints as files (training.results, .checkpoint: no training in them),
#    the cached assets, and the model-agnostic measures (metrics: perplexity, timing): import only config.
#  - interop reads and writes model files (HF, GGUF, run dirs) into models; data loads tokenizers through it.
#  - training and conversion: the trainer, and converting trained models (which trains the healing steps).
#  - evaluation (lm-eval adapter) < probes (the lm_eval probe uses it) < bench (times the probes' code, e.g. the
#    spectra probe) < analysis (claims reuse the bench's decode shapes) < runner < the entry points.
LAYERS = [
    ("package helpers", ("mla_analysis._lazy",)),
    ("config", ("mla_analysis.config",)),
    ("models", ("mla_analysis.models", "mla_analysis.published_configs")),
    ("files and measures", ("mla_analysis.assets", "mla_analysis.metrics", "mla_analysis.training.results",
                            "mla_analysis.training.checkpoint")),
    ("interop", ("mla_analysis.interop",)),
    ("data", ("mla_analysis.data",)),
    ("training", ("mla_analysis.training", "mla_analysis.conversion")),
    ("evaluation", ("mla_analysis.evaluation",)),
    ("probes", ("mla_analysis.probes",)),
    ("bench", ("mla_analysis.bench",)),
    ("analysis", ("mla_analysis.analysis",)),
    ("runner", ("mla_analysis.runner",)),
    ("entry points", ("mla_analysis", "mla_analysis.run", "mla_analysis.cli", "mla_analysis.convert",
                      "mla_analysis.eval", "mla_analysis.figures", "mla_analysis.report")),
]


def _layer(module: str) -> int:
    """The index in LAYERS of a module: the layer of its longest prefix (whole dotted parts)."""
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module}: in no layer of LAYERS"
    return best[0]


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({LAYERS[_layer(m)][0]}) -> {d} ({LAYERS[_layer(d)][0]})"
                  for m, deps in graph.items() for d in deps if _layer(d) > _layer(m))


def test_the_layer_check_sees_an_upward_import():
    graph = {"mla_analysis.data.mixture": {"mla_analysis.evaluation.perplexity"},
             "mla_analysis.training.trainer": {"mla_analysis.training.results", "mla_analysis.data"}}
    assert _upward(graph) == ["mla_analysis.data.mixture (data) -> mla_analysis.evaluation.perplexity (evaluation)"]
    assert _layer("mla_analysis.training.results") < _layer("mla_analysis.interop.hf_io") < _layer("mla_analysis.data")


def test_every_import_goes_down_the_layers():
    """Imports inside functions count: a lazy import is still an edge of the design."""
    assert _upward(_graph()) == []


def test_models_import_only_config_and_models():
    graph = _graph()
    for m in (m for m in graph if m.startswith("mla_analysis.models")):
        bad = sorted(d for d in graph[m] if not d.startswith(("mla_analysis.models", "mla_analysis.config")))
        assert bad == [], f"{m} imports {bad}"


def test_no_private_name_is_imported_from_another_module():
    modules = _modules()
    bad = [f"{name}: {m}.{what}" for name, (p, pkg) in modules.items()
           for m, what in _imports(name, p, pkg, modules) if what.startswith("_") and not what.startswith("__")]
    assert bad == []


def test_every_subpackage_says_what_it_owns():
    for init in sorted(PKG.rglob("__init__.py")):
        if "__pycache__" in init.parts:
            continue
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 10, f"{init.relative_to(PKG.parent)}: no module docstring"


# the package root: the entry points and the cached assets; everything else lives in a subpackage of its stage
ROOT_MODULES = {"__init__", "run", "cli", "assets", "_lazy"}  # _lazy: the subpackages' lazy exports
SHIMS = {"convert", "eval", "figures", "report"}  # `python -m mla_analysis.<x>` as documented
SUBPACKAGES = {"config", "models", "metrics", "data", "training", "interop", "conversion", "evaluation", "probes", "bench",
               "analysis", "runner", "published_configs"}


def test_the_root_holds_only_entry_points_and_shims():
    modules = {p.stem for p in PKG.glob("*.py")}
    assert modules == ROOT_MODULES | SHIMS
    packages = {p.parent.name for p in PKG.glob("*/__init__.py")}
    assert packages == SUBPACKAGES


def test_a_shim_only_forwards_to_its_module():
    """Each shim is a few lines: its docstring, imports of one module of a subpackage, and the __main__ call."""
    modules = _modules()
    for name in sorted(SHIMS):
        path = PKG / f"{name}.py"
        tree = ast.parse(path.read_text())
        targets = {m for m, _ in _imports(f"mla_analysis.{name}", path, False, modules)}
        assert len(targets) == 1 and next(iter(targets)).count(".") == 2, (name, targets)
        assert len(path.read_text().splitlines()) <= 12, name
        assert not [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))], name


def test_every_exported_name_of_every_package_resolves():
    """Each package's ``__all__`` (lazy ones through ``_lazy.lazy_exports``) names objects that exist, and dir() lists them."""
    import importlib

    packages = sorted({".".join(p.relative_to(PKG.parent).parts[:-1]) for p in PKG.rglob("__init__.py")
                       if "__pycache__" not in p.parts})
    lazy = 0
    for name in packages:
        module = importlib.import_module(name)
        missing = [export for export in getattr(module, "__all__", []) if not hasattr(module, export)]
        assert missing == [], f"{name}: {missing}"
        lazy += "lazy_exports" in vars(module)
        assert set(getattr(module, "__all__", [])) <= set(dir(module)), name
    assert lazy >= 7  # the root and analysis, conversion, evaluation, interop, runner, training


def test_no_test_module_imports_another():
    """Shared constants and helpers live in tests/helpers.py and tests/conftest.py, not in a test module."""
    tests = PKG.parent / "tests"
    bad = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module or ''}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(part.startswith("test_") for n in names for part in n.split(".")):
                bad.append(f"{path.relative_to(tests)}:{node.lineno}")
    assert bad == []
