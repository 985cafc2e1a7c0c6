"""``python -m dispersive`` and ``torchrun -m dispersive`` enter the command line here."""

import sys

from dispersive.cli import main

if __name__ == "__main__":
    sys.exit(main())
