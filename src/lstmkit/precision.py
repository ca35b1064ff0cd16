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

Widened copies of weights that autograd does not record are kept between calls (see
:func:`widen`), keyed by the tensor and its ``_version``, so that a short call (a decoding
step) neither copies its weights nor misses the cpu backend's cache of packed weights.
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


# id(tensor) -> (weak reference to it, its _version, inference mode, the widened copy)
_widened: dict[int, tuple[weakref.ref, int, bool, Tensor]] = {}


def widen(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``t`` in ``dtype`` (a float32 copy of a bf16 weight). Differentiable where autograd
    records it; otherwise the copy is kept while ``t`` lives and is unchanged (its
    ``_version``), and is given again on the next call."""
    if t is None or t.dtype == dtype:
        return t
    if not _cacheable(t):
        return t.to(dtype)
    key, inference = id(t), torch.is_inference_mode_enabled()
    kept = _widened.get(key)
    if kept is not None and kept[0]() is t and kept[1] == t._version and kept[2] == inference:
        return kept[3]
    copy = t.detach().to(dtype)
    _widened[key] = (weakref.ref(t, lambda _, key=key: _widened.pop(key, None)), t._version,
                     inference, copy)  # fmt: skip
    return copy


def _cacheable(t: Tensor) -> bool:
    """Whether ``t``'s widened copy may be kept: a plain tensor that autograd does not record,
    outside a compiler, tracer or torch.func transform (which would see a stale copy)."""
    if torch.is_grad_enabled() and t.requires_grad:
        return False
    if torch.compiler.is_compiling() or torch._C._is_tracing():
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    return type(t) in (Tensor, torch.nn.Parameter)
