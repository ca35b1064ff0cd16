"""One layer through the compiled kernels: directly for inference, as an autograd Function for
training (gradients for x, h0, c0 and every weight; first derivatives only)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from lstmkit.backends.cpu.library import GRADS, LAYER, Kernels

Param = Tensor | None
NO_DIRECTION = (0,) * 5  # the weights of an absent second direction


def through_function(tensors: tuple[Param, ...]) -> bool:
    """Whether a call must go through its autograd Function rather than straight to the
    kernels: autograd will differentiate it, or ``torch.jit.trace`` is recording it. A trace
    records a Function as one op that runs again on each call's tensors; a direct call hands
    the kernels addresses the trace never sees, so the traced module would return the empty
    tensors allocated for the results."""
    if torch.jit.is_tracing():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def addresses(tensors: list[Param] | tuple[Param, ...]) -> list[int]:
    return [0 if t is None else t.data_ptr() for t in tensors]


def run(
    kernels: Kernels,
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: list[Param],
    lengths: Tensor | None,
    cell_sequence: bool,
    training: bool,
    variant: bytes | None = None,
) -> tuple[bytes, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """The forward kernel on contiguous tensors; ``params`` is the flat LayerWeights of each
    direction, ``variant`` the packed step variants (then variant.c runs, else kernel.c).
    Returns the packed layer (for backward), out, h_n, c_n, the cells (with ``cell_sequence``
    or ``training``, else None) and what backward needs (training, else None).
    """
    steps, batch, _ = x.shape
    directions = len(params) // 5
    h_size, hidden = h0.shape[2], c0.shape[2]
    new = x.new_empty
    out = new(steps, batch, directions * h_size)
    h_n = new(directions, batch, h_size)
    c_n = new(directions, batch, hidden)
    cells = new(steps, batch, directions * hidden) if cell_sequence or training else None
    fields = layer_fields(x, h0, c0, params, lengths, out, h_n, c_n, cells)
    layer = LAYER.pack(*fields)
    saved = None
    if training:
        if variant is None:
            saved = new(kernels.saved_elems(layer))
        else:
            saved = new(kernels.variant_saved_elems(layer, variant))
        fields[-1] = saved.data_ptr()
        layer = LAYER.pack(*fields)
    forward_layer(kernels, layer, variant)
    return layer, out, h_n, c_n, cells, saved


def layer_fields(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: list[Param],
    lengths: Tensor | None,
    out: Tensor,
    h_n: Tensor,
    c_n: Tensor,
    cells: Tensor | None,
    first_row: int = 0,
) -> list[int]:
    """lk_layer's fields (without ``saved``: 0). The states are (rows, N, ·) tensors of which
    this layer uses the D rows from ``first_row``."""
    steps, batch, features = x.shape
    directions = len(params) // 5
    h_size, hidden = h0.shape[2], c0.shape[2]
    h_offset = first_row * batch * h_size * x.element_size()
    c_offset = first_row * batch * hidden * x.element_size()
    return [
        steps,
        batch,
        features,
        hidden,
        h_size,
        directions,
        torch.get_num_threads(),
        0 if lengths is None else lengths.data_ptr(),
        x.data_ptr(),
        h0.data_ptr() + h_offset,
        c0.data_ptr() + c_offset,
        *addresses(params),
        *(NO_DIRECTION if directions == 1 else ()),
        out.data_ptr(),
        h_n.data_ptr() + h_offset,
        c_n.data_ptr() + c_offset,
        0 if cells is None else cells.data_ptr(),
        0,
    ]


def forward_layer(kernels: Kernels, layer: bytes, variant: bytes | None = None) -> None:
    """The forward kernel on a packed layer: kernel.c's, or variant.c's with ``variant``."""
    status = kernels.forward(layer) if variant is None else kernels.variant_forward(layer, variant)
    if status != 0:
        raise MemoryError("lstmkit cpu backend: out of memory for the forward workspace")


class LayerFunction(torch.autograd.Function):
    """``apply(kernels, lengths, cell_sequence, x, h0, c0, *params)`` -> out, h_n, c_n[, cells].

    Inputs must be contiguous; ``params`` is each direction's LayerWeights, flattened.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        kernels: Kernels,
        lengths: Tensor | None,
        cell_sequence: bool,
        x: Tensor,
        h0: Tensor,
        c0: Tensor,
        *params: Param,
    ) -> tuple[Tensor, ...]:
        layer, out, h_n, c_n, cells, saved = run(
            kernels, x, h0, c0, list(params), lengths, cell_sequence, training=True
        )
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, h0, c0, out, cells, *params)
        # The packed layer holds addresses of these tensors; ctx keeps them alive.
        ctx.kernels, ctx.layer, ctx.lengths, ctx.saved = kernels, layer, lengths, saved
        if cell_sequence:
            return out, h_n, c_n, cells
        return out, h_n, c_n

    @staticmethod
    def backward(ctx: FunctionCtx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        x, h0, c0, _, _, *params = ctx.saved_tensors  # checks nothing was modified in place
        with torch.no_grad():
            result = _backward(ctx, x, h0, c0, params, grads)
        return None, None, None, *first_derivatives_only(result, (x, h0, c0, *params))


DOUBLE_BACKWARD = (
    "lstmkit's cpu backend computes first derivatives only: its gradients cannot be "
    "differentiated again (double backward through create_graph=True). Run with "
    "LSTMKIT_BACKEND=reference for higher derivatives."
)


def first_derivatives_only(
    result: tuple[Tensor | None, ...], inputs: tuple[Param, ...]
) -> tuple[Tensor | None, ...]:
    """The gradients ``result`` of ``inputs``; under create_graph=True, wrapped so that
    differentiating them raises DOUBLE_BACKWARD instead of silently giving zeros."""
    anchor = next((t for t in inputs if t is not None and t.requires_grad), None)
    if not torch.is_grad_enabled() or anchor is None:
        return result
    computed = iter(_FirstDerivativesOnly.apply(anchor, *(r for r in result if r is not None)))
    return tuple(None if r is None else next(computed) for r in result)


class _FirstDerivativesOnly(torch.autograd.Function):
    """Hands the gradients on unchanged; differentiating them raises DOUBLE_BACKWARD."""

    @staticmethod
    def forward(ctx: FunctionCtx, anchor: Tensor, *grads: Tensor) -> tuple[Tensor, ...]:
        return tuple(g.view_as(g) for g in grads)

    @staticmethod
    def backward(ctx: FunctionCtx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        raise RuntimeError(DOUBLE_BACKWARD)


def _backward(
    ctx: FunctionCtx,
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: list[Param],
    grads: tuple[Tensor | None, ...],
) -> tuple[Tensor | None, ...]:
    """The C backward: gradients of x, h0, c0 and every param (None where not needed)."""
    wanted = [
        torch.empty_like(t) if t is not None and need else None
        for t, need in zip((x, h0, c0, *params), ctx.needs_input_grad[3:])
    ]
    incoming = [None if g is None else g.contiguous() for g in grads]
    incoming += [None] * (4 - len(incoming))  # no cell_sequence: no gradient of cells
    packed = GRADS.pack(
        *addresses(incoming),
        *addresses(wanted),
        *(NO_DIRECTION if len(params) == 5 else ()),
    )
    if ctx.kernels.backward(ctx.layer, packed) != 0:
        raise MemoryError("lstmkit cpu backend: out of memory for the backward workspace")
    return tuple(wanted)
