import sys

from bcseg.cli import main

sys.exit(main())
