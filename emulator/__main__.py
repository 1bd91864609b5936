"""`python -m emulator`: see emulator/cli.py."""

import sys

from emulator.cli import main

if __name__ == "__main__":
    sys.exit(main())
