"""A whole plain stack through the compiled kernels: the implementations behind the
``lstmkit::stack`` and ``lstmkit::stack_backward`` ops (:mod:`.ops`), one Python pass and, for
training, one autograd node for all layers.

Each layer reads its initial states from its rows of the stack's h0 and c0 and writes its
final ones into its rows of one h_n and c_n, by address (``layer_fields``' ``first_row``), so no
view or concatenation is made per layer. For training the forward also returns what backward
needs of every layer (``kept``: the inputs of the layers above the first, every layer's cells
and saved buffer). Backward walks the layers from the top, each layer's input gradient being
the output gradient of the layer below. Plain: no step variants, no dropout between layers, no
per-layer sequences (see ``Backend.run_stack``).
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from lstmkit.backends.cpu import library
from lstmkit.backends.cpu.function import (
    NO_DIRECTION,
    SAVED,
    Param,
    addresses,
    contiguous,
    forward_layer,
    layer_fields,
    proj_key,
    saved_elems,
)
from lstmkit.backends.cpu.library import GRADS, LAYER


def forward(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: list[Param],
    lengths: Tensor | None,
    directions: int,
    training: bool,
    layers: list[bytes] | None = None,
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """Every layer forward. ``params`` is every layer's LayerWeights for every direction,
    flattened. Shape: x (L, N, H_in), h0 and c0 (num_layers*D, N, ·) -> output, h_n, c_n, and
    with ``training`` kept = the inputs of layers 1.., the cells and saved buffer of each.
    ``layers``, if given, receives each layer's lk_layer, which :func:`backward` can take
    instead of packing it again (while what it points to lives: x, params and the outputs)."""
    kernels = library.load().kernels_for(x.dtype, c0.shape[2])
    given = (x, h0, c0, *params)
    x, h0, c0 = x.contiguous(), h0.contiguous(), c0.contiguous()
    params = contiguous(params)
    if layers is not None and not all(map(operator.is_, given, (x, h0, c0, *params))):
        layers = None  # the layers would point into copies that die with this call
    steps, batch, _ = x.shape
    per_layer = 5 * directions
    h_size, hidden = h0.shape[2], c0.shape[2]
    h_n, c_n = torch.empty_like(h0), torch.empty_like(c0)
    inputs: list[Tensor] = []
    cells: list[Tensor] = []
    saved: list[Tensor] = []
    layer_input = x
    per_row = saved_elems(x.dtype, hidden, h_size, proj_key(params[:per_layer])) if training else 0
    for first in range(0, len(params), per_layer):
        weights = params[first : first + per_layer]
        out = x.new_empty(steps, batch, directions * h_size)
        layer_cells = x.new_empty(steps, batch, directions * hidden) if training else None
        row = first // 5
        fields = layer_fields(
            layer_input, h0, c0, weights, lengths, out, h_n, c_n, layer_cells, row
        )
        if training:  # every layer has the first's projections, or none
            saved.append(x.new_empty(steps * batch * per_row))
            fields[SAVED] = saved[-1].data_ptr()
            cells.append(layer_cells)
            if first > 0:
                inputs.append(layer_input)
        layer = LAYER.pack(*fields)
        if layers is not None:
            layers.append(layer)
        if training and lengths is not None:
            saved[-1][kernels.saved_elems(layer) :].zero_()  # as function.forward does
        if forward_layer(kernels, layer, weights[0], steps, batch) != 0:
            raise MemoryError("lstmkit cpu backend: out of memory for the forward workspace")
        layer_input = out
    return layer_input, h_n, c_n, [*inputs, *cells, *saved]


def backward(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: list[Tensor],
    lengths: Tensor | None,
    directions: int,
    out: Tensor,
    kept: list[Tensor],
    d_out: Tensor | None,
    d_h_n: Tensor | None,
    d_c_n: Tensor | None,
    needs: list[bool],
    layers: list[bytes] | None = None,
) -> list[Tensor]:
    """The C backward of each layer from the top, from what :func:`forward` returned for
    training (and its ``layers``, if it was given them). Returns the gradients of x, h0, c0
    and every param, in that order, for those ``needs`` marks."""
    kernels = library.load().kernels_for(x.dtype, c0.shape[2])
    if not layers:  # else forward found all of them contiguous already
        x, h0, c0 = x.contiguous(), h0.contiguous(), c0.contiguous()
        params = contiguous(params)
    count = len(params) // (5 * directions)
    inputs, cells, saved = (
        [x, *kept[: count - 1]],
        kept[count - 1 : 2 * count - 1],
        kept[2 * count - 1 :],
    )
    outputs = [*inputs[1:], out.contiguous()]
    d_h0 = torch.empty_like(h0) if needs[1] else None
    d_c0 = torch.empty_like(c0) if needs[2] else None
    d_params = [torch.empty_like(p) if need else None for p, need in zip(params, needs[3:])]
    d_h_n = None if d_h_n is None else d_h_n.contiguous()
    d_c_n = None if d_c_n is None else d_c_n.contiguous()
    upstream = None if d_out is None else d_out.contiguous()
    per_layer = 5 * directions
    batch, item = x.shape[1], x.element_size()
    for index in range(count - 1, -1, -1):
        layer_input = inputs[index]
        row = index * directions
        first = index * per_layer
        if not layers:
            fields = layer_fields(
                layer_input, h0, c0, params[first : first + per_layer], lengths, outputs[index],
                None, None, cells[index], row,
            )  # fmt: skip
            fields[SAVED] = saved[index].data_ptr()
            layer = LAYER.pack(*fields)
        else:
            layer = layers[index]  # forward's: it also names h_n and c_n, which backward ignores
        d_x = torch.empty_like(layer_input) if index > 0 or needs[0] else None
        h_offset = row * batch * h0.shape[2] * item
        c_offset = row * batch * c0.shape[2] * item
        grads = GRADS.pack(
            _address(upstream, 0),
            _address(d_h_n, h_offset),
            _address(d_c_n, c_offset),
            0,  # no cell sequence
            _address(d_x, 0),
            _address(d_h0, h_offset),
            _address(d_c0, c_offset),
            *addresses(d_params[first : first + per_layer]),
            *(NO_DIRECTION if directions == 1 else ()),
        )
        if kernels.backward(layer, grads) != 0:
            raise MemoryError("lstmkit cpu backend: out of memory for the backward workspace")
        upstream = d_x
    wanted = [upstream if needs[0] else None, d_h0, d_c0, *d_params]
    return [g for g in wanted if g is not None]


def _address(tensor: Tensor | None, offset: int) -> int:
    return 0 if tensor is None else tensor.data_ptr() + offset
