"""Parameters that do not fit the module reach no kernel: torch's exception type, a message
that names the parameter, what was expected and what was found; and a module whose parameter
is changed after a call that passed is checked again."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lstmkit

Mutation = Callable[[nn.Module], None]


def replace(name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Mutation:
    """Replace parameter ``name`` by ``make(its value)``, as assignment or
    ``load_state_dict(..., assign=True)`` would."""

    def mutate(module: nn.Module) -> None:
        setattr(module, name, nn.Parameter(make(getattr(module, name).detach())))

    return mutate


BI = {"input_size": 4, "hidden_size": 6, "num_layers": 2, "bidirectional": True}
PROJ = {"input_size": 4, "hidden_size": 6, "proj_size": 3}
# name: (constructor kwargs, module dtype, mutation, fragments the message must hold)
CASES = {
    "bias-float64": (
        BI,
        torch.float32,
        replace("bias_hh_l0", lambda t: t.double()),
        ("bias_hh_l0", "torch.float64", "torch.float32"),
    ),
    "weight-float32-in-float64": (
        BI,
        torch.float64,
        replace("weight_hh_l1_reverse", lambda t: t.float()),
        ("weight_hh_l1_reverse", "torch.float32", "torch.float64"),
    ),
    "bias-3-elements": (
        BI,
        torch.float32,
        replace("bias_ih_l0", lambda t: t[:3].clone()),
        ("bias_ih_l0", "(3,)", "(24,)"),
    ),
    "weight-ih-transposed": (
        BI,
        torch.float32,
        replace("weight_ih_l1", lambda t: t.t().contiguous()),
        ("weight_ih_l1", "(12, 24)", "(24, 12)"),
    ),
    "weight-meta": (
        BI,
        torch.float32,
        replace("weight_hh_l0", lambda t: t.to("meta")),
        ("weight_hh_l0", "meta", "cpu"),
    ),
    "projection-shape": (
        PROJ,
        torch.float32,
        replace("weight_hr_l0", lambda t: torch.zeros(4, 6)),
        ("weight_hr_l0", "(4, 6)", "(3, 6)", "proj_size"),
    ),
}


def build(kind: type[nn.Module], kwargs: dict, dtype: torch.dtype, mutate: Mutation) -> nn.Module:
    torch.manual_seed(0)
    module = kind(**kwargs).to(dtype)
    mutate(module)
    return module


def raised(call: Callable[[], object]) -> BaseException | None:
    try:
        call()
    except Exception as error:
        return error
    return None


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_parameter_that_does_not_fit_is_refused_like_torch(
    case: str, packed: bool, backend: str
) -> None:
    kwargs, dtype, mutate, fragments = CASES[case]
    x = torch.randn(5, 3, kwargs["input_size"], dtype=dtype)
    data = pack_padded_sequence(x, [5, 4, 2]) if packed else x
    theirs = raised(lambda: build(nn.LSTM, kwargs, dtype, mutate)(data))
    # Where torch runs anyway (a transposed weight_ih of a layer above the first, a meta
    # weight with packed input), lstmkit still refuses, with torch's type for the others.
    expected = RuntimeError if theirs is None else type(theirs)
    module = build(lstmkit.LSTM, kwargs, dtype, mutate)
    ours = raised(lambda: module(data))
    assert type(ours) is expected, f"{type(ours)} vs {expected}: {ours}"
    message = str(ours)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert f'lstmkit explain "{module.spec}"' in message


def test_variant_parameter_of_another_dtype_is_refused(backend: str) -> None:
    module = lstmkit.LSTM(4, 6, layer_norm=True, peepholes=True)
    module.weight_peephole_l0 = nn.Parameter(module.weight_peephole_l0.detach().double())
    with pytest.raises(RuntimeError, match=r"weight_peephole_l0 has dtype torch\.float64"):
        module(torch.randn(5, 3, 4))
    module = lstmkit.LSTM(4, 6, layer_norm=True)
    module.ln_weight_c_l0 = nn.Parameter(torch.ones(7))
    with pytest.raises(RuntimeError, match=r"ln_weight_c_l0 has shape \(7,\), expected \(6,\)"):
        module(torch.randn(5, 3, 4))


CHANGES = {
    # .data = ... keeps the parameter's identity and its _version
    "data-assigned": lambda p: setattr(p, "data", torch.zeros(3)),
    "data-assigned-float64": lambda p: setattr(p, "data", p.data.double()),
    "set-in-place": lambda p: p.set_(torch.zeros(3)),
    # and this one its address too: only the shape tells
    "data-view-same-address": lambda p: setattr(p, "data", p.data[:3]),
}


@pytest.mark.parametrize("change", CHANGES, ids=str)
def test_parameter_changed_after_a_call_is_checked_again(change: str, backend: str) -> None:
    module = lstmkit.LSTM(4, 6)
    x = torch.randn(5, 3, 4)
    module(x)  # passes, and is remembered as checked
    with torch.no_grad():
        CHANGES[change](module.bias_ih_l0)
    with pytest.raises(RuntimeError, match="bias_ih_l0"):
        module(x)


def test_input_on_another_device_than_the_parameters_is_refused(backend: str) -> None:
    module = lstmkit.LSTM(4, 6)
    module(torch.randn(5, 3, 4))
    with pytest.raises(RuntimeError, match="is on cpu but the input is on meta"):
        module(torch.randn(5, 3, 4, device="meta"))


def test_change_is_seen_whichever_dispatch_state_passed_before(backend: str) -> None:
    # inference mode and autocast change the dispatch state the remembered checks record
    module = lstmkit.LSTM(4, 6)
    x = torch.randn(5, 3, 4)
    with torch.inference_mode():
        module(x)
    module(x)
    with torch.autocast("cpu", enabled=False):
        module(x)
    with torch.no_grad():
        module.bias_hh_l0.data = module.bias_hh_l0.data[:3]
    for mode in (torch.inference_mode, torch.no_grad, torch.enable_grad):
        with mode(), pytest.raises(RuntimeError, match="bias_hh_l0 has shape"):
            module(x)
