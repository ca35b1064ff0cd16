"""The reference backend: :mod:`lstmkit.reference`, differentiated by autograd; it refuses
to be traced by torch.jit.trace, which would unroll its time loop."""

from __future__ import annotations

import torch
from torch import Tensor

from lstmkit import reference
from lstmkit.backends import Backend, Request
from lstmkit.reference import LayerWeights, Variant


class ReferenceBackend(Backend):
    name = "reference"
    description = "plain time loop of torch ops (lstmkit.reference); any device and dtype"
    variants = frozenset({"layer_norm", "peepholes", "zoneout", "recurrent_dropout"})

    def unavailable_reason(self, request: Request) -> str | None:
        if torch.jit.is_tracing():
            return (
                "torch.jit.trace would unroll its Python time loop to the traced length, and "
                "the trace would then be wrong at any other length (use the cpu backend, "
                "torch.compile or torch.export)"
            )
        return None

    def run_layer(
        self,
        x: Tensor,
        h0: Tensor,
        c0: Tensor,
        weights: list[LayerWeights],
        lengths: Tensor | None,
        cell_sequence: bool = False,
        variants: list[Variant] | None = None,
    ) -> tuple[Tensor, ...]:
        if lengths is not None:
            lengths = lengths.to(x.device)
        return reference.lstm_layer(x, h0, c0, weights, lengths, cell_sequence, variants)


BACKEND = ReferenceBackend()
