"""The cpu backend against the reference, directly, and how it is built, chosen and shared."""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor

import lstmkit
from compare import assert_close
from lstmkit import backends, reference
from lstmkit.backends.cpu import BACKEND, build, library
from lstmkit.reference import LayerWeights

DTYPES = [torch.float32, torch.float64]


@dataclass(frozen=True)
class Layer:
    name: str
    steps: int
    batch: int
    inputs: int
    hidden: int
    proj: int = 0
    directions: int = 1
    bias: bool = True
    lengths: tuple[int, ...] = ()
    cells: bool = False


# Batch sizes cover every register tile (1..5 leftover rows, whole tiles of 6), hidden sizes
# full and partial vector blocks, lengths zeros and sequences that end at different steps.
LAYERS = [
    Layer("tiny", 5, 3, 10, 20, directions=2),
    Layer("one-unit", 4, 2, 3, 1),
    Layer("batch-1", 9, 1, 4, 16),
    Layer("batch-13-bi", 6, 13, 5, 17, directions=2),
    Layer("proj-no-bias", 5, 7, 4, 11, proj=5, directions=2, bias=False),
    Layer("lengths", 7, 5, 4, 9, directions=2, lengths=(7, 6, 4, 2, 0)),
    Layer(
        "lengths-proj-cells", 6, 8, 3, 12, proj=7, directions=2, lengths=(6, 6, 5, 3, 3, 1, 0, 0)
    ),
    Layer("all-zero-lengths", 3, 2, 4, 8, directions=2, lengths=(0, 0), cells=True),
    Layer("cells", 5, 6, 5, 40, directions=2, cells=True),
    Layer("long", 300, 2, 3, 8, directions=2, lengths=(300, 170)),
    # products longer than one pass over a weight panel (512 rows): backward's 4H, forward's H
    Layer("panel-passes-backward", 3, 7, 5, 130, directions=2),
    Layer("panel-passes-forward", 2, 3, 4, 520, proj=515),
    # the input's panel (x_t W_ih^T, inside the step) longer than one pass, with lengths
    Layer("panel-passes-input", 3, 8, 600, 24, directions=2, lengths=(3, 3, 2, 1, 1, 1, 0, 0)),
    # fewer rows than a tile and weights past L2 (up to 4 MB here): the input projection of
    # every step before the loop; with lengths, both directions, and a projection at batch 1
    Layer("hoisted-input", 4, 3, 300, 300, directions=2, lengths=(4, 2, 1)),
    Layer("hoisted-input-proj", 3, 1, 260, 400, proj=200, cells=True),
    Layer("threads", 8, 24, 64, 96, directions=1),  # enough work for a team of threads
    Layer("threads-proj", 8, 24, 64, 96, proj=40, directions=1, lengths=(8,) * 20 + (5, 3, 2, 0)),
    # batch 1: weights small enough to be packed, torch's rows with the input projection inside
    # the step, or after a GEMM (float32 and float64 fall on either side of the size limits);
    # partial unit blocks, lengths (zero too), both directions, and a team of two threads
    Layer("batch-1-lengths-bi", 7, 1, 3, 20, directions=2, lengths=(5,)),
    Layer("batch-1-zero-length", 3, 1, 4, 8, lengths=(0,), cells=True),
    Layer("batch-1-fused", 6, 1, 8, 45, directions=2),
    Layer("batch-1-gemm", 5, 1, 70, 37, directions=2, lengths=(4,), cells=True),
    Layer("batch-1-threads", 300, 1, 64, 128),
    # batch 1 on the pair of threads (weights past L1): whole and partial unit blocks, the input
    # projection by halves or inside the step, lengths (zero too), cells, both directions
    Layer("batch-1-pair", 37, 1, 16, 128, cells=True),
    Layer("batch-1-pair-partial", 23, 1, 70, 100, lengths=(17,)),
    Layer("batch-1-pair-zero-length", 4, 1, 70, 100, lengths=(0,), cells=True),
    Layer("batch-1-pair-bi", 9, 1, 16, 128, directions=2, lengths=(6,)),
]
BY_NAME = {layer.name: layer for layer in LAYERS}


def make_layer(layer: Layer, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, list]:
    """x, h0, c0 and the weights of a layer, torch's init, every tensor requiring grad."""
    torch.manual_seed(0)
    module = lstmkit.LSTM(
        layer.inputs,
        layer.hidden,
        bias=layer.bias,
        bidirectional=layer.directions == 2,
        proj_size=layer.proj,
        dtype=dtype,
    )
    weights = module.layer_weights()[0]
    h_size = layer.proj or layer.hidden
    x = torch.randn(layer.steps, layer.batch, layer.inputs, dtype=dtype)
    if layer.lengths:
        valid = torch.arange(layer.steps).unsqueeze(1) < torch.tensor(layer.lengths)
        x = x * valid.unsqueeze(2)
    h0 = torch.randn(layer.directions, layer.batch, h_size, dtype=dtype)
    c0 = torch.randn(layer.directions, layer.batch, layer.hidden, dtype=dtype)
    return x.requires_grad_(), h0.requires_grad_(), c0.requires_grad_(), weights


def run_both(layer: Layer, dtype: torch.dtype) -> None:
    x, h0, c0, weights = make_layer(layer, dtype)
    lengths = torch.tensor(layer.lengths) if layer.lengths else None
    inputs = [x, h0, c0] + [w for d in weights for w in d if w is not None]
    expected = reference.lstm_layer(x, h0, c0, weights, lengths, layer.cells)
    actual = BACKEND.run_layer(x, h0, c0, weights, lengths, layer.cells)
    names = ["output", "h_n", "c_n", "cells"]
    for name, a, e in zip(names, actual, expected):
        assert_close(a, e, name)
    seeds = [torch.randn_like(e) for e in expected]
    grads_expected = torch.autograd.grad(expected, inputs, seeds)
    grads_actual = torch.autograd.grad(actual, inputs, seeds)
    grad_names = ["x", "h0", "c0"] + [
        f"{kind} direction {d}"
        for d, w in enumerate(weights)
        for kind, t in zip(LayerWeights._fields, w)
        if t is not None
    ]
    for name, a, e in zip(grad_names, grads_actual, grads_expected):
        assert_close(a, e, f"grad {name}", "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("layer", LAYERS, ids=lambda c: c.name)
def test_matches_reference(cpu_tier: str, layer: Layer, dtype: torch.dtype) -> None:
    run_both(layer, dtype)


def poison_workspace(dtype: torch.dtype) -> None:
    """A forward and backward on NaN inputs big enough for a 2 MB-page workspace: the
    workspace the process keeps for the next call (lk_workspace_give) is left full of NaN."""
    module = lstmkit.LSTM(64, 256, bidirectional=True, dtype=dtype)
    x = torch.full((60, 24, 64), float("nan"), dtype=dtype, requires_grad=True)
    out, (h, c) = module(x)
    (out.sum() + h.sum() + c.sum()).backward()
    assert torch.isnan(out).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize(
    "name", ["tiny", "lengths-proj-cells", "batch-1-fused", "batch-1-pair", "threads-proj"]
)
def test_kept_workspace_does_not_leak_into_the_next_call(name: str, dtype: torch.dtype) -> None:
    """Workspaces are reused between calls, never cleared: nothing may read what an earlier
    call left there."""
    poison_workspace(dtype)
    run_both(BY_NAME[name], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_kept_workspace_does_not_leak_into_variant_calls(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for variant.c: layer norm and peepholes after a poisoned workspace give the
    same bits as before it (a NaN read from the workspace would spread; against the reference,
    the float32 gradients of this layer, of order 10, differ by their rounding alone by more
    than the table's atol, whichever of the two is closer to float64)."""
    torch.manual_seed(0)
    module = lstmkit.LSTM(6, 10, 2, bidirectional=True, layer_norm=True, peepholes=True)
    module = module.to(dtype)
    x = torch.randn(7, 5, 6, dtype=dtype, requires_grad=True)

    def run(backend: str) -> list[Tensor]:
        monkeypatch.setenv(backends.BACKEND_ENV, backend)
        out, (h, c) = module(x)
        seeds = [
            torch.randn_like(t, generator=torch.Generator().manual_seed(1)) for t in (out, h, c)
        ]
        return [out, h, c, *torch.autograd.grad((out, h, c), [x, *module.parameters()], seeds)]

    expected = run("cpu")
    poison_workspace(dtype)
    for k, (a, e) in enumerate(zip(run("cpu"), expected)):
        assert torch.equal(a, e), f"result {k}: differs after the workspace was poisoned"


@pytest.mark.parametrize(
    "layer",
    [BY_NAME[n] for n in ("tiny", "lengths-proj-cells", "batch-1-gemm")],
    ids=lambda c: c.name,
)
def test_matches_reference_with_each_gemm(cpu_tier: str, layer: Layer, gemm_choice: str) -> None:
    run_both(layer, torch.float64)
    run_both(layer, torch.float32)


def one_and_two_threads(layer: Layer, dtype: torch.dtype = torch.float32) -> list[list[Tensor]]:
    """Outputs and gradients of `layer` run on one thread, then on two (inference outputs
    first, then training outputs and every gradient)."""
    lengths = torch.tensor(layer.lengths) if layer.lengths else None
    results = []
    threads_before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            x, h0, c0, weights = make_layer(layer, dtype)
            with torch.no_grad():
                inferred = BACKEND.run_layer(x, h0, c0, weights, lengths, layer.cells)
            outputs = BACKEND.run_layer(x, h0, c0, weights, lengths, layer.cells)
            params = [w for d in weights for w in d if w is not None]
            seeds = [torch.randn_like(t) for t in outputs]
            grads = torch.autograd.grad(outputs, [x, h0, c0, *params], seeds)
            results.append([t.detach() for t in (*inferred, *outputs, *grads)])
    finally:
        torch.set_num_threads(threads_before)
    return results


@pytest.mark.parametrize(
    "name",
    [
        "threads",
        "hoisted-input",
        "batch-1-threads",
        "batch-1-pair",
        "batch-1-pair-partial",
        "batch-1-pair-bi",
    ],
)
def test_same_bits_on_one_and_two_threads(cpu_tier: str, name: str) -> None:
    """A team of two threads splits the units of each step: the results do not change a bit."""
    one, two = one_and_two_threads(BY_NAME[name])
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.fixture
def late_thread():
    """lk_pair_set_lag: lag(rank, step, micros) makes a thread of the batch-1 pair sleep before
    a step, as if descheduled; switched off after the test."""
    set_lag = library.load().cdll.lk_pair_set_lag
    set_lag.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    set_lag.restype = None
    yield set_lag
    set_lag(-1, 0, 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize(
    ("rank", "step"),
    [(1, 0), (1, 5), (0, 5), (0, 0)],
    ids=["helper-0", "helper-5", "caller-5", "caller-0"],
)
def test_pair_with_a_late_thread(
    cpu_tier: str, late_thread, rank: int, step: int, dtype: torch.dtype
) -> None:
    """When one thread of the pair stops for a while, the other computes its halves too: the
    results are the same bits as on one thread (and the late thread's rewrites change none)."""
    late_thread(rank, step, 2000)
    layer = Layer("late", 30, 1, 70, 100, lengths=(26,), cells=rank == 0)
    one, two = one_and_two_threads(layer, dtype)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    x, h0, c0, weights = make_layer(layer, dtype)
    lengths = torch.tensor(layer.lengths)
    expected = reference.lstm_layer(x, h0, c0, weights, lengths, layer.cells)
    for name, a, e in zip(["output", "h_n", "c_n", "cells"], two, expected):
        assert_close(a, e, name)


def test_inference_keeps_nothing_and_matches_training() -> None:
    x, h0, c0, weights = make_layer(LAYERS[5], torch.float32)
    lengths = torch.tensor(LAYERS[5].lengths)
    trained = BACKEND.run_layer(x, h0, c0, weights, lengths)
    with torch.no_grad():
        inferred = BACKEND.run_layer(x, h0, c0, weights, lengths)
    assert all(t.grad_fn is None for t in inferred)
    for a, e in zip(inferred, trained):
        assert torch.equal(a, e.detach())


def test_second_backward_with_retained_graph() -> None:
    x, h0, c0, weights = make_layer(LAYERS[4], torch.float64)
    out, h_n, c_n = BACKEND.run_layer(x, h0, c0, weights, None)
    loss = out.square().sum() + h_n.sum() + c_n.sum()
    first = torch.autograd.grad(loss, [x, weights[0].weight_hh], retain_graph=True)
    second = torch.autograd.grad(loss, [x, weights[0].weight_hh])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_double_backward_is_the_reference_one() -> None:
    """A graph of the gradient (create_graph=True) is the reference's, so differentiating it
    again gives the reference's second derivatives; last_choice says which ran."""
    x, h0, c0, weights = make_layer(LAYERS[4], torch.float64)
    lengths = torch.tensor([5, 5, 4, 3, 3, 1, 1])

    def second_derivatives(run: object) -> tuple[Tensor, ...]:
        out, h_n, c_n = run(x, h0, c0, weights, lengths)
        loss = out.square().sum() + h_n.sum() + c_n.square().sum()
        grad_x, grad_w = torch.autograd.grad(loss, [x, weights[1].weight_hh], create_graph=True)
        return torch.autograd.grad(grad_x.square().sum() + grad_w.sum(), [x, h0, *weights[0][:2]])

    got = second_derivatives(BACKEND.run_layer)
    assert backends.last_choice().backend == "reference"
    assert "create_graph=True" in str(backends.last_choice())
    for index, (a, b) in enumerate(zip(got, second_derivatives(reference.lstm_layer))):
        assert_close(a, b, f"second derivative {index}", "grad")


def test_approximations_are_accurate() -> None:
    """tanh and sigmoid of the kernels (both kernel.c and variant.c use real.h's) within a few
    units in the last place on a dense grid, saturating far out, and NaN propagating."""
    kernels = library.load().kernels
    grid = torch.linspace(-12, 12, 2_000_003, dtype=torch.float64)
    tiny = torch.logspace(-30, 1, 100_000, dtype=torch.float64)
    far = torch.tensor([50.0, 800.0, 1e30])
    grid = torch.cat([grid, tiny, -tiny, far, -far])
    for dtype, limit in ((torch.float32, 3.0), (torch.float64, 4.0)):
        x = grid.to(dtype)
        exact = {"tanh": torch.tanh(x.double()), "sigmoid": torch.sigmoid(x.double())}
        for name, function in (("tanh", kernels[dtype].tanh), ("sigmoid", kernels[dtype].sigmoid)):
            y = torch.empty_like(x)
            function(x.data_ptr(), y.data_ptr(), x.numel())
            rounded = exact[name].to(dtype)
            ulp = (
                torch.nextafter(rounded.abs(), torch.tensor(torch.inf, dtype=dtype)) - rounded.abs()
            )
            error = ((y.double() - exact[name]).abs() / ulp.double()).max().item()
            assert error <= limit, f"{name} {dtype}: {error:.2f} ulp"
            nan = torch.full((3,), float("nan"), dtype=dtype)
            function(nan.data_ptr(), y.data_ptr(), 3)
            assert torch.isnan(y[:3]).all(), f"{name} {dtype}: NaN does not propagate"


def test_default_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    for dtype in DTYPES:
        lstmkit.LSTM(3, 4, dtype=dtype)(torch.randn(2, 1, 3, dtype=dtype))
        choice = backends.last_choice()
        assert choice.backend == "cpu" and not choice.forced


def test_environment_forces_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backends.BACKEND_ENV, "reference")
    lstmkit.LSTM(3, 4)(torch.randn(2, 1, 3))
    assert backends.last_choice().backend == "reference"
    assert backends.last_choice().forced


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_run_in_the_cpu_backend(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bfloat16 and float16 are computed in float32 (lstmkit.precision), so the cpu backend
    runs them; tests/test_half.py checks their numbers."""
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    out, _ = lstmkit.LSTM(3, 4, dtype=dtype)(torch.randn(2, 1, 3, dtype=dtype))
    assert out.dtype == dtype
    choice = backends.last_choice()
    assert choice.backend == "cpu" and choice.passed_over == ()


def test_unsupported_call_falls_back_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    lstmkit.LSTM(3, 4, device="meta")(torch.randn(2, 1, 3, device="meta"))
    choice = backends.last_choice()
    assert choice.backend == "reference"
    assert choice.passed_over == (("cpu", "runs on CPU tensors only, not meta"),)
    assert "cpu not used: runs on CPU tensors only, not meta" in str(choice)
    request = backends.Request("cpu", torch.complex64, False, False, False, False)
    assert BACKEND.unavailable_reason(request) == (
        "supports float32 and float64 only, not complex64"
    )


def test_forcing_cpu_on_unsupported_call_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backends.BACKEND_ENV, "cpu")
    with pytest.raises(RuntimeError, match="runs on CPU tensors only, not meta"):
        lstmkit.LSTM(3, 4, device="meta")(torch.randn(2, 1, 3, device="meta"))


def test_description_and_warmup_name_the_gemm() -> None:
    # warmup tunes a library that is not tuned yet (a fresh cache), which may change its GEMM:
    # compare with the library as warmup leaves it
    said = BACKEND.warmup()
    loaded = library.load()
    assert loaded.blas in BACKEND.description
    assert loaded.blas in said
    assert str(loaded.path) in said


def test_threads_calling_one_module_agree() -> None:
    """Several Python threads running one module at once get the single-threaded results."""
    torch.manual_seed(0)
    module = lstmkit.LSTM(32, 64, num_layers=2, bidirectional=True, proj_size=24)
    x = torch.randn(30, 12, 32)
    with torch.no_grad():
        expected = module(x)[0]
    results: list[Tensor] = []
    start = threading.Barrier(4)

    def worker() -> None:
        start.wait()
        for _ in range(3):
            with torch.no_grad():
                results.append(module(x)[0])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 12
    for result in results:
        assert torch.equal(result, expected)


def test_threads_training_separate_graphs_agree() -> None:
    torch.manual_seed(0)
    module = lstmkit.LSTM(16, 48, bidirectional=True)
    inputs = [torch.randn(20, 9, 16, requires_grad=True) for _ in range(4)]

    def grads(x: Tensor) -> list[Tensor]:
        out, (h, c) = module(x)
        return list(torch.autograd.grad(out.sum() + h.sum() + c.sum(), [x, *module.parameters()]))

    expected = [grads(x) for x in inputs]
    actual: dict[int, list[Tensor]] = {}
    start = threading.Barrier(len(inputs))

    def worker(k: int) -> None:
        start.wait()
        actual[k] = grads(inputs[k])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k, grads_k in enumerate(expected):
        for a, e in zip(actual[k], grads_k):
            assert torch.equal(a, e)


def test_build_into_a_fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LSTMKIT_CACHE_DIR", str(tmp_path))
    compiler = build.find_compiler()
    assert compiler is not None
    target = build.library_path(compiler)
    assert target.parent == tmp_path and not target.exists()
    day = 86400.0
    stale, recent, other = (tmp_path / n for n in ("lstmkit_cpu_0.so", "lstmkit_cpu_1.so", "x.so"))
    stale_record, young_record = (build.record_path(stale, d * 64) for d in "ab")
    for path, age_days in (
        (stale, build.STALE_DAYS + 1),
        (recent, 1),
        (other, 99),
        (stale_record, build.STALE_DAYS + 1),
        (young_record, 0),  # a concurrent build's, just before its library is renamed in
    ):
        path.write_bytes(b"")
        os.utime(path, (time.time() - age_days * day,) * 2)
    build.build(compiler, target)
    # no temporary files left; the build unused for STALE_DAYS and its old record are gone,
    # the others stay; the new build has its record
    record = build.record_path(target, hashlib.sha256(target.read_bytes()).hexdigest())
    kept = [target.name, record.name, recent.name, "x.so", young_record.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert record.read_text() == f"{target.stat().st_size} {record.name.split('.')[2]}\n"
    assert build.check(target) is None
    loaded = ctypes.CDLL(str(target))
    assert loaded.lk_layer_bytes() == library.LAYER.size
    os.utime(target, (time.time() - 10 * day,) * 2)
    build.mark_used(target)
    assert target.stat().st_mtime > time.time() - day


def test_build_failure_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "find_compiler", lambda: None)
    with pytest.raises(build.BuildError, match="no C compiler found"):
        library._load("native")


def test_unbuildable_kernels_fall_back_with_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    monkeypatch.setattr(library, "failure", lambda: "no C compiler found (set CC, or install gcc)")
    lstmkit.LSTM(3, 4)(torch.randn(2, 1, 3))
    choice = backends.last_choice()
    assert choice.backend == "reference"
    assert choice.passed_over == (("cpu", "no C compiler found (set CC, or install gcc)"),)


def test_import_compiles_nothing(tmp_path: Path) -> None:
    env = dict(os.environ, LSTMKIT_CACHE_DIR=str(tmp_path / "cache"))
    code = "import lstmkit, lstmkit.backends.cpu; print('ok')"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "ok"
    assert not (tmp_path / "cache").exists()


def test_plain_stacks_run_in_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain stack goes through run_stack, with or without autograd, never layer by layer;
    per-layer sequences and dropout between layers run layer by layer."""
    lstm = lstmkit.LSTM(3, 4, num_layers=3, bidirectional=True, dropout=0.5)
    lstm.eval()
    x = torch.randn(5, 2, 3)
    with torch.no_grad():
        expected = lstm(x)[0]
    calls = []
    layer_by_layer = type(BACKEND).run_layer

    def counting(self, *args, **kwargs):
        calls.append(1)
        return layer_by_layer(self, *args, **kwargs)

    monkeypatch.setattr(type(BACKEND), "run_layer", counting)
    with torch.no_grad():
        assert torch.equal(lstm(x)[0], expected)
    assert torch.equal(lstm(x)[0].detach(), expected)
    assert calls == []
    with torch.no_grad():
        lstm.forward_all(x)
    assert len(calls) == 3
    lstm.train()
    lstm(x)
    assert len(calls) == 6


def test_stack_backward_twice_double_backward_and_in_place_edits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The one autograd node of a stack: a retained graph gives the same gradients again,
    its gradients differentiate again as the reference's do, and editing its output in place
    is caught."""
    lstm = lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    out, (h_n, c_n) = lstm(x)
    loss = out.square().sum() + h_n.sum() + c_n.sum()
    first = torch.autograd.grad(loss, [x, lstm.weight_hh_l0], retain_graph=True)
    second = torch.autograd.grad(loss, [x, lstm.weight_hh_l0])
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    (grad_x,) = torch.autograd.grad(lstm(x)[0].square().sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad_x.square().sum(), x)
    monkeypatch.setenv(backends.BACKEND_ENV, "reference")
    (grad_x,) = torch.autograd.grad(lstm(x)[0].square().sum(), x, create_graph=True)
    (expected,) = torch.autograd.grad(grad_x.square().sum(), x)
    assert_close(second, expected, "second derivative", "grad")
    monkeypatch.delenv(backends.BACKEND_ENV)
    out, _ = lstm(x)
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
