"""Packed weights kept between short calls: the buffers behind ``lk_layer.packed``.

A short call (a few steps of a few sequences, as a decoder or ``lstm.stream()`` feeds) spends
much of its time packing its weights into the kernels' layouts. The forward kernel can keep
them in a buffer that outlives the call (kernel.c, "packed weights kept between calls"): the
buffer holds a copy of the weights as they were packed, and a call whose weights equal that
copy bit for bit skips the packing. The kernel compares the contents, so whatever changed the
weights (an optimizer step, ``load_state_dict``, ``p.data``, a numpy view of the storage, none
of which needs to move ``_version``), no call can read stale packed weights; Python only has to
find a buffer for the layer, by the identity of its first weight.

A buffer is about twice its weights' bytes. Buffers live as long as their layer's first weight
and at most :data:`LIMIT_BYTES` in all (the least recently used go first), and only calls of at
most :data:`SHORT_ROWS` rows use them: on longer ones the packing is a small part of the call,
and the copy and comparison would only add to it. One call at a time uses a buffer; a call
that finds it taken (another thread) packs into its workspace as without one.
"""

from __future__ import annotations

import mmap
import struct
import threading
import weakref
from collections import OrderedDict

import torch
from torch import Tensor

from lstmkit.backends.cpu.library import Kernels

SHORT_ROWS = 64  # steps x sequences of a call that keeps packed weights
LIMIT_BYTES = 256 << 20


class _Entry:
    __slots__ = ("address", "buffer", "kernels", "lock", "pages")

    def __init__(self, kernels: Kernels, elems: int, dtype: torch.dtype) -> None:
        self.kernels = kernels  # the buffer's dtype and tier
        # Pages of its own (zeros: nothing packed yet), not a block of the heap: long-lived
        # blocks among the short-lived tensors of calls made the heap serve other calls' tensors
        # worse (a sensor call after tutorial-2's training in the benchmark: 0.28 ms, not 0.23).
        self.pages = mmap.mmap(-1, max(1, elems * dtype.itemsize))
        self.buffer = torch.frombuffer(self.pages, dtype=dtype, count=elems)
        self.address = _ADDRESS.pack(self.buffer.data_ptr())
        self.lock = threading.Lock()


_ADDRESS = struct.Struct("=Q")  # lk_layer's last field
# layout (see take) -> entry, least recently added first
_entries: OrderedDict[bytes, _Entry] = OrderedDict()
_bytes = 0
_lock = threading.RLock()  # reentrant: a weight can die (and _forget run) inside _add


def take(kernels: Kernels, layer: bytes, first: Tensor) -> tuple[bytes, _Entry | None]:
    """``layer`` (a packed lk_layer whose ``packed`` is 0, the last field) with the buffer of
    its layer, whose first weight is ``first``, and the buffer's entry, taken for this call
    (give it back with :func:`give`); ``layer`` as it is and ``None`` when this layer keeps
    nothing (the row path) or its buffer is in use."""
    # found by what of lk_layer the buffer follows from: B, I, H, P, D (the size of the packed
    # layout follows from them, the dtype and the tier) and the weights' addresses (the layer;
    # a weight that dies takes its buffer with it, so an address used again finds none)
    layout = layer[8:48] + layer[88:168]
    entry = _entries.get(layout)
    if entry is None or entry.kernels is not kernels:
        elems = kernels.packed_elems(layer)
        if elems == 0:
            return layer, None
        with _lock:
            entry = _add(layout, first, kernels, elems)
    if not entry.lock.acquire(blocking=False):
        return layer, None
    return layer[: -_ADDRESS.size] + entry.address, entry


def give(entry: _Entry | None) -> None:
    if entry is not None:
        entry.lock.release()


def _add(layout: bytes, first: Tensor, kernels: Kernels, elems: int) -> _Entry:
    """A new buffer for ``first``'s layer."""
    global _bytes
    _drop(layout)
    entry = _Entry(kernels, elems, first.dtype)
    _entries[layout] = entry
    weakref.finalize(first, _forget, layout, entry)
    _bytes += entry.buffer.numel() * entry.buffer.element_size()
    while _bytes > LIMIT_BYTES and len(_entries) > 1:
        _drop(next(iter(_entries)))
    return entry


def _drop(layout: bytes) -> None:
    global _bytes
    entry = _entries.pop(layout, None)
    if entry is not None:
        _bytes -= entry.buffer.numel() * entry.buffer.element_size()


def _forget(layout: bytes, entry: _Entry) -> None:
    """``entry``'s first weight died: drop it, unless its layout has another entry now."""
    with _lock:
        if _entries.get(layout) is entry:
            _drop(layout)


def held_bytes() -> int:
    """Bytes of packed weights held now."""
    return _bytes
