"""What an explanation holds: plain, frozen records, rendered by :mod:`.text` and as JSON."""

from __future__ import annotations

from dataclasses import dataclass

from lstmkit.spec import LSTMSpec

# A check's status: verified on a live module, found false (a bug in lstmkit), or not run.
CHECKED, FAILED, NOT_RUN = "checked", "FAILED", "not run"


@dataclass(frozen=True)
class Batch:
    """The input an explanation is about.

    ``lengths`` describes a padded batch, run packed; ``batch`` is None for unbatched input.
    ``given`` is False when the shape is an illustration chosen by ``explain``.
    """

    steps: int
    batch: int | None
    lengths: tuple[int, ...] | None = None
    given: bool = True

    @property
    def unbatched(self) -> bool:
        return self.batch is None

    @property
    def packed(self) -> bool:
        return self.lengths is not None


@dataclass(frozen=True)
class Dim:
    """One named dimension, e.g. ``Dim("num_layers*D", 4)``."""

    name: str
    size: int


@dataclass(frozen=True)
class Shape:
    """A tensor's named dimensions, e.g. output: (L, N, D*H_out) = (5, 3, 40)."""

    tensor: str
    dims: tuple[Dim, ...]
    note: str = ""

    @property
    def layout(self) -> str:
        return (
            "(" + ", ".join(d.name for d in self.dims) + ("," if len(self.dims) == 1 else "") + ")"
        )

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(d.size for d in self.dims)


@dataclass(frozen=True)
class Parameter:
    """One parameter tensor, with torch's name."""

    name: str
    layout: str
    shape: tuple[int, ...]

    @property
    def count(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


@dataclass(frozen=True)
class Check:
    """A statement, written as Python over the live check's variables, and whether it held."""

    statement: str
    status: str


@dataclass(frozen=True)
class StateRow:
    """Row ``index`` of h_n / c_n: which layer and direction, where it ends, where it shows."""

    index: int
    layer: int
    direction: str
    last_step: str
    in_output: tuple[Check, ...]


@dataclass(frozen=True)
class Pitfall:
    """A classic mistake that applies to this configuration, the right code, its checks."""

    number: int
    title: str
    text: str
    code: str
    checks: tuple[Check, ...]


@dataclass(frozen=True)
class OtherPitfall:
    """A pitfall that does not apply to this configuration, and how to see it apply."""

    number: int
    title: str
    shown_by: str


@dataclass(frozen=True)
class Explanation:
    """Everything ``lstmkit explain`` says about one configuration and input.

    ``str(explanation)`` is the text report; :meth:`to_dict` the same as JSON-ready data.
    """

    spec: LSTMSpec
    input: Batch
    shapes: tuple[Shape, ...]
    shape_checks: tuple[Check, ...]
    parameters: tuple[Parameter, ...]
    parameter_checks: tuple[Check, ...]
    state_rows: tuple[StateRow, ...]
    pitfalls: tuple[Pitfall, ...]
    other_pitfalls: tuple[OtherPitfall, ...]
    script: tuple[str, ...]
    seed: int
    notes: tuple[str, ...] = ()  # what the module's constructor warned about

    @property
    def checks(self) -> tuple[Check, ...]:
        """Every check, in the order the report prints them."""
        rows = tuple(c for row in self.state_rows for c in row.in_output)
        pitfalls = tuple(c for p in self.pitfalls for c in p.checks)
        return self.shape_checks + self.parameter_checks + rows + pitfalls

    @property
    def all_checked(self) -> bool:
        return all(c.status == CHECKED for c in self.checks)

    @property
    def total_parameters(self) -> int:
        return sum(p.count for p in self.parameters)

    def shape(self, tensor: str) -> Shape:
        """The shape entry named ``tensor`` (``input``, ``h0``, ``output``, ...)."""
        for shape in self.shapes:
            if shape.tensor == tensor:
                return shape
        raise KeyError(f"no shape named {tensor!r}; known: {[s.tensor for s in self.shapes]}")

    def to_dict(self) -> dict[str, object]:
        # Imported here: the renderer imports this module.
        from lstmkit.explain.text import to_dict

        return to_dict(self)

    def __str__(self) -> str:
        from lstmkit.explain.text import render

        return render(self)
