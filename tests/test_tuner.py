"""lstmkit's own GEMM against torch.mm, and the tuner: every candidate it measures gives the
reference's results (the thread and team choices the very same bits), and what it keeps is
read back only where it holds."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lstmkit
from compare import assert_close
from lstmkit import backends
from lstmkit.backends.cpu import library, machine, tuner

DTYPES = [torch.float32, torch.float64]


def lk_gemm(dtype: torch.dtype):
    suffix = "f32" if dtype == torch.float32 else "f64"
    return getattr(library.load().cdll, "lk_gemm_" + suffix)


def operands(trans_a: int, trans_b: int, m: int, n: int, k: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn((k, m) if trans_a else (m, k), generator=g, dtype=dtype)
    b = torch.randn((n, k) if trans_b else (k, n), generator=g, dtype=dtype)
    c = torch.randn(m, n, generator=g, dtype=dtype)
    return a, b, c


# every edge of the blocking: below one register tile, one tile, tiles plus a ragged edge,
# more than one K block, more than one M and N block (KC, MC and NC follow the plan's caches)
SHAPES = [
    (1, 1, 1), (5, 3, 7), (6, 16, 4), (7, 33, 9), (13, 64, 130), (64, 17, 513),
    (200, 96, 300), (97, 1100, 40), (700, 70, 64),
]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("trans", [(0, 0), (1, 0), (0, 1), (1, 1)], ids=lambda t: f"t{t[0]}{t[1]}")
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 0.0), (-0.5, 1.0), (2.0, 0.25)])
def test_own_gemm_matches_torch_mm(
    cpu_tier: str, dtype: torch.dtype, trans: tuple[int, int], alpha: float, beta: float
) -> None:
    entry = lk_gemm(dtype)
    for index, (m, n, k) in enumerate(SHAPES):
        a, b, c = operands(*trans, m, n, k, dtype, index)
        op_a = a.t() if trans[0] else a
        op_b = b.t() if trans[1] else b
        expected = alpha * (op_a.double() @ op_b.double()) + beta * c.double()
        results = []
        for threads in (1, 2):
            out = c.clone()
            tuner.call_gemm(entry, 1, *trans, a, b, out, threads, alpha, beta)
            results.append(out)
        # the error bound of a K-term dot product, against the float64 product
        eps = torch.finfo(dtype).eps
        scale = (op_a.double().abs() @ op_b.double().abs()) * abs(alpha) + abs(beta) * c.abs()
        assert torch.all((results[0].double() - expected).abs() <= 2 * k * eps * scale + 1e-30), (
            m,
            n,
            k,
        )
        assert torch.equal(results[0], results[1]), f"{m}x{n}x{k}: one and two threads differ"


def test_own_gemm_with_beta_zero_ignores_what_c_held(cpu_tier: str) -> None:
    a, b, _ = operands(0, 0, 30, 40, 50, torch.float32, 0)
    c = torch.full((30, 40), float("nan"))
    tuner.call_gemm(lk_gemm(torch.float32), 1, 0, 0, a, b, c, 1)
    assert_close(c, a @ b, "product")


@pytest.fixture
def restored():
    """The loaded library's GEMMs, plan and tuning words restored after the test."""
    before = library.load()
    yield before
    library.configure(
        gemm=before.gemm, plan=before.plan, tuning=before.tuning, narrow_cost=before.narrow_cost
    )


def bidirectional_run(backend: str, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype):
    """Outputs and every gradient of a two-layer bidirectional LSTM through ``backend``."""
    monkeypatch.setenv(backends.BACKEND_ENV, backend)
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(24, 40, num_layers=2, bidirectional=True, dtype=dtype)
    x = torch.randn(9, 6, 24, dtype=dtype, requires_grad=True)
    out, (h, c) = lstm(x)
    assert backends.last_choice().backend == backend
    seeds = [torch.randn_like(t) for t in (out, h, c)]
    grads = torch.autograd.grad((out, h, c), [x, *lstm.parameters()], seeds)
    return [t.detach() for t in (out, h, c, *grads)]


PLANS = {
    "one thread": {"serial_flops": float("inf")},
    "every thread": {"serial_flops": 0.0},
    "a team each": {"serial_flops": 0.0, "one_team": 0.0},
    "one team": {"serial_flops": 0.0, "one_team": 1.0},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_each_plan_candidate_gives_the_same_bits_and_the_reference(
    cpu_tier: str, monkeypatch: pytest.MonkeyPatch, restored, dtype: torch.dtype
) -> None:
    base = machine.plan(machine.machine(), library.load().tier)
    expected = bidirectional_run("reference", monkeypatch, dtype)
    results = {}
    for name, changes in PLANS.items():
        library.configure(plan=dataclasses.replace(base, **changes))
        results[name] = bidirectional_run("cpu", monkeypatch, dtype)
    first = results["one thread"]
    for k, e in enumerate(expected):
        assert_close(first[k], e, f"result {k}", "value" if k < 3 else "grad")
    for name, result in results.items():
        for k, (a, f) in enumerate(zip(result, first)):
            assert torch.equal(a, f), f"{name}: result {k} differs from one thread's"


def test_tune_measures_keeps_and_applies(tmp_path: Path, restored) -> None:
    path = tmp_path / "kernels.so.tune.json"
    lines = []
    tuning, kept = tuner.tune(quick=True, progress=lines.append, path=path)
    assert kept == path and path.is_file()
    assert any("GEMM" in line for line in lines)
    assert set(tuning.gemm) == {"float32", "float64"}
    assert set(tuning.gemm.values()) <= {"own", "blas"}
    if library.blas_found() is None:
        assert set(tuning.gemm.values()) == {"own"}
    else:
        for name, choice in tuning.gemm.items():
            times = tuning.measured[f"gemm {name}"]
            assert choice == min(times, key=times.__getitem__)
    if torch.get_num_threads() >= 2:
        assert tuning.serial_flops is not None and tuning.serial_flops > 0
        assert tuning.one_team is not None
    # the 32-byte kernels' cost, where the tier has them beside wider ones
    has_narrow = bool(library.load().narrow)
    assert (tuning.narrow_cost is not None) is has_narrow
    if has_narrow:
        times = tuning.measured["narrow"]
        assert tuning.narrow_cost == times["narrow"] / times["wide"]
        assert any("32-byte kernels: a lane costs" in line for line in tuning.describe())
    assert library.load().narrow_cost == tuning.narrow_cost
    # applied to the loaded library
    loaded = library.load()
    assert loaded.gemm == tuning.gemm_choice()
    assert loaded.plan == tuning.applied_to(machine.plan(machine.machine(), loaded.tier))
    # and read back as it was written
    again, words = tuner.read(path)
    assert again == tuning and "tuned on this machine" in words


def test_kept_tuning_is_ignored_where_it_does_not_hold(tmp_path: Path, restored) -> None:
    path = tmp_path / "kernels.so.tune.json"
    tuner.tune(quick=True, path=path)
    assert tuner.read(path)[0] is not None
    for field, value, reason in (
        ("cpu", "vendor_id=Other", "on another CPU"),
        ("torch", "0.1", "with torch 0.1"),
        ("threads", torch.get_num_threads() + 1, "threads, not"),
        ("format", 99, "not of this lstmkit"),
    ):
        data = json.loads(path.read_text())
        data[field] = value
        changed = tmp_path / f"{field}.tune.json"
        changed.write_text(json.dumps(data))
        kept, words = tuner.read(changed)
        assert kept is None and reason in words and "ignored" in words
    broken = tmp_path / "broken.tune.json"
    broken.write_text("{")
    assert "unreadable" in tuner.read(broken)[1]
    assert "not tuned" in tuner.read(tmp_path / "missing.tune.json")[1]


def test_tune_show_prints_what_is_kept() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "lstmkit", "tune", "--show"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    loaded = library.load()
    assert str(loaded.path) in shown
    tuning = tuner.stored(loaded.path)[0]
    if tuning is None:
        assert "not tuned" in shown or "ignored" in shown
    else:
        assert "GEMM float32" in shown and tuning.date in shown


def test_the_gemm_can_be_forced_from_the_environment(tmp_path: Path) -> None:
    script = (
        "from lstmkit.backends.cpu import library\n"
        "print(sorted(set(library.load().gemm.values())))\n"
    )
    for choice in ("own", "blas"):
        env = {**__import__("os").environ, library.GEMM_ENV: choice}
        printed = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env
        ).stdout
        assert printed.strip() == f"['{choice}']"


def test_serial_threshold_follows_the_times() -> None:
    """The split that costs least: one thread where it is within a tenth of two, two from where
    they win by more; one noisy size in the middle does not move the split past it."""
    sizes = [1.0, 4.0, 16.0, 64.0, 256.0]
    one = [1.0, 1.0, 1.0, 1.0, 1.0]
    assert tuner.serial_threshold(sizes, one, [2.0, 1.5, 0.6, 0.6, 0.6]) == 8.0
    assert tuner.serial_threshold(sizes, one, [0.5] * 5) == 1.0  # two win everywhere
    assert tuner.serial_threshold(sizes, one, [0.95] * 5) == 512.0  # never by a tenth
    # two win from the second size on, except by 1% at the fourth: the split stays put
    assert tuner.serial_threshold(sizes, one, [1.2, 0.8, 0.8, 0.91, 0.8]) == 2.0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_narrow_kernels_for_an_uneven_split_match_the_reference(
    monkeypatch: pytest.MonkeyPatch, restored, dtype: torch.dtype
) -> None:
    """The candidate narrow_cost chooses: a layer of 100 units (7 wide vectors of float32, 4
    and 3 per thread) in the 32-byte kernels where a narrow lane costs what a wide one does,
    against the reference, values and every gradient."""
    loaded = library.load()
    if not loaded.narrow:
        pytest.skip(f"the {loaded.tier.name} tier has no narrower kernels")
    if torch.get_num_threads() < 2:
        pytest.skip("one thread: every split is even")
    hidden = 100 if dtype == torch.float32 else 50  # 7 and 13 vectors; 7 and 13 for float64
    library.configure(narrow_cost=1.0)
    configured = library.load()
    configured.chosen.pop((dtype, hidden), None)  # chosen again under this cost
    try:
        assert configured.kernels_for(dtype, hidden) is configured.narrow[dtype]
        results = []
        for backend in ("cpu", "reference"):
            monkeypatch.setenv(backends.BACKEND_ENV, backend)
            torch.manual_seed(0)
            lstm = lstmkit.LSTM(30, hidden, dtype=dtype)
            x = torch.randn(6, 70, 30, dtype=dtype, requires_grad=True)
            out, (h, c) = lstm(x)
            seeds = [torch.randn_like(t) for t in (out, h, c)]
            grads = torch.autograd.grad((out, h, c), [x, *lstm.parameters()], seeds)
            results.append([t.detach() for t in (out, h, c, *grads)])
        for k, (a, e) in enumerate(zip(*results, strict=True)):
            assert_close(a, e, f"result {k}", "value" if k < 3 else "grad")
    finally:
        configured.chosen.pop((dtype, hidden), None)
