"""lstmkit.LSTMCell's fused step in the cpu backend against the reference and torch.nn.LSTMCell:
outputs and every gradient, on every tier, both dtypes, every input form."""

from __future__ import annotations

import pytest
import torch

import lstmkit
from compare import assert_close
from lstmkit import backends

DTYPES = [torch.float32, torch.float64]
SHAPES = [(1, 3, 5), (4, 7, 20), (9, 33, 17), (16, 64, 64)]  # N, H_in, H


def test_shapes_take_both_product_paths() -> None:
    """The first shapes make their products in cell.c, the last by torch.mm."""
    from lstmkit.backends.cpu import cell

    assert [cell.fused(*shape) for shape in SHAPES] == [True, True, True, False]


def run(cell, backend: str, monkeypatch, x, hx):
    monkeypatch.setenv(backends.BACKEND_ENV, backend)
    inputs = [x] + ([] if hx is None else list(hx))
    h, c = cell(x, hx)
    assert backends.last_choice().backend == backend
    g = torch.Generator().manual_seed(7)
    seeds = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in (h, c)]
    wrt = inputs + list(cell.parameters())
    grads = torch.autograd.grad((h, c), wrt, seeds)
    return [h.detach(), c.detach(), *grads]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("form", ["hx", "zeros", "unbatched"])
def test_matches_reference_and_torch(
    cpu_tier: str, monkeypatch, dtype: torch.dtype, shape, bias: bool, form: str
) -> None:
    n, inputs, hidden = shape
    torch.manual_seed(0)
    cell = lstmkit.LSTMCell(inputs, hidden, bias=bias, dtype=dtype)
    oracle = torch.nn.LSTMCell(inputs, hidden, bias=bias, dtype=dtype)
    oracle.load_state_dict(cell.state_dict())
    batch = () if form == "unbatched" else (n,)
    x = torch.randn(*batch, inputs, dtype=dtype, requires_grad=True)
    hx = None
    if form != "zeros":
        hx = tuple(torch.randn(*batch, hidden, dtype=dtype, requires_grad=True) for _ in "hc")
    actual = run(cell, "cpu", monkeypatch, x, hx)
    expected = run(cell, "reference", monkeypatch, x, hx)
    names = ["h'", "c'", "grad x"] + (["grad h", "grad c"] if hx else [])
    names += [f"grad {name}" for name, _ in cell.named_parameters()]
    for name, a, e in zip(names, actual, expected, strict=True):
        assert_close(a, e, name, "value" if name in ("h'", "c'") else "grad")
    h, c = oracle(x, hx)
    assert_close(actual[0], h.detach(), "h' against torch")
    assert_close(actual[1], c.detach(), "c' against torch")


def test_gradcheck_float64(monkeypatch) -> None:
    monkeypatch.setenv(backends.BACKEND_ENV, "cpu")
    cell = lstmkit.LSTMCell(3, 4, dtype=torch.float64)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, h, c: cell(x, (h, c)), (x, h, c))


def test_same_bits_on_one_and_two_threads(monkeypatch) -> None:
    monkeypatch.setenv(backends.BACKEND_ENV, "cpu")
    torch.manual_seed(1)
    cell = lstmkit.LSTMCell(96, 128)
    x = torch.randn(64, 96, requires_grad=True)
    hx = tuple(torch.randn(64, 128, requires_grad=True) for _ in "hc")
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(run(cell, "cpu", monkeypatch, x, hx))
    finally:
        torch.set_num_threads(before)
    for k, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), f"result {k} differs between one and two threads"


def test_double_backward_is_the_references(monkeypatch) -> None:
    torch.manual_seed(2)
    cell = lstmkit.LSTMCell(5, 6, dtype=torch.float64)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    results = {}
    for backend in ("cpu", "reference"):
        monkeypatch.setenv(backends.BACKEND_ENV, backend)
        h, c = cell(x)
        (gx,) = torch.autograd.grad((h * h).sum() + c.sum(), x, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.pow(2).sum(), x)
        results[backend] = (gx.detach(), ggx)
    for a, e, name in zip(results["cpu"], results["reference"], ("grad", "grad of grad")):
        assert_close(a, e, name, "grad")


def test_inference_needs_no_graph(monkeypatch) -> None:
    monkeypatch.setenv(backends.BACKEND_ENV, "cpu")
    cell = lstmkit.LSTMCell(4, 8)
    with torch.no_grad():
        h, c = cell(torch.randn(2, 4))
    assert h.grad_fn is None and c.grad_fn is None and h.shape == (2, 8)


@pytest.mark.parametrize("trainable", ["weight_hh", "bias_ih", "bias_hh"])
def test_one_trainable_parameter_gets_its_gradient(monkeypatch, trainable: str) -> None:
    """Only one parameter requires grad (the others frozen, the input too): the step is still
    recorded, and that gradient is the reference's."""
    monkeypatch.setenv(backends.BACKEND_ENV, "cpu")
    torch.manual_seed(0)
    cell = lstmkit.LSTMCell(5, 7)
    for name, p in cell.named_parameters():
        p.requires_grad_(name == trainable)
    x, h, c = torch.randn(3, 5), torch.randn(3, 7), torch.randn(3, 7)
    h1, c1 = cell(x, (h, c))
    (h1.sum() + 2 * c1.sum()).backward()
    got = getattr(cell, trainable).grad
    assert got is not None
    monkeypatch.setenv(backends.BACKEND_ENV, "reference")
    getattr(cell, trainable).grad = None
    h1, c1 = cell(x, (h, c))
    (h1.sum() + 2 * c1.sum()).backward()
    assert_close(got, getattr(cell, trainable).grad, trainable, "grad")


def test_parametrized_weight_is_used(monkeypatch) -> None:
    """A parametrization (here weight_norm) moves weight_hh out of the module's parameters:
    the step must use the computed weight, as torch's LSTMCell does."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    cell = lstmkit.LSTMCell(6, 8)
    oracle = torch.nn.LSTMCell(6, 8)
    oracle.load_state_dict(cell.state_dict())
    weight_norm(cell, "weight_hh")
    weight_norm(oracle, "weight_hh")
    with torch.no_grad():  # make the computed weight differ from the one it replaced
        cell.parametrizations.weight_hh.original0.mul_(2.0)
        oracle.parametrizations.weight_hh.original0.mul_(2.0)
    x, hx = torch.randn(3, 6), (torch.randn(3, 8), torch.randn(3, 8))
    monkeypatch.setenv(backends.BACKEND_ENV, "cpu")
    h, c = cell(x, hx)
    (h.sum() + c.sum()).backward()
    h_t, c_t = oracle(x, hx)
    (h_t.sum() + c_t.sum()).backward()
    assert_close(h.detach(), h_t.detach(), "h'", "value")
    assert_close(c.detach(), c_t.detach(), "c'", "value")
    for name, original in (("original0", "g"), ("original1", "v")):
        actual = getattr(cell.parametrizations.weight_hh, name).grad
        expected = getattr(oracle.parametrizations.weight_hh, name).grad
        assert_close(actual, expected, f"grad weight_hh {original}", "grad")
