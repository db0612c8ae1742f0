"""``python -m mla_analysis.bench``: the benchmarks' command line (``mla_analysis.bench.cli``)."""

from . import main

main()
