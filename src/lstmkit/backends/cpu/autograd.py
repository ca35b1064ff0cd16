"""Autograd of the ``lstmkit::layer`` and ``lstmkit::stack`` ops (registered in :mod:`.ops`).

``setup_context`` saves the inputs and what the training forward returned for backward;
backward runs the C backward op. When autograd is asked to build a graph of the gradient
(``create_graph=True``), the C backward, which computes first
derivatives only, would give a gradient that cannot be differentiated again, so the
gradient is instead that of :mod:`lstmkit.reference`, recomputed from the saved inputs:
the same values, and differentiable any number of times. :func:`lstmkit.backends.last_choice`
then says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lstmkit import backends, reference
from lstmkit.backends.cpu import function, route, stack
from lstmkit.backends.cpu.variants import to_variants
from lstmkit.reference import LayerWeights

GRAPH_OF_GRADIENT = (
    "its C backward computes first derivatives only, and a graph of the gradient was asked "
    "for (create_graph=True): the gradient is the reference's, recomputed"
)
NOT_TRAINED = (
    "lstmkit's cpu backend: this {what} ran without keeping what backward needs (it was "
    "called, or traced, with no input requiring grad); call it again with gradients enabled"
)

Grads = list[Tensor | None]


def setup_layer(ctx: object, inputs: tuple, output: tuple) -> None:
    x, h0, c0, params, lengths, variant_params, masks, keep, cell_sequence, training = inputs
    out, _, _, cells, saved = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, h0, c0, lengths, out, cells, saved, *params, *variant_params, *masks)
    ctx.sizes = (len(params), len(variant_params))
    ctx.keep, ctx.cell_sequence, ctx.training = keep, cell_sequence, training


def backward_layer(
    ctx: object,
    d_out: Tensor | None,
    d_h_n: Tensor | None,
    d_c_n: Tensor | None,
    d_cells: Tensor | None,
    d_saved: Tensor | None,
) -> tuple:
    x, h0, c0, lengths, out, cells, saved, *rest = ctx.saved_tensors
    n_params, n_variant = ctx.sizes
    params, variant_params = rest[:n_params], rest[n_params : n_params + n_variant]
    masks = rest[n_params + n_variant :]
    needs_in = ctx.needs_input_grad
    needs = [*needs_in[:3], *needs_in[3], *needs_in[5]]
    incoming = [d_out, d_h_n, d_c_n, d_cells if ctx.cell_sequence else None]
    inputs = [x, h0, c0, *params, *variant_params]
    if torch.is_grad_enabled():
        weights = _layer_weights(params)
        variants = to_variants(variant_params, masks, ctx.keep) if variant_params else None
        with torch.enable_grad():
            outputs = reference.lstm_layer(x, h0, c0, weights, lengths, ctx.cell_sequence, variants)
        grads = _reference_grads(outputs, incoming, inputs, needs)
    else:
        if not ctx.training:
            raise RuntimeError(NOT_TRAINED.format(what="layer"))
        run = function.backward if route.direct(x, False) else torch.ops.lstmkit.layer_backward
        computed = run(
            x, h0, c0, params, lengths, variant_params, masks, ctx.keep,
            out, cells, saved, *incoming, needs,
        )  # fmt: skip
        grads = _spread(computed, needs)
    d_params = grads[3 : 3 + n_params]
    d_variant = grads[3 + n_params :]
    # torch matches these against the inputs' structure, in which an empty list (no keep)
    # is a list and a list of floats is one leaf.
    d_keep = None if ctx.keep else []
    return (*grads[:3], d_params, None, d_variant, [None] * len(masks), d_keep, None, None)


def setup_stack(ctx: object, inputs: tuple, output: tuple) -> None:
    x, h0, c0, params, lengths, directions, training = inputs
    out, _, _, kept = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, h0, c0, lengths, out, *params, *kept)
    ctx.n_params, ctx.directions, ctx.training = len(params), directions, training


def backward_stack(
    ctx: object,
    d_out: Tensor | None,
    d_h_n: Tensor | None,
    d_c_n: Tensor | None,
    d_kept: Grads,
) -> tuple:
    needs_in = ctx.needs_input_grad
    grads = stack_grads(ctx, [*needs_in[:3], *needs_in[3]], d_out, d_h_n, d_c_n)
    return (*grads[:3], grads[3:], None, None, None)


def stack_grads(
    ctx: object,
    needs: list[bool],
    d_out: Tensor | None,
    d_h_n: Tensor | None,
    d_c_n: Tensor | None,
) -> Grads:
    """The gradients of x, h0, c0 and every parameter (``None`` where ``needs`` is false)
    from what :func:`setup_stack` saved: the C backward, or the reference's as a graph."""
    x, h0, c0, lengths, out, *rest = ctx.saved_tensors
    params, kept = rest[: ctx.n_params], rest[ctx.n_params :]
    layers = getattr(ctx, "layers", None)
    if layers is not None:  # EagerStack's
        kept = ctx.kept
    if torch.is_grad_enabled():
        with torch.enable_grad():
            outputs = reference_stack(x, h0, c0, params, lengths, ctx.directions)
        return _reference_grads(outputs, [d_out, d_h_n, d_c_n], [x, h0, c0, *params], needs)
    if not ctx.training:
        raise RuntimeError(NOT_TRAINED.format(what="stack"))
    arguments = (x, h0, c0, params, lengths, ctx.directions, out, kept, d_out, d_h_n, d_c_n, needs)
    if route.direct(x, False):
        computed = stack.backward(*arguments, layers)
    else:
        computed = torch.ops.lstmkit.stack_backward(*arguments)
    return _spread(computed, needs)


class EagerStack(torch.autograd.Function):
    """Eager training of a plain stack: the ``lstmkit::stack`` op's implementation and
    backward under one hand-written autograd node. In plain eager code only autograd sees the
    call, and this skips the dispatcher and ``register_autograd``'s wrapper, which flattens and
    unflattens every argument list on each call (together about 0.2 ms of a tutorial-2 training
    step; see benchmarks/README.md). Compiled, exported, traced and transformed code gets the
    op. ``apply(x, h0, c0, lengths, directions, *params)`` -> output, h_n, c_n."""

    @staticmethod
    def forward(
        ctx: object,
        x: Tensor,
        h0: Tensor,
        c0: Tensor,
        lengths: Tensor | None,
        directions: int,
        *params: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        layers: list[bytes] = []
        out, h_n, c_n, kept = stack.forward(
            x, h0, c0, list(params), lengths, directions, True, layers
        )
        # kept and layers are this node's own (nothing else holds or changes them): attributes,
        # which cost less to keep and read back than saved tensors
        setup_stack(ctx, (x, h0, c0, params, lengths, directions, True), (out, h_n, c_n, []))
        ctx.kept, ctx.layers = kept, layers
        return out, h_n, c_n

    @staticmethod
    def backward(
        ctx: object, d_out: Tensor | None, d_h_n: Tensor | None, d_c_n: Tensor | None
    ) -> tuple:
        needs = ctx.needs_input_grad
        grads = stack_grads(ctx, [*needs[:3], *needs[5:]], d_out, d_h_n, d_c_n)
        return (*grads[:3], None, None, *grads[3:])


def reference_stack(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: Sequence[Tensor],
    lengths: Tensor | None,
    directions: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The stack by :mod:`lstmkit.reference`, layer by layer: output, h_n, c_n."""
    per_layer = 5 * directions
    layer_input, h_n, c_n = x, [], []
    for index, first in enumerate(range(0, len(params), per_layer)):
        rows = slice(index * directions, (index + 1) * directions)
        weights = _layer_weights(params[first : first + per_layer])
        layer_input, h, c = reference.lstm_layer(layer_input, h0[rows], c0[rows], weights, lengths)
        h_n.append(h)
        c_n.append(c)
    return layer_input, torch.cat(h_n), torch.cat(c_n)


def _layer_weights(params: Sequence[Tensor]) -> list[LayerWeights]:
    """Each direction's LayerWeights from its five tensors (empty ones are absent)."""
    return [
        LayerWeights(*(t if t is not None and t.numel() else None for t in params[d : d + 5]))
        for d in range(0, len(params), 5)
    ]


def _reference_grads(
    outputs: Sequence[Tensor], incoming: Grads, inputs: Sequence[Tensor], needs: Sequence[bool]
) -> Grads:
    """The gradients of ``inputs`` marked in ``needs`` from the recomputed reference
    ``outputs`` and their incoming gradients, as a graph (differentiable again)."""
    backends.note_choice(backends.Choice("reference", False, (("cpu", GRAPH_OF_GRADIENT),)))
    pairs = [(o, g) for o, g in zip(outputs, incoming) if g is not None]
    wanted = [t for t, need in zip(inputs, needs) if need]
    if not pairs or not wanted:
        return [None] * len(inputs)
    computed = torch.autograd.grad(
        [o for o, _ in pairs],
        wanted,
        [g for _, g in pairs],
        create_graph=True,
        allow_unused=True,
    )
    return _spread(list(computed), needs)


def _spread(computed: Sequence[Tensor | None], needs: Sequence[bool]) -> Grads:
    """The gradients of the ``needs`` entries, in order, as one entry per input."""
    found = iter(computed)
    return [next(found) if need else None for need in needs]
