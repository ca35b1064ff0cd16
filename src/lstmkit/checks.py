"""Checks of forward arguments, with messages that say what was expected, what came, and why.

Each check raises the exception type ``torch.nn.LSTM`` / ``torch.nn.LSTMCell`` raise for the
same mistake. Where torch only fails by accident (an ``AttributeError`` from calling ``.dim()``
on a list, an ``IndexError`` from a one-element tuple), lstmkit raises the type of torch's own
deliberate check for that kind of mistake: ``TypeError`` for a non-tensor, ``RuntimeError`` for
a state tuple of the wrong length.
"""

from __future__ import annotations

import functools
import operator
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lstmkit.reference import LayerWeights, Variant
from lstmkit.spec import LSTMSpec


def hint(spec: LSTMSpec) -> str:
    """The closing line of every message: the configuration, and where to see its shapes."""
    return f' [{spec}; see every shape with: lstmkit explain "{spec}"]'


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_tensor(value: object, what: str, spec: LSTMSpec) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(value).__name__}" + hint(spec))
    return value


def check_input(x: object, spec: LSTMSpec, weight_dtype: torch.dtype) -> Tensor:
    """A dense input: (L, N, H_in), (N, L, H_in) with batch_first, or unbatched (L, H_in)."""
    x = check_tensor(x, "input", spec)
    if x.dim() not in (2, 3):
        layout = "(N, L, H_in)" if spec.batch_first else "(L, N, H_in)"
        raise ValueError(
            f"LSTM input must be 3-D {layout} for a batch or 2-D (L, H_in) for one sequence, "
            f"got a {x.dim()}-D tensor of shape {_shape(x)}" + hint(spec)
        )
    _check_input_dtype(x, spec, weight_dtype, ValueError)
    _check_features(x, spec)
    if x.shape[0 if x.dim() == 2 or not spec.batch_first else 1] == 0:
        raise RuntimeError(
            f"LSTM input has sequence length L = 0 (shape {_shape(x)}); at least one step is "
            f"needed" + hint(spec)
        )
    return x


def check_packed_data(data: object, spec: LSTMSpec, weight_dtype: torch.dtype) -> Tensor:
    """The ``.data`` of a PackedSequence: (sum of lengths, H_in)."""
    data = check_tensor(data, "PackedSequence.data", spec)
    if data.dim() != 2:
        raise RuntimeError(
            f"a PackedSequence's data must be 2-D (sum of lengths, H_in), got shape "
            f"{_shape(data)}" + hint(spec)
        )
    _check_input_dtype(data, spec, weight_dtype, RuntimeError)
    _check_features(data, spec)
    return data


def _check_input_dtype(
    x: Tensor, spec: LSTMSpec, weight_dtype: torch.dtype, error: type[Exception]
) -> None:
    if x.dtype != weight_dtype:
        raise error(
            f"LSTM input dtype {x.dtype} does not match the weights' dtype {weight_dtype}: "
            f"convert the input with input.to({weight_dtype}) or the module with "
            f"lstm.to({x.dtype})" + hint(spec)
        )


def _check_features(x: Tensor, spec: LSTMSpec) -> None:
    if x.shape[-1] != spec.input_size:
        raise RuntimeError(
            f"LSTM input's last dimension must be input_size={spec.input_size} features, got "
            f"{x.shape[-1]} (input shape {_shape(x)})" + _axis_hint(x, spec) + hint(spec)
        )


def _axis_hint(x: Tensor, spec: LSTMSpec) -> str:
    if x.dim() == 3 and spec.input_size in x.shape[:2]:
        return "; the features seem to be on another axis: is the input transposed?"
    return ""


def check_states(
    hx: object, batched: bool, batch: int, spec: LSTMSpec, x: Tensor
) -> tuple[Tensor, Tensor]:
    """``hx = (h0, c0)``, each (num_layers*D, N, H) or unbatched (num_layers*D, H)."""
    if isinstance(hx, Tensor):
        raise RuntimeError(
            f"LSTM states must be a tuple (h0, c0) of two tensors, got a single tensor of shape "
            f"{_shape(hx)}; an LSTM carries a hidden state h and a cell state c" + hint(spec)
        )
    if not isinstance(hx, Sequence):
        raise TypeError(
            f"LSTM states must be a tuple (h0, c0) of two tensors, got {type(hx).__name__}"
            + hint(spec)
        )
    if len(hx) != 2:
        raise RuntimeError(
            f"LSTM states must be a tuple (h0, c0) of two tensors, got {len(hx)} items" + hint(spec)
        )
    h0 = check_tensor(hx[0], "h0 (hx[0])", spec)
    c0 = check_tensor(hx[1], "c0 (hx[1])", spec)
    rank = 3 if batched else 2
    if h0.dim() != rank or c0.dim() != rank:
        kind = "batched 3-D" if batched else "unbatched 2-D"
        layout = "(num_layers*D, N, H)" if batched else "(num_layers*D, H)"
        if batched:
            fix = "; give them the batch dimension N, e.g. h0.unsqueeze(1).expand(-1, N, -1)"
        else:
            fix = (
                "; 2-D input (L, H_in) is one sequence (batch_first does not apply to it), so "
                "its states have no N dimension, e.g. h0[:, 0]"
            )
        raise RuntimeError(
            f"for {kind} input, h0 and c0 must be {rank}-D {layout}, got {h0.dim()}-D and "
            f"{c0.dim()}-D tensors of shapes {_shape(h0)} and {_shape(c0)}" + fix + hint(spec)
        )
    rows = spec.num_layers * spec.num_directions
    for name, state, size, size_name in (
        ("h0", h0, spec.h_size, "proj_size" if spec.proj_size else "hidden_size"),
        ("c0", c0, spec.hidden_size, "hidden_size"),
    ):
        expected = (rows, batch, size) if batched else (rows, size)
        if _shape(state) != expected:
            raise RuntimeError(
                f"{name} has shape {_shape(state)}, expected {expected}: {name} holds one state "
                f"per layer and direction, num_layers * num_directions = {spec.num_layers} * "
                f"{spec.num_directions} = {rows}"
                + (f", for each of the N = {batch} sequences" if batched else "")
                + f", each of {size_name} = {size}"
                + _state_hint(name, _shape(state), expected, spec)
                + hint(spec)
            )
        if state.dtype != x.dtype:
            raise RuntimeError(
                f"{name} has dtype {state.dtype} but the input has dtype {x.dtype}; states "
                f"and input must share one dtype" + hint(spec)
            )
        if state.device != x.device:
            raise RuntimeError(
                f"{name} is on {state.device} but the input is on {x.device}" + hint(spec)
            )
    return h0, c0


def _state_hint(
    name: str, shape: tuple[int, ...], expected: tuple[int, ...], spec: LSTMSpec
) -> str:
    """What a wrong state shape most likely means, and the fix."""
    if len(expected) == 3 and shape == (expected[1], expected[0], expected[2]):
        return (
            f"; it looks batch-first (N, num_layers*D, H), but batch_first does not apply to "
            f"states, which are (num_layers*D, N, H): pass {name}.transpose(0, 1)"
        )
    if spec.proj_size and shape[:-1] == expected[:-1]:
        if name == "c0" and shape[-1] == spec.proj_size:
            return (
                f"; only h is projected: c0 keeps hidden_size = {spec.hidden_size} features "
                f"while h0 has proj_size = {spec.proj_size}"
            )
        if name == "h0" and shape[-1] == spec.hidden_size:
            return (
                f"; h is projected: h0 has proj_size = {spec.proj_size} features, only c0 has "
                f"hidden_size = {spec.hidden_size}"
            )
    return " (batch_first does not apply to states)" if spec.batch_first else ""


def check_lengths(lengths: object, batched: bool, steps: int, batch: int, spec: LSTMSpec) -> Tensor:
    """``lengths=`` of a padded batch as an (N,) int64 CPU tensor with values in [0, L].

    Accepted as ``pack_padded_sequence`` accepts them: an integer tensor, a numpy integer array
    or scalar, an int or a list/tuple of ints (Python or numpy), and floats with whole values
    (a tensor or a list, e.g. ``torch.tensor([3., 2.])``). numpy is never imported: anything
    that is not a tensor goes through ``torch.as_tensor``.
    """
    values = _length_values(lengths, spec)
    expected = (batch,) if batched else (1,)
    if values.dim() == 0:
        values = values.reshape(1)
    if tuple(values.shape) != expected:
        what = f"one length per sequence, N = {batch}" if batched else "one length (unbatched)"
        raise ValueError(
            f"lengths has shape {tuple(values.shape)}, expected {expected}: {what}" + hint(spec)
        )
    if torch.compiler.is_compiling():
        return values  # a traced graph cannot branch on values: the op checks them when it runs
    low, high = (int(values.min()), int(values.max())) if values.numel() else (0, 0)
    if low < 0 or high > steps:
        raise ValueError(
            f"lengths must lie in [0, L] = [0, {steps}] (L is the padded sequence length), got "
            f"values from {low} to {high}" + hint(spec)
        )
    return values


@functools.cache
def _parameter_shapes(spec: LSTMSpec) -> tuple[tuple[tuple[int, ...] | None, ...], ...]:
    """Per layer, the shape of each LayerWeights field (``None``: the spec has no such
    parameter), in torch's layout."""
    gates = 4 * spec.hidden_size
    bias = (gates,) if spec.bias else None
    proj = (spec.proj_size, spec.hidden_size) if spec.proj_size else None
    return tuple(
        ((gates, spec.layer_input_size(layer)), (gates, spec.h_size), bias, bias, proj)
        for layer in range(spec.num_layers)
    )


@functools.cache
def _variant_shapes(spec: LSTMSpec) -> tuple[tuple[int, ...] | None, ...]:
    """The shape of each variant parameter (Variant's first 7 fields), ``None`` if off."""
    gates, hidden = (4 * spec.hidden_size,), (spec.hidden_size,)
    norm = (gates, gates, gates, gates, hidden, hidden) if spec.layer_norm else (None,) * 6
    return (*norm, (3 * spec.hidden_size,) if spec.peepholes else None)


def check_parameters(
    weights: Sequence[Sequence[LayerWeights]],
    variants: Sequence[Sequence[Variant]] | None,
    spec: LSTMSpec,
    like: Tensor,
) -> None:
    """Every parameter a call hands to a backend: torch's shape for ``spec``, the input's
    dtype and device, a dense (strided) layout. ``RuntimeError`` naming the parameter, as
    torch.nn.LSTM raises for a parameter that does not fit; ``weights[layer][direction]``.

    Decided once per state of the parameters: a set that passed is remembered with each
    tensor's identity and a guard of what the check read (:func:`_guard`: dtype, device,
    layout, sizes and strides, in C++), and is checked again when any of them changes. No
    counter tells these changes apart: ``p.data = p.data[:3]`` keeps the identity, the
    ``_version`` and the address of ``p`` and changes its shape.
    """
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        # Traced once (the compiled graph guards on every parameter's shape, dtype and
        # device), or tensors without storage (torch.func's wrappers): nothing to remember.
        _check_parameters(weights, variants, spec, like)
        return
    memo = getattr(weights, "checked", None)
    if (
        memo is not None
        and memo[0] is spec
        and memo[1] is like.dtype
        and memo[2] == like.device
        and memo[3] is variants
    ):
        present = memo[4]
        for guard in memo[5]:
            if guard(*present):
                return
    flat = [t for layer in weights for w in layer for t in w]
    if variants is not None:
        flat += [t for layer in variants for v in layer for t in v[:_VARIANT_PARAMETERS]]
    first = flat[0]
    present = [t for t in flat if t is not None]
    seen = _passed.get(id(first))
    same = (
        seen is not None
        and seen[0]() is first
        and seen[1] is spec
        and seen[2] is like.dtype
        and seen[3] == like.device
        and all(map(operator.is_, seen[4], flat[1:]))
    )
    if same and any(guard(*present) for guard in seen[5]):
        return
    _check_parameters(weights, variants, spec, like)
    if not isinstance(first, Tensor):
        return
    guard = _guard(present)
    if guard is None:
        return  # no guard in this torch: every call checks in full
    # the same tensors may have passed in another state too (another dispatch state, such as
    # inference mode or autocast, which the guards include): keep the last few
    guards = [guard, *(seen[5][: _GUARDS - 1] if same else ())]
    _remember(first, (spec, like.dtype, like.device, tuple(flat[1:]), guards))
    if isinstance(weights, ParameterLists):
        weights.checked = (spec, like.dtype, like.device, variants, tuple(present), guards)


class ParameterLists(list):
    """A module's parameters as ``weights[layer][direction]`` (tuples of LayerWeights per
    layer), which the module keeps while its parameters stay the same objects and never
    changes: :func:`check_parameters` keeps what it checked on it (``checked``), so the
    module's calls find it without walking the lists; it goes with the module's lists."""

    checked: tuple | None = None


_VARIANT_PARAMETERS = 7  # Variant's fields up to weight_peephole; the rest is per-call noise
_GUARDS = 4  # guards kept per set of parameters
# id(first weight) -> (weak reference to it, spec, dtype, device, the other parameters,
# guards, newest first). The first weight is held weakly and the others strongly: all belong
# to one module, so an entry lives as long as that module's parameters do, and goes when the
# first weight dies.
_passed: dict[int, tuple] = {}


def _remember(first: Tensor, entry: tuple) -> None:
    key = id(first)
    _passed[key] = (weakref.ref(first, lambda _: _passed.pop(key, None)), *entry)


def _guard(tensors: list[Tensor]) -> Callable[..., bool] | None:
    """A check, in C++, that tensors passed to it have the dtype, device, dispatch keys
    (layout, and the thread's dispatch state: inference mode, autocast), sizes, strides and
    requires_grad that ``tensors`` have now (about 1 us for 16, against 0.3 us a tensor for
    reading these in Python). It is dynamo's guard of a compiled graph's tensor inputs; where
    this torch has none, or it does not see a change of shape (:func:`_guards_work`), ``None``.
    """
    if not _guards_work():
        return None
    return _tensor_guards()(
        *tensors,
        dynamic_dims_sizes=[list(t.shape) for t in tensors],
        dynamic_dims_strides=[list(t.stride()) for t in tensors],
    ).check


def _tensor_guards() -> type:
    from torch._C._dynamo.guards import TensorGuards

    return TensorGuards


@functools.cache
def _guards_work() -> bool:
    """Whether dynamo's tensor guards exist here and see what the checks must see: a shape,
    a dtype, a layout, given by ``.data =`` (which keeps identity, ``_version`` and address)."""
    try:
        guards = _tensor_guards()
        probe = torch.zeros(4, 3)
        check = guards(probe, dynamic_dims_sizes=[[4, 3]], dynamic_dims_strides=[[3, 1]]).check
        if not check(probe):
            return False
        changed = []
        for data in (probe.data[:2], probe.data.double(), probe.data.t()):
            other = torch.zeros(4, 3)
            other.data = data
            changed.append(other)
        return not any(check(t) for t in (*changed, probe.to_sparse()))
    except (ImportError, AttributeError, TypeError, RuntimeError):
        return False


def _check_parameters(
    weights: Sequence[Sequence[LayerWeights]],
    variants: Sequence[Sequence[Variant]] | None,
    spec: LSTMSpec,
    like: Tensor,
) -> None:
    directions = spec.num_directions
    if len(weights) != spec.num_layers or any(len(w) != directions for w in weights):
        found = [len(w) for w in weights]
        raise RuntimeError(
            f"expected the weights of {spec.num_layers} layer(s) x {directions} direction(s), "
            f"got {len(weights)} layer(s) with {found} direction(s)" + hint(spec)
        )
    dtype, device = like.dtype, like.device
    groups = [(LayerWeights._fields, weights, _traceable(_parameter_shapes)(spec))]
    if variants is not None:
        variant_shapes = _traceable(_variant_shapes)(spec)
        groups.append((Variant._fields, variants, (variant_shapes,) * spec.num_layers))
    for fields, by_layer, layer_shapes in groups:
        for layer, (by_direction, shapes) in enumerate(zip(by_layer, layer_shapes)):
            for direction, tensors in enumerate(by_direction):
                for field, tensor, shape in zip(fields, tensors, shapes):
                    if not _fits(tensor, shape, dtype, device):
                        _refuse(f"{field}_l{layer}", direction, tensor, shape, like, spec)


def _traceable(cached: Callable) -> Callable:
    """The ``functools.cache`` function ``cached``, or under torch.compile the function it
    wraps: dynamo traces through a cache anyway, and warns when it meets one."""
    return cached.__wrapped__ if torch.compiler.is_compiling() else cached


def _fits(
    tensor: Tensor | None,
    shape: tuple[int, ...] | None,
    dtype: torch.dtype,
    device: torch.device,
) -> bool:
    if not isinstance(tensor, Tensor):
        return tensor is None and shape is None
    return (
        tensor.dtype is dtype
        and tensor.device == device
        and tensor.shape == shape
        and tensor.layout is torch.strided
    )


_LAYOUTS = {
    "weight_ih": "(4*H_cell, H_in) in layer 0, (4*H_cell, D*H_out) above",
    "weight_hh": "(4*H_cell, H_out)",
    "bias": "(4*H_cell,)",
    "weight_hr": "(H_out, H_cell) = (proj_size, hidden_size)",
    "ln_weight_c": "(H_cell,)",
    "ln_bias_c": "(H_cell,)",
    "ln": "(4*H_cell,)",
    "weight_peephole": "(3*H_cell,): w_ci, w_cf, w_co",
}


def _layout(name: str) -> str:
    """The named layout of parameter ``name`` (e.g. ``bias_ih_l1_reverse``)."""
    kind = next(k for k in _LAYOUTS if name.startswith(k))
    gate_rows = "4*H_cell" in _LAYOUTS[kind]
    return _LAYOUTS[kind] + (" (one block of rows per gate i, f, g, o)" if gate_rows else "")


def _refuse(
    name: str,
    direction: int,
    tensor: Tensor | None,
    shape: tuple[int, ...] | None,
    like: Tensor,
    spec: LSTMSpec,
) -> None:
    """Raise the RuntimeError that says how parameter ``name`` does not fit."""
    name += "_reverse" if direction else ""
    if shape is None:
        problem = f"is a tensor of shape {_shape(tensor)}, but {spec} has no such parameter"
    elif tensor is None:
        problem = f"is None, expected a tensor of shape {shape}"
    elif not isinstance(tensor, Tensor):
        problem = f"is a {type(tensor).__name__}, expected a tensor of shape {shape}"
    elif tensor.shape != shape:
        problem = f"has shape {_shape(tensor)}, expected {shape} = {_layout(name)}"
    elif tensor.dtype != like.dtype:
        problem = (
            f"has dtype {tensor.dtype} but the input has {like.dtype}: every parameter and "
            f"the input share one dtype (convert with lstm.to({like.dtype}))"
        )
    elif tensor.device != like.device:
        problem = (
            f"is on {tensor.device} but the input is on {like.device}: input and parameter "
            f"tensors must be on the same device (move with lstm.to({str(like.device)!r}))"
        )
    else:
        problem = f"has layout {tensor.layout}, expected a dense tensor (torch.strided)"
    raise RuntimeError(f"LSTM parameter {name} {problem}" + hint(spec))


def _length_values(lengths: object, spec: LSTMSpec) -> Tensor:
    """``lengths`` as an int64 CPU tensor of any shape, or a TypeError saying what is wrong."""
    if isinstance(lengths, Tensor):
        values = lengths.detach()
    else:
        # torch.as_tensor would read True as 1; a bool is not a length.
        items = lengths if isinstance(lengths, (list, tuple)) else (lengths,)
        if any(isinstance(v, bool) for v in items):
            raise TypeError(f"lengths must hold integers, got a bool in {lengths!r}" + hint(spec))
        try:
            values = torch.as_tensor(lengths, device="cpu")
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"lengths must be a 1-D integer tensor, a numpy integer array or a list of "
                f"ints, got {lengths!r} ({error})" + hint(spec)
            ) from error
        if values.dtype.is_floating_point:
            # Again in float64: a list of floats becomes float32, which rounds 2.0000001 to 2.
            values = torch.as_tensor(lengths, dtype=torch.float64, device="cpu")
    if values.dtype.is_complex or values.dtype == torch.bool:
        raise TypeError(
            f"lengths must hold integers, got values of dtype {values.dtype}" + hint(spec)
        )
    if values.dtype.is_floating_point:
        whole = torch.isfinite(values) & (values == values.trunc())
        if not bool(whole.all()):
            # TypeError, as torch's argument parser raises for a float where an int is needed
            # (torch.zeros(2.5), nn.LSTM(4, 2.5)); whole floats pass only because
            # pack_padded_sequence takes them.
            bad = values[~whole].flatten()[0].item()
            raise TypeError(
                f"lengths count steps, so they must be whole numbers, got {bad} (lengths of "
                f"dtype {values.dtype})" + hint(spec)
            )
    return values.to("cpu", torch.int64)
