"""Put this checkout's library (``src/``) first on ``sys.path`` for a rule script.

Snakemake adds the script's own folder to ``sys.path``, so ``import _library`` works in every
rule script, locally, inside a conda env and in a cluster job; the library then comes from the
same checkout as the Snakefile, whatever else is installed.
"""

import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")
if sys.path[:1] != [SRC]:
    sys.path.insert(0, SRC)
