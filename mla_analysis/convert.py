"""``python -m mla_analysis.convert``, as documented: the code is ``mla_analysis.conversion.cli`` (old imports keep working)."""

import sys

from .conversion.cli import *  # noqa: F401,F403  (its public names, importable from here as before)
from .conversion.cli import main

if __name__ == "__main__":
    sys.exit(main())
