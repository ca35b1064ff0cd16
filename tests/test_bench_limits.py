"""``lstmkit bench --limits``: the probes compile and measure, and the floor is what it says.

Nothing here asserts a speed: the probes run with small budgets to exercise the plumbing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lstmkit.bench import limits, runner
from lstmkit.bench.configs import BenchConfig
from lstmkit.bench.timing import Budget

TWO_SAMPLES = Budget(0.0, min_repeats=2, max_repeats=2, repeats=2, warmup_s=0.0, warmup_calls=1)
TINY_BI = BenchConfig("tiny-bi", 4, 3, 5, 6, num_layers=2, bidirectional=True, proj_size=2)


def test_probes_measure_positive_rates(tmp_path: Path) -> None:
    library = limits.compile_probes(tmp_path)
    small, large = limits.stream(library, 16, 0.001), limits.stream(library, 256, 0.001)
    for s in (small, large):
        assert s.seconds_per_pass > 0 and s.gb_per_s > 0
        assert s.gflops == pytest.approx(s.gb_per_s / 2)  # 16 FLOPs per 32 bytes
    trip = limits.round_trip(library, trips=100)
    assert trip is not None and trip > 0


def test_floor_function_gives_outputs_and_gradients_of_the_right_shapes() -> None:
    x = torch.randn(4, 3, 5)
    params = [torch.randn(2, 3, requires_grad=True), torch.randn(4, requires_grad=True)]
    shapes = ((4, 3, 2), (1, 3, 2))
    out, h = limits._Nothing.apply(shapes, x, *params)
    assert out.shape == (4, 3, 2) and h.shape == (1, 3, 2)
    (out.sum() + h.sum()).backward()
    assert [p.grad.shape for p in params] == [p.shape for p in params]
    assert x.grad is None


def test_floor_runs_the_configs_shapes() -> None:
    f = limits.floor(TINY_BI, TWO_SAMPLES)
    assert f.config == "tiny-bi" and f.floor_s > 0 and f.torch_s > 0
    assert f.cap == pytest.approx(f.torch_s / f.floor_s)


def test_cli_limits_reports_every_probe(capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.main(["--limits", "--shape", "4,3,5,6,bi", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    for kb in limits.STREAM_KB:
        assert f"{kb:>5} KB buffer:" in out
    assert "round trip between two threads" in out
    assert "autograd floor, 4,3,5,6,bi training step:" in out
