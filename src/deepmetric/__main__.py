"""`python -m deepmetric ...` runs the command line, as the `deepmetric` script does; under
torchrun (`torchrun --nproc-per-node=2 -m deepmetric train ...`) every process runs it."""

from __future__ import annotations

import sys

from deepmetric.cli import main

if __name__ == "__main__":
    sys.exit(main())
