"""``python -m lstmkit.bench``: the same as ``lstmkit bench``."""

import sys

from lstmkit.bench.runner import main

sys.exit(main())
