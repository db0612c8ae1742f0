"""``python -m mla_analysis.report``, as documented: the code is ``mla_analysis.analysis.report`` (old imports keep working)."""

import sys

from .analysis.report import *  # noqa: F401,F403  (its public names, importable from here as before)
from .analysis.report import main

if __name__ == "__main__":
    sys.exit(main())
