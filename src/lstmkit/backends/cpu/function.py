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
) -> tuple[bytes, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """The forward kernel on contiguous tensors; ``params`` is the flat LayerWeights of each
    direction. Returns the packed layer (for backward), out, h_n, c_n, the cells (with
    ``cell_sequence`` or ``training``, else None) and what backward needs (training, else None).
    """
    steps, batch, _ = x.shape
    directions = len(params) // 5
    h_size, hidden = h0.shape[2], c0.shape[2]
    new = x.new_empty
    out = new(steps, batch, directions * h_size)
    h_n = new(directions, batch, h_size)
    c_n = new(directions, batch, hidden)
    cells = new(steps, batch, directions * hidden) if cell_sequence or training else None
    fields = _fields(x, h0, c0, params, lengths, out, h_n, c_n, cells)
    layer = LAYER.pack(*fields)
    saved = None
    if training:
        saved = new(kernels.saved_elems(layer))
        fields[-1] = saved.data_ptr()
        layer = LAYER.pack(*fields)
    _forward(kernels, layer)
    return layer, out, h_n, c_n, cells, saved


def run_stack(
    kernels: Kernels,
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: list[list[Param]],
    lengths: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Every layer, inference only: each layer reads its initial states from its rows of h0
    and c0 and writes its final ones into its rows of one h_n and c_n, by address, so no view
    or concatenation is made per layer. ``weights[layer]`` is the layer's flat LayerWeights.
    Shape: x (L, N, H_in), h0 and c0 (num_layers*D, N, ·), contiguous -> output, h_n, c_n.
    """
    steps, batch, _ = x.shape
    h_n, c_n = torch.empty_like(h0), torch.empty_like(c0)
    layer_input = x
    for layer, params in enumerate(weights):
        directions = len(params) // 5
        out = x.new_empty(steps, batch, directions * h0.shape[2])
        first_row = layer * directions
        fields = _fields(layer_input, h0, c0, params, lengths, out, h_n, c_n, None, first_row)
        _forward(kernels, LAYER.pack(*fields))
        layer_input = out
    return layer_input, h_n, c_n


def _fields(
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
        *_addresses(params),
        *(_NO_DIRECTION if directions == 1 else ()),
        out.data_ptr(),
        h_n.data_ptr() + h_offset,
        c_n.data_ptr() + c_offset,
        0 if cells is None else cells.data_ptr(),
        0,
    ]


def _forward(kernels: Kernels, layer: bytes) -> None:
    if kernels.forward(layer) != 0:
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
        anchor = next((t for t in (x, h0, c0, *params) if t is not None and t.requires_grad), None)
        if torch.is_grad_enabled() and anchor is not None:  # create_graph=True
            computed = _FirstDerivativesOnly.apply(anchor, *(r for r in result if r is not None))
            rest = iter(computed)
            result = tuple(None if r is None else next(rest) for r in result)
        return None, None, None, *result


DOUBLE_BACKWARD = (
    "lstmkit's cpu backend computes first derivatives only: its gradients cannot be "
    "differentiated again (double backward through create_graph=True). Run with "
    "LSTMKIT_BACKEND=reference for higher derivatives."
)


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
