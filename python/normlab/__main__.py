"""Command line: ``python -m normlab bench [--quick] [--json FILE] [--threads N]``."""

import sys

from .bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
