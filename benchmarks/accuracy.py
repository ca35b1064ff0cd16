"""float32 accuracy of lstmkit against torch.nn.LSTM's own, over the corpus of tests/accuracy.py:
per kind of quantity, the median and worst ratio of the errors (see that module's docstring).
``python benchmarks/accuracy.py --cases 4600``; ``--help`` for the options."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from accuracy import main

if __name__ == "__main__":
    sys.exit(main())
