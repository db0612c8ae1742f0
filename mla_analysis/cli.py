"""The ``mla-analysis`` console script: one command, a subcommand per stage of the pipeline.

``mla-analysis run|report|figures|claims|eval|convert|bench ARGS`` is ``python -m mla_analysis.<x> ARGS``
(``claims`` is ``run +experiment=claims ARGS``); each dispatches to that module's own entry point, so both
forms take the same arguments and exit with the same codes. A first argument that is not a subcommand
(``mla-analysis model=mla``) is a ``run``, as the console script was before it had subcommands.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Optional, Sequence

# subcommand -> (module, what it does); the module's main(argv) (run: cli()) does the work
COMMANDS = {
    "run": ("mla_analysis.run", "train / convert / probe one job or a sweep (Hydra overrides)"),
    "report": ("mla_analysis.analysis.report", "comparison tables from run or sweep directories"),
    "figures": ("mla_analysis.analysis.figures", "figures from run or sweep directories"),
    "claims": ("mla_analysis.run", "the claims audit: run +experiment=claims (CLAIMS.md)"),
    "eval": ("mla_analysis.evaluation.cli", "lm-eval tasks on a run or Hugging Face directory"),
    "convert": ("mla_analysis.conversion.cli", "from-hf / to-hf / mha-to-mla conversions"),
    "bench": ("mla_analysis.bench", "speed benchmarks as side-by-side ratios (BENCHMARKS.md)"),
}


def usage() -> str:
    """The top-level help text: one line per subcommand."""
    width = max(map(len, COMMANDS))
    lines = ["usage: mla-analysis COMMAND [ARGS...]   (mla-analysis COMMAND --help for its arguments)", "",
             "commands:"]
    lines += [f"  {name:{width}s}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def _hydra_run(prefix: Sequence[str]) -> Callable[[list[str]], int]:
    def go(argv: list[str]) -> int:
        from .run import cli

        sys.argv = [sys.argv[0], *prefix, *argv]  # Hydra reads its overrides from sys.argv
        cli()
        return 0

    return go


def _module_main(module: str) -> Callable[[list[str]], int]:
    def go(argv: list[str]) -> int:
        rc = importlib.import_module(module).main(argv)
        return rc if isinstance(rc, int) else 0  # bench.main returns its results

    return go


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Dispatch ``mla-analysis COMMAND ARGS`` to the module that owns COMMAND; returns its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name = argv[0]
    if name not in COMMANDS:
        if "=" not in name and not name.startswith("-"):  # a Hydra override has '=', a Hydra flag a '-'
            print(f"error: unknown command {name!r} (allowed: {', '.join(COMMANDS)})", file=sys.stderr)
            return 2
        return _hydra_run(())(argv)  # overrides without a subcommand: a run
    if name == "run":
        go = _hydra_run(())
    elif name == "claims":
        go = _hydra_run(("+experiment=claims",))
    else:
        go = _module_main(COMMANDS[name][0])
    return go(argv[1:])


def console() -> None:
    """Console-script entry (``mla-analysis``)."""
    sys.exit(main())


if __name__ == "__main__":
    console()
