"""A whole plain stack through the compiled kernels: one Python pass and, for training, one
autograd node for all layers.

Each layer reads its initial states from its rows of the stack's h0 and c0 and writes its
final ones into its rows of one h_n and c_n, by address (``layer_fields``' ``first_row``), so no
view or concatenation is made per layer. Backward walks the layers from the top, each layer's
input gradient being the output gradient of the layer below. Plain: no step variants, no
dropout between layers, no per-layer sequences (see ``Backend.run_stack``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from lstmkit.backends.cpu.function import (
    NO_DIRECTION,
    Param,
    addresses,
    first_derivatives_only,
    forward_layer,
    layer_fields,
)
from lstmkit.backends.cpu.library import GRADS, LAYER, Kernels


def run_stack(
    kernels: Kernels,
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: list[Param],
    directions: int,
    lengths: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Inference. ``params`` is every layer's LayerWeights for every direction, flattened.
    Shape: x (L, N, H_in), h0 and c0 (num_layers*D, N, ·), contiguous -> output, h_n, c_n."""
    out, h_n, c_n, _ = _forward(kernels, x, h0, c0, params, directions, lengths, False)
    return out, h_n, c_n


def _forward(
    kernels: Kernels,
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: list[Param] | tuple[Param, ...],
    directions: int,
    lengths: Tensor | None,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, list[tuple[bytes, Tensor, Tensor, Tensor]]]:
    """Every layer forward. With ``training``, also each layer's packed lk_layer with the
    tensors its addresses point to that backward needs: input, cells and saved buffer."""
    steps, batch, _ = x.shape
    per_layer = 5 * directions
    h_n, c_n = torch.empty_like(h0), torch.empty_like(c0)
    kept = []
    layer_input = x
    for first in range(0, len(params), per_layer):
        weights = params[first : first + per_layer]
        out = x.new_empty(steps, batch, directions * h0.shape[2])
        cells = x.new_empty(steps, batch, directions * c0.shape[2]) if training else None
        row = first // 5
        fields = layer_fields(layer_input, h0, c0, weights, lengths, out, h_n, c_n, cells, row)
        layer = LAYER.pack(*fields)
        if training:
            saved = x.new_empty(kernels.saved_elems(layer))
            fields[-1] = saved.data_ptr()
            layer = LAYER.pack(*fields)
            kept.append((layer, layer_input, cells, saved))
        forward_layer(kernels, layer)
        layer_input = out
    return layer_input, h_n, c_n, kept


class StackFunction(torch.autograd.Function):
    """``apply(kernels, lengths, directions, x, h0, c0, *params)`` -> output, h_n, c_n.

    Inputs must be contiguous; ``params`` is every layer's LayerWeights for every direction,
    flattened. Gradients for x, h0, c0 and every weight; first derivatives only.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        kernels: Kernels,
        lengths: Tensor | None,
        directions: int,
        x: Tensor,
        h0: Tensor,
        c0: Tensor,
        *params: Param,
    ) -> tuple[Tensor, Tensor, Tensor]:
        out, h_n, c_n, kept = _forward(kernels, x, h0, c0, params, directions, lengths, True)
        ctx.set_materialize_grads(False)
        # The top output is returned, so it is saved (checked for in-place changes) rather
        # than held; the packed layers hold addresses of it and of what `kept` keeps alive.
        ctx.save_for_backward(x, h0, c0, out, *params)
        ctx.kernels, ctx.lengths, ctx.directions, ctx.kept = kernels, lengths, directions, kept
        return out, h_n, c_n

    @staticmethod
    def backward(
        ctx: FunctionCtx, d_out: Tensor | None, d_h_n: Tensor | None, d_c_n: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        x, h0, c0, _, *params = ctx.saved_tensors  # checks nothing was modified in place
        with torch.no_grad():
            result = _backward(ctx, x, h0, c0, params, d_out, d_h_n, d_c_n)
        return None, None, None, *first_derivatives_only(result, (x, h0, c0, *params))


def _backward(
    ctx: FunctionCtx,
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: list[Param],
    d_out: Tensor | None,
    d_h_n: Tensor | None,
    d_c_n: Tensor | None,
) -> tuple[Tensor | None, ...]:
    """The C backward of each layer from the top: gradients of x, h0, c0 and every param."""
    needs = ctx.needs_input_grad[3:]
    d_h0 = torch.empty_like(h0) if needs[1] else None
    d_c0 = torch.empty_like(c0) if needs[2] else None
    d_params = [
        torch.empty_like(p) if p is not None and need else None
        for p, need in zip(params, needs[3:])
    ]
    d_h_n = None if d_h_n is None else d_h_n.contiguous()
    d_c_n = None if d_c_n is None else d_c_n.contiguous()
    upstream = None if d_out is None else d_out.contiguous()
    per_layer = 5 * ctx.directions
    batch, item = x.shape[1], x.element_size()
    for index in range(len(ctx.kept) - 1, -1, -1):
        layer, layer_input, _, _ = ctx.kept[index]
        d_x = layer_input.new_empty(layer_input.shape) if index > 0 or needs[0] else None
        row = index * ctx.directions
        h_offset = row * batch * h0.shape[2] * item
        c_offset = row * batch * c0.shape[2] * item
        first = index * per_layer
        grads = GRADS.pack(
            _address(upstream, 0),
            _address(d_h_n, h_offset),
            _address(d_c_n, c_offset),
            0,  # no cell sequence
            _address(d_x, 0),
            _address(d_h0, h_offset),
            _address(d_c0, c_offset),
            *addresses(d_params[first : first + per_layer]),
            *(NO_DIRECTION if ctx.directions == 1 else ()),
        )
        if ctx.kernels.backward(layer, grads) != 0:
            raise MemoryError("lstmkit cpu backend: out of memory for the backward workspace")
        upstream = d_x
    return upstream, d_h0, d_c0, *d_params


def _address(tensor: Tensor | None, offset: int) -> int:
    return 0 if tensor is None else tensor.data_ptr() + offset
