"""Checks of forward arguments, with messages that say what was expected, what came, and why.

Each check raises the exception type ``torch.nn.LSTM`` / ``torch.nn.LSTMCell`` raise for the
same mistake. Where torch only fails by accident (an ``AttributeError`` from calling ``.dim()``
on a list, an ``IndexError`` from a one-element tuple), lstmkit raises the type of torch's own
deliberate check for that kind of mistake: ``TypeError`` for a non-tensor, ``RuntimeError`` for
a state tuple of the wrong length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

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
    low, high = (int(values.min()), int(values.max())) if values.numel() else (0, 0)
    if low < 0 or high > steps:
        raise ValueError(
            f"lengths must lie in [0, L] = [0, {steps}] (L is the padded sequence length), got "
            f"values from {low} to {high}" + hint(spec)
        )
    return values


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
