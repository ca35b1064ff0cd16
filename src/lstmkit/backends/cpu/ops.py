"""The cpu kernels as torch ops, so that torch.compile, torch.export, torch.func and
torch.jit.trace see one op per layer (or stack), never ctypes and raw addresses.

Ops (namespace ``lstmkit``), tensor-only schemas; an absent tensor (no bias, a variant that is
off) is an empty one, since torch's autograd wrapper mishandles ``None`` in a tensor list:

- ``layer(x, h0, c0, params, lengths, variant_params, masks, keep, cell_sequence, training)``
  -> out, h_n, c_n, cells, saved: one layer, every direction (:mod:`.function`; the variant
  kernels when ``variant_params`` is not empty, :mod:`.variants`).
- ``stack(x, h0, c0, params, lengths, directions, training)`` -> out, h_n, c_n, kept: a whole
  plain stack (:mod:`.stack`).
- ``layer_backward`` and ``stack_backward``: their C backward, the gradients ``needs`` marks.

Fake implementations compute every shape from L, N and the weights' shapes: the buffer kept
for backward is sized for L*N rows whatever the lengths (:func:`.function.saved_elems`).
Building and loading the library happen inside the implementations (or, for a fake, the size
query), never in traced code. Autograd is registered with ``register_autograd`` and
``setup_context``; a backward asked to build a graph of the gradient (``create_graph=True``)
differentiates the reference recurrence instead, recomputed from the saved inputs, so that
higher derivatives are right. vmap folds the vmapped dimension into N for inference and loops
over it otherwise. torch.func's differentiating transforms cannot reach these ops (the
backend says why, in ``CpuBackend.unavailable_reason``): they run the reference.

The dispatcher's way into Python costs tens of microseconds per op on a small machine, more
than a whole small inference call, so an eager call that nothing transforms, traces or
differentiates calls the implementation directly (:func:`.route.direct`), and so does an eager
backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lstmkit.backends.cpu import autograd, batching, function, stack

Tensors = list[Tensor]


_LIBRARY = torch.library.Library("lstmkit", "DEF")
# The schemas, written out: a Library op (unlike torch.library.custom_op) costs no Python
# wrapper between the dispatcher and its implementation.
SCHEMAS = {
    "layer": "layer(Tensor x, Tensor h0, Tensor c0, Tensor[] params, Tensor? lengths, "
    "Tensor[] variant_params, Tensor[] masks, float[] keep, bool cell_sequence, bool training) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    "layer_backward": "layer_backward(Tensor x, Tensor h0, Tensor c0, Tensor[] params, "
    "Tensor? lengths, Tensor[] variant_params, Tensor[] masks, float[] keep, Tensor out, "
    "Tensor cells, Tensor saved, Tensor? d_out, Tensor? d_h_n, Tensor? d_c_n, Tensor? d_cells, "
    "bool[] needs) -> Tensor[]",
    "stack": "stack(Tensor x, Tensor h0, Tensor c0, Tensor[] params, Tensor? lengths, "
    "int directions, bool training) -> (Tensor, Tensor, Tensor, Tensor[])",
    "stack_backward": "stack_backward(Tensor x, Tensor h0, Tensor c0, Tensor[] params, "
    "Tensor? lengths, int directions, Tensor out, Tensor[] kept, Tensor? d_out, Tensor? d_h_n, "
    "Tensor? d_c_n, bool[] needs) -> Tensor[]",
}


def _op(name: str) -> Callable:
    """Define ``lstmkit::name`` with the decorated function as its CPU implementation."""

    def define(implementation: Callable) -> torch._ops.OpOverload:
        _LIBRARY.define(SCHEMAS[name])
        _LIBRARY.impl(name, implementation, "CPU")
        return getattr(torch.ops.lstmkit, name).default

    return define


def check_lengths(lengths: Tensor | None, steps: int) -> None:
    """What the kernels assume of ``lengths``; a traced graph cannot check values before its
    ops run (:func:`lstmkit.checks.check_lengths` skips them there), so the ops do."""
    if lengths is None or lengths.numel() == 0:
        return
    low, high = int(lengths.min()), int(lengths.max())
    if low < 0 or high > steps:
        raise ValueError(
            f"lengths must lie in [0, L] = [0, {steps}] (L is the padded sequence length), "
            f"got values from {low} to {high}"
        )
    if bool((lengths[1:] > lengths[:-1]).any()):
        raise ValueError(f"the kernels need lengths in non-increasing order, got {lengths}")


@_op("layer")
def layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: Tensors,
    lengths: Tensor | None,
    variant_params: Tensors,
    masks: Tensors,
    keep: list[float],
    cell_sequence: bool,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_lengths(lengths, x.shape[0])
    return function.forward(
        x, h0, c0, params, lengths, variant_params, masks, keep, cell_sequence, training
    )


@torch.library.register_fake("lstmkit::layer")
def _(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: Tensors,
    lengths: Tensor | None,
    variant_params: Tensors,
    masks: Tensors,
    keep: list[float],
    cell_sequence: bool,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    steps, batch, _ = x.shape
    directions = len(params) // 5
    h_size, hidden = h0.shape[2], c0.shape[2]
    new = x.new_empty
    cells = new(steps, batch, directions * hidden) if cell_sequence or training else new(0)
    saved = new(0)
    if training:
        key = function.variant_key(variant_params, masks, keep)
        per_row = function.saved_elems(
            x.dtype, int(hidden), int(h_size), function.proj_key(params), key
        )
        saved = new(steps * batch * per_row)
    return (
        new(steps, batch, directions * h_size),
        new(directions, batch, h_size),
        new(directions, batch, hidden),
        cells,
        saved,
    )


@_op("layer_backward")
def layer_backward(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: Tensors,
    lengths: Tensor | None,
    variant_params: Tensors,
    masks: Tensors,
    keep: list[float],
    out: Tensor,
    cells: Tensor,
    saved: Tensor,
    d_out: Tensor | None,
    d_h_n: Tensor | None,
    d_c_n: Tensor | None,
    d_cells: Tensor | None,
    needs: list[bool],
) -> Tensors:
    return function.backward(
        x, h0, c0, params, lengths, variant_params, masks, keep,
        out, cells, saved, d_out, d_h_n, d_c_n, d_cells, needs,
    )  # fmt: skip


@torch.library.register_fake("lstmkit::layer_backward")
def _(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: Tensors,
    lengths: Tensor | None,
    variant_params: Tensors,
    masks: Tensors,
    keep: list[float],
    out: Tensor,
    cells: Tensor,
    saved: Tensor,
    d_out: Tensor | None,
    d_h_n: Tensor | None,
    d_c_n: Tensor | None,
    d_cells: Tensor | None,
    needs: list[bool],
) -> Tensors:
    return _like_needed([x, h0, c0, *params, *variant_params], needs)


@_op("stack")
def stack_op(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: Tensors,
    lengths: Tensor | None,
    directions: int,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensors]:
    check_lengths(lengths, x.shape[0])
    return stack.forward(x, h0, c0, params, lengths, directions, training)


@torch.library.register_fake("lstmkit::stack")
def _(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: Tensors,
    lengths: Tensor | None,
    directions: int,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensors]:
    steps, batch, _ = x.shape
    h_size, hidden = h0.shape[2], c0.shape[2]
    layers = len(params) // (5 * directions)
    new = x.new_empty
    out = new(steps, batch, directions * h_size)
    kept: Tensors = []
    if training:
        inputs = [new(steps, batch, directions * h_size) for _ in range(layers - 1)]
        cells = [new(steps, batch, directions * hidden) for _ in range(layers)]
        per_layer = 5 * directions
        saved = [
            new(steps * batch * function.saved_elems(x.dtype, int(hidden), int(h_size), proj))
            for proj in (
                function.proj_key(params[f : f + per_layer])
                for f in range(0, len(params), per_layer)
            )
        ]
        kept = [*inputs, *cells, *saved]
    return out, new(h0.shape), new(c0.shape), kept


@_op("stack_backward")
def stack_backward(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: Tensors,
    lengths: Tensor | None,
    directions: int,
    out: Tensor,
    kept: Tensors,
    d_out: Tensor | None,
    d_h_n: Tensor | None,
    d_c_n: Tensor | None,
    needs: list[bool],
) -> Tensors:
    return stack.backward(
        x, h0, c0, params, lengths, directions, out, kept, d_out, d_h_n, d_c_n, needs
    )


@torch.library.register_fake("lstmkit::stack_backward")
def _(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: Tensors,
    lengths: Tensor | None,
    directions: int,
    out: Tensor,
    kept: Tensors,
    d_out: Tensor | None,
    d_h_n: Tensor | None,
    d_c_n: Tensor | None,
    needs: list[bool],
) -> Tensors:
    return _like_needed([x, h0, c0, *params], needs)


def _like_needed(inputs: Sequence[Tensor], needs: Sequence[bool]) -> Tensors:
    return [t.new_empty(t.shape) for t, need in zip(inputs, needs) if need]


torch.library.register_autograd(
    "lstmkit::layer", autograd.backward_layer, setup_context=autograd.setup_layer
)
torch.library.register_autograd(
    "lstmkit::stack", autograd.backward_stack, setup_context=autograd.setup_stack
)
torch.library.register_vmap("lstmkit::layer", batching.layer_rule(torch.ops.lstmkit.layer))
torch.library.register_vmap("lstmkit::stack", batching.stack_rule(torch.ops.lstmkit.stack))
