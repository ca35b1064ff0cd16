"""The layout layer: every input form torch.nn.LSTM accepts, turned into canonical tensors.

Backends only ever see one layer at a time as time-major, contiguous tensors (see
:class:`lstmkit.backends.Backend`). Everything else is resolved here, once: ``batch_first``,
unbatched input, ``PackedSequence`` (unpacked to a padded batch in its sorted order, with the
lengths sorted non-increasing), ``lengths=`` for a padded batch (sorted the same way, and the
results put back in the caller's order), default states, stacking layers, the two directions
and the dropout between layers.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from lstmkit import backends, checks, onnx, precision
from lstmkit.reference import NO_VARIANT, LayerWeights, Variant
from lstmkit.spec import LSTMSpec

State = tuple[Tensor, Tensor]


class Result(NamedTuple):
    """What one forward call produces, in the caller's layout and batch order.

    ``layer_outputs`` and ``layer_cells`` are filled only when asked for (``sequences=True``):
    one entry per layer, like ``output`` (a tensor, or a PackedSequence for packed input), the
    first holding that layer's h (D*H_out features), the second its c (D*H_cell features).
    """

    output: Tensor | PackedSequence
    h_n: Tensor
    c_n: Tensor
    layer_outputs: tuple[Tensor | PackedSequence, ...] | None = None
    layer_cells: tuple[Tensor | PackedSequence, ...] | None = None


def lstm(
    input: Tensor | PackedSequence,
    hx: State | None,
    spec: LSTMSpec,
    weights: list[list[LayerWeights]],
    training: bool = False,
    *,
    lengths: Tensor | list[int] | tuple[int, ...] | int | None = None,
    initial_state: State | None = None,
    sequences: bool = False,
    variants: list[list[Variant]] | None = None,
) -> Result:
    """Run a stacked LSTM exactly as ``torch.nn.LSTM.forward`` does, plus lstmkit's extras.

    Args:
        input: (L, N, H_in), (N, L, H_in) with ``spec.batch_first``, unbatched (L, H_in), or
            a PackedSequence.
        hx: optional ``(h0, c0)``, each (num_layers*D, N, H_out / H_cell), or 2-D unbatched.
        spec: the configuration.
        weights: ``weights[layer][direction]``.
        training: enables the dropout between layers.
        lengths: valid steps of each sequence of a padded batch, (N,) in [0, L], any order;
            the result is what packing, running and unpacking with zero padding gives.
        initial_state: ``(h, c)`` of shapes (num_layers*D, H_out) and (num_layers*D, H_cell)
            used for every sequence when ``hx`` is not given (zeros when ``None``).
        sequences: also return every layer's h and c at every step.
        variants: the variants' parameters as ``variants[layer][direction]`` (layer norm,
            peepholes); the noise of the others is drawn here from ``spec``'s probabilities.
    """
    data = input.data if isinstance(input, PackedSequence) else input
    cast = precision.autocast_dtype(data.device.type) if isinstance(data, Tensor) else None
    if cast is None:
        return _lstm(
            input, hx, spec, weights, training, lengths, initial_state, sequences, variants
        )
    packed = isinstance(input, PackedSequence)
    pair = isinstance(hx, (tuple, list)) and len(hx) == 2
    h0, c0 = hx if pair else (None, None)
    # torch's autocast: a dense call casts its float32 tensors to the autocast dtype; so does a
    # packed one with projections (torch runs both through ops autocast casts); a packed one
    # without (aten::lstm.data) runs in its states' dtype (h0's if given, else the input's),
    # to which its float32, bfloat16 and float16 tensors are cast
    sources: tuple[torch.dtype, ...] = (torch.float32,)
    by_states = packed and spec.proj_size == 0
    if by_states:
        cast = h0.dtype if isinstance(h0, Tensor) else data.dtype
        sources = (torch.float32, *precision.COMPUTE)
    c_dtype = c0.dtype if isinstance(c0, Tensor) else data.dtype
    if not by_states or cast in sources:  # (a packed call in float64 stays as it is)

        def to(*items: object) -> tuple:
            return _autocast_all(cast, sources, *items)

        if packed:
            order = (input.batch_sizes, input.sorted_indices, input.unsorted_indices)
            input = PackedSequence(to(data)[0], *order)
        else:
            input = to(input)[0]
        hx, initial_state = to(hx, initial_state)
        weights, variants = _parameter_copies(weights, variants, cast, sources)
    # the casts are made: inside, autocast would run the reference's float32 products (and
    # the cpu backend's torch.mm) in its dtype again
    with torch.autocast(data.device.type, enabled=False):
        result = _lstm(
            input, hx, spec, weights, training, lengths, initial_state, sequences, variants
        )
    if spec.proj_size > 0 and result.c_n.dtype != c_dtype:
        # torch's autocast LSTM with projections gives c_n in c0's dtype (the input's when c0
        # is not given)
        result = result._replace(c_n=result.c_n.to(c_dtype))
    return result


def _lstm(
    input: Tensor | PackedSequence,
    hx: State | None,
    spec: LSTMSpec,
    weights: list[list[LayerWeights]],
    training: bool,
    lengths: Tensor | list[int] | tuple[int, ...] | int | None,
    initial_state: State | None,
    sequences: bool,
    variants: list[list[Variant]] | None,
) -> Result:
    weight_dtype = weights[0][0].weight_ih.dtype
    if isinstance(input, PackedSequence):
        if lengths is not None:
            raise ValueError(
                "lengths= is for a padded batch; a PackedSequence already carries its lengths"
                + checks.hint(spec)
            )
        return _packed(
            input, hx, spec, weights, training, weight_dtype, initial_state, sequences, variants
        )
    x = checks.check_input(input, spec, weight_dtype)
    checks.check_parameters(weights, variants, spec, x)
    batched = x.dim() == 3
    if not batched:
        x = x.unsqueeze(1)
    elif spec.batch_first:
        x = x.transpose(0, 1)
    steps, batch = x.shape[0], x.shape[1]
    h0, c0 = _states(hx, batched, x, spec, initial_state)
    order = restore = None
    if lengths is not None:
        lengths = checks.check_lengths(lengths, batched, steps, batch, spec)
        # A traced graph cannot branch on the values: it keeps the lengths and always sorts;
        # an ONNX export keeps them as they are (ONNX's LSTM takes any order).
        traced, exporting = torch.compiler.is_compiling(), onnx.exporting()
        if not (traced or exporting) and bool((lengths == steps).all()):
            lengths = None
        elif not exporting and (traced or bool((lengths[1:] > lengths[:-1]).any())):
            lengths, order = torch.sort(lengths, descending=True, stable=True)
            restore = torch.argsort(order).to(x.device)
            order = order.to(x.device)
            x = x.index_select(1, order)
            h0, c0 = h0.index_select(1, order), c0.index_select(1, order)
    out, h_n, c_n, per_layer = run_stack(
        x, h0, c0, spec, weights, training, lengths, sequences, variants
    )

    def to_caller(t: Tensor, sequence: bool = True) -> Tensor:
        """Back to the caller's batch order and layout; batch_first applies to sequences only."""
        if restore is not None:
            t = t.index_select(1, restore)
        if not batched:
            return t.squeeze(1)
        return t.transpose(0, 1) if spec.batch_first and sequence else t

    result = Result(to_caller(out), to_caller(h_n, False), to_caller(c_n, False))
    if per_layer is None:
        return result
    return result._replace(
        layer_outputs=tuple(to_caller(h) for h, _ in per_layer),
        layer_cells=tuple(to_caller(c) for _, c in per_layer),
    )


def _autocast_all(dtype: torch.dtype, sources: tuple[torch.dtype, ...], *items: object) -> tuple:
    """Each item as autocast passes it to torch's LSTM: a tensor of a ``sources`` dtype, or a
    pair of them, cast to ``dtype``; anything else (None, other dtypes, what the checks will
    refuse) as it is."""
    out = []
    for item in items:
        if isinstance(item, Tensor):
            item = precision.autocast(item, dtype, sources)
        elif isinstance(item, (tuple, list)) and all(isinstance(t, Tensor) for t in item):
            item = type(item)(precision.autocast(t, dtype, sources) for t in item)
        out.append(item)
    return tuple(out)


def _parameter_copies(
    weights: list[list[LayerWeights]],
    variants: list[list[Variant]] | None,
    dtype: torch.dtype,
    sources: tuple[torch.dtype, ...],
) -> tuple[list[list[LayerWeights]], list[list[Variant]] | None]:
    """The weights and the variants' parameters with each tensor of a ``sources`` dtype in
    ``dtype``, through :func:`lstmkit.precision.copies` (kept between inference calls)."""
    copies = iter(precision.copies([t for ws in weights for w in ws for t in w], dtype, sources))
    weights = [[LayerWeights(*(next(copies) for _ in w)) for w in ws] for ws in weights]
    if variants is None:
        return weights, None

    def copied(variant: Variant) -> Variant:
        names = [name for name, value in variant._asdict().items() if isinstance(value, Tensor)]
        tensors = precision.copies([getattr(variant, name) for name in names], dtype, sources)
        return variant._replace(**dict(zip(names, tensors, strict=True)))

    return weights, [[copied(v) for v in layer] for layer in variants]


def _packed(
    packed: PackedSequence,
    hx: State | None,
    spec: LSTMSpec,
    weights: list[list[LayerWeights]],
    training: bool,
    weight_dtype: torch.dtype,
    initial_state: State | None,
    sequences: bool,
    variants: list[list[Variant]] | None,
) -> Result:
    data = checks.check_packed_data(packed.data, spec, weight_dtype)
    checks.check_parameters(weights, variants, spec, data)
    batch_sizes = packed.batch_sizes
    batch = int(batch_sizes[0])
    if hx is not None:
        h0, c0 = checks.check_states(hx, True, batch, spec, data)
        if packed.sorted_indices is not None:
            order = packed.sorted_indices.to(data.device)
            h0, c0 = h0.index_select(1, order), c0.index_select(1, order)
    else:
        h0, c0 = default_states(spec, batch, data, initial_state)
    x, lengths, flat_index = unpack(data, batch_sizes)
    out, h_n, c_n, per_layer = run_stack(
        x, h0, c0, spec, weights, training, lengths, sequences, variants
    )

    def repack(t: Tensor) -> PackedSequence:
        rows = t.reshape(-1, t.shape[-1]).index_select(0, flat_index)
        return PackedSequence(rows, batch_sizes, packed.sorted_indices, packed.unsorted_indices)

    if packed.unsorted_indices is not None:
        order = packed.unsorted_indices.to(data.device)
        h_n, c_n = h_n.index_select(1, order), c_n.index_select(1, order)
    result = Result(repack(out), h_n, c_n)
    if per_layer is None:
        return result
    return result._replace(
        layer_outputs=tuple(repack(h) for h, _ in per_layer),
        layer_cells=tuple(repack(c) for _, c in per_layer),
    )


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


def default_states(
    spec: LSTMSpec, batch: int, like: Tensor, initial_state: State | None = None
) -> State:
    """The states used when ``hx`` is not given: zeros, or ``initial_state`` for every
    sequence. Shapes: (num_layers*D, N, H_out) and (num_layers*D, N, H_cell)."""
    rows = spec.num_layers * spec.num_directions
    if initial_state is None:
        return like.new_zeros(rows, batch, spec.h_size), like.new_zeros(
            rows, batch, spec.hidden_size
        )
    h, c = initial_state  # (num_layers*D, H_out), (num_layers*D, H_cell)
    return h.unsqueeze(1).expand(rows, batch, spec.h_size), c.unsqueeze(1).expand(
        rows, batch, spec.hidden_size
    )


def _states(
    hx: State | None, batched: bool, x: Tensor, spec: LSTMSpec, initial_state: State | None
) -> State:
    if hx is None:
        return default_states(spec, x.shape[1], x, initial_state)
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
    sequences: bool = False,
    variants: list[list[Variant]] | None = None,
) -> tuple[Tensor, Tensor, Tensor, list[tuple[Tensor, Tensor]] | None]:
    """Every layer on canonical tensors. Shape: x (L, N, H_in), h0 (num_layers*D, N, H_out),
    c0 (num_layers*D, N, H_cell) -> output (L, N, D*H_out), h_n and c_n like h0 and c0, and
    with ``sequences`` each layer's (h (L, N, D*H_out), c (L, N, D*H_cell)) at every step.
    A call stored in bfloat16 or float16 is computed in float32 (see :mod:`lstmkit.precision`):
    widened here, rounded back at the end."""
    storage = x.dtype
    compute = precision.compute_dtype(storage)
    if compute == storage:
        return _run_stack(x, h0, c0, spec, weights, training, lengths, sequences, variants)
    weights, variants = _parameter_copies(weights, variants, compute, tuple(precision.COMPUTE))
    out, h_n, c_n, per_layer = _run_stack(
        x.to(compute), h0.to(compute), c0.to(compute), spec, weights, training, lengths,
        sequences, variants,
    )  # fmt: skip
    if per_layer is not None:
        per_layer = [(h.to(storage), c.to(storage)) for h, c in per_layer]
    return out.to(storage), h_n.to(storage), c_n.to(storage), per_layer


def _run_stack(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    spec: LSTMSpec,
    weights: list[list[LayerWeights]],
    training: bool,
    lengths: Tensor | None,
    sequences: bool,
    variants: list[list[Variant]] | None,
) -> tuple[Tensor, Tensor, Tensor, list[tuple[Tensor, Tensor]] | None]:
    if onnx.exporting():
        result = onnx.run_stack(x, h0, c0, spec, weights, training, lengths, sequences, variants)
        return (*result, None)
    request = backends.Request(
        x.device.type,
        x.dtype,
        _needs_grad(x, h0, c0, weights),
        spec.bidirectional,
        spec.proj_size > 0,
        lengths is not None,
        spec.step_variants(training),
    )
    backend = backends.choose(request)
    if training and spec.weight_dropout > 0:
        weights = [[_drop_weights(w, spec.weight_dropout) for w in layer] for layer in weights]
    if (
        backend.fused_stack
        and not request.variants
        and not sequences
        and not (training and spec.dropout > 0)
    ):
        return (*backend.run_stack(x, h0, c0, weights, lengths), None)
    directions = spec.num_directions
    h_n: list[Tensor] = []
    c_n: list[Tensor] = []
    per_layer: list[tuple[Tensor, Tensor]] = []
    layer_input = x.contiguous()
    h0, c0 = h0.contiguous(), c0.contiguous()
    for layer, layer_weights in enumerate(weights):
        extra = {}
        if request.variants:
            layer_variants = variants[layer] if variants else [NO_VARIANT] * directions
            extra["variants"] = _with_noise(layer_variants, spec, training, x.shape[:2], x)
        out, h, c, *cells = backend.run_layer(
            layer_input,
            _rows(h0, layer, directions, len(weights)),
            _rows(c0, layer, directions, len(weights)),
            layer_weights,
            lengths,
            sequences,
            **extra,
        )
        h_n.append(h)
        c_n.append(c)
        if sequences:
            per_layer.append((out, cells[0]))
        if training and spec.dropout > 0 and layer < spec.num_layers - 1:
            out = F.dropout(out, spec.dropout, training=True)
        layer_input = out
    if len(weights) > 1:
        h_n, c_n = [torch.cat(h_n)], [torch.cat(c_n)]
    return layer_input, h_n[0], c_n[0], per_layer if sequences else None


def _rows(states: Tensor, layer: int, directions: int, layers: int) -> Tensor:
    """Layer ``layer``'s (D, N, ·) rows of a (num_layers*D, N, ·) state."""
    return states if layers == 1 else states.narrow(0, layer * directions, directions)


def _needs_grad(x: Tensor, h0: Tensor, c0: Tensor, weights: list[list[LayerWeights]]) -> bool:
    """Whether autograd will differentiate this call: some input or weight requires grad."""
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad or h0.requires_grad or c0.requires_grad:
        return True
    return any(t is not None and t.requires_grad for layer in weights for w in layer for t in w)


def _drop_weights(weights: LayerWeights, p: float) -> LayerWeights:
    """Weight drop: W_hh times one fresh DropConnect mask scaled by 1/(1-p); the parameter
    itself is untouched and receives the masked gradient."""
    keep = torch.empty_like(weights.weight_hh).bernoulli_(1 - p).div_(1 - p)  # (4H, P)
    return weights._replace(weight_hh=weights.weight_hh * keep)


def _with_noise(
    layer_variants: list[Variant],
    spec: LSTMSpec,
    training: bool,
    steps_batch: tuple[int, int],
    like: Tensor,
) -> list[Variant]:
    """Each direction's variant with this call's masks drawn from torch's RNG: recurrent
    dropout (N, H_out) per sequence, zoneout (L, N, H) 0/1 keep-masks per step in training;
    in evaluation zoneout is its probability (the expectation) and dropout is off."""
    steps, batch = steps_batch
    noisy = []
    for variant in layer_variants:
        if training and spec.recurrent_dropout > 0:
            p = spec.recurrent_dropout
            mask = like.new_empty(batch, spec.h_size).bernoulli_(1 - p).div_(1 - p)
            variant = variant._replace(recurrent_mask=mask)
        for name, z, size in (
            ("zoneout_cell", spec.zoneout_cell, spec.hidden_size),
            ("zoneout_hidden", spec.zoneout_hidden, spec.h_size),
        ):
            if z > 0:
                keep = like.new_empty(steps, batch, size).bernoulli_(z) if training else z
                variant = variant._replace(**{name: keep})
        noisy.append(variant)
    return noisy
