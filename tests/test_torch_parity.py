"""lstmkit.LSTM against torch.nn.LSTM: outputs, final states and every gradient, every backend."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor

import lstmkit
from compare import assert_close, run_packed
from lstmkit import backends


@dataclass(frozen=True)
class Case:
    name: str
    lstm: dict = field(default_factory=dict)
    steps: int = 5
    batch: int = 3
    form: str = "dense"  # dense | unbatched | packed
    lengths: tuple[int, ...] = ()
    enforce_sorted: bool = True


CASES = [
    Case("plain", {"input_size": 4, "hidden_size": 6}),
    Case("hidden-1", {"input_size": 3, "hidden_size": 1}, steps=4, batch=2),
    Case("hidden-7-no-bias", {"input_size": 5, "hidden_size": 7, "bias": False}),
    Case("hidden-37", {"input_size": 11, "hidden_size": 37}, steps=6, batch=4),
    Case("two-layers", {"input_size": 4, "hidden_size": 5, "num_layers": 2}),
    Case(
        "three-layers-bi",
        {"input_size": 3, "hidden_size": 4, "num_layers": 3, "bidirectional": True},
    ),
    Case(
        "bidirectional",
        {"input_size": 10, "hidden_size": 20, "num_layers": 2, "bidirectional": True},
    ),
    Case("batch-first", {"input_size": 4, "hidden_size": 6, "batch_first": True}),
    Case(
        "batch-first-bi",
        {
            "input_size": 4,
            "hidden_size": 6,
            "batch_first": True,
            "bidirectional": True,
            "num_layers": 2,
        },
    ),
    Case(
        "batch-first-one-step-bi",
        {"input_size": 4, "hidden_size": 6, "batch_first": True, "bidirectional": True},
        steps=1,
    ),
    Case("proj", {"input_size": 4, "hidden_size": 7, "proj_size": 3}),
    Case(
        "proj-bi-2l-no-bias",
        {
            "input_size": 4,
            "hidden_size": 7,
            "proj_size": 2,
            "num_layers": 2,
            "bidirectional": True,
            "bias": False,
        },
    ),
    Case("single-step", {"input_size": 4, "hidden_size": 6, "bidirectional": True}, steps=1),
    Case("unbatched", {"input_size": 4, "hidden_size": 6}, form="unbatched"),
    Case(
        "unbatched-bi-batch-first",
        {
            "input_size": 4,
            "hidden_size": 6,
            "num_layers": 2,
            "bidirectional": True,
            "batch_first": True,
        },
        form="unbatched",
    ),
    Case(
        "packed-sorted",
        {"input_size": 4, "hidden_size": 6},
        steps=6,
        batch=4,
        form="packed",
        lengths=(6, 4, 4, 1),
    ),
    Case(
        "packed-unsorted-bi",
        {"input_size": 4, "hidden_size": 5, "num_layers": 2, "bidirectional": True},
        steps=6,
        batch=5,
        form="packed",
        lengths=(2, 6, 1, 4, 6),
        enforce_sorted=False,
    ),
    Case(
        "packed-proj-bi",
        {"input_size": 3, "hidden_size": 6, "proj_size": 4, "bidirectional": True},
        steps=5,
        batch=3,
        form="packed",
        lengths=(3, 5, 1),
        enforce_sorted=False,
    ),
    Case(
        "packed-batch-first",
        {"input_size": 3, "hidden_size": 4, "batch_first": True, "bidirectional": True},
        steps=4,
        batch=3,
        form="packed",
        lengths=(4, 1, 3),
        enforce_sorted=False,
    ),
]

DTYPES = [torch.float32, torch.float64]


def make_pair(kwargs: dict, dtype: torch.dtype) -> tuple[lstmkit.LSTM, torch.nn.LSTM]:
    ours = lstmkit.LSTM(**kwargs, dtype=dtype)
    theirs = torch.nn.LSTM(**kwargs, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def make_inputs(
    case: Case, dtype: torch.dtype, with_hx: bool
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    spec = lstmkit.LSTMSpec(**case.lstm)
    if case.form == "unbatched":
        x = torch.randn(case.steps, spec.input_size, dtype=dtype)
    elif spec.batch_first:
        x = torch.randn(case.batch, case.steps, spec.input_size, dtype=dtype)
    else:
        x = torch.randn(case.steps, case.batch, spec.input_size, dtype=dtype)
    x.requires_grad_()
    if not with_hx:
        return x, None
    rows = spec.num_layers * spec.num_directions
    batch_shape = () if case.form == "unbatched" else (case.batch,)
    h0 = torch.randn(rows, *batch_shape, spec.h_size, dtype=dtype, requires_grad=True)
    c0 = torch.randn(rows, *batch_shape, spec.hidden_size, dtype=dtype, requires_grad=True)
    return x, (h0, c0)


def forward(module: torch.nn.Module, case: Case, x: Tensor, hx) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``module`` on the case's input form; returns output data, h_n, c_n."""
    if case.form == "packed":
        return run_packed(module, x, case.lengths, hx, case.enforce_sorted)
    out, (h, c) = module(x, hx)
    return out, h, c


def run_and_backprop(module, case, x, hx, weights):
    out, h, c = forward(module, case, x, hx)
    loss = (out * weights[0]).sum() + (h * weights[1]).sum() + (c * weights[2]).sum()
    loss.backward()
    return out, h, c


def compare(case: Case, dtype: torch.dtype, with_hx: bool) -> None:
    torch.manual_seed(0)
    ours, theirs = make_pair(case.lstm, dtype)
    x, hx = make_inputs(case, dtype, with_hx)
    x2 = x.detach().clone().requires_grad_()
    hx2 = None if hx is None else tuple(s.detach().clone().requires_grad_() for s in hx)
    expected = forward(theirs, case, x2, hx2)
    weights = [torch.randn_like(t) for t in expected]
    expected = run_and_backprop(theirs, case, x2, hx2, weights)
    actual = run_and_backprop(ours, case, x, hx, weights)
    for name, a, e in zip(("output", "h_n", "c_n"), actual, expected):
        assert_close(a, e, name)
    assert_close(x.grad, x2.grad, "grad input", "grad")
    if hx is not None:
        assert_close(hx[0].grad, hx2[0].grad, "grad h0", "grad")
        assert_close(hx[1].grad, hx2[1].grad, "grad c0", "grad")
    theirs_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        assert_close(param.grad, theirs_params[name].grad, f"grad {name}", "grad")


@pytest.mark.parametrize("with_hx", [False, True], ids=["no-hx", "hx"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_torch(case: Case, dtype: torch.dtype, with_hx: bool, backend: str) -> None:
    compare(case, dtype, with_hx)
    assert backends.last_choice().backend == backend


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_lstm_cell_matches_torch(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    for bias in (True, False):
        ours = lstmkit.LSTMCell(5, 7, bias=bias, dtype=dtype)
        theirs = torch.nn.LSTMCell(5, 7, bias=bias, dtype=dtype)
        theirs.load_state_dict(ours.state_dict())
        for batch_shape in ((3,), ()):
            for with_hx in (False, True):
                x = torch.randn(*batch_shape, 5, dtype=dtype, requires_grad=True)
                x2 = x.detach().clone().requires_grad_()
                hx = hx2 = None
                if with_hx:
                    hx = tuple(
                        torch.randn(*batch_shape, 7, dtype=dtype, requires_grad=True)
                        for _ in range(2)
                    )
                    hx2 = tuple(s.detach().clone().requires_grad_() for s in hx)
                h, c = ours(x, hx)
                h2, c2 = theirs(x2, hx2)
                assert_close(h, h2, "h'")
                assert_close(c, c2, "c'")
                (h * 2 + c).sum().backward()
                (h2 * 2 + c2).sum().backward()
                assert_close(x.grad, x2.grad, "grad input", "grad")
                if with_hx:
                    for a, e in zip(hx, hx2):
                        assert_close(a.grad, e.grad, "grad state", "grad")
                theirs_params = dict(theirs.named_parameters())
                for name, p in ours.named_parameters():
                    assert_close(p.grad, theirs_params[name].grad, f"grad {name}", "grad")
                    p.grad = None
                    theirs_params[name].grad = None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_size": 3, "hidden_size": 4},
        {"input_size": 2, "hidden_size": 3, "num_layers": 2, "bidirectional": True},
        {"input_size": 2, "hidden_size": 4, "proj_size": 2, "bidirectional": True},
    ],
    ids=["plain", "bi-2l", "proj-bi"],
)
def test_gradcheck_float64(kwargs: dict, backend: str) -> None:
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(**kwargs, dtype=torch.float64)
    spec = lstm.spec
    rows = spec.num_layers * spec.num_directions
    x = torch.randn(4, 2, spec.input_size, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(rows, 2, spec.h_size, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(rows, 2, spec.hidden_size, dtype=torch.float64, requires_grad=True)
    params = list(lstm.parameters())
    names = [n for n, _ in lstm.named_parameters()]

    def fn(x, h0, c0, *flat):
        out, (h, c) = torch.func.functional_call(lstm, dict(zip(names, flat)), (x, (h0, c0)))
        return out, h, c

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params))


@pytest.mark.parametrize("with_hx", [False, True], ids=["no-hx", "hx"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_inference_matches_torch(
    case: Case, dtype: torch.dtype, with_hx: bool, backend: str
) -> None:
    """Under no_grad a backend may run the whole stack at once (``fused_stack``)."""
    torch.manual_seed(0)
    ours, theirs = make_pair(case.lstm, dtype)
    x, hx = make_inputs(case, dtype, with_hx)
    with torch.no_grad():
        expected = forward(theirs, case, x, hx)
        actual = forward(ours, case, x, hx)
    for name, a, e in zip(("output", "h_n", "c_n"), actual, expected):
        assert_close(a, e, name)
    assert backends.last_choice().backend == backend
