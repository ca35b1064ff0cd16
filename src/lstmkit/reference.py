r"""The LSTM recurrence, written once, as a plain loop over time steps.

This module is the definition every fast path in lstmkit is tested against, and it is itself
tested against ``torch.nn.LSTM``. It uses only ordinary differentiable tensor ops, so autograd
provides its backward pass.

For one layer and one direction, with input ``x_t``, previous hidden state ``h_{t-1}`` and
previous cell state ``c_{t-1}``::

    i_t = sigmoid(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)      input gate
    f_t = sigmoid(W_if x_t + b_if + W_hf h_{t-1} + b_hf)      forget gate
    g_t = tanh   (W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)      cell candidate
    o_t = sigmoid(W_io x_t + b_io + W_ho h_{t-1} + b_ho)      output gate
    c_t = f_t * c_{t-1} + i_t * g_t
    h_t = o_t * tanh(c_t)                 (proj_size == 0)
    h_t = W_hr (o_t * tanh(c_t))          (proj_size > 0)

``weight_ih`` stacks ``W_ii, W_if, W_ig, W_io`` row-wise (gate order i, f, g, o), and likewise
``weight_hh`` and the two biases, exactly as ``torch.nn.LSTM`` stores them.

Variable lengths: sequence ``b`` is valid for steps ``t < lengths[b]``. At a padded step its
state is carried unchanged and its output is zero, so the forward direction ends with the state
of its own last valid step, and the backward direction (which walks ``t = L-1, ..., 0``) starts
from the initial state at its own last valid step.

Legend: L steps, N batch, I input features, H cell size, P = proj_size or H (size of h).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class LayerWeights(NamedTuple):
    """The parameters of one layer in one direction, in torch's layout."""

    weight_ih: Tensor  # (4H, I)
    weight_hh: Tensor  # (4H, P)
    bias_ih: Tensor | None  # (4H,)
    bias_hh: Tensor | None  # (4H,)
    weight_hr: Tensor | None  # (P, H), only with proj_size > 0


def lstm_cell(
    gates_x: Tensor, h: Tensor, c: Tensor, weights: LayerWeights
) -> tuple[Tensor, Tensor]:
    """One LSTM step from the already projected input ``gates_x = W_ih x + b_ih``.

    Shape: gates_x (N, 4H), h (N, P), c (N, H) -> h' (N, P), c' (N, H).
    """
    gates = gates_x + h @ weights.weight_hh.t()  # (N, 4H)
    if weights.bias_hh is not None:
        gates = gates + weights.bias_hh  # (N, 4H)
    i, f, g, o = gates.chunk(4, dim=1)  # 4 x (N, H)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # (N, H)
    h_next = torch.sigmoid(o) * torch.tanh(c_next)  # (N, H)
    if weights.weight_hr is not None:
        h_next = h_next @ weights.weight_hr.t()  # (N, P)
    return h_next, c_next


def project_input(x: Tensor, weights: LayerWeights) -> Tensor:
    """``W_ih x + b_ih`` for every step at once. Shape: x (..., I) -> (..., 4H)."""
    if weights.bias_ih is None:
        return x @ weights.weight_ih.t()
    flat = torch.addmm(weights.bias_ih, x.reshape(-1, x.shape[-1]), weights.weight_ih.t())
    return flat.view(*x.shape[:-1], weights.weight_ih.shape[0])


def lstm_direction(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: LayerWeights,
    reverse: bool = False,
    lengths: Tensor | None = None,
    cell_sequence: bool = False,
) -> tuple[Tensor, ...]:
    """Run one layer in one direction over a time-major batch.

    Args:
        x: (L, N, I) input sequence.
        h0: (N, P) initial hidden state.
        c0: (N, H) initial cell state.
        weights: the layer's parameters for this direction.
        reverse: walk the sequence from its end (the backward direction).
        lengths: optional (N,) int64 valid lengths on x's device; ``None`` means all are L.
        cell_sequence: also return the cell state of every step.

    Returns:
        output (L, N, P) with zeros at padded steps, h_n (N, P), c_n (N, H), and with
        ``cell_sequence`` the cells (L, N, H), zeros at padded steps.
    """
    steps = x.shape[0]
    gates_x = project_input(x, weights)  # (L, N, 4H)
    h, c = h0, c0  # (N, P), (N, H)
    outputs: list[Tensor] = [h0] * steps
    cells: list[Tensor] = [c0] * steps
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in order:
        h_next, c_next = lstm_cell(gates_x[t], h, c, weights)  # (N, P), (N, H)
        if lengths is None:
            h, c = h_next, c_next
            outputs[t], cells[t] = h_next, c_next
        else:
            valid = (lengths > t).unsqueeze(1)  # (N, 1)
            h = torch.where(valid, h_next, h)  # (N, P)
            c = torch.where(valid, c_next, c)  # (N, H)
            outputs[t] = torch.where(valid, h_next, torch.zeros_like(h_next))  # (N, P)
            cells[t] = torch.where(valid, c_next, torch.zeros_like(c_next))  # (N, H)
    result = (torch.stack(outputs), h, c)  # (L, N, P), (N, P), (N, H)
    if cell_sequence:
        return (*result, torch.stack(cells))  # (L, N, H)
    return result


def lstm_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: list[LayerWeights],
    lengths: Tensor | None = None,
    cell_sequence: bool = False,
) -> tuple[Tensor, ...]:
    """Run one layer in every direction (forward first, then backward).

    Shape: x (L, N, I), h0 (D, N, P), c0 (D, N, H) -> output (L, N, D*P), h_n (D, N, P),
    c_n (D, N, H), and with ``cell_sequence`` the cells (L, N, D*H).
    """
    results = [
        lstm_direction(x, h0[d], c0[d], w, d == 1, lengths, cell_sequence)
        for d, w in enumerate(weights)
    ]
    layer = (
        torch.cat([r[0] for r in results], dim=2),  # (L, N, D*P)
        torch.stack([r[1] for r in results]),  # (D, N, P)
        torch.stack([r[2] for r in results]),  # (D, N, H)
    )
    if cell_sequence:
        return (*layer, torch.cat([r[3] for r in results], dim=2))  # (L, N, D*H)
    return layer
