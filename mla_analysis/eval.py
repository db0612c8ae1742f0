"""``python -m mla_analysis.eval``, as documented: the code is ``mla_analysis.evaluation.cli`` (old imports keep working)."""

import sys

from .evaluation.cli import *  # noqa: F401,F403  (its public names, importable from here as before)
from .evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
