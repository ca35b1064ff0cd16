"""The configuration of an LSTM, checked once, shared by the modules, the layout layer and the
explainer."""

from __future__ import annotations

import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class LSTMSpec:
    """An ``LSTM``'s constructor arguments, validated the way ``torch.nn.LSTM`` validates them.

    Invalid arguments raise the exception type torch raises for them, with a message that says
    what was expected and what was received. The fields after ``proj_size`` are lstmkit's
    extras; their defaults behave like ``torch.nn.LSTM``.
    """

    input_size: int
    hidden_size: int
    num_layers: int = 1
    bias: bool = True
    batch_first: bool = False
    dropout: float = 0.0
    bidirectional: bool = False
    proj_size: int = 0
    learn_initial_state: bool = False
    forget_bias: float | None = None
    layer_norm: bool = False
    recurrent_dropout: float = 0.0
    weight_dropout: float = 0.0
    zoneout_cell: float = 0.0
    zoneout_hidden: float = 0.0
    peepholes: bool = False

    def __post_init__(self) -> None:
        _check_size("input_size", self.input_size)
        _check_size("hidden_size", self.hidden_size)
        _check_size("num_layers", self.num_layers)
        for name in ("bias", "batch_first"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(
                    f"{name} should be of type bool (True or False), got {value!r} of type "
                    f"{type(value).__name__}"
                )
        dropout = self.dropout
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, numbers.Real)
            or not 0 <= dropout <= 1
        ):
            raise ValueError(
                f"dropout should be a number in [0, 1], the probability of zeroing an element "
                f"of each layer's output except the last, got {dropout!r}"
            )
        object.__setattr__(self, "dropout", float(dropout))
        object.__setattr__(self, "bidirectional", bool(self.bidirectional))
        if isinstance(self.proj_size, bool) or not isinstance(self.proj_size, int):
            raise TypeError(
                f"proj_size should be an int, got {self.proj_size!r} of type "
                f"{type(self.proj_size).__name__}"
            )
        if self.proj_size < 0:
            raise ValueError(
                f"proj_size should be 0 (no projection) or a positive int smaller than "
                f"hidden_size, got {self.proj_size}"
            )
        if self.proj_size >= self.hidden_size:
            raise ValueError(
                f"proj_size projects h down from hidden_size, so it must be smaller than "
                f"hidden_size={self.hidden_size}, got proj_size={self.proj_size}"
            )

        for name in ("learn_initial_state", "layer_norm", "peepholes"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} should be True or False, got {getattr(self, name)!r}")
        if self.forget_bias is not None:
            if isinstance(self.forget_bias, bool) or not isinstance(self.forget_bias, numbers.Real):
                raise TypeError(f"forget_bias should be a number or None, got {self.forget_bias!r}")
            if not self.bias:
                raise ValueError(
                    f"forget_bias={self.forget_bias} sets the forget gate's bias, but bias=False "
                    f"gives the LSTM no bias: use bias=True or drop forget_bias"
                )
            object.__setattr__(self, "forget_bias", float(self.forget_bias))
        # A dropout of 1 would divide by zero when rescaling; zoneout 1 freezes the state.
        for name, what, one_allowed in (
            ("recurrent_dropout", "zeroing each unit of h before W_hh", False),
            ("weight_dropout", "zeroing each weight of W_hh", False),
            ("zoneout_cell", "each unit of c keeping its previous value", True),
            ("zoneout_hidden", "each unit of h keeping its previous value", True),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(
                    f"{name} should be a number, the probability of {what}; got {value!r}"
                )
            if not (0 <= value <= 1 if one_allowed else 0 <= value < 1):
                interval = "[0, 1]" if one_allowed else "[0, 1)"
                raise ValueError(
                    f"{name} should be in {interval}, the probability of {what}; got {value}"
                )
            object.__setattr__(self, name, float(value))

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def h_size(self) -> int:
        """Size of h (H_out): ``proj_size`` when projecting, else ``hidden_size``."""
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def layer_input_size(self, layer: int) -> int:
        return self.input_size if layer == 0 else self.h_size * self.num_directions

    def extra_repr(self) -> str:
        """torch's ``extra_repr`` for this configuration, e.g. ``10, 20, num_layers=2``."""
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size != 0:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        if self.learn_initial_state:
            s += ", learn_initial_state=True"
        if self.forget_bias is not None:
            s += f", forget_bias={self.forget_bias}"
        for name in ("layer_norm", "peepholes"):
            if getattr(self, name):
                s += f", {name}=True"
        for name in ("recurrent_dropout", "weight_dropout", "zoneout_cell", "zoneout_hidden"):
            if getattr(self, name) != 0:
                s += f", {name}={getattr(self, name)}"
        return s

    def step_variants(self, training: bool) -> frozenset[str]:
        """The variants a backend must implement in its step for a call (weight drop is applied
        to W_hh before any backend sees it; recurrent dropout only acts in training)."""
        active = set()
        if self.layer_norm:
            active.add("layer_norm")
        if self.peepholes:
            active.add("peepholes")
        if self.zoneout_cell or self.zoneout_hidden:
            active.add("zoneout")
        if training and self.recurrent_dropout:
            active.add("recurrent_dropout")
        return frozenset(active)

    def __str__(self) -> str:
        return f"LSTM({self.extra_repr()})"


def _check_size(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} should be a positive int, got {value!r} of type {type(value).__name__}"
        )
    if value <= 0:
        raise ValueError(f"{name} must be greater than zero, got {value}")
