"""The live check: build the module, run it on random data, verify each printed statement.

Every statement in a report is Python over the variables of :func:`script` (``lstm``, ``x``,
``h0``, ``c0``, ``output``, ``h_n``, ``c_n``, and ``lengths``, ``packed``, ``padded`` for a
padded batch), so a reader can paste the script and try any statement. :func:`run` performs the
same steps, with the same random numbers, and :class:`Checker` verifies each statement with a
function written beside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from lstmkit.explain.model import CHECKED, FAILED, NOT_RUN, Batch, Check
from lstmkit.modules import LSTM
from lstmkit.spec import LSTMSpec


@dataclass(frozen=True)
class Run:
    """The script's variables after running it; ``lengths``, ``packed`` and ``padded`` only
    for a padded batch."""

    lstm: LSTM
    x: Tensor
    h0: Tensor
    c0: Tensor
    output: Tensor | PackedSequence
    h_n: Tensor
    c_n: Tensor
    lengths: Tensor | None
    packed: PackedSequence | None
    padded: Tensor | None

    @property
    def dense_output(self) -> Tensor:
        """``padded`` for a packed run, else ``output``: the output as a tensor."""
        if self.padded is not None:
            return self.padded
        assert isinstance(self.output, Tensor)
        return self.output


def input_shape(spec: LSTMSpec, batch: Batch) -> tuple[int, ...]:
    """The input tensor's shape in the module's layout (padded, for a packed batch)."""
    if batch.batch is None:
        return (batch.steps, spec.input_size)
    if spec.batch_first:
        return (batch.batch, batch.steps, spec.input_size)
    return (batch.steps, batch.batch, spec.input_size)


def state_shape(spec: LSTMSpec, batch: Batch, size: int) -> tuple[int, ...]:
    """h0 / c0 / h_n / c_n: (num_layers*D, N, size), or (num_layers*D, size) unbatched."""
    rows = spec.num_layers * spec.num_directions
    return (rows, size) if batch.batch is None else (rows, batch.batch, size)


def _args(shape: tuple[int, ...]) -> str:
    return ", ".join(str(n) for n in shape)


def script(spec: LSTMSpec, batch: Batch, seed: int) -> tuple[str, ...]:
    """The code the live check runs, one line each, commented with the layouts."""
    batch_first = ", batch_first=True" if spec.batch_first and batch.packed else ""
    x_layout = "(L, H_in)" if batch.unbatched else "(N, L, H_in)" if spec.batch_first else None
    x_layout = x_layout or "(L, N, H_in)"
    state = "(num_layers*D, H_" if batch.unbatched else "(num_layers*D, N, H_"
    lines: list[tuple[str, str]] = [("import torch", ""), ("import lstmkit", "")]
    if batch.packed:
        lines.append(
            ("from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence", "")
        )
    lines += [(f"torch.manual_seed({seed})", ""), (f"lstm = lstmkit.{spec}", "")]
    if spec.dropout > 0:
        lines.append(("lstm.eval()", "dropout off, so the checks' runs repeat exactly"))
    if batch.lengths is not None:
        lines.append((f"lengths = torch.tensor([{_args(batch.lengths)}])", "(N,) valid steps"))
    padding = "; t >= lengths[n] is padding" if batch.packed else ""
    lines += [
        (f"x = torch.randn({_args(input_shape(spec, batch))})", x_layout + padding),
        (f"h0 = torch.randn({_args(state_shape(spec, batch, spec.h_size))})", state + "out)"),
        (f"c0 = torch.randn({_args(state_shape(spec, batch, spec.hidden_size))})", state + "cell)"),
    ]
    if batch.packed:
        layout = "(N, max(lengths), D*H_out)" if spec.batch_first else "(max(lengths), N, D*H_out)"
        lines += [
            (f"packed = pack_padded_sequence(x, lengths{batch_first}, enforce_sorted=False)", ""),
            ("output, (h_n, c_n) = lstm(packed, (h0, c0))", "output is a PackedSequence"),
            (f"padded, _ = pad_packed_sequence(output{batch_first})", layout),
        ]
    else:
        lines.append(("output, (h_n, c_n) = lstm(x, (h0, c0))", ""))
    width = max(len(code) for code, comment in lines if comment)
    return tuple(f"{code:<{width}}  # {comment}" if comment else code for code, comment in lines)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: the live check's tensors are tiny, and waking a thread pool
    for each small op costs more than the op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build(spec: LSTMSpec, device: str | None = None) -> tuple[LSTM, tuple[str, ...]]:
    """The module of ``spec``, and the warnings its constructor gave (reported as notes)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lstm = LSTM(**dataclasses.asdict(spec), device=device)
    return lstm, tuple(str(warning.message) for warning in caught)


def run(spec: LSTMSpec, batch: Batch, seed: int) -> Run:
    """Run :func:`script` (same steps, same random numbers) without touching the caller's
    random state."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        lstm, _ = build(spec)
        if spec.dropout > 0:
            lstm.eval()
        lengths = None if batch.lengths is None else torch.tensor(batch.lengths)
        x = torch.randn(input_shape(spec, batch))
        h0 = torch.randn(state_shape(spec, batch, spec.h_size))
        c0 = torch.randn(state_shape(spec, batch, spec.hidden_size))
        if lengths is None:
            output, (h_n, c_n) = lstm(x, (h0, c0))
            return Run(lstm, x, h0, c0, output, h_n, c_n, None, None, None)
        bf = spec.batch_first
        packed = pack_padded_sequence(x, lengths, batch_first=bf, enforce_sorted=False)
        output, (h_n, c_n) = lstm(packed, (h0, c0))
        padded, _ = pad_packed_sequence(output, batch_first=bf)
        return Run(lstm, x, h0, c0, output, h_n, c_n, lengths, packed, padded)


class Checker:
    """Turns (statement, verifier) pairs into :class:`Check` records, verified on ``run``."""

    def __init__(self, run: Run | None) -> None:
        self.run = run

    def __call__(self, statement: str, holds: Callable[[Run], bool]) -> Check:
        if self.run is None:
            return Check(statement, NOT_RUN)
        with torch.no_grad():
            ok = bool(holds(self.run))
        return Check(statement, CHECKED if ok else FAILED)


def equal(a: Tensor, b: Tensor) -> bool:
    """``a == b`` in a statement: same shape, every element equal."""
    return a.shape == b.shape and torch.equal(a, b)


def differ(a: Tensor, b: Tensor) -> bool:
    """``a != b`` in a statement: clearly different values, not rounding."""
    return a.shape != b.shape or not torch.allclose(a, b)
