"""One layer through the compiled kernels: directly for inference, as an autograd Function for
training (gradients for x, h0, c0 and every weight; first derivatives only)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from lstmkit.backends.cpu.library import GRADS, LAYER, Kernels

Param = Tensor | None
_NO_DIRECTION = (0,) * 5  # the weights of an absent second direction


def _addresses(tensors: list[Param] | tuple[Param, ...]) -> list[int]:
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
    steps, batch, features = x.shape
    directions = len(params) // 5
    h_size, hidden = h0.shape[2], c0.shape[2]
    new = x.new_empty
    out = new(steps, batch, directions * h_size)
    h_n = new(directions, batch, h_size)
    c_n = new(directions, batch, hidden)
    cells = new(steps, batch, directions * hidden) if cell_sequence or training else None
    fields = [
        steps,
        batch,
        features,
        hidden,
        h_size,
        directions,
        torch.get_num_threads(),
        0 if lengths is None else lengths.data_ptr(),
        x.data_ptr(),
        h0.data_ptr(),
        c0.data_ptr(),
        *_addresses(params),
        *(_NO_DIRECTION if directions == 1 else ()),
        out.data_ptr(),
        h_n.data_ptr(),
        c_n.data_ptr(),
        0 if cells is None else cells.data_ptr(),
        0,
    ]
    layer = LAYER.pack(*fields)
    forward, saved_elems, extra = kernels.forward, kernels.saved_elems, ()
    if variant is not None:
        forward, saved_elems = kernels.variant_forward, kernels.variant_saved_elems
        extra = (variant,)
    saved = None
    if training:
        saved = new(saved_elems(layer, *extra))
        fields[-1] = saved.data_ptr()
        layer = LAYER.pack(*fields)
    if forward(layer, *extra) != 0:
        raise MemoryError("lstmkit cpu backend: out of memory for the forward workspace")
    return layer, out, h_n, c_n, cells, saved


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
        return None, None, None, *first_derivatives_only((x, h0, c0, *params), result)


DOUBLE_BACKWARD = (
    "lstmkit's cpu backend computes first derivatives only: its gradients cannot be "
    "differentiated again (double backward through create_graph=True). Run with "
    "LSTMKIT_BACKEND=reference for higher derivatives."
)


def first_derivatives_only(
    inputs: tuple[Param, ...], result: tuple[Tensor | None, ...]
) -> tuple[Tensor | None, ...]:
    """``result`` (the gradients of ``inputs``), made to raise DOUBLE_BACKWARD if a backward
    run with create_graph=True is differentiated again."""
    anchor = next((t for t in inputs if t is not None and t.requires_grad), None)
    if not torch.is_grad_enabled() or anchor is None:
        return result
    computed = _FirstDerivativesOnly.apply(anchor, *(r for r in result if r is not None))
    rest = iter(computed)
    return tuple(None if r is None else next(rest) for r in result)


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
        *_addresses(incoming),
        *_addresses(wanted),
        *(_NO_DIRECTION if len(params) == 5 else ()),
    )
    if ctx.kernels.backward(ctx.layer, packed) != 0:
        raise MemoryError("lstmkit cpu backend: out of memory for the backward workspace")
    return tuple(wanted)
