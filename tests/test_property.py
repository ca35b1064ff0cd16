"""Property test: random configurations of lstmkit.LSTM against torch.nn.LSTM, every backend.

Hypothesis draws the configuration (layers, directions, projection, layout, input form, sizes,
dtype, initial states); torch.nn.LSTM gets lstmkit's parameters through ``load_state_dict``,
and outputs, final states and every gradient (input, h0, c0, each parameter) are compared with
the suite's tolerance table. ``lengths=`` is compared with packing only the sequences of
nonzero length: a sequence of length 0 keeps its initial state and outputs zeros.

The budget is fixed for CI: ``derandomize`` makes the examples the same on every run (a
failure prints its reproduction blob), and sizes (each 1 to 70) are drawn so that the work of
one example stays bounded (``WORK`` and ``LOOP``), whatever the mix of sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit
from compare import assert_close, run_packed
from lstmkit import backends

# Multiply-adds of one example's forward pass, at most, and steps times layers times directions
# (the reference's time loop runs in Python): each example takes at most a few tenths of a second.
WORK = 2_000_000
LOOP = 120
MAX_SIZE = 70
FORMS = ("dense", "unbatched", "packed", "lengths")


@dataclass(frozen=True)
class Config:
    lstm: dict
    dtype: torch.dtype
    form: str  # one of FORMS
    steps: int
    batch: int
    lengths: tuple[int, ...]  # packed and lengths forms only
    enforce_sorted: bool
    with_hx: bool
    seed: int


@st.composite
def configs(draw: st.DrawFn, form: str) -> Config:
    layers = draw(st.integers(1, 3))
    directions = 2 if draw(st.booleans()) else 1
    hidden = draw(st.integers(1, MAX_SIZE))
    proj = draw(st.integers(0, hidden - 1))
    input_size = draw(st.integers(1, MAX_SIZE))
    h_out = proj or hidden
    # One step of one sequence: each layer and direction multiplies its input and its h by the
    # gate weights (4H rows), and h by the projection.
    layer_inputs = [input_size] + [directions * h_out] * (layers - 1)
    per_step = sum(directions * hidden * (4 * (i + h_out) + proj) for i in layer_inputs)
    room = max(1, WORK // per_step)  # steps * batch this example can afford
    steps = draw(st.integers(1, min(MAX_SIZE, room, LOOP // (layers * directions))))
    batch = 1 if form == "unbatched" else draw(st.integers(1, min(MAX_SIZE, max(1, room // steps))))
    lengths: tuple[int, ...] = ()
    enforce_sorted = False
    if form == "packed":
        lengths = tuple(draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch)))
        enforce_sorted = draw(st.booleans())
        if enforce_sorted:
            lengths = tuple(sorted(lengths, reverse=True))
    elif form == "lengths":
        values = draw(st.lists(st.integers(0, steps), min_size=batch, max_size=batch))
        # At least one sequence of nonzero length, so that torch.nn.LSTM has one to run.
        anchor = draw(st.integers(0, batch - 1))
        values[anchor] = max(values[anchor], 1)
        lengths = tuple(values)
    return Config(
        lstm={
            "input_size": input_size,
            "hidden_size": hidden,
            "num_layers": layers,
            "bidirectional": directions == 2,
            "proj_size": proj,
            "batch_first": draw(st.booleans()),
        },
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        form=form,
        steps=steps,
        batch=batch,
        lengths=lengths,
        enforce_sorted=enforce_sorted,
        with_hx=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _inputs(config: Config, spec: lstmkit.LSTMSpec) -> list[Tensor]:
    """x, and with ``with_hx`` h0 and c0, as leaves requiring grad."""
    dtype = config.dtype
    if config.form == "unbatched":
        shape: tuple[int, ...] = (config.steps,)
        batch: tuple[int, ...] = ()
    else:
        shape = (config.batch, config.steps) if spec.batch_first else (config.steps, config.batch)
        batch = (config.batch,)
    leaves = [torch.randn(*shape, spec.input_size, dtype=dtype)]
    if config.with_hx:
        rows = spec.num_layers * spec.num_directions
        leaves.append(torch.randn(rows, *batch, spec.h_size, dtype=dtype))
        leaves.append(torch.randn(rows, *batch, spec.hidden_size, dtype=dtype))
    return [t.requires_grad_() for t in leaves]


def _ours(lstm: lstmkit.LSTM, config: Config, x: Tensor, hx: tuple | None) -> list[Tensor]:
    if config.form == "packed":
        return _run_packed(lstm, config, x, hx)
    if config.form == "lengths":
        out, (h, c) = lstm(x, hx, lengths=list(config.lengths))
        return [out, h, c]
    out, (h, c) = lstm(x, hx)
    return [out, h, c]


def _theirs(lstm: torch.nn.LSTM, config: Config, x: Tensor, hx: tuple | None) -> list[Tensor]:
    if config.form == "packed":
        return _run_packed(lstm, config, x, hx)
    if config.form == "lengths":
        return _pack_live_sequences(lstm, config, x, hx)
    out, (h, c) = lstm(x, hx)
    return [out, h, c]


def _run_packed(lstm: torch.nn.Module, config: Config, x: Tensor, hx: tuple | None) -> list[Tensor]:
    return list(run_packed(lstm, x, config.lengths, hx, config.enforce_sorted))


def _pack_live_sequences(
    lstm: torch.nn.LSTM, config: Config, x: Tensor, hx: tuple | None
) -> list[Tensor]:
    """What ``lengths=`` must give: pack, run and unpack the sequences of nonzero length;
    the others output zeros and keep their initial state (zeros without ``hx``)."""
    lengths = torch.tensor(config.lengths)
    live = (lengths > 0).nonzero().squeeze(1)  # (live N,)
    batch_dim = 0 if lstm.batch_first else 1
    packed = pack_padded_sequence(
        x.index_select(batch_dim, live),
        lengths[live],
        batch_first=lstm.batch_first,
        enforce_sorted=False,
    )
    live_hx = None if hx is None else tuple(s.index_select(1, live) for s in hx)
    packed_out, (h, c) = lstm(packed, live_hx)
    out, _ = pad_packed_sequence(
        packed_out, batch_first=lstm.batch_first, total_length=config.steps
    )
    full_out = out.new_zeros(*x.shape[:2], out.shape[-1]).index_copy(batch_dim, live, out)
    if hx is None:
        rows = h.shape[0]
        hx = (
            h.new_zeros(rows, config.batch, h.shape[-1]),
            c.new_zeros(rows, config.batch, c.shape[-1]),
        )
    h0, c0 = hx
    return [full_out, h0.index_copy(1, live, h), c0.index_copy(1, live, c)]


def _check(config: Config) -> None:
    torch.manual_seed(config.seed)
    ours = lstmkit.LSTM(**config.lstm, dtype=config.dtype)
    theirs = torch.nn.LSTM(**config.lstm, dtype=config.dtype)
    theirs.load_state_dict(ours.state_dict())
    leaves = _inputs(config, ours.spec)
    twins = [t.detach().clone().requires_grad_() for t in leaves]
    hx = tuple(leaves[1:]) if config.with_hx else None
    twin_hx = tuple(twins[1:]) if config.with_hx else None

    expected = _theirs(theirs, config, twins[0], twin_hx)
    actual = _ours(ours, config, leaves[0], hx)
    weights = [torch.randn_like(t) for t in expected]
    sum((t * w).sum() for t, w in zip(expected, weights)).backward()
    sum((t * w).sum() for t, w in zip(actual, weights)).backward()

    for name, a, e in zip(("output", "h_n", "c_n"), actual, expected):
        assert_close(a, e, name)
    for name, a, e in zip(("input", "h0", "c0"), leaves, twins):
        assert_close(a.grad, e.grad, f"grad {name}", "grad")
    theirs_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        assert_close(param.grad, theirs_params[name].grad, f"grad {name}", "grad")


# 10 examples per input form, so 40 per backend. The backend fixture only sets LSTMKIT_BACKEND,
# the same for every example of one test run, so sharing it across examples is what is wanted.
# No example database: derandomize fixes the examples, and a failure is reproduced from its
# printed blob, not from a file on one machine.
@settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@pytest.mark.parametrize("form", FORMS)
@given(data=st.data())
def test_random_configurations_match_torch(form: str, backend: str, data: st.DataObject) -> None:
    _check(data.draw(configs(form), label="config"))
    assert backends.last_choice().backend == backend
