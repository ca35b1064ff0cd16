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

Variants (options of this one step, all off by default; ``Variant`` carries their parameters
and noise, drawn by the layout layer from torch's RNG so every backend sees the same masks):

- Layer norm (Ba, Kiros and Hinton 2016, "Layer Normalization", arXiv:1607.06450, section
  3.1 and the LSTM equations of section 6): the pre-activation is
  ``LN(W_ih x; g_ih, b_ih') + LN(W_hh h; g_hh, b_hh') + bias_ih + bias_hh``, each LN over the
  whole 4H vector, and ``h_t = o_t * tanh(LN(c_t; g_c, b_c))``; c_t itself is not normalised.
  ``LN(v; g, b) = g * (v - mean(v)) / sqrt(var(v) + 1e-5) + b`` with the biased variance.
- Recurrent dropout (Gal and Ghahramani 2016, "A Theoretically Grounded Application of Dropout
  in Recurrent Neural Networks", arXiv:1512.05287): ``W_hh (m * h_{t-1})`` with one mask m per
  sequence, drawn once per call and scaled by 1/(1-p).
- Weight drop (Merity, Keskar and Socher 2017, "Regularizing and Optimizing LSTM Language
  Models", arXiv:1708.02182): DropConnect on W_hh, one mask per call; applied to the weight
  before this module sees it.
- Zoneout (Krueger et al. 2016, "Zoneout: Regularizing RNNs by Randomly Preserving Hidden
  Activations", arXiv:1606.01305): ``c_t = d_c * c_{t-1} + (1 - d_c) * c_t'`` and likewise for
  h with d_h, where d is a fresh 0/1 mask per step in training (1 keeps the previous value) and
  the probability z itself in evaluation (the expectation).
- Peepholes (Gers and Schmidhuber 2000, "Recurrent Nets that Time and Count", IJCNN): the
  pre-activations of i and f add ``w_ci * c_{t-1}`` and ``w_cf * c_{t-1}``, that of o adds
  ``w_co * c_t``, with diagonal weights ``weight_peephole = [w_ci; w_cf; w_co]`` (3H,).

Variable lengths: sequence ``b`` is valid for steps ``t < lengths[b]``. At a padded step its
state is carried unchanged and its output is zero, so the forward direction ends with the state
of its own last valid step, and the backward direction (which walks ``t = L-1, ..., 0``) starts
from the initial state at its own last valid step. Padding is never read: a padded step's
input counts as zero, so whatever the padding holds (NaN, Inf) reaches no output and no gradient.

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


class Variant(NamedTuple):
    """The variants' parameters and noise for one layer in one direction; ``None`` (or 0) is
    off. Layer norm is on when its gains are given, peepholes when their weights are."""

    ln_weight_ih: Tensor | None = None  # (4H,) gain of LN(W_ih x)
    ln_bias_ih: Tensor | None = None  # (4H,) shift of LN(W_ih x)
    ln_weight_hh: Tensor | None = None  # (4H,) gain of LN(W_hh h)
    ln_bias_hh: Tensor | None = None  # (4H,)
    ln_weight_c: Tensor | None = None  # (H,) gain of LN(c)
    ln_bias_c: Tensor | None = None  # (H,)
    weight_peephole: Tensor | None = None  # (3H,) w_ci, w_cf, w_co
    recurrent_mask: Tensor | None = None  # (N, P) scaled dropout mask on h_{t-1}
    zoneout_cell: Tensor | float = 0.0  # (L, N, H) 0/1 masks (training) or z_c (evaluation)
    zoneout_hidden: Tensor | float = 0.0  # (L, N, P) likewise for h


LAYER_NORM_EPS = 1e-5
NO_VARIANT = Variant()


def layer_norm(v: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """LN over the last dimension with gain ``weight`` and shift ``bias``. Shape kept."""
    mean = v.mean(dim=-1, keepdim=True)
    var = v.var(dim=-1, unbiased=False, keepdim=True)
    return (v - mean) * torch.rsqrt(var + LAYER_NORM_EPS) * weight + bias


def lstm_step(
    gates_x: Tensor,
    h: Tensor,
    c: Tensor,
    weights: LayerWeights,
    variant: Variant = NO_VARIANT,
    step: int = 0,
) -> tuple[Tensor, Tensor]:
    """One LSTM step from the already projected input (see :func:`project_input`).

    ``step`` selects this step's zoneout masks. Shape: gates_x (N, 4H), h (N, P), c (N, H) ->
    h' (N, P), c' (N, H).
    """
    h_in = h if variant.recurrent_mask is None else h * variant.recurrent_mask  # (N, P)
    recurrent = h_in @ weights.weight_hh.t()  # (N, 4H)
    if variant.ln_weight_hh is not None:
        recurrent = layer_norm(recurrent, variant.ln_weight_hh, variant.ln_bias_hh)
    gates = gates_x + recurrent  # (N, 4H)
    if weights.bias_hh is not None:
        gates = gates + weights.bias_hh  # (N, 4H)
    i, f, g, o = gates.chunk(4, dim=1)  # 4 x (N, H)
    if variant.weight_peephole is not None:
        w_ci, w_cf, w_co = variant.weight_peephole.chunk(3)  # 3 x (H,)
        i, f = i + w_ci * c, f + w_cf * c  # (N, H)
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # (N, H)
    if variant.weight_peephole is not None:
        o = o + w_co * c_next  # (N, H)
    c_shown = c_next
    if variant.ln_weight_c is not None:
        c_shown = layer_norm(c_next, variant.ln_weight_c, variant.ln_bias_c)  # (N, H)
    h_next = torch.sigmoid(o) * torch.tanh(c_shown)  # (N, H)
    if weights.weight_hr is not None:
        h_next = h_next @ weights.weight_hr.t()  # (N, P)
    c_next = _zoneout(c_next, c, variant.zoneout_cell, step)  # (N, H)
    h_next = _zoneout(h_next, h, variant.zoneout_hidden, step)  # (N, P)
    return h_next, c_next


def _zoneout(new: Tensor, previous: Tensor, keep: Tensor | float, step: int) -> Tensor:
    """``keep * previous + (1 - keep) * new``: keep is step ``step`` of 0/1 masks, or z.

    As written, not torch.lerp: lerp's ``new + keep * (previous - new)`` turns an infinite
    state into NaN (Inf - Inf) where the sum of the two terms is infinite."""
    if isinstance(keep, Tensor):
        keep = keep[step]  # (N, H) or (N, P)
    elif keep == 0.0:
        return new
    return keep * previous + (1 - keep) * new


def project_input(x: Tensor, weights: LayerWeights, variant: Variant = NO_VARIANT) -> Tensor:
    """``W_ih x + b_ih`` (or ``LN(W_ih x) + b_ih``) for every step at once.

    Shape: x (..., I) -> (..., 4H).
    """
    gates = x @ weights.weight_ih.t()  # (..., 4H)
    if variant.ln_weight_ih is not None:
        gates = layer_norm(gates, variant.ln_weight_ih, variant.ln_bias_ih)
    if weights.bias_ih is not None:
        gates = gates + weights.bias_ih
    return gates


def lstm_direction(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: LayerWeights,
    reverse: bool = False,
    lengths: Tensor | None = None,
    cell_sequence: bool = False,
    variant: Variant = NO_VARIANT,
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
        variant: the variants' parameters and noise for this layer and direction.

    Returns:
        output (L, N, P) with zeros at padded steps, h_n (N, P), c_n (N, H), and with
        ``cell_sequence`` the cells (L, N, H), zeros at padded steps.
    """
    steps = x.shape[0]
    if lengths is not None:
        # Padding is never read: its values (NaN or Inf included) would otherwise reach the
        # gradients through padded steps' products, even though their results are discarded.
        padded = torch.arange(steps, device=x.device).unsqueeze(1) >= lengths  # (L, N)
        x = x.masked_fill(padded.unsqueeze(2), 0.0)  # (L, N, I)
    gates_x = project_input(x, weights, variant)  # (L, N, 4H)
    h, c = h0, c0  # (N, P), (N, H)
    outputs: list[Tensor] = [h0] * steps
    cells: list[Tensor] = [c0] * steps
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in order:
        h_next, c_next = lstm_step(gates_x[t], h, c, weights, variant, t)  # (N, P), (N, H)
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
    variants: list[Variant] | None = None,
) -> tuple[Tensor, ...]:
    """Run one layer in every direction (forward first, then backward).

    Shape: x (L, N, I), h0 (D, N, P), c0 (D, N, H) -> output (L, N, D*P), h_n (D, N, P),
    c_n (D, N, H), and with ``cell_sequence`` the cells (L, N, D*H).
    """
    variants = variants or [NO_VARIANT] * len(weights)
    results = [
        lstm_direction(x, h0[d], c0[d], w, d == 1, lengths, cell_sequence, variants[d])
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
