"""lstmkit's benchmark runner, the same as ``lstmkit bench``: see ``--help``."""

import sys

from lstmkit.bench.runner import main

if __name__ == "__main__":
    sys.exit(main())
