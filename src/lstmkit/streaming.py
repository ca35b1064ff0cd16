"""Streaming: one long sequence fed chunk by chunk, with ``(h, c)`` carried between calls.

Feeding chunks to :class:`Stream` gives exactly the outputs of one call on the whole sequence.
A ``reset`` mask starts a fresh sequence for some batch entries mid-chunk (an episode or an
utterance ended): at a step where ``reset`` is true, that entry's state is set back to the
initial state (zeros, or the module's learned initial state) before the step is computed.
:meth:`Stream.detach` cuts the graph between chunks for truncated backpropagation through time.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from lstmkit import checks

if TYPE_CHECKING:
    from lstmkit.modules import LSTM


class Stream:
    """A stateful runner over an :class:`lstmkit.LSTM` (see the module docstring).

    Args:
        lstm: a unidirectional LSTM; the runner keeps a reference, so training updates to its
            parameters are seen by later chunks.

    Shape:
        - chunk: like the module's input, (L, N, H_in), (N, L, H_in) with ``batch_first``, or
          unbatched (L, H_in); L may change from chunk to chunk, N may not.
        - reset: optional bool mask shaped like the chunk without its feature dimension,
          (L, N), (N, L) or (L,): true where a new sequence starts at that step.
        - returns the output for the chunk, shaped like the module's output.
    """

    def __init__(self, lstm: LSTM) -> None:
        if lstm.spec.bidirectional:
            raise ValueError(
                "a bidirectional LSTM cannot be streamed: its backward direction reads each "
                "sequence from its end, which a stream has not seen yet. Stream a "
                "unidirectional LSTM, or run whole sequences" + checks.hint(lstm.spec)
            )
        self.lstm = lstm
        self.state: tuple[Tensor, Tensor] | None = None

    def __call__(self, chunk: Tensor, reset: Tensor | None = None) -> Tensor:
        if isinstance(chunk, PackedSequence):
            raise TypeError(
                "Stream takes a padded chunk tensor, not a PackedSequence: streamed sequences "
                "run in lockstep; mark where one ends and a new one starts with reset="
                + checks.hint(self.lstm.spec)
            )
        spec = self.lstm.spec
        time_dim = 1 if spec.batch_first and isinstance(chunk, Tensor) and chunk.dim() == 3 else 0
        if reset is None:
            output, self.state = self.lstm(chunk, self.state)
            return output
        chunk = checks.check_tensor(chunk, "chunk", spec)
        mask = self._check_reset(reset, chunk)
        steps = chunk.shape[time_dim]
        per_step = mask if mask.dim() == 1 else mask.any(dim=1 - time_dim)  # (L,)
        starts = set(per_step.nonzero().flatten().tolist())
        bounds = sorted({0, *starts, steps})
        outputs = []
        for begin, end in itertools.pairwise(bounds):
            if begin in starts:
                self._reset_rows(mask.select(time_dim, begin))
            output, self.state = self.lstm(chunk.narrow(time_dim, begin, end - begin), self.state)
            outputs.append(output)
        return torch.cat(outputs, dim=time_dim)

    def _check_reset(self, reset: object, chunk: Tensor) -> Tensor:
        expected = tuple(chunk.shape[:-1])
        if not isinstance(reset, Tensor) or reset.dtype != torch.bool:
            raise TypeError(
                f"reset must be a bool tensor of shape {expected} (the chunk without its feature "
                f"dimension), got {type(reset).__name__}"
                + (f" of dtype {reset.dtype}" if isinstance(reset, Tensor) else "")
                + checks.hint(self.lstm.spec)
            )
        if tuple(reset.shape) != expected:
            raise ValueError(
                f"reset has shape {tuple(reset.shape)}, expected {expected}: one flag per step "
                f"and sequence, laid out like the chunk" + checks.hint(self.lstm.spec)
            )
        return reset.to(chunk.device)

    def _reset_rows(self, rows: Tensor) -> None:
        """Set the state of the entries flagged in ``rows`` ((N,) or ()) to the initial one."""
        if self.state is None:
            return  # nothing has run yet: every entry starts from the initial state anyway
        h, c = self.state  # (num_layers, N, H_out) / (num_layers, N, H_cell), or 2-D unbatched
        initial = self.lstm.initial_state()
        if initial is None:
            initial = (h.new_zeros(()), c.new_zeros(()))
        elif h.dim() == 3:
            initial = (initial[0].unsqueeze(1), initial[1].unsqueeze(1))
        flags = rows.view(1, -1, 1) if h.dim() == 3 else rows.view(1, 1)
        self.state = (torch.where(flags, initial[0], h), torch.where(flags, initial[1], c))

    def detach(self) -> None:
        """Keep the state's values but cut its graph: backpropagation stops at this point."""
        if self.state is not None:
            self.state = (self.state[0].detach(), self.state[1].detach())

    def reset(self) -> None:
        """Forget the state: the next chunk starts every sequence from the initial state."""
        self.state = None
