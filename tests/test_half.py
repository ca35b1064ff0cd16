"""bfloat16 and float16: modules of those dtypes and torch.autocast, in the cpu backend on every
tier, against the reference under the same precision policy (lstmkit.precision) and against a
float64 run of the same numbers; and autocast's dtypes against torch.nn.LSTM's."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence

import lstmkit
from compare import assert_half_accurate, assert_same_policy
from lstmkit import backends

HALVES = [torch.bfloat16, torch.float16]


@dataclass(frozen=True)
class Case:
    name: str
    lstm: dict = field(default_factory=dict)
    form: str = "dense"  # dense | unbatched | packed | lengths
    torch_has: bool = True  # torch.nn.LSTM runs it (no lstmkit variant)


CASES = [
    Case("plain", {"input_size": 5, "hidden_size": 8}),
    Case(
        "bi-2-layers", {"input_size": 5, "hidden_size": 8, "num_layers": 2, "bidirectional": True}
    ),
    Case("proj", {"input_size": 5, "hidden_size": 8, "proj_size": 3}),
    Case("batch-first", {"input_size": 5, "hidden_size": 8, "batch_first": True}),
    Case("unbatched", {"input_size": 5, "hidden_size": 8}, form="unbatched"),
    Case("packed", {"input_size": 5, "hidden_size": 8, "bidirectional": True}, form="packed"),
    Case(
        "lengths",
        {"input_size": 5, "hidden_size": 8, "bidirectional": True},
        form="lengths",
        torch_has=False,  # torch's counterpart is the packed case
    ),
    Case(
        "variants",
        {
            "input_size": 5,
            "hidden_size": 8,
            "layer_norm": True,
            "peepholes": True,
            "zoneout_cell": 0.2,
        },
        torch_has=False,
    ),
]
STEPS, BATCH, LENGTHS = 12, 3, [12, 5, 9]


def _call(module, x: Tensor, hx, case: Case):
    """out (a tensor: a packed output's data), h_n, c_n."""
    if case.form == "packed":
        packed = pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False)
        out, (h, c) = module(packed, hx)
        return out.data, h, c
    if case.form == "lengths":
        out, (h, c) = module(x, hx, lengths=torch.tensor(LENGTHS))
        return out, h, c
    out, (h, c) = module(x, hx)
    return out, h, c


def _run(module, x: Tensor, hx, case: Case, autocast: torch.dtype | None, storage: torch.dtype):
    """Values and the gradients of every input and parameter, for output seeds rounded to
    ``storage`` (so that every run sees the same numbers)."""
    x = x.detach().requires_grad_()
    hx = tuple(t.detach().requires_grad_() for t in hx)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        outputs = _call(module, x, hx, case)
    g = torch.Generator().manual_seed(3)
    seeds = [torch.randn(t.shape, generator=g).to(storage).to(t.dtype) for t in outputs]
    grads = torch.autograd.grad(outputs, [x, *hx, *module.parameters()], seeds)
    return [t.detach() for t in outputs] + list(grads)


def _names(module) -> list[str]:
    return ["out", "h_n", "c_n", "grad x", "grad h0", "grad c0"] + [
        f"grad {n}" for n, _ in module.named_parameters()
    ]


def _inputs(case: Case, module, dtype: torch.dtype):
    torch.manual_seed(1)
    spec = module.spec
    features = spec.input_size
    batch = () if case.form == "unbatched" else (BATCH,)
    shape = (BATCH, STEPS, features) if spec.batch_first else (STEPS, *batch, features)
    x = torch.randn(shape).to(dtype)
    rows = spec.num_layers * spec.num_directions
    h0 = torch.randn(rows, *batch, spec.h_size).to(dtype)
    return x, (h0, torch.randn(rows, *batch, spec.hidden_size).to(dtype))


@pytest.mark.parametrize("mode", ["module", "autocast"])
@pytest.mark.parametrize("dtype", HALVES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_half_matches_policy_and_float64(
    cpu_tier: str, monkeypatch, case: Case, dtype: torch.dtype, mode: str
) -> None:
    torch.manual_seed(0)
    base = lstmkit.LSTM(**case.lstm).eval()  # eval: zoneout as its expectation, no noise
    autocast = dtype if mode == "autocast" else None
    # the numbers the call computes on: the weights rounded to `dtype` (a module of that
    # dtype, or autocast's cast of the float32 one), inputs likewise
    module = base if autocast else copy.deepcopy(base).to(dtype)
    x, hx = _inputs(case, module, torch.float32 if autocast else dtype)
    if autocast and case.form == "packed":  # a packed call runs in its states' dtype
        hx = tuple(t.to(dtype) for t in hx)
    monkeypatch.setenv(backends.BACKEND_ENV, "cpu")
    actual = _run(module, x, hx, case, autocast, dtype)
    assert backends.last_choice().backend == "cpu"
    assert actual[0].dtype == dtype
    monkeypatch.setenv(backends.BACKEND_ENV, "reference")
    expected = _run(module, x, hx, case, autocast, dtype)
    names = _names(module)
    for name, a, e in zip(names, actual, expected, strict=True):
        assert_same_policy(a, e, name, dtype)
    # float64 truth on the same numbers
    truth_module = copy.deepcopy(base).to(dtype).double()
    truth = _run(
        truth_module, x.to(dtype).double(), [t.to(dtype).double() for t in hx], case, None, dtype
    )
    yardstick = None
    if case.torch_has:
        yardstick = _torch_run(base, dtype, autocast, x, hx, case)
    for i, (name, a, t) in enumerate(zip(names, actual, truth, strict=True)):
        assert_half_accurate(a, t, None if yardstick is None else yardstick[i], name, dtype)


def _torch_run(base, dtype, autocast, x, hx, case: Case) -> list[Tensor]:
    """torch.nn.LSTM's own run in ``dtype`` on the same numbers: under autocast for bfloat16,
    else (torch's CPU LSTM has no float16 autocast) a module of that dtype."""
    oracle = torch.nn.LSTM(**case.lstm)
    oracle.load_state_dict(base.state_dict())
    if autocast is torch.bfloat16:
        return _run(oracle, x, hx, case, torch.bfloat16, dtype)
    return _run(oracle.to(dtype), x.to(dtype), [t.to(dtype) for t in hx], case, None, dtype)


AUTOCAST_CASES = {
    "plain": ({"input_size": 4, "hidden_size": 5}, "dense"),
    "bi-2-layers": (
        {"input_size": 4, "hidden_size": 5, "num_layers": 2, "bidirectional": True},
        "dense",
    ),
    "proj": ({"input_size": 4, "hidden_size": 5, "proj_size": 3}, "dense"),
    "packed": ({"input_size": 4, "hidden_size": 5}, "packed"),
    "packed-bi-2-layers": (
        {"input_size": 4, "hidden_size": 5, "num_layers": 2, "bidirectional": True},
        "packed",
    ),
    "packed-proj": ({"input_size": 4, "hidden_size": 5, "proj_size": 3}, "packed"),
}


@pytest.mark.parametrize("states", ["zeros", "float32", "bfloat16"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["x-fp32", "x-bf16"])
@pytest.mark.parametrize("module_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(AUTOCAST_CASES))
def test_autocast_dtypes_are_torchs(name: str, module_dtype, x_dtype, states: str) -> None:
    config, form = AUTOCAST_CASES[name]
    torch.manual_seed(0)
    ours = lstmkit.LSTM(**config).to(module_dtype)
    theirs = torch.nn.LSTM(**config).to(module_dtype)
    theirs.load_state_dict(ours.state_dict())
    rows = config.get("num_layers", 1) * (2 if config.get("bidirectional") else 1)
    results = []
    for module in (ours, theirs):
        x = torch.randn(4, 2, 4).to(x_dtype).requires_grad_()
        hx = None
        if states != "zeros":
            state_dtype = getattr(torch, states)
            h_size = config.get("proj_size") or 5
            hx = (
                torch.randn(rows, 2, h_size, dtype=state_dtype),
                torch.randn(rows, 2, 5, dtype=state_dtype),
            )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if form == "packed":
                out, (h, c) = module(pack_padded_sequence(x, torch.tensor([4, 2])), hx)
                out = out.data
            else:
                out, (h, c) = module(x, hx)
            loss = out.float().sum() + h.float().sum() + c.float().sum()
        loss.backward()
        results.append((out.dtype, h.dtype, c.dtype, x.grad.dtype, module.weight_ih_l0.grad.dtype))
    assert results[0] == results[1], f"lstmkit {results[0]} != torch {results[1]}"


def test_cell_half_runs_in_the_cpu_backend(monkeypatch) -> None:
    torch.manual_seed(0)
    for dtype in HALVES:
        cell = lstmkit.LSTMCell(6, 8).to(dtype)
        x = torch.randn(3, 6).to(dtype)
        hx = (torch.randn(3, 8).to(dtype), torch.randn(3, 8).to(dtype))
        monkeypatch.setenv(backends.BACKEND_ENV, "cpu")
        h, c = cell(x, hx)
        assert backends.last_choice().backend == "cpu" and h.dtype == c.dtype == dtype
        monkeypatch.setenv(backends.BACKEND_ENV, "reference")
        h_ref, c_ref = cell(x, hx)
        assert_same_policy(h.detach(), h_ref.detach(), "h'", dtype)
        assert_same_policy(c.detach(), c_ref.detach(), "c'", dtype)
    # autocast leaves LSTMCell alone, as it leaves torch's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, _ = lstmkit.LSTMCell(6, 8)(torch.randn(3, 6))
    assert h.dtype == torch.float32


@pytest.mark.parametrize("change", ["optimizer step", "p.data", "numpy view"])
@pytest.mark.parametrize("mode", ["bf16-module", "autocast"])
def test_kept_weight_copies_are_never_stale(mode: str, change: str) -> None:
    """Inference keeps its float32 copy of a bf16 weight (or autocast's bf16 copy of a float32
    one) between calls; a weight changed in place, whether or not that moves its _version,
    gives what a fresh module gives."""
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(5, 8)
    x = torch.randn(4, 2, 5)
    if mode == "bf16-module":
        lstm, x = lstm.bfloat16(), x.bfloat16()
    weight = lstm.weight_hh_l0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        before, _ = lstm(x)
        again, _ = lstm(x)
        assert torch.equal(before, again)
        version = weight._version
        if change == "optimizer step":
            weight.mul_(0.5)
        elif change == "p.data":
            weight.data.mul_(0.5)  # .data: its own version counter
        else:
            weight.detach().view(torch.int16).numpy()[...] = 0  # zeros, behind torch's back
        assert (weight._version != version) is (change == "optimizer step")
        after, _ = lstm(x)
        expected, _ = copy.deepcopy(lstm)(x)
    assert before.dtype == torch.bfloat16
    assert not torch.equal(after, before)
    assert torch.equal(after, expected)
