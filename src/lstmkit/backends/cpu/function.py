"""One layer through the compiled kernels: directly for inference, as an autograd Function for
training (gradients for x, h0, c0 and every weight; first derivatives only)."""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from lstmkit.backends.cpu.library import Grads, Kernels, Layer
from lstmkit.reference import LayerWeights

Param = Tensor | None


def _address(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _pair(params: list[Param], field: int, directions: int) -> tuple[int | None, int | None]:
    """Addresses of one kind of weight (field of LayerWeights) for both directions."""
    first = _address(params[field])
    return first, _address(params[5 + field]) if directions == 2 else None


def run(
    kernels: Kernels,
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: list[Param],
    lengths: Tensor | None,
    cell_sequence: bool,
    training: bool,
) -> tuple[Layer, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """The forward kernel on contiguous tensors; ``params`` is the flat LayerWeights of each
    direction. Returns the layer (for backward), out, h_n, c_n, the cells (with
    ``cell_sequence`` or ``training``, else None) and what backward needs (training, else None).
    """
    steps, batch, features = x.shape
    directions = len(params) // 5
    h_size, hidden = h0.shape[2], c0.shape[2]
    out = x.new_empty(steps, batch, directions * h_size)
    h_n = x.new_empty(directions, batch, h_size)
    c_n = x.new_empty(directions, batch, hidden)
    cells = x.new_empty(steps, batch, directions * hidden) if cell_sequence or training else None
    layer = Layer(
        steps,
        batch,
        features,
        hidden,
        h_size,
        directions,
        torch.get_num_threads(),
        _address(lengths),
        x.data_ptr(),
        h0.data_ptr(),
        c0.data_ptr(),
        *(_pair(params, field, directions) for field in range(5)),
        out.data_ptr(),
        h_n.data_ptr(),
        c_n.data_ptr(),
        _address(cells),
        None,
    )
    saved = None
    if training:
        saved = x.new_empty(kernels.saved_elems(layer))
        layer.saved = saved.data_ptr()
    if kernels.forward(layer) != 0:
        raise MemoryError("lstmkit cpu backend: out of memory for the forward workspace")
    return layer, out, h_n, c_n, cells, saved


def contiguous_params(weights: list[LayerWeights]) -> list[Param]:
    return [None if w is None else w.contiguous() for layer in weights for w in layer]


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
        ctx.kernels, ctx.layer, ctx.lengths, ctx.saved = kernels, layer, lengths, saved
        if cell_sequence:
            return out, h_n, c_n, cells
        return out, h_n, c_n

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        x, h0, c0, _, _, *params = ctx.saved_tensors  # checks nothing was modified in place
        needs = ctx.needs_input_grad[3:]
        wanted = [
            torch.empty_like(t) if t is not None and need else None
            for t, need in zip((x, h0, c0, *params), needs)
        ]
        incoming = [None if g is None else g.contiguous() for g in grads]
        incoming += [None] * (4 - len(incoming))
        directions = len(params) // 5
        d_x, d_h0, d_c0, *d_params = wanted
        result = Grads(
            *(_address(g) for g in incoming),
            _address(d_x),
            _address(d_h0),
            _address(d_c0),
            *(_pair(d_params, field, directions) for field in range(5)),
        )
        if ctx.kernels.backward(ctx.layer, ctypes.byref(result)) != 0:
            raise MemoryError("lstmkit cpu backend: out of memory for the backward workspace")
        return None, None, None, *wanted
