import sys

from lstmkit.bench.runner import main

sys.exit(main())
