"""Run the command line as ``python -m bcseg.cli``, which ``torchrun`` needs."""

import sys

from bcseg.cli import main

sys.exit(main())
