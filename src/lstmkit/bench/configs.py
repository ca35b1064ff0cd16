"""Benchmark configurations: the standard grid, ad-hoc shapes, and the input each one is timed on.

A configuration is an LSTM's sizes in torch's notation (L steps, N batch, H_in, H = hidden_size,
proj_size) plus how its batch is formed: a dense (L, N, H_in) tensor, or a PackedSequence whose
lengths run evenly from a minimum to a maximum.

The standard grid is ``../shared/bench/grid.json`` beside a source checkout; an installed
package falls back to its own copy, ``lstmkit/data/grid.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from lstmkit.spec import LSTMSpec

GROUPS = ("dense", "latency", "packed+proj")

# The keys a grid entry may have; every other key is an error, so a typo cannot pass unseen.
GRID_KEYS = frozenset(
    {
        "name",
        "seq_len",
        "batch",
        "input_size",
        "hidden_size",
        "num_layers",
        "bidirectional",
        "proj_size",
        "latency",
        "lengths",
        "dtype",
    }
)


@dataclass(frozen=True)
class BenchConfig:
    """One LSTM shape to time (fp32).

    ``lengths`` is ``None`` for a dense (L, N, H_in) batch, else ``(min, max)``: the batch is a
    PackedSequence whose lengths run evenly from min to max (see :func:`packed_lengths`).
    ``latency`` marks a configuration dominated by per-call and per-step overhead.
    """

    name: str
    seq_len: int
    batch: int
    input_size: int
    hidden_size: int
    num_layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0
    latency: bool = False
    lengths: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        for field in ("seq_len", "batch"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"config {self.name!r}: {field} must be a positive int, got {value!r}"
                )
        self.spec()  # validates the LSTM's own arguments with torch's rules
        if self.lengths is not None:
            low, high = self.lengths
            if not 1 <= low <= high <= self.seq_len:
                raise ValueError(
                    f"config {self.name!r}: lengths must satisfy 1 <= min <= max <= seq_len = "
                    f"{self.seq_len}, got min={low}, max={high}"
                )

    def spec(self) -> LSTMSpec:
        """The LSTM's constructor arguments."""
        return LSTMSpec(
            self.input_size,
            self.hidden_size,
            num_layers=self.num_layers,
            bidirectional=self.bidirectional,
            proj_size=self.proj_size,
        )

    def lstm_kwargs(self) -> dict[str, int | bool]:
        """Keyword arguments for ``torch.nn.LSTM`` and ``lstmkit.LSTM``."""
        return {
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "bidirectional": self.bidirectional,
            "proj_size": self.proj_size,
        }

    @property
    def group(self) -> str:
        """The target group: latency first, then packed or projected, else dense."""
        if self.latency:
            return "latency"
        if self.lengths is not None or self.proj_size > 0:
            return "packed+proj"
        return "dense"

    def steps(self) -> int:
        """Sequence steps in the batch: L * N, or the sum of the lengths when packed."""
        if self.lengths is None:
            return self.seq_len * self.batch
        return int(packed_lengths(self).sum())

    def forward_flops(self) -> int:
        """FLOPs of one forward call: per layer and direction 2 * 4 * H * (H_in_layer + H_out)
        per step, plus 2 * H * P per step with a projection, times the steps of the batch."""
        spec = self.spec()
        per_step = 0
        for layer in range(spec.num_layers):
            gates = 2 * 4 * spec.hidden_size * (spec.layer_input_size(layer) + spec.h_size)
            projection = 2 * spec.hidden_size * spec.proj_size
            per_step += (gates + projection) * spec.num_directions
        return per_step * self.steps()

    def describe(self) -> str:
        """The sizes in one line, e.g. ``L=40 N=32 H_in=100 H=128 bi lengths=10..40``."""
        text = f"L={self.seq_len} N={self.batch} H_in={self.input_size} H={self.hidden_size}"
        if self.num_layers != 1:
            text += f" layers={self.num_layers}"
        if self.bidirectional:
            text += " bi"
        if self.proj_size:
            text += f" proj={self.proj_size}"
        if self.lengths is not None:
            text += f" lengths={self.lengths[0]}..{self.lengths[1]}"
        if self.latency:
            text += " latency"
        return text


def packed_lengths(config: BenchConfig) -> Tensor:
    """The (N,) lengths of a packed configuration, as the grid defines them.

    Evenly spaced from min to max (``torch.linspace``, rounded half to even by
    ``torch.round``), then shuffled by ``torch.randperm`` right after ``torch.manual_seed(0)``
    (this resets torch's global generator).
    """
    if config.lengths is None:
        raise ValueError(f"config {config.name!r} has no lengths: its batch is dense")
    low, high = config.lengths
    lengths = torch.linspace(low, high, config.batch).round().long()  # (N,)
    torch.manual_seed(0)
    return lengths[torch.randperm(config.batch)]  # (N,)


def make_input(config: BenchConfig) -> Tensor | PackedSequence:
    """The batch a configuration is timed on: (L, N, H_in) fp32 from ``randn`` with seed 0, or
    that tensor packed with :func:`packed_lengths` and ``enforce_sorted=False``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(config.seq_len, config.batch, config.input_size, generator=generator)
    if config.lengths is None:
        return x
    return pack_padded_sequence(x, packed_lengths(config), enforce_sorted=False)


def repo_root() -> Path | None:
    """The source checkout this package runs from, or ``None`` for an installed package."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() else None


def default_grid() -> Path | Traversable:
    """``../shared/bench/grid.json`` beside the checkout when present, else the packaged copy."""
    root = repo_root()
    if root is not None:
        shared = root.parent / "shared" / "bench" / "grid.json"
        if shared.is_file():
            return shared
    return resources.files("lstmkit").joinpath("data", "grid.json")


def load_grid(path: Path | Traversable) -> list[BenchConfig]:
    """Every configuration of a grid file (``{"configs": [{"name": ..., ...}, ...]}``)."""
    document = json.loads(path.read_text(encoding="utf-8"))
    entries = document.get("configs") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a grid is a JSON object with a list under 'configs'")
    configs = [_from_entry(entry, path) for entry in entries]
    names = [c.name for c in configs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{path}: config names must be unique, repeated: {duplicates}")
    return configs


def _from_entry(entry: object, path: Path | Traversable) -> BenchConfig:
    if not isinstance(entry, dict) or "name" not in entry:
        raise ValueError(f"{path}: every config is an object with a 'name', got {entry!r}")
    unknown = sorted(set(entry) - GRID_KEYS)
    if unknown:
        raise ValueError(
            f"{path}: config {entry['name']!r} has unknown keys {unknown}; "
            f"known keys: {sorted(GRID_KEYS)}"
        )
    fields = dict(entry)
    dtype = fields.pop("dtype", "float32")
    if dtype != "float32":
        raise ValueError(
            f"{path}: config {entry['name']!r}: only float32 is benchmarked, got {dtype!r}"
        )
    lengths = fields.pop("lengths", None)
    if lengths is not None:
        if not isinstance(lengths, dict) or set(lengths) != {"min", "max"}:
            raise ValueError(
                f"{path}: config {entry['name']!r}: lengths is {{'min': ..., 'max': ...}}, "
                f"got {lengths!r}"
            )
        fields["lengths"] = (lengths["min"], lengths["max"])
    return BenchConfig(**fields)


def select(grid: list[BenchConfig], names: list[str]) -> list[BenchConfig]:
    """The named configurations of ``grid``, in the order given."""
    by_name = {c.name: c for c in grid}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"no config named {unknown} in the grid; known: {', '.join(by_name)}")
    return [by_name[n] for n in names]


SHAPE_SYNTAX = "L,N,H_in,H[,layers=K][,bi][,proj=P][,lengths=MIN:MAX][,latency]"


def parse_shape(text: str) -> BenchConfig:
    """An ad-hoc configuration from ``SHAPE_SYNTAX``, e.g. ``100,8,128,128,layers=2,bi``.

    Its name is the text itself, without spaces.
    """
    parts = [part.strip() for part in text.split(",")]
    sizes, options = parts[:4], parts[4:]
    if len(sizes) < 4 or not all(s.isdigit() for s in sizes):
        raise ValueError(f"a shape is {SHAPE_SYNTAX}, got {text!r}")
    config = BenchConfig(",".join(parts), *(int(s) for s in sizes))
    for option in options:
        key, _, value = option.partition("=")
        if key == "bi" and not value:
            config = replace(config, bidirectional=True)
        elif key == "latency" and not value:
            config = replace(config, latency=True)
        elif key == "layers" and value.isdigit():
            config = replace(config, num_layers=int(value))
        elif key == "proj" and value.isdigit():
            config = replace(config, proj_size=int(value))
        elif key == "lengths" and _is_range(value):
            low, high = value.split(":")
            config = replace(config, lengths=(int(low), int(high)))
        else:
            raise ValueError(
                f"unknown shape option {option!r} in {text!r}; a shape is {SHAPE_SYNTAX}"
            )
    return config


def _is_range(value: str) -> bool:
    low, sep, high = value.partition(":")
    return bool(sep) and low.isdigit() and high.isdigit()
