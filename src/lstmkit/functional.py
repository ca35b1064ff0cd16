"""The layout layer: every input form torch.nn.LSTM accepts, turned into canonical tensors.

Backends only ever see one layer at a time as time-major, contiguous tensors (see
:class:`lstmkit.backends.Backend`). Everything else is resolved here, once: ``batch_first``,
unbatched input, ``PackedSequence`` (unpacked to a padded batch in its sorted order, with the
lengths sorted non-increasing), default zero states, stacking layers, the two directions and
the dropout between layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from lstmkit import backends, checks
from lstmkit.reference import LayerWeights
from lstmkit.spec import LSTMSpec

State = tuple[Tensor, Tensor]


def lstm(
    input: Tensor | PackedSequence,
    hx: State | None,
    spec: LSTMSpec,
    weights: list[list[LayerWeights]],
    training: bool = False,
) -> tuple[Tensor | PackedSequence, State]:
    """Run a stacked LSTM exactly as ``torch.nn.LSTM.forward`` does.

    Args:
        input: (L, N, H_in), (N, L, H_in) with ``spec.batch_first``, unbatched (L, H_in), or
            a PackedSequence.
        hx: optional ``(h0, c0)``, each (num_layers*D, N, H_out / H_cell), or 2-D unbatched.
        spec: the configuration.
        weights: ``weights[layer][direction]``.
        training: enables the dropout between layers.

    Returns:
        ``output, (h_n, c_n)`` in the caller's layout and batch order.
    """
    weight_dtype = weights[0][0].weight_ih.dtype
    if isinstance(input, PackedSequence):
        return _packed(input, hx, spec, weights, training, weight_dtype)
    x = checks.check_input(input, spec, weight_dtype)
    batched = x.dim() == 3
    if not batched:
        x = x.unsqueeze(1)
    elif spec.batch_first:
        x = x.transpose(0, 1)
    h0, c0 = _states(hx, batched, x, spec)
    out, h_n, c_n = run_stack(x, h0, c0, spec, weights, training, None)
    if not batched:
        return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
    if spec.batch_first:
        out = out.transpose(0, 1)
    return out, (h_n, c_n)


def _packed(
    packed: PackedSequence,
    hx: State | None,
    spec: LSTMSpec,
    weights: list[list[LayerWeights]],
    training: bool,
    weight_dtype: torch.dtype,
) -> tuple[PackedSequence, State]:
    data = checks.check_packed_data(packed.data, spec, weight_dtype)
    batch_sizes = packed.batch_sizes
    batch = int(batch_sizes[0])
    if hx is not None:
        h0, c0 = checks.check_states(hx, True, batch, spec, data)
        if packed.sorted_indices is not None:
            order = packed.sorted_indices.to(data.device)
            h0, c0 = h0.index_select(1, order), c0.index_select(1, order)
    else:
        h0, c0 = zero_states(spec, batch, data)
    x, lengths, flat_index = unpack(data, batch_sizes)
    out, h_n, c_n = run_stack(x, h0, c0, spec, weights, training, lengths)
    out_data = out.reshape(-1, out.shape[-1]).index_select(0, flat_index)
    if packed.unsorted_indices is not None:
        order = packed.unsorted_indices.to(data.device)
        h_n, c_n = h_n.index_select(1, order), c_n.index_select(1, order)
    result = PackedSequence(out_data, batch_sizes, packed.sorted_indices, packed.unsorted_indices)
    return result, (h_n, c_n)


def unpack(data: Tensor, batch_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A packed batch as a padded one, in the packed (sorted) batch order.

    Returns:
        padded (L, N, F) with zeros after each sequence's end, lengths (N,) int64 on the CPU
        (non-increasing), and the flat index (sum of lengths,) of each packed row in
        ``padded.view(L * N, F)``, on data's device.
    """
    steps, batch = len(batch_sizes), int(batch_sizes[0])
    lengths = (batch_sizes.unsqueeze(0) > torch.arange(batch).unsqueeze(1)).sum(1)  # (N,)
    valid = torch.arange(batch).unsqueeze(0) < batch_sizes.unsqueeze(1)  # (L, N)
    flat_index = valid.reshape(-1).nonzero().squeeze(1).to(data.device)  # (sum of lengths,)
    padded = data.new_zeros(steps * batch, data.shape[1]).index_copy(0, flat_index, data)
    return padded.view(steps, batch, -1), lengths, flat_index


def zero_states(spec: LSTMSpec, batch: int, like: Tensor) -> State:
    rows = spec.num_layers * spec.num_directions
    h0 = like.new_zeros(rows, batch, spec.h_size)
    c0 = like.new_zeros(rows, batch, spec.hidden_size)
    return h0, c0


def _states(hx: State | None, batched: bool, x: Tensor, spec: LSTMSpec) -> State:
    if hx is None:
        return zero_states(spec, x.shape[1], x)
    h0, c0 = checks.check_states(hx, batched, x.shape[1], spec, x)
    if not batched:
        return h0.unsqueeze(1), c0.unsqueeze(1)
    return h0, c0


def run_stack(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    spec: LSTMSpec,
    weights: list[list[LayerWeights]],
    training: bool,
    lengths: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Every layer on canonical tensors. Shape: x (L, N, H_in), h0 (num_layers*D, N, H_out),
    c0 (num_layers*D, N, H_cell) -> output (L, N, D*H_out), h_n and c_n like h0 and c0."""
    request = backends.Request(
        device_type=x.device.type,
        dtype=x.dtype,
        requires_grad=torch.is_grad_enabled()
        and (
            x.requires_grad
            or h0.requires_grad
            or c0.requires_grad
            or any(w.weight_ih.requires_grad for layer in weights for w in layer)
        ),
        bidirectional=spec.bidirectional,
        proj=spec.proj_size > 0,
        variable_lengths=lengths is not None,
    )
    backend = backends.choose(request)
    directions = spec.num_directions
    h_n: list[Tensor] = []
    c_n: list[Tensor] = []
    layer_input = x.contiguous()
    for layer, layer_weights in enumerate(weights):
        rows = slice(layer * directions, (layer + 1) * directions)
        layer_input, h, c = backend.run_layer(
            layer_input, h0[rows], c0[rows], layer_weights, lengths
        )
        h_n.append(h)
        c_n.append(c)
        if training and spec.dropout > 0 and layer < spec.num_layers - 1:
            layer_input = F.dropout(layer_input, spec.dropout, training=True)
    return layer_input, torch.cat(h_n), torch.cat(c_n)
