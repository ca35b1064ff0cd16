"""vmap of the cpu ops (registered in :mod:`.ops`).

Inference over a vmapped batch of independent inputs (only x, h0 and c0 vmapped, no lengths
and no masks) folds the vmapped dimension into N: one kernel call on V*N sequences, whose
results unfold back to (..., V, N, ...). Everything else (training, vmapped weights, lengths,
whose sort order folding would break, per-sequence masks) runs the op once per vmapped entry
and stacks the results. (vmap of a call that autograd records runs the reference, see
``CpuBackend.unavailable_reason``.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Dims = tuple


def loop(op: Callable) -> Callable:
    """A vmap rule that runs ``op`` once per vmapped entry and stacks its outputs along 0."""

    def rule(info: object, in_dims: Dims, *args: object) -> tuple[object, object]:
        results = [
            op(*(_select(a, d, v) for a, d in zip(args, in_dims))) for v in range(info.batch_size)
        ]
        first = results[0]
        if isinstance(first, list):
            return _stack_list(results), [0] * len(first)
        outputs, dims = [], []
        for i, item in enumerate(first):
            if isinstance(item, list):
                outputs.append(_stack_list([r[i] for r in results]))
                dims.append([0] * len(item))
            else:
                outputs.append(torch.stack([r[i] for r in results]))
                dims.append(0)
        return tuple(outputs), tuple(dims)

    return rule


def _select(arg: object, dim: object, index: int) -> object:
    if dim is None:
        return arg
    if isinstance(arg, list):
        return [a if d is None else a.select(d, index) for a, d in zip(arg, dim)]
    return arg.select(dim, index)


def _stack_list(results: list[list[Tensor]]) -> list[Tensor]:
    return [torch.stack(items) for items in zip(*results)]


def _unbatched(dims: object) -> bool:
    if isinstance(dims, list):
        return all(d is None for d in dims)
    return dims is None


def _fold(t: Tensor, dim: int | None, size: int, batch_axis: int) -> Tensor:
    """(..., N, ...) with a vmapped dimension at ``dim`` -> (..., V*N, ...)."""
    if dim is None:
        shape = list(t.shape)
        t = t.unsqueeze(batch_axis).expand(*shape[:batch_axis], size, *shape[batch_axis:])
    else:
        t = t.movedim(dim, batch_axis)
    return t.flatten(batch_axis, batch_axis + 1)


def layer_rule(op: Callable) -> Callable:
    """lstmkit::layer: fold for inference without lengths or masks, else loop."""
    fallback = loop(op)

    def rule(info: object, in_dims: Dims, *args: object) -> tuple[object, object]:
        x, h0, c0, params, lengths, variant_params, masks, keep, cell_sequence, training = args
        foldable = (
            not training
            and lengths is None
            and all(m.numel() == 0 for m in masks)
            and all(_unbatched(d) for d in in_dims[3:])
        )
        if not foldable:
            return fallback(info, in_dims, *args)
        size = info.batch_size
        folded = [_fold(t, d, size, 1) for t, d in zip((x, h0, c0), in_dims[:3])]
        out, h_n, c_n, cells, saved = op(
            *folded, params, lengths, variant_params, masks, keep, cell_sequence, training
        )
        unfolded = [t.unflatten(1, (size, -1)) for t in (out, h_n, c_n)]
        if cell_sequence:
            return (*unfolded, cells.unflatten(1, (size, -1)), saved), (1, 1, 1, 1, None)
        return (*unfolded, cells, saved), (1, 1, 1, None, None)

    return rule


def stack_rule(op: Callable) -> Callable:
    """lstmkit::stack: fold for inference without lengths, else loop."""
    fallback = loop(op)

    def rule(info: object, in_dims: Dims, *args: object) -> tuple[object, object]:
        x, h0, c0, params, lengths, directions, training = args
        if training or lengths is not None or not _unbatched(in_dims[3]):
            return fallback(info, in_dims, *args)
        size = info.batch_size
        folded = [_fold(t, d, size, 1) for t, d in zip((x, h0, c0), in_dims[:3])]
        out, h_n, c_n, kept = op(*folded, params, lengths, directions, training)
        unfolded = tuple(t.unflatten(1, (size, -1)) for t in (out, h_n, c_n))
        return (*unfolded, kept), (1, 1, 1, [])

    return rule
