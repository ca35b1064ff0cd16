r"""The variants the way users write them today: a Python loop over time steps of a cell.

:class:`LoopLSTM` is the baseline ``lstmkit bench --variants`` times lstmkit's variants
against. It is written as users write a layer-norm, dropout, zoneout or peephole LSTM when
``torch.nn.LSTM`` lacks the option: one cell, called once per step, per layer and direction,
from torch ops only; it uses nothing of lstmkit.

One step, with ``F = torch.nn.functional``::

    gates = F.linear(x_t, W_ih, b_ih) + F.linear(m * h_{t-1}, W_hh', b_hh)
          (layer norm: LN(x_t W_ih^T; g_ih, s_ih) + LN((m * h_{t-1}) W_hh'^T; g_hh, s_hh)
                       + b_ih + b_hh, each LN over the 4H gates, F.layer_norm, eps 1e-5)
    i, f, g, o = gates.chunk(4)                 (torch's gate order)
    i += w_ci * c_{t-1};  f += w_cf * c_{t-1}   (peepholes)
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    o += w_co * c_t                             (peepholes)
    h_t = sigmoid(o) * tanh(c_t)                (layer norm: tanh(LN(c_t; g_c, s_c)))
    h_t = h_t W_hr^T                            (proj_size > 0)
    zoneout: c_t = c_{t-1} where a fresh mask keeps it (probability z_c), else c_t, in
             training; z_c * c_{t-1} + (1 - z_c) * c_t in eval; the same for h with z_h.

In training, ``m`` is one recurrent-dropout mask per sequence, layer and direction
(``F.dropout`` of ones, so scaled by 1/(1-p)) and ``W_hh'`` is ``F.dropout(W_hh, p)`` once per
call (weight drop, as AWD-LSTM's ``WeightDrop`` does); in eval both are the identity.

The input projection ``x_t W_ih^T`` is computed inside the step, one small GEMM per step, as
the common hand-written cell does (an ``nn.LSTMCell``-style ``forward(x_t, (h, c))``); hoisting
it out of the loop as one GEMM is an optimisation such code rarely has.

Parameter names and shapes are those of ``lstmkit.LSTM`` (torch's ``weight_ih_l0`` ...,
lstmkit's ``ln_weight_ih_l0``, ``weight_peephole_l0_reverse`` ...), so
``loop.load_state_dict(lstmkit_lstm.state_dict())`` gives both the same weights.

Legend: L steps, N batch, H_in input features, H cell size, P = proj_size or H (size of h),
D directions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LoopLSTM(nn.Module):
    """A multi-layer LSTM with the variants, as a Python loop over a per-step cell.

    Args:
        input_size, hidden_size, num_layers, bidirectional, proj_size: as ``torch.nn.LSTM``
            (biases always on, time-major input).
        layer_norm, recurrent_dropout, weight_dropout, zoneout_cell, zoneout_hidden,
        peepholes: the variants, as ``lstmkit.LSTM``'s keyword arguments.

    Shape:
        - input: (L, N, H_in) dense tensor; states start at zero.
        - output: (L, N, D * P); h_n (num_layers * D, N, P); c_n (num_layers * D, N, H).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bidirectional: bool = False,
        proj_size: int = 0,
        *,
        layer_norm: bool = False,
        recurrent_dropout: float = 0.0,
        weight_dropout: float = 0.0,
        zoneout_cell: float = 0.0,
        zoneout_hidden: float = 0.0,
        peepholes: bool = False,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        self.num_directions = 2 if bidirectional else 1
        self.hidden_size = hidden_size
        self.h_size = proj_size or hidden_size
        self.layer_norm = layer_norm
        self.recurrent_dropout = recurrent_dropout
        self.weight_dropout = weight_dropout
        self.zoneout_cell = zoneout_cell
        self.zoneout_hidden = zoneout_hidden
        self.peepholes = peepholes
        gates = 4 * hidden_size
        self.suffixes = [
            f"_l{layer}" + ("_reverse" if d == 1 else "")
            for layer in range(num_layers)
            for d in range(self.num_directions)
        ]
        shapes: dict[str, tuple[int, ...]] = {
            "weight_ih": (gates, input_size),  # (4H, H_in) in layer 0, (4H, D*P) after it
            "weight_hh": (gates, self.h_size),
            "bias_ih": (gates,),
            "bias_hh": (gates,),
        }
        if proj_size:
            shapes["weight_hr"] = (proj_size, hidden_size)
        if layer_norm:
            shapes |= {"ln_weight_ih": (gates,), "ln_bias_ih": (gates,)}
            shapes |= {"ln_weight_hh": (gates,), "ln_bias_hh": (gates,)}
            shapes |= {"ln_weight_c": (hidden_size,), "ln_bias_c": (hidden_size,)}
        if peepholes:
            shapes["weight_peephole"] = (3 * hidden_size,)
        self.kinds = tuple(shapes)
        for index, suffix in enumerate(self.suffixes):
            if index == self.num_directions:
                shapes["weight_ih"] = (gates, self.num_directions * self.h_size)
            for kind, shape in shapes.items():
                self.register_parameter(kind + suffix, nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's init, U(-1/sqrt(H), 1/sqrt(H)), for weights, biases and peepholes; layer-norm
        gains 1 and shifts 0. (The benchmark loads lstmkit's values over these.)"""
        bound = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.startswith("ln_"):
                    param.fill_(1.0 if name.startswith("ln_weight") else 0.0)
                else:
                    param.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``output, (h_n, c_n)`` for an (L, N, H_in) input (see the class docstring)."""
        h_n: list[Tensor] = []
        c_n: list[Tensor] = []
        layer_input = x  # (L, N, H_in), then (L, N, D*P)
        for layer in range(self.num_layers):
            outputs = []
            for d in range(self.num_directions):
                suffix = self.suffixes[layer * self.num_directions + d]
                output, h, c = self._direction(layer_input, suffix, reverse=d == 1)
                outputs.append(output)
                h_n.append(h)
                c_n.append(c)
            layer_input = torch.cat(outputs, dim=2)  # (L, N, D*P)
        return layer_input, (torch.stack(h_n), torch.stack(c_n))

    def _direction(self, x: Tensor, suffix: str, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
        """One layer in one direction. Shape: x (L, N, I) -> output (L, N, P), h (N, P),
        c (N, H)."""
        p = {kind: getattr(self, kind + suffix) for kind in self.kinds}
        batch = x.shape[1]
        h = x.new_zeros(batch, self.h_size)  # (N, P)
        c = x.new_zeros(batch, self.hidden_size)  # (N, H)
        # Weight drop and recurrent dropout: one mask per call, then fixed over the steps.
        weight_hh = p["weight_hh"]  # (4H, P)
        if self.training and self.weight_dropout > 0:
            weight_hh = F.dropout(weight_hh, self.weight_dropout)  # (4H, P)
        recurrent_mask = None
        if self.training and self.recurrent_dropout > 0:
            recurrent_mask = F.dropout(torch.ones_like(h), self.recurrent_dropout)  # (N, P)
        steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
        outputs: list[Tensor] = [h] * x.shape[0]
        for t in steps:
            h_in = h if recurrent_mask is None else h * recurrent_mask  # (N, P)
            h, c = self._cell(x[t], h, c, h_in, weight_hh, p)
            outputs[t] = h
        return torch.stack(outputs), h, c  # (L, N, P), (N, P), (N, H)

    def _cell(
        self,
        x_t: Tensor,
        h: Tensor,
        c: Tensor,
        h_in: Tensor,
        weight_hh: Tensor,
        p: dict[str, Tensor],
    ) -> tuple[Tensor, Tensor]:
        """One step. Shape: x_t (N, I), h and h_in (N, P), c (N, H) -> h' (N, P), c' (N, H)."""
        if self.layer_norm:
            size = (4 * self.hidden_size,)
            gates_x = F.layer_norm(
                F.linear(x_t, p["weight_ih"]), size, p["ln_weight_ih"], p["ln_bias_ih"]
            )
            gates_h = F.layer_norm(
                F.linear(h_in, weight_hh), size, p["ln_weight_hh"], p["ln_bias_hh"]
            )
            gates = gates_x + gates_h + p["bias_ih"] + p["bias_hh"]  # (N, 4H)
        else:
            gates_x = F.linear(x_t, p["weight_ih"], p["bias_ih"])  # (N, 4H)
            gates = gates_x + F.linear(h_in, weight_hh, p["bias_hh"])  # (N, 4H)
        i, f, g, o = gates.chunk(4, dim=1)  # 4 x (N, H)
        if self.peepholes:
            w_ci, w_cf, w_co = p["weight_peephole"].chunk(3)  # 3 x (H,)
            i = i + w_ci * c
            f = f + w_cf * c
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # (N, H)
        if self.peepholes:
            o = o + w_co * c_new
        c_shown = c_new
        if self.layer_norm:
            c_shown = F.layer_norm(c_new, (self.hidden_size,), p["ln_weight_c"], p["ln_bias_c"])
        h_new = torch.sigmoid(o) * torch.tanh(c_shown)  # (N, H)
        if "weight_hr" in p:
            h_new = h_new @ p["weight_hr"].t()  # (N, P)
        c_new = self._zoneout(c_new, c, self.zoneout_cell)  # (N, H)
        h_new = self._zoneout(h_new, h, self.zoneout_hidden)  # (N, P)
        return h_new, c_new

    def _zoneout(self, new: Tensor, previous: Tensor, z: float) -> Tensor:
        """Keep each unit's previous value with probability z (training), or mix by z (eval)."""
        if z == 0:
            return new
        if self.training:
            keep = torch.rand_like(new) < z  # a fresh mask every step
            return torch.where(keep, previous, new)
        return z * previous + (1 - z) * new
