"""Storage and compute dtypes: bfloat16 and float16 calls, and ``torch.autocast``.

The policy, for every backend (the reference included, so that the tests have an oracle of the
same precision): a tensor is *stored* in the caller's dtype and *computed* in
:func:`compute_dtype` of it. For bfloat16 and float16 that is float32: the inputs, states and
weights, already rounded to the storage dtype, are widened (exactly) at the call's boundary;
the recurrence runs in float32 (its products accumulate in float32, and the gates, the cell
state and what is kept for backward are float32); the outputs and final states are rounded to
the storage dtype once, at the end, and so are the gradients autograd hands back through the
widening. Every product therefore sees operands that are exactly bf16 (or fp16) numbers at the
boundary, and h between steps keeps float32.

Autocast (:func:`autocast_dtype`): where ``torch.autocast`` is enabled for the input's device,
a dense call (``torch.nn.LSTM``'s ``aten::lstm.input``) first casts every float32 tensor among
its input, states and parameters to the autocast dtype, as torch's autocast does for its LSTM,
and then runs as a call of that dtype (with projections, c_n comes back in c0's dtype, as
torch's does). A packed call without projections (``aten::lstm.data``) runs, as torch's does,
in its states' dtype (h0's if given, else the input's), casting its float32, bfloat16 and
float16 tensors to it. ``LSTMCell`` is left alone, as torch leaves its own.

Copies of weights in inference (widened, or cast by autocast) are kept between calls (see
:func:`copies`) and copied into again on each call, so that a short call (a decoding step)
neither allocates them nor misses the cpu backend's cache of packed weights, and a weight
changed in any way (an optimizer step, ``p.data``, a numpy view) is never read stale.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

# storage dtype -> compute dtype, where they differ
COMPUTE: dict[torch.dtype, torch.dtype] = {
    torch.bfloat16: torch.float32,
    torch.float16: torch.float32,
}


def compute_dtype(storage: torch.dtype) -> torch.dtype:
    """The dtype lstmkit computes a call stored in ``storage`` in."""
    return COMPUTE.get(storage, storage)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype float32 tensors are cast to under an autocast enabled for ``device_type``, or
    ``None`` where none is."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast(
    t: Tensor | None, dtype: torch.dtype, sources: tuple[torch.dtype, ...] = (torch.float32,)
) -> Tensor | None:
    """``t`` as autocast would pass it to an op in ``dtype``: a tensor of a ``sources`` dtype
    cast (differentiably), anything else as it is."""
    if t is None or t.dtype not in sources or t.dtype == dtype:
        return t
    return t.to(dtype)


# (id(tensor), dtype) -> (weak reference to it, inference mode, the copy)
_kept_copies: dict[tuple[int, torch.dtype], tuple[weakref.ref, bool, Tensor]] = {}


def widen(tensors: list[Tensor | None], dtype: torch.dtype) -> list[Tensor | None]:
    """Each of ``tensors`` in ``dtype`` (float32 copies of bf16 weights); see :func:`copies`."""
    return copies(tensors, dtype, tuple(COMPUTE))


def copies(
    tensors: list[Tensor | None], dtype: torch.dtype, sources: tuple[torch.dtype, ...]
) -> list[Tensor | None]:
    """Each of ``tensors`` of a ``sources`` dtype in ``dtype``, the others as they are: weights,
    widened for the compute dtype or cast by autocast. Differentiable where autograd records a
    tensor. Under ``no_grad`` or ``inference_mode`` the copy is kept while the tensor lives
    and copied into again on the next call, so that it keeps its identity (the cpu backend
    finds the weights it packed by it, and packs again only if their bits changed) and never
    holds stale numbers. Not kept under a compiler, tracer or torch.func transform."""
    keep = not (
        torch.compiler.is_compiling()
        or torch._C._is_tracing()
        or torch._C._are_functorch_transforms_active()
    )
    if not keep:  # (and nothing here that a compiler cannot trace)
        return [t if t is None or t.dtype not in sources else t.to(dtype) for t in tensors]
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    out: list[Tensor | None] = []
    recorded: list[int] = []  # what autograd records: cast by one node (see _Cast)
    for t in tensors:
        if t is None or t.dtype == dtype or t.dtype not in sources:
            out.append(t)
        elif grad and t.requires_grad:
            recorded.append(len(out))
            out.append(t)
        elif grad or type(t) not in _PLAIN:
            # (with grad on, a kept copy could be saved by a graph that a later call's copy
            # into it would spoil)
            out.append(t.to(dtype))
        else:
            out.append(_kept(t, dtype, inference))
    if len(recorded) == 1:
        out[recorded[0]] = out[recorded[0]].to(dtype)
    elif recorded:
        for i, cast in zip(recorded, _Cast.apply(dtype, *(out[i] for i in recorded))):
            out[i] = cast
    return out


class _Cast(torch.autograd.Function):
    """``apply(dtype, *tensors)``: each tensor in ``dtype``, and in backward each gradient back
    in its tensor's dtype; one autograd node for all the weights of a call instead of one
    each (a bf16 training step of tutorial-2 casts 16)."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.dtypes = [t.dtype for t in tensors]
        return tuple(t.to(dtype) for t in tensors)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        back = [None if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes, strict=True)]
        return (None, *back)


_PLAIN = (Tensor, torch.nn.Parameter)


def _kept(t: Tensor, dtype: torch.dtype, inference: bool) -> Tensor:
    key = (id(t), dtype)
    kept = _kept_copies.get(key)
    if kept is not None and kept[0]() is t and kept[1] == inference and kept[2].shape == t.shape:
        # copied again, in place: a weight can change without moving its _version (p.data,
        # a numpy view), and only its contents tell; the copy keeps its identity, by which
        # the cpu backend finds the weights it packed (and compares them bit for bit)
        return kept[2].copy_(t.detach())
    copy = t.detach().to(dtype)
    _kept_copies[key] = (weakref.ref(t, lambda _, key=key: _kept_copies.pop(key, None)),
                         inference, copy)  # fmt: skip
    return copy
