"""``python -m mla_analysis.figures``, as documented: the code is ``mla_analysis.analysis.figures`` (old imports keep working)."""

import sys

from .analysis.figures import *  # noqa: F401,F403  (its public names, importable from here as before)
from .analysis.figures import main

if __name__ == "__main__":
    sys.exit(main())
