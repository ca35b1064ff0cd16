"""One layer through the compiled kernels: the implementations behind the ``lstmkit::layer``
and ``lstmkit::layer_backward`` ops (:mod:`.ops`), which pack the tensors' addresses into
lk_layer and lk_grads (and lk_variant for step variants, :mod:`.variants`) for ctypes.

An absent tensor (no bias, no projection, a variant that is off) is an empty tensor: its
address is 0, which the kernels read as NULL. The buffer kept for backward (``saved``) is sized
for every step of every sequence, the most any lengths need, so that its size follows from the
shapes alone (the ops' fake implementations compute it too); with lengths the kernels use only
its first rows.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lstmkit.backends.cpu import library, machine, packing
from lstmkit.backends.cpu.library import GRADS, LAYER, Kernels
from lstmkit.backends.cpu.variants import pack_variant, pack_variant_grads, variant_probe

NO_DIRECTION = (0,) * 5  # the weights of an absent second direction
Param = Tensor | None  # an absent one: None, or (in the ops' lists) an empty tensor


def addresses(tensors: list[Param] | tuple[Param, ...]) -> list[int]:
    return [0 if t is None else t.data_ptr() for t in tensors]


def contiguous(tensors: list[Param]) -> list[Param]:
    return [None if t is None else t.contiguous() for t in tensors]


def layer_fields(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: list[Param],
    lengths: Tensor | None,
    out: Tensor,
    h_n: Tensor | None,
    c_n: Tensor | None,
    cells: Tensor | None,
    first_row: int = 0,
) -> list[int]:
    """lk_layer's fields (without ``saved``: 0). The states are (rows, N, ·) tensors of which
    this layer uses the D rows from ``first_row``; backward reads no h_n and c_n (``None``)."""
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
        0 if h_n is None else h_n.data_ptr() + h_offset,
        0 if c_n is None else c_n.data_ptr() + c_offset,
        0 if cells is None else cells.data_ptr(),
        0,  # saved (SAVED)
        0,  # packed: set by packing.take
    ]


SAVED = -2  # lk_layer's field of the buffer kept for backward, in layer_fields' list


def saved_elems(
    dtype: torch.dtype,
    hidden: int,
    h_size: int,
    proj: tuple[bool, ...],
    variant: tuple[object, ...] | None = None,
) -> int:
    """Elements of the buffer one layer keeps for backward per row (step of one sequence),
    from its shapes alone: the kernels' own count for one step of one sequence, which grows
    linearly with the rows. ``proj``: per direction, whether it has a projection; ``variant``:
    :func:`variant_key`.

    The same on every tier, because a compiled graph bakes it in and may be cached on disk
    and reused under another LSTMKIT_CPU_TARGET: the plain kernels pad the units to their
    vector width, so they are counted as padded to the widest tier's (a little more than a
    narrower tier uses; the variant kernels keep unpadded rows)."""
    if variant is None:
        lanes = max(tier.vector_bytes for tier in machine.TIERS) // dtype.itemsize
        hidden = -(-hidden // lanes) * lanes
    return _saved_elems(dtype, hidden, h_size, proj, variant)


@functools.cache
def _saved_elems(
    dtype: torch.dtype,
    hidden: int,
    h_size: int,
    proj: tuple[bool, ...],
    variant: tuple[object, ...] | None,
) -> int:
    kernels = library.load().kernels[dtype]
    weights: list[int] = []
    for has_proj in proj:
        weights += [0, 0, 0, 0, 1 if has_proj else 0]  # only w_hr's presence is read
    weights += NO_DIRECTION if len(proj) == 1 else ()
    # T B I H P D threads, lengths x h0 c0, weights, out h_n c_n cells saved packed
    layer = LAYER.pack(
        1, 1, 1, hidden, h_size, len(proj), 1, 0, 0, 0, 0, *weights, 0, 0, 0, 0, 0, 0
    )  # fmt: skip
    if variant is None:
        return kernels.saved_elems(layer)
    return kernels.variant_saved_elems(layer, variant_probe(variant))


def forward(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: list[Param],
    lengths: Tensor | None,
    variant_params: list[Tensor],
    masks: list[Tensor],
    keep: list[float],
    cell_sequence: bool,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward kernel: kernel.c's, or variant.c's when ``variant_params`` is given (each
    direction's variant parameters, see :mod:`.variants`, with ``masks`` and ``keep``).

    Returns out, h_n, c_n, the cells (with ``cell_sequence`` or ``training``, else empty) and
    the buffer backward needs (``training``, else empty).
    """
    kernels = library.load().kernels_for(x.dtype, c0.shape[2])
    x, h0, c0 = x.contiguous(), h0.contiguous(), c0.contiguous()
    params = contiguous(params)
    steps, batch, _ = x.shape
    directions = len(params) // 5
    h_size, hidden = h0.shape[2], c0.shape[2]
    new = x.new_empty
    out = new(steps, batch, directions * h_size)
    h_n = new(directions, batch, h_size)
    c_n = new(directions, batch, hidden)
    keep_cells = cell_sequence or training
    cells = new(steps, batch, directions * hidden) if keep_cells else new(0)
    fields = layer_fields(x, h0, c0, params, lengths, out, h_n, c_n, cells if keep_cells else None)
    variant = None
    if variant_params:
        variant_params, masks = contiguous(variant_params), contiguous(masks)
        variant = pack_variant(variant_params, masks, keep)
    saved = new(0)
    if training:
        key = variant_key(variant_params, masks, keep)
        rows = steps * batch * saved_elems(x.dtype, hidden, h_size, proj_key(params), key)
        # Zeros where the kernels write nothing (rows no sequence reaches; some of the variant
        # kernels' buffers), so that every call returns the same.
        saved = x.new_zeros(rows) if variant is not None else new(rows)
        fields[SAVED] = saved.data_ptr()
    layer = LAYER.pack(*fields)
    if training and lengths is not None and variant is None:
        saved[kernels.saved_elems(layer) :].zero_()
    if variant is not None:
        status = kernels.variant_forward(layer, variant)
    else:
        status = forward_layer(kernels, layer, params[0], steps, batch)
    if status != 0:
        raise MemoryError("lstmkit cpu backend: out of memory for the forward workspace")
    return out, h_n, c_n, cells, saved


def forward_layer(kernels: Kernels, layer: bytes, first: Tensor, steps: int, batch: int) -> int:
    """kernel.c's forward of ``layer`` (first weight ``first``); a short call with packed
    weights kept between calls (:mod:`.packing`). The kernel's status."""
    if steps * batch > packing.SHORT_ROWS:
        return kernels.forward(layer)
    layer, entry = packing.take(kernels, layer, first)
    try:
        return kernels.forward(layer)
    finally:
        packing.give(entry)


def proj_key(params: list[Param]) -> tuple[bool, ...]:
    """Per direction, whether it has a projection (w_hr, the fifth of its five tensors)."""
    return tuple(_present(params[d + 4]) for d in range(0, len(params), 5))


def _present(t: Param) -> bool:
    return t is not None and t.numel() > 0


def variant_key(
    variant_params: list[Tensor], masks: list[Tensor], keep: list[float]
) -> tuple[object, ...] | None:
    """What of the variants shapes the saved buffer: which tensors are present, and keep."""
    if not variant_params:
        return None
    present = tuple(t.numel() > 0 for t in (*variant_params, *masks))
    return (*present, *keep)


def backward(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: list[Tensor],
    lengths: Tensor | None,
    variant_params: list[Tensor],
    masks: list[Tensor],
    keep: list[float],
    out: Tensor,
    cells: Tensor,
    saved: Tensor,
    d_out: Tensor | None,
    d_h_n: Tensor | None,
    d_c_n: Tensor | None,
    d_cells: Tensor | None,
    needs: list[bool],
) -> list[Tensor]:
    """The C backward from what :func:`forward` returned for training, given the gradients
    of out, h_n, c_n and cells (``None``: zero). Returns the gradients of x, h0, c0,
    every param and every variant param, in that order, for those ``needs`` marks."""
    kernels = library.load().kernels_for(x.dtype, c0.shape[2])
    x, h0, c0 = x.contiguous(), h0.contiguous(), c0.contiguous()
    params = contiguous(params)
    fields = layer_fields(x, h0, c0, params, lengths, out.contiguous(), None, None, cells)
    fields[SAVED] = saved.data_ptr()
    layer = LAYER.pack(*fields)
    inputs = [x, h0, c0, *params, *contiguous(variant_params)]
    wanted = [torch.empty_like(t) if need else None for t, need in zip(inputs, needs)]
    incoming = [None if g is None else g.contiguous() for g in (d_out, d_h_n, d_c_n, d_cells)]
    directions = len(params) // 5
    single = directions == 1
    layer_grads = wanted[: 3 + 5 * directions]
    grads = GRADS.pack(
        *addresses(incoming), *addresses(layer_grads), *(NO_DIRECTION if single else ())
    )
    if variant_params:
        variant = pack_variant(contiguous(variant_params), contiguous(masks), keep)
        variant_grads = pack_variant_grads(wanted[3 + 5 * directions :])
        status = kernels.variant_backward(layer, variant, grads, variant_grads)
    else:
        status = kernels.backward(layer, grads)
    if status != 0:
        raise MemoryError("lstmkit cpu backend: out of memory for the backward workspace")
    return [g for g in wanted if g is not None]
