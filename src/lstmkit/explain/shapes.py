"""The facts of one configuration: the shape table, the parameter table and the h_n row map,
each with the statements that the live check verifies."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lstmkit.explain.live import Checker, Run, equal, state_shape
from lstmkit.explain.model import Batch, Check, Dim, Parameter, Shape, StateRow
from lstmkit.spec import LSTMSpec
from lstmkit.states import DIRECTIONS

Index = tuple[int | slice, ...]
ALL = slice(None)


def index_text(index: Index) -> str:
    """``(4, slice(None), slice(None, 20))`` -> ``4, :, :20``."""

    def one(item: int | slice) -> str:
        if isinstance(item, int):
            return str(item)
        start = "" if item.start is None else str(item.start)
        stop = "" if item.stop is None else str(item.stop)
        return f"{start}:{stop}"

    return ", ".join(one(item) for item in index)


@dataclass(frozen=True)
class Setting:
    """A configuration and its input, with the indexing every statement is written in."""

    spec: LSTMSpec
    batch: Batch
    check: Checker

    @property
    def h(self) -> int:
        return self.spec.h_size

    @property
    def directions(self) -> int:
        return self.spec.num_directions

    @property
    def rows(self) -> int:
        return self.spec.num_layers * self.spec.num_directions

    @property
    def out_name(self) -> str:
        """The output as a tensor in the script: ``padded`` for a packed run."""
        return "padded" if self.batch.packed else "output"

    @property
    def out_steps(self) -> int:
        """Steps of ``out_name``: max(lengths) after pad_packed_sequence, else L."""
        return max(self.batch.lengths) if self.batch.lengths else self.batch.steps

    def state_sizes(self, size: int) -> tuple[int, ...]:
        """h0 / h_n (size H_out) or c0 / c_n (size H_cell) in this setting."""
        return state_shape(self.spec, self.batch, size)

    def half(self, direction: int) -> slice | None:
        """The slice of output's last dimension holding ``direction``; None with D = 1."""
        if self.directions == 1:
            return None
        return slice(None, self.h) if direction == 0 else slice(self.h, None)

    def out_index(self, t: int, direction: int, n: int | None = None) -> Index:
        """Index of ``out_name`` at step t, for ``direction``'s half, all sequences or n."""
        sequence: int | slice = ALL if n is None else n
        if self.batch.unbatched:
            index: Index = (t,)
        elif self.spec.batch_first:
            index = (sequence, t)
        else:
            index = (t, sequence)
        half = self.half(direction)
        if half is not None:
            return (*index, half)
        return index[:-1] if index[-1] == ALL else index  # output[4], not output[4, :]


def _dims(*pairs: tuple[str, int]) -> tuple[Dim, ...]:
    return tuple(Dim(name, size) for name, size in pairs)


def shapes(s: Setting) -> tuple[tuple[Shape, ...], tuple[Check, ...]]:
    """The shape table (each dimension named) and one checked statement per entry."""
    spec, batch = s.spec, s.batch
    h_in, h_out, h_cell = ("H_in", spec.input_size), ("H_out", s.h), ("H_cell", spec.hidden_size)
    rows, out = ("num_layers*D", s.rows), ("D*H_out", s.directions * s.h)
    sequences = () if batch.batch is None else (("N", batch.batch),)
    steps = ("L", batch.steps)
    time_batch = (sequences[0], steps) if spec.batch_first and sequences else (steps, *sequences)
    h0_note = "optional, like c0: zeros if omitted"
    if getattr(spec, "learn_initial_state", False):  # an lstmkit extra
        h0_note = "optional, like c0: the learned initial state if omitted"
    if spec.batch_first:
        h0_note += "; batch_first does not apply to h0, c0, h_n, c_n"
    halves = ""
    if s.directions == 2:
        halves = f"; [..., :{s.h}] forward, [..., {s.h}:] backward"
    table: list[tuple[str, Shape]] = []
    if batch.lengths is None:
        x_note = "one sequence (unbatched)" if batch.unbatched else ""
        table.append(("x", Shape("input", _dims(*time_batch, h_in), x_note)))
    else:
        total, longest = ("sum(lengths)", sum(batch.lengths)), ("max(lengths)", max(batch.lengths))
        running = _batch_sizes(batch.lengths)
        table += [
            ("x", Shape("input", _dims(*time_batch, h_in), "padded; packed for the call")),
            ("packed.data", Shape("packed.data", _dims(total, h_in), "every valid step, packed")),
            (
                "packed.batch_sizes",
                Shape(
                    "packed.batch_sizes",
                    _dims(longest),
                    f"sequences still running at each t: {running}",
                ),
            ),
        ]
    table += [
        ("h0", Shape("h0", _dims(rows, *sequences, h_out), h0_note)),
        ("c0", Shape("c0", _dims(rows, *sequences, h_cell))),
    ]
    if batch.lengths is None:
        note = "the top layer's h at every step" + halves
        table.append(("output", Shape("output", _dims(*time_batch, out), note)))
    else:
        padded = (sequences[0], longest) if spec.batch_first else (longest, sequences[0])
        note = (
            "pad_packed_sequence(output): the top layer's h at every step, 0 where t >= "
            "lengths[n]" + halves
        )
        table += [
            ("output.data", Shape("output.data", _dims(total, out), "output is a PackedSequence")),
            ("padded", Shape("padded", _dims(*padded, out), note)),
        ]
    last = "at each sequence's own last step" if batch.packed else "after the last step"
    table += [
        ("h_n", Shape("h_n", _dims(rows, *sequences, h_out), f"every layer's h {last}")),
        ("c_n", Shape("c_n", _dims(rows, *sequences, h_cell), f"every layer's c {last}")),
    ]
    checks = tuple(
        s.check(f"{name}.shape == {shape.sizes}", _shape_holds(name, shape.sizes))
        for name, shape in table
    )
    return tuple(shape for _, shape in table), checks


def _shape_holds(name: str, sizes: tuple[int, ...]) -> Callable[[Run], bool]:
    def holds(run: Run) -> bool:
        value: object = run
        for attribute in name.split("."):
            value = getattr(value, attribute)
        return tuple(value.shape) == sizes  # type: ignore[attr-defined]

    return holds


def _batch_sizes(lengths: tuple[int, ...]) -> list[int]:
    return [sum(1 for length in lengths if length > t) for t in range(max(lengths))]


GATES = ("i", "f", "g", "o")


def parameters(s: Setting, module: nn.Module) -> tuple[tuple[Parameter, ...], tuple[Check, ...]]:
    """torch's parameters, in torch's order, with each dimension named, then any that
    lstmkit's extras add (read from ``module``, e.g. on the meta device); and their checks."""
    spec = s.spec
    gates = 4 * spec.hidden_size
    found: list[Parameter] = []
    for layer in range(spec.num_layers):
        reads = "H_in" if layer == 0 else "D*H_out"
        for direction in range(s.directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            found.append(
                Parameter(
                    "weight_ih" + suffix,
                    f"(4*H_cell, {reads})",
                    (gates, spec.layer_input_size(layer)),
                )
            )
            found.append(Parameter("weight_hh" + suffix, "(4*H_cell, H_out)", (gates, s.h)))
            if spec.bias:
                found.append(Parameter("bias_ih" + suffix, "(4*H_cell,)", (gates,)))
                found.append(Parameter("bias_hh" + suffix, "(4*H_cell,)", (gates,)))
            if spec.proj_size:
                found.append(
                    Parameter("weight_hr" + suffix, "(H_out, H_cell)", (s.h, spec.hidden_size))
                )
    known = {p.name for p in found}
    for name, value in module.named_parameters():
        if name not in known:
            found.append(Parameter(name, "lstmkit extra", tuple(value.shape)))
    table = tuple(found)
    expected = [(p.name, p.shape) for p in table]
    total = sum(p.count for p in table)
    checks = (
        s.check(
            "lstm.named_parameters() gives exactly the names and shapes above, in this order",
            lambda run: [(n, tuple(p.shape)) for n, p in run.lstm.named_parameters()] == expected,
        ),
        s.check(
            f"sum(p.numel() for p in lstm.parameters()) == {total}",
            lambda run: sum(p.numel() for p in run.lstm.parameters()) == total,
        ),
    )
    return table, checks


def gate_rows(spec: LSTMSpec) -> str:
    """``i [0:20], f [20:40], g [40:60], o [60:80]``."""
    h = spec.hidden_size
    return ", ".join(f"{gate} [{k * h}:{(k + 1) * h}]" for k, gate in enumerate(GATES))


def state_rows(s: Setting) -> tuple[StateRow, ...]:
    """Row k of h_n / c_n: its layer and direction, its last step, and for the top layer the
    slice of output that equals it (checked)."""
    rows = []
    top = s.spec.num_layers - 1
    for k in range(s.rows):
        layer, direction = divmod(k, s.directions)
        if direction == 1:
            last = "t = 0"
        elif s.batch.packed:
            last = "t = lengths[n] - 1"
        else:
            last = f"t = {s.batch.steps - 1}"
        checks = _in_output(s, k, direction) if layer == top else ()
        rows.append(StateRow(k, layer, DIRECTIONS[direction], last, checks))
    return tuple(rows)


def _in_output(s: Setting, k: int, direction: int) -> tuple[Check, ...]:
    if direction == 1:
        return (_same(s, s.out_index(0, 1), (k,)),)
    if s.batch.lengths is None:
        return (_same(s, s.out_index(s.batch.steps - 1, 0), (k,)),)
    shown = list(enumerate(s.batch.lengths))[:4]
    checks = [_same(s, s.out_index(length - 1, 0, n), (k, n)) for n, length in shown]
    if len(s.batch.lengths) > len(shown):
        every = "torch.arange(len(lengths))"
        index = f"{every}, lengths - 1" if s.spec.batch_first else f"lengths - 1, {every}"
        half = s.half(0)
        cut = "" if half is None else ", " + index_text((half,))

        def holds(run: Run) -> bool:
            assert run.lengths is not None
            every_n = torch.arange(len(run.lengths))
            pair = (every_n, run.lengths - 1) if s.spec.batch_first else (run.lengths - 1, every_n)
            values = run.dense_output[pair]
            return equal(values if half is None else values[:, half], run.h_n[k])

        checks.append(s.check(f"{s.out_name}[{index}{cut}] == h_n[{k}]", holds))
    return tuple(checks)


def _same(s: Setting, out_index: Index, state_index: Index) -> Check:
    statement = f"{s.out_name}[{index_text(out_index)}] == h_n[{index_text(state_index)}]"
    return s.check(statement, lambda run: equal(run.dense_output[out_index], run.h_n[state_index]))
