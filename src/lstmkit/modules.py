"""``LSTM`` and ``LSTMCell``: torch's modules on the outside, lstmkit's recurrence inside.

The modules own parameters (torch's names, shapes, order and init), validation and ``repr``;
``forward`` delegates to :mod:`lstmkit.functional`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import warnings
from operator import is_

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from lstmkit import backends, checks, functional, precision, reference
from lstmkit.reference import LayerWeights, Variant
from lstmkit.spec import LSTMSpec
from lstmkit.streaming import Stream


def _spec_field(name: str) -> property:
    """A module attribute stored in ``self.spec``; setting it re-validates the spec.

    Only settings that keep the parameter shapes (``batch_first``, ``dropout``, ...) can
    usefully be changed after construction, as with ``torch.nn.LSTM``.
    """

    def get(self: LSTM) -> object:
        return getattr(self.spec, name)

    def set(self: LSTM, value: object) -> None:
        self.spec = dataclasses.replace(self.spec, **{name: value})

    return property(get, set, doc=f"``{name}`` of the configuration (see ``spec``).")


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class LSTM(nn.Module):
    r"""A multi-layer LSTM, a drop-in replacement for ``torch.nn.LSTM``.

    The constructor, parameters, input forms and outputs are those of ``torch.nn.LSTM``; the
    recurrence is computed by lstmkit (:mod:`lstmkit.reference` and the backends).

    Args:
        input_size: H_in, features of the input.
        hidden_size: H_cell, features of the cell state (and of h without projection).
        num_layers: stacked layers; layer k > 0 reads layer k-1's output.
        bias: use ``bias_ih`` and ``bias_hh``.
        batch_first: input and output are (N, L, ...) instead of (L, N, ...); never applies
            to the states.
        dropout: probability of zeroing each layer's output except the last, in training.
        bidirectional: run a second, backward direction in every layer (D = 2).
        proj_size: if > 0, h is projected to this size (H_out) by ``weight_hr``.

    Shape:
        - input: (L, N, H_in), (N, L, H_in) if ``batch_first``, (L, H_in) unbatched, or a
          PackedSequence.
        - hx: optional ``(h_0, c_0)``, each (num_layers * D, N, H_out) and
          (num_layers * D, N, H_cell); 2-D for unbatched input; zeros by default.
        - output: (L, N, D * H_out) (same batch layout as the input): the top layer's h at
          every step, forward and backward halves concatenated.
        - h_n, c_n: like h_0 and c_0, each layer's final state; rows ordered layer 0 forward,
          layer 0 backward, layer 1 forward, ...

    lstmkit's extras (keyword-only; the defaults behave like ``torch.nn.LSTM``):
        learn_initial_state: add learnable initial states, used when ``hx`` is not given:
            ``h0_l{k}`` (H_out,) and ``c0_l{k}`` (H_cell,) per layer, ``..._reverse`` for the
            backward direction, initialised to zero.
        forget_bias: if given, the forget gate's slice of ``bias_ih`` is set to this value and
            that of ``bias_hh`` to zero at init, so their sum is ``forget_bias``.
        layer_norm: layer-normalise the input and recurrent pre-activations and the cell state
            shown in h (Ba et al. 2016); adds ``ln_weight_ih_l{k}``, ``ln_bias_ih_l{k}``,
            ``ln_weight_hh_l{k}``, ``ln_bias_hh_l{k}`` (4*H_cell,) and ``ln_weight_c_l{k}``,
            ``ln_bias_c_l{k}`` (H_cell,): gains start at 1, shifts at 0.
        recurrent_dropout: variational dropout on h before ``W_hh`` in training, one mask per
            sequence, layer and direction (Gal and Ghahramani 2016).
        weight_dropout: DropConnect on ``W_hh`` in training, one mask per call (AWD-LSTM,
            Merity et al. 2017); the stored parameter is never modified.
        zoneout_cell, zoneout_hidden: each unit of c (h) keeps its previous value with this
            probability in training, and the expectation is used in evaluation (Krueger et al.
            2016).
        peepholes: i and f see c_{t-1}, o sees c_t, through ``weight_peephole_l{k}``
            (3*H_cell,: w_ci, w_cf, w_co), initialised like the other weights (Gers and
            Schmidhuber 2000).

    ``forward`` also takes ``lengths=`` (a padded batch's valid lengths, see :meth:`forward`);
    :meth:`forward_all` returns every layer's h and c sequences; :meth:`stream` runs a long
    sequence chunk by chunk.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        learn_initial_state: bool = False,
        forget_bias: float | None = None,
        layer_norm: bool = False,
        recurrent_dropout: float = 0.0,
        weight_dropout: float = 0.0,
        zoneout_cell: float = 0.0,
        zoneout_hidden: float = 0.0,
        peepholes: bool = False,
    ) -> None:
        super().__init__()
        spec = LSTMSpec(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            learn_initial_state,
            forget_bias,
            layer_norm,
            recurrent_dropout,
            weight_dropout,
            zoneout_cell,
            zoneout_hidden,
            peepholes,
        )
        if spec.dropout > 0 and num_layers == 1:
            warnings.warn(
                f"dropout={spec.dropout} has no effect with num_layers=1: dropout is applied "
                f"to each layer's output except the last layer's",
                stacklevel=2,
            )
        self.spec = spec
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        factory = {"device": device, "dtype": dtype}
        gates = 4 * hidden_size
        for layer in range(num_layers):
            for direction in range(spec.num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = {
                    "weight_ih": (gates, spec.layer_input_size(layer)),
                    "weight_hh": (gates, spec.h_size),
                }
                if bias:
                    shapes["bias_ih"] = (gates,)
                    shapes["bias_hh"] = (gates,)
                if proj_size > 0:
                    shapes["weight_hr"] = (proj_size, hidden_size)
                names = []
                for kind, shape in shapes.items():
                    setattr(self, kind + suffix, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(kind + suffix)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        for name, size in self._variant_shapes().items():
            setattr(self, name, nn.Parameter(torch.empty(size, **factory)))
        if learn_initial_state:
            for name in self._initial_state_names():
                size = spec.h_size if name.startswith("h") else hidden_size
                setattr(self, name, nn.Parameter(torch.empty(size, **factory)))
        self.reset_parameters()

    def _suffixes(self) -> list[str]:
        """``_l{k}`` and ``_l{k}_reverse`` in h_n's row order."""
        return [
            f"_l{layer}" + ("_reverse" if d == 1 else "")
            for layer in range(self.spec.num_layers)
            for d in range(self.spec.num_directions)
        ]

    def _variant_shapes(self) -> dict[str, int]:
        """Names and sizes of the variants' parameters, per layer and direction."""
        hidden = self.spec.hidden_size
        kinds: dict[str, int] = {}
        if self.spec.layer_norm:
            kinds |= {"ln_weight_ih": 4 * hidden, "ln_bias_ih": 4 * hidden}
            kinds |= {"ln_weight_hh": 4 * hidden, "ln_bias_hh": 4 * hidden}
            kinds |= {"ln_weight_c": hidden, "ln_bias_c": hidden}
        if self.spec.peepholes:
            kinds["weight_peephole"] = 3 * hidden
        return {kind + suffix: size for suffix in self._suffixes() for kind, size in kinds.items()}

    def _initial_state_names(self) -> list[str]:
        """``h0_l{k}[_reverse]`` then ``c0_l{k}[_reverse]``, rows in h_n's order."""
        suffixes = self._suffixes()
        return [f"h0{s}" for s in suffixes] + [f"c0{s}" for s in suffixes]

    # torch's configuration attributes, read from (and written through) the validated spec.
    input_size = _spec_field("input_size")
    hidden_size = _spec_field("hidden_size")
    num_layers = _spec_field("num_layers")
    bias = _spec_field("bias")
    batch_first = _spec_field("batch_first")
    dropout = _spec_field("dropout")
    bidirectional = _spec_field("bidirectional")
    proj_size = _spec_field("proj_size")
    learn_initial_state = _spec_field("learn_initial_state")
    forget_bias = _spec_field("forget_bias")
    layer_norm = _spec_field("layer_norm")
    recurrent_dropout = _spec_field("recurrent_dropout")
    weight_dropout = _spec_field("weight_dropout")
    zoneout_cell = _spec_field("zoneout_cell")
    zoneout_hidden = _spec_field("zoneout_hidden")
    peepholes = _spec_field("peepholes")

    def reset_parameters(self) -> None:
        """torch's init: every weight and bias from U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)),
        in torch's order; then the variants' parameters (peepholes like the weights, layer-norm
        gains 1 and shifts 0), ``forget_bias`` and zero learned initial states, if any."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name in self._flat_weights_names:
            nn.init.uniform_(getattr(self, name), -bound, bound)
        with torch.no_grad():
            for name in self._variant_shapes():
                if name.startswith("weight_peephole"):
                    nn.init.uniform_(getattr(self, name), -bound, bound)
                else:
                    getattr(self, name).fill_(1.0 if name.startswith("ln_weight") else 0.0)
            if self.spec.learn_initial_state:
                for name in self._initial_state_names():
                    getattr(self, name).zero_()
            if self.spec.forget_bias is not None:
                forget = slice(self.hidden_size, 2 * self.hidden_size)
                for names in self._all_weights:
                    getattr(self, names[2])[forget] = self.spec.forget_bias  # bias_ih
                    getattr(self, names[3])[forget] = 0.0  # bias_hh

    def flatten_parameters(self) -> None:
        """Does nothing: lstmkit needs no flat weight buffer. Kept for code written for torch."""

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """The parameters per layer and direction, as ``torch.nn.LSTM.all_weights``."""
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def layer_weights(self) -> list[list[LayerWeights]]:
        """The parameters as ``weights[layer][direction]`` for :mod:`lstmkit.functional`."""
        return [list(layer) for layer in self._parameter_lists()[0]]

    def layer_variants(self) -> list[list[Variant]] | None:
        """The variants' parameters as ``variants[layer][direction]``, or ``None`` if the
        configuration has no layer norm and no peepholes."""
        variants = self._parameter_lists()[1]
        return None if variants is None else [list(layer) for layer in variants]

    def _parameter_lists(
        self,
    ) -> tuple[list[tuple[LayerWeights, ...]], list[tuple[Variant, ...]] | None]:
        """``layer_weights()`` and ``layer_variants()``, rebuilt only when they may differ.

        They hold the parameter objects themselves, so they stay right when a parameter's data
        changes. They are rebuilt when any object in ``_parameters`` or the spec was replaced
        (assignment, ``.to()``, ``load_state_dict(assign=True)``), and on every call when a
        parameter lives elsewhere (``torch.nn.utils.parametrize``, weight norm), where the
        value is computed anew each time. The module's own: never changed once made (a
        :class:`lstmkit.checks.ParameterLists`, which remembers their check), so the
        public methods above return copies.
        """
        key = (self.spec, *self._parameters.values())
        cached = self.__dict__.get("_cached_lists")
        if cached is not None and len(cached[0]) == len(key) and all(map(is_, cached[0], key)):
            return cached[1]
        get = self._parameter
        suffixes = self._suffixes()
        directions = self.spec.num_directions
        # Traced code (torch.compile, torch.export) reads the parameters anew each time it
        # runs; it must not leave tensors of its own in the module.
        traced = torch.compiler.is_compiling()
        weights = (list if traced else checks.ParameterLists)(
            tuple(
                LayerWeights(*(get(kind + suffix) for kind in LayerWeights._fields)) for suffix in s
            )
            for s in _chunks(suffixes, directions)
        )
        variants = None
        if self.spec.layer_norm or self.spec.peepholes:
            kinds = Variant._fields[:7]
            variants = [
                tuple(Variant(*(get(kind + suffix) for kind in kinds)) for suffix in s)
                for s in _chunks(suffixes, directions)
            ]
        lists = (weights, variants)
        if traced:
            return lists
        if not torch.nn.utils.parametrize.is_parametrized(self) and all(
            name in self._parameters for names in self._all_weights for name in names
        ):
            self.__dict__["_cached_lists"] = (key, lists)
        return lists

    def __getstate__(self) -> dict:
        """The module's state for pickling and copying, without the cache of parameter lists
        (rebuilt on the next call), so that a pickle holds only lstmkit's public classes."""
        state = self.__dict__.copy()
        state.pop("_cached_lists", None)
        return state

    def _parameter(self, name: str) -> Tensor | None:
        """The parameter (or computed weight) called ``name``; ``None`` if the configuration
        has none (``bias_ih`` without bias, ``weight_hr`` without projection, ...)."""
        value = self._parameters.get(name)
        if value is not None or name in self._parameters:
            return value
        return getattr(self, name, None)

    def initial_state(self) -> tuple[Tensor, Tensor] | None:
        """The learned initial states as (num_layers*D, H_out) and (num_layers*D, H_cell), or
        ``None`` without ``learn_initial_state`` (then states default to zeros)."""
        if not self.spec.learn_initial_state:
            return None
        names = self._initial_state_names()
        half = len(names) // 2
        h = torch.stack([getattr(self, n) for n in names[:half]])
        c = torch.stack([getattr(self, n) for n in names[half:]])
        return h, c

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: tuple[Tensor, Tensor] | None = None,
        *,
        lengths: Tensor | list[int] | None = None,
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        """``output, (h_n, c_n)`` as ``torch.nn.LSTM`` returns them.

        ``lengths`` (keyword-only) gives the valid steps of each sequence of a padded batch:
        an (N,) integer tensor or list, any order, values in [0, L]. The result is what
        packing, running and unpacking with zero padding would give (zeros at padded steps,
        h_n and c_n from each sequence's own last step, the backward direction starting at
        each sequence's end), without the packing; a length of 0 gives zeros and the initial
        state.
        """
        result = self.forward_all(input, hx, lengths=lengths, sequences=False)
        return result.output, (result.h_n, result.c_n)

    def forward_all(
        self,
        input: Tensor | PackedSequence,
        hx: tuple[Tensor, Tensor] | None = None,
        *,
        lengths: Tensor | list[int] | None = None,
        sequences: bool = True,
    ) -> functional.Result:
        """Like :meth:`forward`, returning a named result that also holds, per layer, the h
        and c of every step (``layer_outputs``, ``layer_cells``; each shaped like ``output``
        with D*H_out and D*H_cell features, or PackedSequences for packed input). Layer k's h
        is its output before the dropout between layers."""
        weights, variants = self._parameter_lists()
        return functional.lstm(
            input,
            hx,
            self.spec,
            weights,
            self.training,
            lengths=lengths,
            initial_state=self.initial_state(),
            sequences=sequences,
            variants=variants,
        )

    def stream(self) -> Stream:
        """A stateful runner that feeds a long sequence chunk by chunk (see :class:`Stream`)."""
        return Stream(self)

    def extra_repr(self) -> str:
        return self.spec.extra_repr()


@functools.cache
def _cpu_cell() -> types.ModuleType:
    """lstmkit.backends.cpu.cell, imported on first use (an import inside the step costs a
    lookup per call)."""
    from lstmkit.backends.cpu import cell

    return cell


class LSTMCell(nn.Module):
    r"""One LSTM step, a drop-in replacement for ``torch.nn.LSTMCell``.

    Args:
        input_size: H_in, features of the input.
        hidden_size: H, features of h and c.
        bias: use ``bias_ih`` and ``bias_hh``.

    Shape:
        - input: (N, H_in) or unbatched (H_in).
        - hx: optional ``(h, c)``, each (N, H) or (H); zeros by default.
        - returns ``(h', c')``, each (N, H) or (H).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(
                    f"{name} should be an int, got {value!r} of type {type(value).__name__}"
                )
            if value < 0:
                raise RuntimeError(f"{name} must not be negative, got {value}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        factory = {"device": device, "dtype": dtype}
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's init: every parameter from U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        w = self._weights()
        x = self._check_input(input, w[0])
        batched = x.dim() == 2
        if not batched:
            x = x.unsqueeze(0)
        if hx is None:
            h = c = x.new_zeros(x.shape[0], self.hidden_size)
        else:
            h, c = self._check_states(hx, batched, x)
        h, c = self._step(x, h, c, w)
        if not batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c

    def _weights(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """weight_ih, weight_hh, bias_ih, bias_hh, read from ``_parameters`` where they are
        (an attribute read through nn.Module costs about a microsecond, a step at small sizes
        some twenty), else as attributes (a parametrization moves them out)."""
        p = self._parameters
        try:
            return p["weight_ih"], p["weight_hh"], p["bias_ih"], p["bias_hh"]
        except KeyError:
            return self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh

    def _step(
        self,
        x: Tensor,
        h: Tensor,
        c: Tensor,
        w: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
    ) -> tuple[Tensor, Tensor]:
        """h', c' from x (N, H_in), h and c (N, H) and the weights ``w`` (see _weights): fused
        by the cpu backend where it is chosen and the call is plain eager code (see
        lstmkit.backends.cpu.cell), else the reference's torch ops (CUDA, other dtypes,
        torch.compile, torch.func, tracing)."""
        compute = precision.compute_dtype(x.dtype)
        if compute != x.dtype:  # bfloat16, float16: computed in float32 (lstmkit.precision)
            h_next, c_next = self._step(
                x.to(compute), h.to(compute), c.to(compute),
                tuple(precision.widen(list(w), compute)),
            )  # fmt: skip
            return h_next.to(x.dtype), c_next.to(x.dtype)
        requires_grad = torch.is_grad_enabled() and (
            x.requires_grad
            or h.requires_grad
            or c.requires_grad
            or any(t is not None and t.requires_grad for t in w)
        )
        request = backends.Request(x.device.type, x.dtype, requires_grad, False, False, False)
        if backends.choose(request).name == "cpu":
            cell = _cpu_cell()
            if cell.usable(x):
                return cell.step(x, h, c, *w, grad=requires_grad)
        weights = LayerWeights(*w, None)
        return reference.lstm_step(reference.project_input(x, weights), h, c, weights)

    def _where(self) -> str:
        return f" [{self}]"

    def _check_input(self, input: object, weight_ih: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(
                f"LSTMCell input must be a torch.Tensor, got {type(input).__name__}" + self._where()
            )
        dim = input.dim()
        if dim != 2 and dim != 1:
            raise ValueError(
                f"LSTMCell input must be 2-D (N, H_in) or 1-D (H_in), got a {input.dim()}-D "
                f"tensor of shape {tuple(input.shape)}; for a whole sequence use lstmkit.LSTM"
                + self._where()
            )
        if input.shape[-1] != self.input_size:
            raise RuntimeError(
                f"LSTMCell input's last dimension must be input_size={self.input_size}, got "
                f"{input.shape[-1]} (shape {tuple(input.shape)})" + self._where()
            )
        if input.dtype != weight_ih.dtype:
            raise RuntimeError(
                f"LSTMCell input dtype {input.dtype} does not match the weights' dtype "
                f"{weight_ih.dtype}" + self._where()
            )
        return input

    def _check_states(self, hx: object, batched: bool, x: Tensor) -> tuple[Tensor, Tensor]:
        if isinstance(hx, Tensor) or not isinstance(hx, (tuple, list)):
            raise TypeError(
                f"LSTMCell states must be a tuple (h, c) of two tensors, got "
                f"{type(hx).__name__}" + self._where()
            )
        if len(hx) != 2:
            raise RuntimeError(
                f"LSTMCell states must be a tuple (h, c) of two tensors, got {len(hx)} items"
                + self._where()
            )
        expected = (x.shape[0], self.hidden_size) if batched else (self.hidden_size,)
        states = []
        for name, state in zip(("h", "c"), hx):
            if not isinstance(state, Tensor):
                raise TypeError(
                    f"LSTMCell state {name} must be a torch.Tensor, got {type(state).__name__}"
                    + self._where()
                )
            dim = state.dim()
            if dim != 2 and dim != 1:
                raise ValueError(
                    f"LSTMCell state {name} must be 2-D (N, H) or 1-D (H), got shape "
                    f"{tuple(state.shape)}" + self._where()
                )
            if state.shape != expected:
                raise RuntimeError(
                    f"LSTMCell state {name} has shape {tuple(state.shape)}, expected {expected}"
                    f": one state of hidden_size={self.hidden_size} per sequence, matching the "
                    f"{'input batch N = ' + str(x.shape[0]) if batched else 'unbatched input'}"
                    + self._where()
                )
            if state.dtype != x.dtype:
                raise RuntimeError(
                    f"LSTMCell state {name} has dtype {state.dtype} but the input has "
                    f"{x.dtype}" + self._where()
                )
            states.append(state if batched else state.unsqueeze(0))
        return states[0], states[1]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        return s
