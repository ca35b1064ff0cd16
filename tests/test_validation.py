"""Every mistake torch.nn.LSTM rejects: the same exception type, and a message that explains."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import lstmkit


def raised(fn: Callable[[], object]) -> BaseException:
    with pytest.raises(Exception) as info:
        fn()
    return info.value


CONSTRUCTOR_CASES = {
    "hidden-float": ((10, 20.0), {}),
    "input-zero": ((0, 20), {}),
    "hidden-negative": ((10, -3), {}),
    "layers-zero": ((10, 20, 0), {}),
    "layers-float": ((10, 20, 2.0), {}),
    "proj-negative": ((10, 20), {"proj_size": -1}),
    "proj-too-big": ((10, 20), {"proj_size": 20}),
    "proj-float": ((10, 20), {"proj_size": 2.0}),
    "dropout-negative": ((10, 20), {"dropout": -0.1}),
    "dropout-above-one": ((10, 20), {"dropout": 1.5}),
    "dropout-bool": ((10, 20), {"dropout": True}),
    "dropout-str": ((10, 20), {"dropout": "0.1"}),
    "bias-int": ((10, 20), {"bias": 1}),
    "batch-first-int": ((10, 20), {"batch_first": 1}),
}


@pytest.mark.parametrize("case", CONSTRUCTOR_CASES, ids=str)
def test_constructor_errors_match_torch(case: str) -> None:
    args, kwargs = CONSTRUCTOR_CASES[case]
    theirs = raised(lambda: torch.nn.LSTM(*args, **kwargs))
    ours = raised(lambda: lstmkit.LSTM(*args, **kwargs))
    assert type(ours) is type(theirs), f"{type(ours)} vs torch's {type(theirs)}: {ours}"
    assert "got" in str(ours)


def test_dropout_with_one_layer_warns_like_torch() -> None:
    with pytest.warns(UserWarning, match="num_layers"):
        torch.nn.LSTM(10, 20, dropout=0.5)
    with pytest.warns(UserWarning, match="num_layers=1"):
        lstmkit.LSTM(10, 20, dropout=0.5)


BI = {"input_size": 10, "hidden_size": 20, "num_layers": 2, "bidirectional": True}
X = (5, 3, 10)


def zeros(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype)


# name -> (constructor kwargs, call(module) -> result, fragments the message must contain)
FORWARD_CASES: dict[str, tuple[dict, Callable, tuple[str, ...]]] = {
    "input-1d": (BI, lambda m: m(zeros(10)), ("2-D", "1-D")),
    "input-4d": (BI, lambda m: m(zeros(1, 5, 3, 10)), ("3-D", "4-D")),
    "input-features": (BI, lambda m: m(zeros(5, 3, 11)), ("input_size=10", "got 11")),
    "input-features-transposed": (BI, lambda m: m(zeros(5, 10, 3)), ("transposed",)),
    "unbatched-features": (BI, lambda m: m(zeros(5, 11)), ("input_size=10",)),
    "input-dtype": (BI, lambda m: m(zeros(*X, dtype=torch.float64)), ("float64", "float32")),
    "input-int": (BI, lambda m: m(zeros(*X, dtype=torch.int64)), ("int64",)),
    "zero-steps": (BI, lambda m: m(zeros(0, 3, 10)), ("L = 0",)),
    "h0-layers": (
        BI,
        lambda m: m(zeros(*X), (zeros(2, 3, 20), zeros(4, 3, 20))),
        ("(4, 3, 20)", "(2, 3, 20)", "num_layers * num_directions = 2 * 2 = 4"),
    ),
    "h0-batch": (
        BI,
        lambda m: m(zeros(*X), (zeros(4, 2, 20), zeros(4, 3, 20))),
        ("(4, 3, 20)", "N = 3"),
    ),
    "c0-size": (
        BI,
        lambda m: m(zeros(*X), (zeros(4, 3, 20), zeros(4, 3, 21))),
        ("c0", "(4, 3, 20)", "(4, 3, 21)"),
    ),
    "h0-proj": (
        {"input_size": 10, "hidden_size": 20, "proj_size": 5},
        lambda m: m(zeros(*X), (zeros(1, 3, 20), zeros(1, 3, 20))),
        ("(1, 3, 5)", "proj_size = 5"),
    ),
    "states-batch-first": (
        {"input_size": 10, "hidden_size": 20, "batch_first": True},
        lambda m: m(zeros(3, 5, 10), (zeros(3, 1, 20), zeros(3, 1, 20))),
        ("(1, 3, 20)", "batch_first does not apply"),
    ),
    "states-rank-batched": (
        BI,
        lambda m: m(zeros(*X), (zeros(4, 20), zeros(4, 20))),
        ("3-D", "(4, 20)"),
    ),
    "states-rank-unbatched": (
        BI,
        lambda m: m(zeros(5, 10), (zeros(4, 3, 20), zeros(4, 3, 20))),
        ("2-D", "unbatched"),
    ),
    "states-single-tensor": (BI, lambda m: m(zeros(*X), zeros(4, 3, 20)), ("tuple (h0, c0)",)),
    "states-three": (
        BI,
        lambda m: m(zeros(*X), (zeros(4, 3, 20),) * 3),
        ("tuple (h0, c0)", "3 items"),
    ),
    "states-int": (BI, lambda m: m(zeros(*X), 3), ("tuple (h0, c0)", "int")),
    "states-dtype": (
        BI,
        lambda m: m(zeros(*X), (zeros(4, 3, 20, dtype=torch.float64), zeros(4, 3, 20))),
        ("float64",),
    ),
    "packed-features": (
        BI,
        lambda m: m(pack_padded_sequence(zeros(5, 3, 11), [5, 3, 2])),
        ("input_size=10",),
    ),
    "packed-dtype": (
        BI,
        lambda m: m(pack_padded_sequence(zeros(*X, dtype=torch.float64), [5, 3, 2])),
        ("float64",),
    ),
    "packed-states-batch": (
        BI,
        lambda m: m(pack_padded_sequence(zeros(*X), [5, 3, 2]), (zeros(4, 2, 20),) * 2),
        ("(4, 3, 20)",),
    ),
}

# Mistakes where torch fails only by accident (see lstmkit.checks): the type lstmkit raises.
ACCIDENTAL = {
    "states-one": (BI, lambda m: m(zeros(*X), (zeros(4, 3, 20),)), RuntimeError),
    "states-none-inside": (BI, lambda m: m(zeros(*X), (zeros(4, 3, 20), None)), TypeError),
    "input-list": (BI, lambda m: m([1.0, 2.0]), TypeError),
}


@pytest.mark.parametrize("case", FORWARD_CASES, ids=str)
def test_forward_errors_match_torch(case: str) -> None:
    kwargs, call, fragments = FORWARD_CASES[case]
    theirs = raised(lambda: call(torch.nn.LSTM(**kwargs)))
    module = lstmkit.LSTM(**kwargs)
    ours = raised(lambda: call(module))
    assert type(ours) is type(theirs), f"{type(ours)} vs torch's {type(theirs)}: {ours}"
    message = str(ours)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    assert f'lstmkit explain "{module.spec}"' in message


@pytest.mark.parametrize("case", ACCIDENTAL, ids=str)
def test_accidental_torch_errors_get_a_deliberate_type(case: str) -> None:
    kwargs, call, expected = ACCIDENTAL[case]
    raised(lambda: call(torch.nn.LSTM(**kwargs)))
    ours = raised(lambda: call(lstmkit.LSTM(**kwargs)))
    assert type(ours) is expected
    assert "LSTM(10, 20" in str(ours)


CELL_CASES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "input-3d": (lambda m: m(zeros(2, 3, 10)), ("2-D", "3-D")),
    "input-features": (lambda m: m(zeros(3, 11)), ("input_size=10", "11")),
    "input-dtype": (lambda m: m(zeros(3, 10, dtype=torch.float64)), ("float64",)),
    "state-size": (lambda m: m(zeros(3, 10), (zeros(3, 21), zeros(3, 20))), ("(3, 20)",)),
    "state-batch": (lambda m: m(zeros(3, 10), (zeros(2, 20), zeros(2, 20))), ("N = 3",)),
    "state-c-size": (lambda m: m(zeros(3, 10), (zeros(3, 20), zeros(3, 21))), ("c",)),
    "state-3d": (lambda m: m(zeros(3, 10), (zeros(1, 3, 20), zeros(1, 3, 20))), ("3, 20",)),
    "state-tensor": (lambda m: m(zeros(3, 10), zeros(3, 20)), ("tuple (h, c)",)),
    "unbatched-with-batched-state": (
        lambda m: m(zeros(10), (zeros(3, 20), zeros(3, 20))),
        ("(20,)",),
    ),
}


@pytest.mark.parametrize("case", CELL_CASES, ids=str)
def test_cell_errors_match_torch(case: str) -> None:
    call, fragments = CELL_CASES[case]
    theirs = raised(lambda: call(torch.nn.LSTMCell(10, 20)))
    ours = raised(lambda: call(lstmkit.LSTMCell(10, 20)))
    assert type(ours) is type(theirs), f"{type(ours)} vs torch's {type(theirs)}: {ours}"
    for fragment in fragments:
        assert fragment in str(ours), f"{fragment!r} not in: {ours}"
    assert "LSTMCell(10, 20)" in str(ours)
