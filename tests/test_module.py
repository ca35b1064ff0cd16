"""The modules as objects: init, state_dict, repr, copying, threads, dropout, and the rule that
library code never calls torch's recurrent kernels."""

from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils._python_dispatch import TorchDispatchMode

import lstmkit
from compare import assert_close
from lstmkit.cli import main

CONFIGS = [
    {"input_size": 10, "hidden_size": 20},
    {"input_size": 10, "hidden_size": 20, "num_layers": 2, "bidirectional": True},
    {"input_size": 7, "hidden_size": 9, "num_layers": 3, "proj_size": 4, "bias": False},
    {"input_size": 3, "hidden_size": 5, "batch_first": True, "dropout": 0.3, "num_layers": 2},
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: str(lstmkit.LSTMSpec(**k)))
def test_same_parameters_init_and_repr_as_torch(kwargs: dict) -> None:
    torch.manual_seed(7)
    ours = lstmkit.LSTM(**kwargs)
    torch.manual_seed(7)
    theirs = torch.nn.LSTM(**kwargs)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    for name, value in theirs_sd.items():
        assert torch.equal(ours_sd[name], value), name
    assert repr(ours) == repr(theirs)
    assert [[p.shape for p in ws] for ws in ours.all_weights] == [
        [p.shape for p in ws] for ws in theirs.all_weights
    ]


def test_cell_parameters_init_and_repr_as_torch() -> None:
    for bias in (True, False):
        torch.manual_seed(3)
        ours = lstmkit.LSTMCell(6, 4, bias=bias)
        torch.manual_seed(3)
        theirs = torch.nn.LSTMCell(6, 4, bias=bias)
        assert repr(ours) == repr(theirs)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        for name, value in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[name], value)


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: str(lstmkit.LSTMSpec(**k)))
def test_state_dict_loads_strictly_both_ways(kwargs: dict) -> None:
    ours, theirs = lstmkit.LSTM(**kwargs), torch.nn.LSTM(**kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value)
    other = torch.nn.LSTM(**kwargs)
    other.load_state_dict(lstmkit.LSTM(**kwargs).state_dict(), strict=True)
    cell, torch_cell = lstmkit.LSTMCell(3, 4), torch.nn.LSTMCell(3, 4)
    cell.load_state_dict(torch_cell.state_dict(), strict=True)
    torch_cell.load_state_dict(lstmkit.LSTMCell(3, 4).state_dict(), strict=True)


def _run(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out, (h, c) = module(x)
    return torch.cat([out.flatten(), h.flatten(), c.flatten()])


def test_copies_pickle_save_and_dtype_conversion() -> None:
    lstm = lstmkit.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3)
    x = torch.randn(5, 2, 4)
    expected = _run(lstm, x)
    assert torch.equal(_run(copy.deepcopy(lstm), x), expected)
    assert torch.equal(_run(pickle.loads(pickle.dumps(lstm)), x), expected)
    buffer = io.BytesIO()
    torch.save(lstm, buffer)
    buffer.seek(0)
    assert torch.equal(_run(torch.load(buffer, weights_only=False), x), expected)
    doubled = copy.deepcopy(lstm).double()
    assert all(p.dtype == torch.float64 for p in doubled.parameters())
    assert_close(_run(doubled, x.double()).float(), expected, "double()")
    halved = copy.deepcopy(lstm).to(torch.float64)
    assert _run(halved, x.double()).dtype == torch.float64
    lstm.flatten_parameters()
    assert torch.equal(_run(lstm, x), expected)


def test_replaced_and_parametrized_weights_are_used() -> None:
    """The module keeps its parameter lists between calls; every way of changing a weight must
    still reach the next call: in-place edits, a new Parameter, load_state_dict(assign=True),
    and parametrizations (weight norm), whose value is computed anew each call."""
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(4, 6, num_layers=2, bidirectional=True)
    oracle = torch.nn.LSTM(4, 6, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 4)

    def check(what: str) -> None:
        oracle.load_state_dict({k: v.detach() for k, v in lstm.state_dict().items()})
        with torch.no_grad():
            assert_close(lstm(x)[0], oracle(x)[0], what)

    check("initial")
    with torch.no_grad():
        lstm.weight_hh_l1.mul_(2.0)
    check("in-place edit")
    lstm.weight_ih_l0_reverse = torch.nn.Parameter(torch.randn(24, 4))
    check("new Parameter")
    state = {k: torch.randn_like(v) for k, v in lstm.state_dict().items()}
    lstm.load_state_dict(state, assign=True)
    check("load_state_dict(assign=True)")

    parametrize = torch.nn.utils.parametrize
    weight_norm = torch.nn.utils.parametrizations.weight_norm
    weight_norm(lstm, "weight_hh_l0")
    with torch.no_grad():
        lstm.parametrizations.weight_hh_l0.original0.mul_(0.5)  # the norm g
        effective = lstm.weight_hh_l0.clone()
        out = lstm(x)[0]
    parametrize.remove_parametrizations(lstm, "weight_hh_l0")
    assert torch.equal(lstm.weight_hh_l0, effective)
    with torch.no_grad():
        assert torch.equal(lstm(x)[0], out)
    check("after removing the parametrization")


def test_configuration_attributes_are_revalidated_when_set() -> None:
    lstm = lstmkit.LSTM(4, 6, num_layers=2)
    lstm.batch_first = True
    assert lstm.spec.batch_first
    out, _ = lstm(torch.randn(2, 5, 4))
    assert out.shape == (2, 5, 6)
    with pytest.raises(ValueError, match="dropout"):
        lstm.dropout = 2.0


def test_threads_share_a_module_safely() -> None:
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(8, 16, num_layers=2, bidirectional=True)
    inputs = [torch.randn(12, 3, 8) for _ in range(4)]
    expected = [_run(lstm, x) for x in inputs]
    results: dict[tuple[int, int], torch.Tensor] = {}

    def work(worker: int) -> None:
        for round_ in range(3):
            index = (worker + round_) % len(inputs)
            results[(worker, round_)] = _run(lstm, inputs[index])

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 12
    for (worker, round_), value in results.items():
        assert torch.equal(value, expected[(worker + round_) % len(inputs)])


def test_dropout_between_layers() -> None:
    torch.manual_seed(0)
    kwargs = {"input_size": 4, "hidden_size": 8, "num_layers": 3, "dropout": 0.5}
    ours = lstmkit.LSTM(**kwargs)
    theirs = torch.nn.LSTM(**kwargs)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(6, 5, 4)
    ours.eval()
    theirs.eval()
    eval_out = _run(ours, x)
    assert_close(eval_out, _run(theirs, x), "eval mode equals torch")
    ours.train()
    torch.manual_seed(1)
    train_a = _run(ours, x)
    torch.manual_seed(1)
    train_b = _run(ours, x)
    train_c = _run(ours, x)
    assert torch.equal(train_a, train_b), "dropout is reproducible under a seed"
    assert not torch.allclose(train_a, eval_out), "dropout acts in training mode"
    assert not torch.equal(train_a, train_c), "a fresh mask on each call"
    # No dropout after the last layer: with one layer, training equals eval.
    with pytest.warns(UserWarning):
        single = lstmkit.LSTM(4, 8, dropout=0.5)
    assert torch.equal(_run(single.train(), x), _run(single.eval(), x))


FORBIDDEN = (
    "lstm",
    "lstm_cell",
    "_thnn_fused_lstm_cell",
    "mkldnn_rnn_layer",
    "_cudnn_rnn",
    "miopen_rnn",
    "_lstm_mps",
    "quantized_lstm",
    "quantized_lstm_cell",
)


class RecordOps(TorchDispatchMode):
    """Records the name of every aten op that reaches the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _forbid(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("lstmkit called one of torch's recurrent kernels")

    for name in FORBIDDEN:
        for owner in (torch, torch._VF):
            if hasattr(owner, name):
                monkeypatch.setattr(owner, name, refuse, raising=False)
    monkeypatch.setattr(torch.nn.LSTM, "forward", refuse)
    monkeypatch.setattr(torch.nn.LSTMCell, "forward", refuse)


def test_never_calls_torch_recurrent_kernels(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    _forbid(monkeypatch)
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(4, 6, num_layers=2, bidirectional=True, proj_size=3).train()
    cell = lstmkit.LSTMCell(4, 6)
    x = torch.randn(5, 3, 4, requires_grad=True)
    packed = pack_padded_sequence(x, [5, 2, 3], enforce_sorted=False)
    with RecordOps() as recorder:
        out, (h, c) = lstm(x)
        packed_out, (hp, cp) = lstm(packed)
        hc, cc = cell(x[0])
        loss = out.sum() + h.sum() + c.sum() + packed_out.data.sum() + hp.sum() + cp.sum()
        (loss + hc.sum() + cc.sum()).backward()
    assert x.grad is not None
    used = {name for name in recorder.names if "lstm" in name or "rnn" in name}
    assert not used, f"torch recurrent ops reached the dispatcher: {used}"
    assert "mm" in recorder.names or "addmm" in recorder.names  # the recorder does see ops


def test_tutorial_examples_via_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    text = capsys.readouterr().out
    for line in (
        "output (L, N, D*H_out) = (7, 64, 100)",
        "h_n, c_n (num_layers*D, N, H_out) = (1, 64, 100), (1, 64, 100)",
        "h0, c0 (num_layers*D, N, H_out) = (4, 3, 20), (4, 3, 20)",
        "output (L, N, D*H_out) = (5, 3, 40)",
        "h_n, c_n (num_layers*D, N, H_out) = (4, 3, 20), (4, 3, 20)",
        "[checked] output[4, :, :20] == h_n[2]",
        "[checked] output[0, :, 20:] == h_n[3]",
    ):
        assert line in text, line


def test_tutorial_identities_directly() -> None:
    lstm = lstmkit.LSTM(10, 20, num_layers=2, bidirectional=True)
    x, h0, c0 = torch.randn(5, 3, 10), torch.randn(4, 3, 20), torch.randn(4, 3, 20)
    output, (h_n, c_n) = lstm(x, (h0, c0))
    assert output.shape == (5, 3, 40) and h_n.shape == c_n.shape == (4, 3, 20)
    assert torch.equal(output[4, :, :20], h_n[2])
    assert torch.equal(output[0, :, 20:], h_n[3])
    one = lstmkit.LSTM(300, 100, 1)
    output, (h_n, c_n) = one(torch.randn(7, 64, 300))
    assert output.shape == (7, 64, 100) and h_n.shape == c_n.shape == (1, 64, 100)


def test_empty_batch_like_torch() -> None:
    lstm = lstmkit.LSTM(10, 20, bidirectional=True)
    out, (h, c) = lstm(torch.randn(5, 0, 10))
    assert out.shape == (5, 0, 40) and h.shape == c.shape == (2, 0, 20)
