"""Reading an LSTM's results: its two directions, its layers, each sequence's final state.

Shapes use torch's notation: L steps, N sequences, D directions (2 if bidirectional), H_out
features of h, H_cell features of c. The helpers work on the results of ``lstmkit.LSTM`` and of
``torch.nn.LSTM`` alike.

- :func:`split_directions`: ``output`` (..., 2*H_out) -> forward and backward halves.
- :func:`layers`: ``h_n`` or ``c_n`` (num_layers*D, N, H) addressed as
  ``[layer, "forward" | "backward"]``, or viewed as (num_layers, D, N, H).
- :func:`final_hidden`: the per-sequence summary that ``output[-1]`` is often wrongly taken
  for: forward h at each sequence's last valid step, backward h at step 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

DIRECTIONS = ("forward", "backward")

Lengths = Sequence[int] | Tensor


@overload
def split_directions(output: Tensor) -> tuple[Tensor, Tensor]: ...
@overload
def split_directions(output: PackedSequence) -> tuple[PackedSequence, PackedSequence]: ...
def split_directions(
    output: Tensor | PackedSequence,
) -> tuple[Tensor, Tensor] | tuple[PackedSequence, PackedSequence]:
    """A bidirectional LSTM's output as its forward and its backward half.

    Args:
        output: (L, N, 2*H_out), (N, L, 2*H_out) with batch_first, unbatched (L, 2*H_out), or
            a PackedSequence whose data is (sum of lengths, 2*H_out).

    Returns:
        ``forward, backward``, each (..., H_out), views of ``output``; PackedSequences (with
        ``output``'s batch sizes and order) for a PackedSequence.
    """
    data = output.data if isinstance(output, PackedSequence) else output
    if not isinstance(data, Tensor) or data.dim() < 1 or data.shape[-1] % 2:
        raise ValueError(
            f"split_directions expects a bidirectional LSTM's output, whose last dimension "
            f"D*H_out = 2*H_out holds the forward half then the backward half, got "
            f"{_describe(data)}"
        )
    forward, backward = data.chunk(2, dim=-1)
    if isinstance(output, PackedSequence):
        return output._replace(data=forward), output._replace(data=backward)
    return forward, backward


class LayerStates:
    """``h_n`` or ``c_n`` (or ``h0``, ``c0``) addressed by layer and direction.

    Row k of the states is layer ``k // D``, direction ``k % D``: layer-major, direction-minor,
    so with D = 2 ``h_n[-1]`` is the top layer's *backward* state and ``h_n[-2]`` its forward
    one.

    Shape:
        - states: (num_layers*D, N, H) or unbatched (num_layers*D, H).
        - ``view``: (num_layers, D, N, H) or (num_layers, D, H), a view of the states.
        - ``states[layer]``: (D, N, H); ``states[layer, direction]``: (N, H).
    """

    def __init__(self, states: Tensor, num_layers: int) -> None:
        if not isinstance(states, Tensor) or states.dim() not in (2, 3):
            raise ValueError(
                f"expected h_n or c_n of shape (num_layers*D, N, H) or unbatched "
                f"(num_layers*D, H), got {_describe(states)}"
            )
        rows = states.shape[0]
        if num_layers < 1 or rows % num_layers or rows // num_layers not in (1, 2):
            raise ValueError(
                f"states with {rows} rows cannot belong to an LSTM with num_layers="
                f"{num_layers}: they hold num_layers * D rows, with D = 1 (one direction) or "
                f"2 (bidirectional)"
            )
        self.num_layers = num_layers
        self.num_directions = rows // num_layers
        self.view = states.unflatten(0, (num_layers, self.num_directions))

    def row(self, layer: int, direction: str | int = "forward") -> int:
        """The row k of ``h_n`` holding ``layer`` (negative counts from the top) and
        ``direction`` ('forward' / 'backward', or 0 / 1)."""
        if not -self.num_layers <= layer < self.num_layers:
            raise IndexError(
                f"layer {layer} out of range for num_layers={self.num_layers} (use 0 to "
                f"{self.num_layers - 1}, or -1 for the top layer)"
            )
        return (layer % self.num_layers) * self.num_directions + self._direction(direction)

    def _direction(self, direction: str | int) -> int:
        index = DIRECTIONS.index(direction) if direction in DIRECTIONS else direction
        if not isinstance(index, int) or not 0 <= index < self.num_directions:
            known = "'forward' (0) or 'backward' (1)" if self.num_directions == 2 else "'forward'"
            raise KeyError(
                f"direction {direction!r} is not one of this LSTM's directions: {known}"
                + ("; it is not bidirectional" if direction in ("backward", 1) else "")
            )
        return index

    def __getitem__(self, key: int | tuple[int, str | int]) -> Tensor:
        if isinstance(key, tuple):
            layer, direction = key
            row = self.row(layer, direction)
            return self.view[row // self.num_directions, row % self.num_directions]
        return self.view[self.row(key) // self.num_directions]

    def __len__(self) -> int:
        return self.num_layers


def layers(states: Tensor, num_layers: int) -> LayerStates:
    """``h_n`` / ``c_n`` (num_layers*D, N, H) addressed as ``[layer, 'forward' | 'backward']``.

    Example: ``layers(h_n, num_layers=2)[-1, "forward"]`` is ``h_n[2]`` of a bidirectional
    LSTM, and ``layers(h_n, 2).view`` is ``h_n.view(2, 2, N, H)``.
    """
    return LayerStates(states, num_layers)


def final_hidden(
    output: Tensor | PackedSequence,
    lengths: Lengths | None = None,
    *,
    bidirectional: bool,
    batch_first: bool = False,
) -> Tensor:
    """Each sequence's summary for classification: forward h at its last valid step, joined
    with backward h at step 0 (where the backward direction ends).

    ``output[-1]`` is not this: for a bidirectional LSTM its backward half has seen one step
    only, and for a padded batch it is taken after the padding of every shorter sequence.

    Padding and the backward direction: the backward half at step 0 summarises the sequence
    only if the backward direction started at the sequence's own last valid step, which is
    what a packed input (``pack_padded_sequence``) gives, and ``lstmkit.LSTM``'s
    ``lengths=``. Run bidirectional LSTMs that way, then pass the output (or, for packed output,
    its padded form with the lengths).

    Args:
        output: the LSTM's output: (L, N, D*H_out), (N, L, D*H_out) with ``batch_first``,
            unbatched (L, D*H_out), or a PackedSequence.
        lengths: each sequence's number of valid steps, (N,) as a list or tensor, in batch
            order (not necessarily sorted). ``None``: every sequence has all L steps, or, for
            a PackedSequence, its own lengths.
        bidirectional: whether ``output`` holds two directions (D = 2).
        batch_first: ``output`` is (N, L, D*H_out); ignored for PackedSequence and unbatched.

    Returns:
        (N, D*H_out), or (D*H_out,) for unbatched output. For packed input and for a batch
        without padding it equals ``torch.cat([h_n[-2], h_n[-1]], dim=-1)`` (D = 2) or
        ``h_n[-1]`` (D = 1).
    """
    if isinstance(output, PackedSequence):
        padded, packed_lengths = pad_packed_sequence(output)
        if lengths is not None and _as_list(lengths) != packed_lengths.tolist():
            raise ValueError(
                f"lengths {_as_list(lengths)} disagree with the PackedSequence's own lengths "
                f"{packed_lengths.tolist()} (in batch order); pass lengths=None for packed "
                f"output"
            )
        return _final(padded, packed_lengths, bidirectional)
    if not isinstance(output, Tensor) or output.dim() not in (2, 3):
        raise ValueError(
            f"output must be the LSTM's output (L, N, D*H_out), (N, L, D*H_out) with "
            f"batch_first, unbatched (L, D*H_out), or a PackedSequence; got {_describe(output)}"
        )
    if output.dim() == 2:
        if lengths is not None:
            raise ValueError(
                "unbatched output (L, D*H_out) is one sequence of L valid steps: pass "
                "lengths=None, or slice the output to its valid steps first"
            )
        return _final(output.unsqueeze(1), None, bidirectional).squeeze(0)
    steps_first = output.transpose(0, 1) if batch_first else output
    return _final(steps_first, _check_lengths(lengths, steps_first, batch_first), bidirectional)


def _final(output: Tensor, lengths: Tensor | None, bidirectional: bool) -> Tensor:
    """(L, N, D*H_out), lengths (N,) or None -> (N, D*H_out)."""
    if bidirectional and output.shape[-1] % 2:
        raise ValueError(
            f"bidirectional=True, but the output's last dimension {output.shape[-1]} is odd: "
            f"a bidirectional output has D*H_out = 2*H_out features"
        )
    half = output.shape[-1] // 2 if bidirectional else output.shape[-1]
    if lengths is None:
        forward = output[-1, :, :half]  # (N, H_out)
    else:
        last = (lengths - 1).to(output.device)  # (N,)
        forward = output[last, torch.arange(output.shape[1], device=output.device), :half]
    if not bidirectional:
        return forward
    return torch.cat([forward, output[0, :, half:]], dim=-1)  # (N, 2*H_out)


def _check_lengths(lengths: Lengths | None, output: Tensor, batch_first: bool) -> Tensor | None:
    """lengths as an int64 (N,) tensor, checked against output (L, N, ...)."""
    if lengths is None:
        return None
    values = _as_list(lengths)
    steps, batch = output.shape[0], output.shape[1]
    layout = "(N, L, D*H_out)" if batch_first else "(L, N, D*H_out)"
    if len(values) != batch:
        raise ValueError(
            f"lengths has {len(values)} entries but the output {layout} holds N = {batch} "
            f"sequences"
            + ("" if batch_first else "; is the output batch-first? pass batch_first=True")
        )
    bad = [n for n, length in enumerate(values) if not 1 <= length <= steps]
    if bad:
        raise ValueError(
            f"each length must be between 1 and L = {steps} (the output's steps), got "
            f"lengths[{bad[0]}] = {values[bad[0]]}"
        )
    return torch.tensor(values, dtype=torch.int64)


def _as_list(lengths: Lengths) -> list[int]:
    if isinstance(lengths, Tensor):
        if lengths.dim() != 1 or lengths.is_floating_point() or lengths.is_complex():
            raise ValueError(f"lengths must be a 1-D integer tensor, got {_describe(lengths)}")
        return [int(v) for v in lengths.tolist()]
    return [int(v) for v in lengths]


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dim()}-D {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"
