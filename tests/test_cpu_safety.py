"""Memory safety and IEEE parity of the cpu backend's kernels.

Memory: the forward kernel runs on tensors that each end flush against a page nobody may
touch, so a read or write past the end of any of them (a whole vector where only part of one
belongs to the tensor) faults. That runs in a child process, whose crash is a failed test.
``make sanitize`` runs this file, and the other cpu-backend tests, under AddressSanitizer.

IEEE parity: Inf and NaN in the input, the initial states or a weight reach the same elements
as in torch.nn.LSTM: output, final states and gradients must be NaN, infinite and finite at
the same positions (values are compared where both are finite). Hidden sizes cover one lane,
partial vectors and whole ones, so padded lanes of a last vector are exercised; batch 1 takes
the kernels' matrix-vector path, batch 3 the panels. The variant kernels are compared with the
reference backend the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence

import lstmkit
from compare import assert_close
from lstmkit import backends

DTYPES = {"float32": torch.float32, "float64": torch.float64}

# ---- memory: buffers that end at a guard page ----

GUARDED_RUN = textwrap.dedent(
    """
    import ctypes, mmap, sys
    import torch
    from lstmkit.backends.cpu import library
    from lstmkit.backends.cpu.function import layer_fields
    from lstmkit.backends.cpu.library import LAYER

    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    keep = []

    def guarded(t):
        # a copy of t whose last byte is followed by a page that may not be read or written
        page = mmap.PAGESIZE
        nbytes = t.numel() * t.element_size()
        pages = (nbytes + page - 1) // page + 1
        buf = mmap.mmap(-1, pages * page)
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        assert libc.mprotect(base + (pages - 1) * page, page, 0) == 0
        offset = (pages - 1) * page - nbytes
        g = torch.frombuffer(buf, dtype=t.dtype, count=t.numel(), offset=offset)
        keep.append(buf)
        return g.view(t.shape).copy_(t)

    dtype = getattr(torch, sys.argv[1])
    for I, H, P, T, B, D in eval(sys.argv[2]):
        print('running', (I, H, P, T, B, D), file=sys.stderr, flush=True)
        torch.manual_seed(0)
        m = torch.nn.LSTM(I, H, proj_size=P, bidirectional=D == 2, dtype=dtype)
        Ph = P or H
        x = guarded(torch.randn(T, B, I, dtype=dtype))
        h0 = guarded(torch.randn(D, B, Ph, dtype=dtype))
        c0 = guarded(torch.randn(D, B, H, dtype=dtype))
        params = []
        for sfx in [""] + (["_reverse"] if D == 2 else []):
            names = ["weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"]
            for n in names:
                p = getattr(m, n + "_l0" + sfx, None)
                params.append(None if p is None else guarded(p.detach()))
        out = guarded(torch.empty(T, B, D * Ph, dtype=dtype))
        h_n = guarded(torch.empty(D, B, Ph, dtype=dtype))
        c_n = guarded(torch.empty(D, B, H, dtype=dtype))
        cells = guarded(torch.empty(T, B, D * H, dtype=dtype))
        kernels = library.load().kernels[dtype]
        fields = layer_fields(x, h0, c0, params, None, out, h_n, c_n, cells)
        assert kernels.forward(LAYER.pack(*fields)) == 0
        with torch.no_grad():
            expected, (eh, ec) = m(x.clone(), (h0.clone(), c0.clone()))
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(h_n, eh, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(c_n, ec, atol=1e-4, rtol=1e-4)
    """
)

# (I, H, P, T, B, D): hidden sizes and projections with partial last vectors, past one pass
# of a panel (hidden_size above 512), batch 1 and more, one and two directions.
GUARDED_SHAPES = {
    "proj-past-one-pass": (4, 520, 515, 3, 2, 1),
    "proj-bi-tail": (5, 9, 3, 4, 3, 2),
    "tail-batch-1": (3, 7, 0, 5, 1, 1),
    "tail-batch-1-row": (37, 67, 0, 4, 1, 1),
    "tail-batch-1-bi": (3, 17, 0, 4, 1, 2),
    "tail-panels": (3, 33, 0, 4, 7, 1),
    "proj-batch-1": (6, 15, 5, 3, 1, 1),
}


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_stays_inside_its_buffers(dtype: str) -> None:
    child = subprocess.run(
        [sys.executable, "-c", GUARDED_RUN, dtype, repr(list(GUARDED_SHAPES.values()))],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=600,
    )
    assert child.returncode == 0, (
        f"forward on guarded buffers, {dtype}: exit status {child.returncode} (-11: it touched "
        f"a guard page past the end of a buffer; the last shape is the one that did)\n"
        f"{child.stderr[-3000:]}"
    )


# ---- IEEE parity against torch.nn.LSTM ----

HIDDEN = (1, 7, 8, 9, 15, 16, 17, 33)
# Where a non-finite value goes: the input, h0, c0, or one weight (by torch's name).
PLACES = ("x", "h0", "c0", "weight_ih_l0", "weight_hh_l0", "bias_hh_l0", "weight_hr_l0")
STEPS, INPUT = 4, 4


def same_classes(actual: Tensor, expected: Tensor, what: str, kind: str) -> None:
    """NaN, +-Inf and finite at the same positions, and close where finite."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    for name, test in (("NaN", torch.isnan), ("Inf", torch.isinf)):
        a, e = test(actual), test(expected)
        assert torch.equal(a, e), (
            f"{what}: {name} at {int(a.sum())} positions, torch has {int(e.sum())}; they differ "
            f"at {int((a != e).sum())} of {a.numel()}"
        )
    finite = torch.isfinite(expected)
    assert_close(actual[finite], expected[finite], what, kind)


def poisoned(
    hidden: int, proj: int, bidirectional: bool, batch: int, dtype: torch.dtype, place: str
) -> tuple[torch.nn.LSTM, Tensor, Tensor, Tensor]:
    """torch's module and inputs under a fixed seed, with one Inf (and, for the input, one NaN
    in another sequence) at `place`."""
    torch.manual_seed(hidden * 100 + proj)
    lstm = torch.nn.LSTM(INPUT, hidden, proj_size=proj, bidirectional=bidirectional, dtype=dtype)
    d = 2 if bidirectional else 1
    x = torch.randn(STEPS, batch, INPUT, dtype=dtype)
    h0 = torch.randn(d, batch, proj or hidden, dtype=dtype)
    c0 = torch.randn(d, batch, hidden, dtype=dtype)
    if place == "x":
        x[1, 0, 2] = float("inf")
        if batch > 1:
            x[2, batch - 1, 0] = float("nan")
    elif place == "h0":
        h0[0, 0, (proj or hidden) - 1] = float("-inf")
    elif place == "c0":
        c0[0, 0, hidden - 1] = float("inf")
    else:
        with torch.no_grad():
            getattr(lstm, place).view(-1)[-1] = float("inf")
    return lstm, x, h0, c0


def outputs_and_grads(
    lstm: torch.nn.Module, x: Tensor, h0: Tensor, c0: Tensor, lengths: list[int] | None
) -> list[Tensor]:
    """output (its packed data with lengths), h_n, c_n, then the gradients of x, h0, c0 and
    every parameter for the sum of the outputs and final states (so every gradient is
    defined)."""
    inputs = [t.clone().requires_grad_() for t in (x, h0, c0)]
    sequence = inputs[0]
    if lengths is not None:
        sequence = pack_padded_sequence(sequence, torch.tensor(lengths), enforce_sorted=False)
    out, (h_n, c_n) = lstm(sequence, tuple(inputs[1:]))
    if lengths is not None:
        out = out.data
    params = list(lstm.parameters())
    grads = torch.autograd.grad(out.sum() + h_n.sum() + c_n.sum(), inputs + params)
    return [out.detach(), h_n.detach(), c_n.detach(), *grads]


def compare_all(actual: list[Tensor], expected: list[Tensor], names: list[str], place: str) -> None:
    for k, (name, a, e) in enumerate(zip(names, actual, expected)):
        same_classes(a, e, f"{place}: {name}", "value" if k < 3 else "grad")


def parity(
    hidden: int, proj: int, bidirectional: bool, batch: str, dtype: torch.dtype, place: str
) -> None:
    rows, lengths = BATCHES[batch]
    oracle, x, h0, c0 = poisoned(hidden, proj, bidirectional, rows, dtype, place)
    ours = lstmkit.LSTM(INPUT, hidden, proj_size=proj, bidirectional=bidirectional, dtype=dtype)
    ours.load_state_dict(oracle.state_dict())
    names = ["output", "h_n", "c_n", "grad x", "grad h0", "grad c0"]
    names += [f"grad {name}" for name, _ in oracle.named_parameters()]
    expected = outputs_and_grads(oracle, x, h0, c0, lengths)
    compare_all(outputs_and_grads(ours, x, h0, c0, lengths), expected, names, place)


# batch 1 (the matrix-vector path), 3 (panels), 3 with lengths (rows ending at other steps)
BATCHES = {"1": (1, None), "3": (3, None), "3-lengths": (3, [4, 2, 3])}
# (hidden, proj, bidirectional, batch); hidden 67 at batch 1 only: past the packed small case,
# the matrix-vector path on torch's rows of W_hh, on two threads.
CASES = [
    (hidden, proj, bi, batch)
    for hidden in HIDDEN
    for proj in (0, *([hidden // 2] if hidden > 1 else []))
    for bi in (False, True)
    for batch in BATCHES
] + [(67, 0, bi, "1") for bi in (False, True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("hidden", "proj", "bidirectional", "batch"),
    CASES,
    ids=[f"H{h}-P{p}-{'bi' if bi else 'one'}-{n}" for h, p, bi, n in CASES],
)
def test_inf_and_nan_reach_what_torch_reaches(
    hidden: int,
    proj: int,
    bidirectional: bool,
    batch: str,
    dtype: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(backends.BACKEND_ENV, "cpu")
    for place in PLACES:
        if place != "weight_hr_l0" or proj:
            parity(hidden, proj, bidirectional, batch, DTYPES[dtype], place)


VARIANTS = {
    "layer-norm": {"layer_norm": True},
    "peepholes": {"peepholes": True},
    "zoneout": {"zoneout_cell": 0.3, "zoneout_hidden": 0.2},
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", ("1", "3"))
@pytest.mark.parametrize(("hidden", "proj"), [(7, 0), (7, 3), (9, 4)], ids=["H7", "H7-P3", "H9-P4"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_inf_and_nan_reach_what_the_reference_reaches(
    variant: str, hidden: int, proj: int, batch: str, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The variant kernels against the reference backend (eval mode: zoneout is its
    expectation, so both backends compute the same thing). Without lengths: the reference
    computes padded steps and masks them with torch.where, whose backward turns their NaN
    into NaN gradients of x at padded steps, where torch.nn.LSTM (and the kernels) give 0."""
    rows, lengths = BATCHES[batch]
    for place in PLACES:
        if place == "weight_hr_l0" and not proj:
            continue
        oracle, x, h0, c0 = poisoned(hidden, proj, True, rows, DTYPES[dtype], place)
        lstm = lstmkit.LSTM(
            INPUT,
            hidden,
            proj_size=proj,
            bidirectional=True,
            dtype=DTYPES[dtype],
            **VARIANTS[variant],
        ).eval()
        lstm.load_state_dict(oracle.state_dict(), strict=False)
        names = ["output", "h_n", "c_n", "grad x", "grad h0", "grad c0"]
        names += [f"grad {name}" for name, _ in lstm.named_parameters()]
        results = {}
        for backend in ("reference", "cpu"):
            monkeypatch.setenv(backends.BACKEND_ENV, backend)
            results[backend] = outputs_and_grads(lstm, x, h0, c0, lengths)
            assert backends.last_choice().backend == backend
        compare_all(results["cpu"], results["reference"], names, place)


def test_known_case_inf_input_with_proj_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """LSTM(4, 7, proj_size=3), one Inf in the input: torch's outputs and W_hh, b_hh
    gradients are all finite (padded lanes of the last vector once turned them NaN)."""
    monkeypatch.setenv(backends.BACKEND_ENV, "cpu")
    parity(7, 3, False, "3", torch.float32, "x")
