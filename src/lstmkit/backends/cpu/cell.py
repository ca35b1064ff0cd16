"""One :class:`lstmkit.LSTMCell` step through the cpu backend: one call of cell.c forward
and one backward, under one hand-written autograd node.

Forward: gates = x W_ih^T + h W_hh^T (the kernels' GEMM), plus both biases, then the cell,
writing h' and c' and, for training, the gate activations over the gates. Backward: the gates'
gradient dG, dc and the bias gradient (the same for both biases); then dx = dG W_ih,
dh = dG W_hh, dW_ih = dG^T x, dW_hh = dG^T h. A step is a few small products and one pass of
gate math, so what Python costs per call decides the speed at small sizes: this path skips the
dispatcher, as :class:`.autograd.EagerStack` does, and is taken only where :func:`usable` says
nothing would see the difference. A small step (up to ``FUSED_FLOPS`` of products) is one C
call each way, products included: six ``torch.mm`` calls would cost more than its arithmetic.
A bigger one makes its products by ``torch.mm`` (its BLAS threaded and at its best on those
shapes), and cell.c the rest. A graph of the gradient (``create_graph=True``) is the
reference's, recomputed, as for :class:`lstmkit.LSTM` (see :mod:`.autograd`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lstmkit import reference
from lstmkit.backends.cpu import autograd, library, route
from lstmkit.backends.cpu.library import CELL, CELL_GRADS, DTYPES
from lstmkit.reference import LayerWeights

# Up to this many flops of forward products (2 N 4H (H_in + H)) a step makes them in cell.c.
# Measured (benchmarks/README.md, 2026-12-07): at N = 1, H = 16 (4 kflop) the fused call won
# 2-3 us of 21; at N = 8, H = 64 (0.5 Mflop) torch.mm's products were 5-25% faster.
FUSED_FLOPS = 1 << 17


def usable(x: Tensor) -> bool:
    """Whether a step on ``x`` may run here: a CPU float32/float64 tensor in plain eager code
    (no compiler, tracer, torch.func transform or dispatch mode, which would see raw
    addresses instead of ops)."""
    return x.device.type == "cpu" and x.dtype in DTYPES and route.direct(x, False)


def step(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    grad: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """h', c' of one step; differentiable. Shape: x (N, H_in), h and c (N, H). ``grad``:
    whether autograd records the step, when the caller knows (else found here)."""
    if grad is None:
        grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, h, c, w_ih, w_hh, b_ih, b_hh)
        )
    if grad:
        return CellFunction.apply(x, h, c, w_ih, w_hh, b_ih, b_hh)
    return _forward(x, h, c, w_ih, w_hh, b_ih, b_hh, False)[:2]


def _forward(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    keep: bool,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """h', c' and, with ``keep``, the gate activations (for :func:`_backward`)."""
    x, h, c = x.contiguous(), h.contiguous(), c.contiguous()
    w_ih, w_hh = w_ih.contiguous(), w_hh.contiguous()
    b_ih = None if b_ih is None else b_ih.contiguous()
    b_hh = None if b_hh is None else b_hh.contiguous()
    rows, hidden = c.shape
    inputs = x.shape[1]
    if fused(rows, inputs, hidden):
        gates = x.new_empty(rows, 4 * hidden) if keep else None
        x_address = x.data_ptr()
    else:
        gates = torch.mm(x, w_ih.t())  # (N, 4H)
        gates.addmm_(h, w_hh.t())
        x_address = 0  # the products are made
    h_next, c_next = torch.empty_like(c), torch.empty_like(c)
    step = CELL.pack(
        rows, hidden, inputs, x_address, h.data_ptr(), w_ih.data_ptr(), w_hh.data_ptr(),
        _address(b_ih), _address(b_hh), c.data_ptr(), _address(gates), h_next.data_ptr(),
        c_next.data_ptr(),
    )  # fmt: skip
    library.load().kernels[x.dtype].cell_forward(step)
    return h_next, c_next, gates


class CellFunction(torch.autograd.Function):
    """``apply(x, h, c, w_ih, w_hh, b_ih, b_hh)`` -> h', c' (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: object,
        x: Tensor,
        h: Tensor,
        c: Tensor,
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Tensor | None,
        b_hh: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        h_next, c_next, acts = _forward(x, h, c, w_ih, w_hh, b_ih, b_hh, True)
        ctx.save_for_backward(x, h, c, w_ih, w_hh, b_ih, b_hh, c_next)
        # the activations are this node's own: an attribute costs less than a saved tensor
        ctx.acts = acts
        return h_next, c_next

    @staticmethod
    def backward(ctx: object, d_h: Tensor | None, d_c: Tensor | None) -> tuple:
        x, h, c, w_ih, w_hh, b_ih, b_hh, c_next = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():
            weights = LayerWeights(w_ih, w_hh, b_ih, b_hh, None)
            with torch.enable_grad():
                outputs = reference.lstm_step(reference.project_input(x, weights), h, c, weights)
            inputs = [x, h, c, w_ih, w_hh, b_ih, b_hh]
            present = [need and t is not None for t, need in zip(inputs, needs)]
            return tuple(autograd._reference_grads(outputs, [d_h, d_c], inputs, present))
        return _backward(ctx.acts, x, h, c, c_next, w_ih, w_hh, b_ih, b_hh, d_h, d_c, needs)


def _backward(
    acts: Tensor,
    x: Tensor,
    h: Tensor,
    c: Tensor,
    c_next: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    d_h: Tensor | None,
    d_c: Tensor | None,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, ...]:
    x, h, c = x.contiguous(), h.contiguous(), c.contiguous()
    w_ih, w_hh = w_ih.contiguous(), w_hh.contiguous()
    d_h = None if d_h is None else d_h.contiguous()
    d_c = None if d_c is None else d_c.contiguous()
    d_gates = torch.empty_like(acts)
    rows, hidden = c.shape
    inputs = x.shape[1]
    here = fused(rows, inputs, hidden)
    d_x = torch.empty_like(x) if needs[0] and here else None
    d_h_prev = torch.empty_like(h) if needs[1] and here else None
    d_c_prev = torch.empty_like(c) if needs[2] else None
    d_w_ih = torch.empty_like(w_ih) if needs[3] and here else None
    d_w_hh = torch.empty_like(w_hh) if needs[4] and here else None
    d_b_ih = torch.empty_like(b_ih) if b_ih is not None and needs[5] else None
    d_b_hh = torch.empty_like(b_hh) if b_hh is not None and needs[6] else None
    step = CELL.pack(
        rows, hidden, inputs, x.data_ptr(), h.data_ptr(), w_ih.data_ptr(), w_hh.data_ptr(), 0,
        0, c.data_ptr(), 0, 0, 0,
    )  # fmt: skip
    grads = CELL_GRADS.pack(
        acts.data_ptr(), c_next.data_ptr(), _address(d_h), _address(d_c), d_gates.data_ptr(),
        _address(d_c_prev), _address(d_b_ih), _address(d_b_hh), _address(d_x),
        _address(d_h_prev), _address(d_w_ih), _address(d_w_hh),
    )  # fmt: skip
    library.load().kernels[x.dtype].cell_backward(step, grads)
    if not here:
        d_x = torch.mm(d_gates, w_ih) if needs[0] else None
        d_h_prev = torch.mm(d_gates, w_hh) if needs[1] else None
        d_w_ih = torch.mm(d_gates.t(), x) if needs[3] else None
        d_w_hh = torch.mm(d_gates.t(), h) if needs[4] else None
    return d_x, d_h_prev, d_c_prev, d_w_ih, d_w_hh, d_b_ih, d_b_hh


def fused(rows: int, inputs: int, hidden: int) -> bool:
    """Whether a step of this shape makes its products in cell.c (see ``FUSED_FLOPS``)."""
    return 8 * rows * hidden * (inputs + hidden) <= FUSED_FLOPS


def _address(tensor: Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()
