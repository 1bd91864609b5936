"""`python -m tpicore` == `tpi`."""

import sys

from tpicore.cli import main

if __name__ == "__main__":
    sys.exit(main())
