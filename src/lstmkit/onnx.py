"""ONNX export: ``torch.onnx.export`` of a model holding ``lstmkit.LSTM``, with no extra step.

Decision. While ``torch.onnx.export`` runs (:func:`exporting`), the layout layer
(:func:`lstmkit.functional.run_stack`) hands its canonical tensors to :func:`run_stack` here
instead of a backend, so no exporter ever sees lstmkit's own ops (``lstmkit::stack``,
``lstmkit::layer``, whose C kernels have no ONNX meaning). Translating those ops instead
(``custom_translation_table``, ``register_custom_op_symbolic``) would need an extra argument
for the dynamo exporter and a translation of the kernels' training outputs; taking another
path while exporting gives both exporters the plain call. Each layer becomes:

- one ONNX ``LSTM`` node where ONNX's operator expresses it (plain layers, ``bias=False``,
  bidirectional, ``lengths=``, peepholes), so runtimes use their fused kernels;
- otherwise a loop over the (dynamic) sequence length of lstmkit's step in standard ops:
  ``proj_size`` and, with the dynamo exporter, layer norm and zoneout (its expectation).

Each exporter is told apart by how it traces, and gets the node and the loop its own way:

- ``dynamo=True`` (the default; ``torch.export``): the node is
  ``torch.onnx.ops.symbolic_multi_out``, an op the exporter writes out as the ONNX node it
  names; the loop is torch's ``scan`` op over :func:`lstmkit.reference.lstm_step` (the math
  written once), which the exporter writes as an ONNX ``Scan``.
- ``dynamo=False`` (TorchScript, ``torch.jit`` tracing): the node is an autograd Function
  whose ``symbolic`` writes it (its forward gives the tracer zeros of the node's shapes, as
  ``torch.onnx.ops`` does); the loop is a scripted function, an ONNX ``Loop``, restating the
  plain step with projection, since TorchScript cannot compile the reference's step (its
  NamedTuples of optional tensors).

Layout, from torch's to ONNX's: gates i, f, g, o become i, o, f, c (:data:`GATE_ORDER`); W is
(D, 4H, H_in), R (D, 4H, H), B (D, 8H) the two biases concatenated, P (D, 3H) the peepholes
i, o, f; ``lengths`` become ``sequence_lens`` (int32, in the caller's order: ONNX needs no
sorting); ONNX's Y (L, D, N, H) becomes torch's (L, N, D*H). ``batch_first``, unbatched input
and default or learned initial states are resolved before, by the layout layer. A sequence of
length 0 ends in its initial state, as in torch (onnxruntime's node gives zeros there).

Refused, with a RuntimeError naming the setting: random masks in training mode (inter-layer
dropout, recurrent and weight dropout, zoneout: export in ``eval()`` mode), ``forward_all``'s
per-layer sequences, and with ``dynamo=False`` layer norm, zoneout and proj_size with
peepholes, which the dynamo exporter handles.

Limits found (torch 2.13, onnxruntime 1.32, the default opset 20): onnxruntime's LSTM kernel
refuses float64; the TorchScript exporter cannot call a bare ``lstmkit.LSTM`` (:func:`export`
wraps it); a program from ``torch.export.export`` outside ``torch.onnx.export`` holds
lstmkit's ops, which have no translation.
"""

from __future__ import annotations

import functools
import io
import os
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lstmkit import reference
from lstmkit.reference import NO_VARIANT, LayerWeights, Variant
from lstmkit.spec import LSTMSpec

if TYPE_CHECKING:
    from torch.onnx._internal.torchscript_exporter.jit_utils import GraphContext

try:  # the flag behind torch.onnx.is_in_onnx_export() for the dynamo exporter
    from torch.onnx._internal.exporter import _flags as _dynamo_flags
except ImportError:  # a torch without the dynamo exporter
    _dynamo_flags = None

# ONNX's gates i, o, f, c as torch's gate blocks (torch: i, f, g, o).
GATE_ORDER = (0, 3, 1, 2)
# ONNX's peepholes i, o, f as lstmkit's blocks (weight_peephole: w_ci, w_cf, w_co).
PEEPHOLE_ORDER = (0, 2, 1)


def export(
    model: torch.nn.Module,
    args: tuple[object, ...],
    f: str | os.PathLike | io.BytesIO | None = None,
    *,
    kwargs: dict[str, object] | None = None,
    dynamo: bool = True,
    **options: object,
) -> object:
    """``torch.onnx.export(model, args, f, kwargs=kwargs, dynamo=dynamo, **options)``, which
    also takes a bare :class:`lstmkit.LSTM` and ``kwargs`` (``lengths=``) with
    ``dynamo=False``.

    The TorchScript exporter passes every parameter of the model's ``forward`` positionally,
    keyword-only ones included, so it cannot call ``lstmkit.LSTM.forward`` itself (its
    ``lengths`` is keyword-only), and it takes keyword arguments only as a dict at the end of
    ``args``; this function wraps the module and moves ``kwargs`` there. With ``dynamo=True``
    it is ``torch.onnx.export`` unchanged. Returns what ``torch.onnx.export`` returns (an
    ONNXProgram with ``dynamo=True``).
    """
    if dynamo:
        return torch.onnx.export(model, args, f, kwargs=kwargs, dynamo=True, **options)
    from lstmkit.modules import LSTM

    if isinstance(model, LSTM):
        model = _Positional(model)
    if kwargs:
        args = (*args, kwargs)
    return torch.onnx.export(model, args, f, dynamo=False, **options)


class _Positional(torch.nn.Module):
    """An :class:`lstmkit.LSTM` whose ``forward`` takes ``lengths`` positionally too."""

    def __init__(self, lstm: torch.nn.Module) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(
        self,
        input: Tensor,
        hx: tuple[Tensor, Tensor] | None = None,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        return self.lstm(input, hx, lengths=lengths)


def exporting() -> bool:
    """Whether ``torch.onnx.export`` is tracing this call (either exporter). The two cheap
    checks first: every export traces (``torch.jit``) or compiles (``torch.export``).

    Dynamo takes ``torch.onnx.is_in_onnx_export()`` for a constant False, so under a strict
    ``torch.export`` (the exporter's second way to capture a model, tried when the first
    fails) the flag behind it is read too.
    """
    # torch._C._is_tracing: torch.jit.is_tracing without its check for TorchScript, which
    # never compiles lstmkit; on every eager call, so the cheaper one (after is_compiling,
    # which dynamo answers: it cannot trace the other)
    if not (torch.compiler.is_compiling() or torch._C._is_tracing()):
        return False
    return torch.onnx.is_in_onnx_export() or getattr(_dynamo_flags, "_is_onnx_exporting", False)


def run_stack(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    spec: LSTMSpec,
    weights: list[list[LayerWeights]],
    training: bool,
    lengths: Tensor | None,
    sequences: bool,
    variants: list[list[Variant]] | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Every layer as ONNX-exportable ops, on the layout layer's canonical tensors.

    Shape: x (L, N, H_in), h0 (num_layers*D, N, H_out), c0 (num_layers*D, N, H_cell), lengths
    (N,) in any order or ``None`` -> output (L, N, D*H_out), h_n and c_n like h0 and c0.
    """
    _check_supported(spec, training, sequences)
    directions = spec.num_directions
    layer_input, h_n, c_n = x, [], []
    for layer, layer_weights in enumerate(weights):
        rows = slice(layer * directions, (layer + 1) * directions)
        layer_variants = _evaluation(variants[layer] if variants else None, spec, directions)
        run = _node_layer if _fits_node(spec) else _loop_layer
        layer_input, h, c = run(
            layer_input, h0[rows], c0[rows], layer_weights, lengths, layer_variants, spec
        )
        h_n.append(h)
        c_n.append(c)
    return layer_input, torch.cat(h_n), torch.cat(c_n)


def _check_supported(spec: LSTMSpec, training: bool, sequences: bool) -> None:
    problems = []
    if training:
        noise = {
            "dropout": spec.dropout,
            "recurrent_dropout": spec.recurrent_dropout,
            "weight_dropout": spec.weight_dropout,
            "zoneout_cell": spec.zoneout_cell,
            "zoneout_hidden": spec.zoneout_hidden,
        }
        drawn = [f"{name}={p}" for name, p in noise.items() if p > 0]
        if drawn:
            problems.append(
                f"{', '.join(drawn)} in training mode draw random masks, which an ONNX graph "
                "does not reproduce; call model.eval() before exporting"
            )
    if sequences:
        problems.append("forward_all's per-layer sequences are not exported; call forward")
    if torch.jit.is_tracing():
        unscriptable = [
            name
            for name, on in (
                ("layer_norm", spec.layer_norm),
                ("zoneout", spec.zoneout_cell > 0 or spec.zoneout_hidden > 0),
                ("proj_size with peepholes", spec.proj_size > 0 and spec.peepholes),
            )
            if on
        ]
        if unscriptable:
            problems.append(
                f"the TorchScript exporter (dynamo=False) cannot export {', '.join(unscriptable)}"
                "; the dynamo exporter (torch.onnx.export(..., dynamo=True)) can"
            )
    if problems:
        raise RuntimeError(f"cannot export {spec} to ONNX: " + "; ".join(problems))


def _evaluation(
    layer_variants: list[Variant] | None, spec: LSTMSpec, directions: int
) -> list[Variant]:
    """Each direction's variant as evaluation sees it: zoneout is its expectation."""
    return [
        variant._replace(zoneout_cell=spec.zoneout_cell, zoneout_hidden=spec.zoneout_hidden)
        for variant in (layer_variants or [NO_VARIANT] * directions)
    ]


def _fits_node(spec: LSTMSpec) -> bool:
    """Whether ONNX's LSTM operator computes this configuration's layers."""
    zoneout = spec.zoneout_cell > 0 or spec.zoneout_hidden > 0
    return spec.proj_size == 0 and not spec.layer_norm and not zoneout


def _reorder(t: Tensor, order: tuple[int, ...], size: int) -> Tensor:
    """The blocks of ``size`` rows of ``t`` in ``order``: slices of static bounds (the tracer
    would record arithmetic on ``t.shape``), not a Split (the dynamo exporter's optimizer
    does not fold one)."""
    return torch.cat([t[k * size : (k + 1) * size] for k in order])


def _node_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: list[LayerWeights],
    lengths: Tensor | None,
    variants: list[Variant],
    spec: LSTMSpec,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, every direction, as one ONNX LSTM node. Shape: x (L, N, I), h0 (D, N, H),
    c0 (D, N, H) -> output (L, N, D*H), h_n (D, N, H), c_n (D, N, H)."""
    hidden = spec.hidden_size  # a Python int: under the tracer, every shape is a traced value

    def gates(t: Tensor) -> Tensor:
        return _reorder(t, GATE_ORDER, hidden)

    w = torch.stack([gates(d.weight_ih) for d in weights])  # (D, 4H, I)
    r = torch.stack([gates(d.weight_hh) for d in weights])  # (D, 4H, H)
    b = None
    if weights[0].bias_ih is not None:
        b = torch.stack([torch.cat([gates(d.bias_ih), gates(d.bias_hh)]) for d in weights])
    p = None
    if variants[0].weight_peephole is not None:
        p = torch.stack([_reorder(v.weight_peephole, PEEPHOLE_ORDER, hidden) for v in variants])
    sequence_lens = None if lengths is None else lengths.to(torch.int32)  # (N,)
    node = lstm_node(x, w, r, b, sequence_lens, h0, c0, p, hidden, len(weights))
    y, h_n, c_n = node  # (L, D, N, H), (D, N, H), (D, N, H)
    if lengths is not None:
        # A sequence of length 0 ends in its initial state; onnxruntime gives it zeros.
        empty = (lengths == 0).view(1, -1, 1)  # (1, N, 1)
        h_n, c_n = torch.where(empty, h0, h_n), torch.where(empty, c0, c_n)
    return y.transpose(1, 2).flatten(2), h_n, c_n  # (L, N, D*H)


def lstm_node(
    x: Tensor,
    w: Tensor,
    r: Tensor,
    b: Tensor | None,
    sequence_lens: Tensor | None,
    initial_h: Tensor,
    initial_c: Tensor,
    p: Tensor | None,
    hidden: int,
    directions: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """ONNX's ``LSTM`` operator in the graph being exported, inputs in ONNX's layout, with
    ``hidden_size`` H and D ``directions``.

    Shape: x (L, N, I), w (D, 4H, I), r (D, 4H, H), b (D, 8H), sequence_lens (N,) int32,
    initial_h and initial_c (D, N, H), p (D, 3H) -> Y (L, D, N, H), Y_h and Y_c (D, N, H).
    """
    if torch.jit.is_tracing():
        args = (x, w, r, b, sequence_lens, initial_h, initial_c, p, hidden, directions)
        return _TracedLSTM.apply(*args)
    steps, batch = x.shape[0], x.shape[1]
    state = (directions, batch, hidden)
    y, y_h, y_c = torch.onnx.ops.symbolic_multi_out(
        "LSTM",
        [x, w, r, b, sequence_lens, initial_h, initial_c, p],
        {"hidden_size": hidden, "direction": _direction(directions)},
        dtypes=(x.dtype,) * 3,
        shapes=((steps, directions, batch, hidden), state, state),
    )
    return y, y_h, y_c


def _direction(directions: int) -> str:
    return "bidirectional" if directions == 2 else "forward"


class _TracedLSTM(torch.autograd.Function):
    """ONNX's LSTM node for the TorchScript exporter: ``symbolic`` writes it; ``forward``
    gives the tracer zeros of the node's shapes, as ``torch.onnx.ops.symbolic`` does (the
    values come from the runtime; a traced forward with optional inputs breaks the
    exporter's passes)."""

    @staticmethod
    def forward(
        ctx: object,
        x: Tensor,
        w: Tensor,
        r: Tensor,
        b: Tensor | None,
        sequence_lens: Tensor | None,
        initial_h: Tensor,
        initial_c: Tensor,
        p: Tensor | None,
        hidden: int,
        directions: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        steps, batch = x.shape[0], x.shape[1]
        state = (directions, batch, hidden)
        return x.new_zeros(steps, directions, batch, hidden), x.new_zeros(state), x.new_zeros(state)

    @staticmethod
    def symbolic(
        g: GraphContext,
        x: torch._C.Value,
        w: torch._C.Value,
        r: torch._C.Value,
        b: torch._C.Value | None,
        sequence_lens: torch._C.Value | None,
        initial_h: torch._C.Value,
        initial_c: torch._C.Value,
        p: torch._C.Value | None,
        hidden: int,
        directions: int,
    ) -> tuple[torch._C.Value, ...]:
        def present(value: torch._C.Value | None) -> torch._C.Value:
            if value is not None and not value.node().mustBeNone():
                return value
            absent = g.op("prim::Constant")  # ONNX's empty name for a skipped optional input
            absent.setType(torch._C.OptionalType.ofTensor())
            return absent

        inputs = [x, w, r, present(b), present(sequence_lens), initial_h, initial_c]
        if p is not None and not p.node().mustBeNone():
            inputs.append(p)
        return g.op(
            "LSTM",
            *inputs,
            hidden_size_i=hidden,
            direction_s=_direction(directions),
            outputs=3,
        )


def _loop_layer(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: list[LayerWeights],
    lengths: Tensor | None,
    variants: list[Variant],
    spec: LSTMSpec,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, every direction, as a loop over the steps of lstmkit's step in standard
    ops. Shape: x (L, N, I), h0 (D, N, P), c0 (D, N, H) -> output (L, N, D*P), h_n (D, N, P),
    c_n (D, N, H)."""
    steps = x.shape[0]
    valid = None
    if lengths is not None:
        valid = (torch.arange(steps).unsqueeze(1) < lengths).unsqueeze(2)  # (L, N, 1)
        x = x.masked_fill(~valid, 0.0)  # padding is never read, as in the reference
    run = _scripted_direction if torch.jit.is_tracing() else _scanned_direction
    results = [run(x, h0[d], c0[d], w, variants[d], d == 1, valid) for d, w in enumerate(weights)]
    return (
        torch.cat([out for out, _, _ in results], dim=2),  # (L, N, D*P)
        torch.stack([h for _, h, _ in results]),  # (D, N, P)
        torch.stack([c for _, _, c in results]),  # (D, N, H)
    )


def _scanned_direction(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: LayerWeights,
    variant: Variant,
    reverse: bool,
    valid: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One direction as torch's scan op over :func:`lstmkit.reference.lstm_step` (dynamo
    exporter). Shape: x (L, N, I), h0 (N, P), c0 (N, H), valid (L, N, 1) or ``None`` ->
    output (L, N, P), h_n (N, P), c_n (N, H).

    The op itself (``scan_op``), not ``scan``: ``scan`` compiles its body with dynamo, whose
    fresh symbols for N specialise the exported batch size; the op takes the weights as
    explicit inputs (no closures) and walks forward only (the backward direction flips).
    """
    from torch._higher_order_ops.scan import scan_op

    xs = [reference.project_input(x, weights, variant)]  # (L, N, 4H)
    if valid is not None:
        xs.append(valid)  # (L, N, 1)
    if reverse:
        xs = [t.flip(0) for t in xs]
    fields = [
        (owner, name)
        for owner, values in (("weights", weights), ("variant", variant))
        for name, value in values._asdict().items()
        if isinstance(value, Tensor)
    ]
    tensors = [getattr(weights if owner == "weights" else variant, n) for owner, n in fields]

    def step(h: Tensor, c: Tensor, *rest: Tensor) -> list[Tensor]:
        inputs, given = rest[: len(xs)], dict(zip(fields, rest[len(xs) :]))
        step_weights = weights._replace(**{n: t for (o, n), t in given.items() if o == "weights"})
        step_variant = variant._replace(**{n: t for (o, n), t in given.items() if o == "variant"})
        h_next, c_next = reference.lstm_step(inputs[0], h, c, step_weights, step_variant)
        if len(inputs) == 1:
            return [h_next, c_next, h_next.clone()]  # the op's outputs may not alias
        keep = inputs[1]  # (N, 1)
        output = torch.where(keep, h_next, torch.zeros_like(h_next))  # (N, P)
        return [torch.where(keep, h_next, h), torch.where(keep, c_next, c), output]

    # An ONNX graph carries no gradients. Detached, no input of the op requires grad, so the
    # exporter's decomposition of the program does not trace a backward of the step (which
    # fails on layer norm's variance, a prim).
    h_n, c_n, out = scan_op(step, *([t.detach() for t in ts] for ts in ([h0, c0], xs, tensors)))
    return (out.flip(0) if reverse else out), h_n, c_n


def _scripted_direction(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: LayerWeights,
    variant: Variant,
    reverse: bool,
    valid: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One direction as a scripted loop (TorchScript exporter, which reaches here only with
    proj_size and no variant: :func:`_check_supported`)."""
    gates_x = reference.project_input(x, weights)  # (L, N, 4H)
    if weights.bias_hh is not None:
        gates_x = gates_x + weights.bias_hh
    if valid is None:
        valid = torch.ones(x.shape[0], x.shape[1], 1, dtype=torch.bool)
    if reverse:
        gates_x, valid = gates_x.flip(0), valid.flip(0)
    loop = _projected_loop()
    out, h_n, c_n = loop(gates_x, h0, c0, weights.weight_hh, weights.weight_hr, valid)
    return (out.flip(0) if reverse else out), h_n, c_n


@functools.cache
def _projected_loop() -> torch.jit.ScriptFunction:
    """The scripted loop, compiled on first use (never at import)."""
    return torch.jit.script(_projected_recurrence)


def _projected_recurrence(
    gates_x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weight_hh: Tensor,
    weight_hr: Tensor,
    valid: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`lstmkit.reference.lstm_step` without variants, forward over every step (the
    backward direction flips its inputs); gates_x holds both biases.

    Shape: gates_x (L, N, 4H), h0 (N, P), c0 (N, H), weight_hh (4H, P), weight_hr (P, H),
    valid (L, N, 1) -> output (L, N, P), h_n (N, P), c_n (N, H).
    """
    h, c = h0, c0
    outputs: list[Tensor] = []
    for t in range(gates_x.shape[0]):
        i, f, g, o = (gates_x[t] + h @ weight_hh.t()).chunk(4, 1)  # 4 x (N, H)
        c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)  # (N, H)
        h_next = (torch.sigmoid(o) * torch.tanh(c_next)) @ weight_hr.t()  # (N, P)
        keep = valid[t]  # (N, 1)
        h = torch.where(keep, h_next, h)
        c = torch.where(keep, c_next, c)
        outputs.append(torch.where(keep, h_next, torch.zeros_like(h_next)))
    return torch.stack(outputs), h, c
