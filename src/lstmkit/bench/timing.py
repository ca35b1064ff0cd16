"""Interleaved timing of several candidates, with repeat counts chosen to fit a time budget.

Each repeat times every candidate once, in alternating order (A B, then B A), so that slow
drifts of a shared, noisy machine (another process taking a core, frequency changes) fall on
all candidates alike. A sample is the mean of a few back-to-back calls when one call is too
short to time on its own. Statistics are percentiles over the samples.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Budget:
    """How long to time one configuration in one mode, all candidates together.

    Attributes:
        seconds: the time the timed repeats should take.
        min_repeats: at least this many samples per candidate, whatever the budget.
        max_repeats: at most this many.
        repeats: a fixed sample count that overrides the three above; ``None`` to adapt.
        min_sample_s: calls are batched so that one sample lasts at least this long.
        warmup_s: untimed calls per candidate before timing, for at least this long ...
        warmup_calls: ... and at least this many calls (at least one). The fastest warm-up
            call is the per-call estimate the repeat count comes from.
    """

    seconds: float
    min_repeats: int
    max_repeats: int
    repeats: int | None = None
    min_sample_s: float = 0.01
    warmup_s: float = 0.5
    warmup_calls: int = 2


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one candidate: one value per sample, each the mean of ``calls``."""

    per_call: tuple[float, ...]
    calls: int

    def percentile(self, q: float) -> float:
        """The q-th percentile (0-100), interpolated linearly between samples."""
        return percentile(self.per_call, q)

    @property
    def p20(self) -> float:
        return self.percentile(20)

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p80(self) -> float:
        return self.percentile(80)


def percentile(values: tuple[float, ...] | list[float], q: float) -> float:
    """The q-th percentile (0-100) of ``values``, linear between the nearest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def time_interleaved(
    candidates: dict[str, Callable[[], object]], budget: Budget
) -> dict[str, Timing]:
    """Time every candidate under ``budget``, interleaved; returns a Timing per name."""
    estimates = {
        name: _warm_up(fn, budget.warmup_s, budget.warmup_calls) for name, fn in candidates.items()
    }
    calls = {
        name: max(1, math.ceil(budget.min_sample_s / estimate))
        for name, estimate in estimates.items()
    }
    repeats = budget.repeats
    if repeats is None:
        round_s = sum(calls[name] * estimates[name] for name in candidates)
        repeats = math.ceil(budget.seconds / round_s)
        repeats = min(max(repeats, budget.min_repeats), budget.max_repeats)
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    order = list(candidates)
    # Garbage collection would land on whichever candidate happens to trigger it.
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for name in order:
                samples[name].append(_sample(candidates[name], calls[name]))
            order.reverse()
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: Timing(tuple(samples[name]), calls[name]) for name in candidates}


def _warm_up(fn: Callable[[], object], seconds: float, calls: int) -> float:
    """Call ``fn`` for ``seconds`` and at least ``calls`` times (at least once); the fastest
    call's duration."""
    fastest = math.inf
    deadline = time.perf_counter() + seconds
    done = 0
    while True:
        start = time.perf_counter()
        fn()
        end = time.perf_counter()
        done += 1
        fastest = min(fastest, end - start)
        if end >= deadline and done >= calls:
            return max(fastest, 1e-9)


def _sample(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def sgemm_peak(size: int, repeats: int, dtype: torch.dtype = torch.float32) -> float:
    """``torch.mm`` of two size x size matrices (fp32, or ``dtype``) at the current thread
    count: the median GFLOP/s (2 * size^3 FLOPs per call), timed like the candidates."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    budget = Budget(0.0, repeats, repeats, repeats, warmup_s=0.0, warmup_calls=1)
    timing = time_interleaved({"sgemm": lambda: torch.mm(a, b, out=out)}, budget)["sgemm"]
    return 2 * size**3 / timing.p50 / 1e9
