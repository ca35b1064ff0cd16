"""``lstmkit bench --limits``: the probes compile and measure, and the floor is what it says.

Nothing here asserts a speed: the probes run with small budgets to exercise the plumbing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lstmkit.backends.cpu import machine
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
    assert f.one_step_s > 0 and f.torch_inference_s > 0
    assert f.cap == pytest.approx(f.torch_s / f.floor_s)


def test_cli_limits_reports_every_probe(capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.main(["--limits", "--shape", "4,3,5,6,bi", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    for kb in limits.STREAM_KB:
        assert f"{kb:>5} KB buffer:" in out
    assert "round trip between two threads" in out
    assert "4,3,5,6,bi training: autograd floor" in out
    assert "4,3,5,6,bi inference: lstmkit on one step" in out


def test_step_bound_reads_w_hh_at_the_rate_of_the_level_that_holds_it() -> None:
    l1, l2 = limits.Stream(24, 24 * 1024 / 100e9, 32), limits.Stream(256, 256 * 1024 / 50e9, 32)
    streams = {24: l1, 256: l2}
    sensor = BenchConfig("sensor", 1000, 1, 8, 32)  # W_hh 4*4*32*32 = 16 KB: in the 24 KB level
    bound = limits.step_bound(sensor, streams, trip=100e-9)
    assert bound is not None and bound.w_hh_bytes == 16 * 1024
    assert bound.one_core_s == pytest.approx(16 * 1024 / 100e9)
    assert bound.two_cores_s == pytest.approx(8 * 1024 / 100e9 + 50e-9)
    assert bound.step_s == min(bound.one_core_s, bound.two_cores_s)
    assert bound.projection_s == pytest.approx(8 * 32 * 8 * 1000 / (2 * l1.gflops * 1e9))
    big = BenchConfig("big", 10, 1, 8, 128)  # 256 KB: the 256 KB level, halves too
    assert limits.step_bound(big, streams, None).one_core_s == pytest.approx(256 * 1024 / 50e9)
    assert limits.step_bound(big, streams, None).two_cores_s is None
    assert limits.step_bound(TINY_BI, streams, trip=None) is None


def test_probes_are_built_for_the_kernels_tier(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for tier in machine.TIERS:
        if machine.machine().runs(tier) is not None:
            continue  # this CPU cannot execute it: nothing to probe
        monkeypatch.setenv("LSTMKIT_CPU_TARGET", tier.name)
        (tmp_path / tier.name).mkdir()
        library = limits.compile_probes(tmp_path / tier.name)
        assert library.lk_vector_bytes() == tier.vector_bytes
