"""lstmkit's benchmark runner: ``lstmkit bench``, ``benchmarks/run.py``.

- :mod:`lstmkit.bench.configs`: the grid, ad-hoc shapes and the batch of each configuration;
- :mod:`lstmkit.bench.check`: the correctness check a candidate passes before it is timed;
- :mod:`lstmkit.bench.timing`: interleaved timing under a time budget, and the sgemm peak;
- :mod:`lstmkit.bench.report`: machine, table, CSV and the targets summary;
- :mod:`lstmkit.bench.runner`: the command itself;
- :mod:`lstmkit.bench.variants`: ``lstmkit bench --variants``, each variant next to plain
  lstmkit and the Python loop of :mod:`lstmkit.bench.baselines`, reported by
  :mod:`lstmkit.bench.variants_report`.
"""
