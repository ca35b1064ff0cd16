"""float32 accuracy of an lstmkit backend, measured against torch.nn.LSTM's own float32 accuracy.

A corpus of random configurations (seeded, so every run draws the same cases): layers 1-3, one
or two directions, proj_size or not, with and without bias, batch 1 (its own path in the cpu
kernels) and larger, lengths= or not, sizes that are and are not multiples of the vector width,
sequences up to a few thousand steps at batch 1, and weights of torch's uniform init scaled by
up to 4 (saturated gates, large gradients). Each case draws DRAWS inputs (with initial state
and upstream gradients) and runs each four times on the same weights: lstmkit in float32 and
in float64 (the module converted with ``.double()``), and torch.nn.LSTM (loaded with the same
``state_dict``) in float32 and in float64.

For every quantity (output, h_n, c_n, the gradients of the input, h0, c0 and of every
parameter) the error of a float32 run is its norm-wise relative error against the float64 run
of the same implementation:

    error = ||q32 - q64|| / ||q64||   (2-norms over all elements of the tensor)

A small element does not dominate, as it would element-wise, and the measure is in units of
the quantity's own scale; a max-norm rests on the one worst element, whose rounding is luck,
and made the ratios of two equally good implementations scatter by 3-5x. A case's error is the
mean over its draws, for the same reason: the same configuration with other inputs gave ratios
from 0.3 to 4 on a 2-element d_h0.

The ratio of lstmkit's error to torch's is taken with a floor on both: ``FLOOR_ULPS`` float32
units in the last place of that scale (2^-23 each), the rounding of a value computed in a few
operations, below which neither error says anything about the summation order. A quantity
whose torch float32 error exceeds ``ILL_CONDITIONED`` is left out of the ratios: large weights
over many steps can make the recurrence chaotic, so that any rounding is amplified until
float32 keeps hardly a digit, in torch as in lstmkit, and which of the two keeps more is
chance, not accuracy. Run by hand for a larger corpus and the median and worst ratio of each
kind of quantity: ``python benchmarks/accuracy.py --cases 4600``.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit
from lstmkit import backends

FLOOR_ULPS = 2.0
FLOOR = FLOOR_ULPS * 2.0**-23
ILL_CONDITIONED = 1e-3
DRAWS = 3


@dataclass(frozen=True)
class Case:
    """One configuration of the corpus: torch.nn.LSTM's arguments, the input's shape, lengths."""

    seed: int
    layers: int
    bidirectional: bool
    bias: bool
    proj: int
    steps: int
    batch: int
    input_size: int
    hidden: int
    scale: float  # torch's uniform init times this
    lengths: tuple[int, ...] | None

    def __str__(self) -> str:
        parts = [
            f"seed={self.seed}",
            f"L={self.steps}",
            f"N={self.batch}",
            f"H_in={self.input_size}",
            f"H={self.hidden}",
            f"layers={self.layers}",
        ]
        parts += ["bi"] if self.bidirectional else []
        parts += [] if self.bias else ["bias=False"]
        parts += [f"proj={self.proj}"] if self.proj else []
        parts += [f"scale={self.scale}"]
        parts += [f"lengths={min(self.lengths)}:{max(self.lengths)}"] if self.lengths else []
        return ",".join(parts)


def draw_case(seed: int) -> Case:
    """The corpus's case number ``seed``: the same configuration on every run and machine."""
    rng = random.Random(seed)
    batch = rng.choice([1, 1, 2, 3, 5, 8, 13, 16])
    hidden = rng.choice([1, 3, 7, 8, 12, 16, 20, 31, 33, 48, 64, 70])
    work = 40000 if batch == 1 else 12000  # bounds steps * batch * hidden: a case's cost
    long = rng.random() < 0.3
    steps = rng.randint(1, max(1, min(3000 if long else 200, work // (batch * hidden))))
    lengths = None
    if batch > 1 and rng.random() < 0.4:
        rest = [rng.randint(1, steps) for _ in range(batch - 1)]
        lengths = tuple(rng.sample([steps, *rest], batch))  # the longest is L: shapes agree
    return Case(
        seed=seed,
        layers=rng.choice([1, 1, 2, 3]),
        bidirectional=rng.random() < 0.5,
        bias=rng.random() < 0.85,
        proj=rng.randint(1, hidden - 1) if hidden > 1 and rng.random() < 0.35 else 0,
        steps=steps,
        batch=batch,
        input_size=rng.choice([1, 2, 5, 8, 10, 17, 24, 40]),
        hidden=hidden,
        scale=rng.choice([1.0, 1.0, 2.0, 3.0, 4.0]),
        lengths=lengths,
    )


def run(module: torch.nn.Module, case: Case, data: dict[str, Tensor]) -> dict[str, Tensor]:
    """Output, h_n, c_n and the gradient of every input and parameter, for upstream gradients
    ``data["d_*"]``; everything in the module's dtype."""
    dtype = next(module.parameters()).dtype
    x, h0, c0 = (data[k].to(dtype).requires_grad_() for k in ("x", "h0", "c0"))
    lengths = torch.tensor(case.lengths) if case.lengths else None
    if isinstance(module, lstmkit.LSTM):
        out, (h_n, c_n) = module(x, (h0, c0), lengths=lengths)
    elif lengths is not None:
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        packed_out, (h_n, c_n) = module(packed, (h0, c0))
        out, _ = pad_packed_sequence(packed_out, total_length=case.steps)
    else:
        out, (h_n, c_n) = module(x, (h0, c0))
    names = [name for name, _ in module.named_parameters()]
    params = [p for _, p in module.named_parameters()]
    ups = [data[k].to(dtype) for k in ("d_out", "d_h_n", "d_c_n")]
    grads = torch.autograd.grad([out, h_n, c_n], [x, h0, c0, *params], ups)
    result = {"out": out, "h_n": h_n, "c_n": c_n}
    result.update(zip(["d_x", "d_h0", "d_c0", *(f"d_{n}" for n in names)], grads))
    return {k: v.detach() for k, v in result.items()}


def relative_error(q32: Tensor, q64: Tensor) -> float:
    """||q32 - q64|| / ||q64|| in 2-norms (the absolute error when q64 is all zero)."""
    diff = torch.linalg.vector_norm(q32.double() - q64).item()
    scale = torch.linalg.vector_norm(q64).item()
    return diff / scale if scale > 0 else diff


def draw_data(case: Case, draw: int) -> dict[str, Tensor]:
    """Input, initial state and upstream gradients of draw number ``draw`` of a case, float64."""
    gen = torch.Generator().manual_seed(case.seed * DRAWS + draw)
    size = case.proj or case.hidden
    states = case.layers * (2 if case.bidirectional else 1)
    out_size = size * (2 if case.bidirectional else 1)
    shapes = {
        "x": (case.steps, case.batch, case.input_size),
        "h0": (states, case.batch, size),
        "c0": (states, case.batch, case.hidden),
        "d_out": (case.steps, case.batch, out_size),
        "d_h_n": (states, case.batch, size),
        "d_c_n": (states, case.batch, case.hidden),
    }
    data = {k: torch.randn(s, generator=gen, dtype=torch.float64) for k, s in shapes.items()}
    if case.lengths:  # no gradient flows into padded steps: none comes from there either
        steps = torch.arange(case.steps).unsqueeze(1)
        data["d_out"] *= (steps < torch.tensor(case.lengths)).unsqueeze(2)
    return data


def measure(case: Case) -> dict[str, tuple[float, float]]:
    """Per quantity: (lstmkit's float32 error, torch's float32 error), each against its own
    float64 run, the mean over DRAWS draws. Layer and direction names are torch's
    (d_weight_hh_l1_reverse, ...)."""
    kwargs = {
        "num_layers": case.layers,
        "bias": case.bias,
        "bidirectional": case.bidirectional,
        "proj_size": case.proj,
    }
    torch.manual_seed(case.seed)
    oracle = torch.nn.LSTM(case.input_size, case.hidden, **kwargs)
    with torch.no_grad():
        for p in oracle.parameters():
            p.mul_(case.scale)
    ours = lstmkit.LSTM(case.input_size, case.hidden, **kwargs)
    ours.load_state_dict(oracle.state_dict())
    sums: dict[str, list[float]] = {}
    for draw in range(DRAWS):
        data = draw_data(case, draw)
        for index, module in enumerate((ours, oracle)):
            single = run(module.float(), case, data)
            double = run(module.double(), case, data)
            for q in double:
                sums.setdefault(q, [0.0, 0.0])[index] += relative_error(single[q], double[q])
    return {q: (ours_sum / DRAWS, torch_sum / DRAWS) for q, (ours_sum, torch_sum) in sums.items()}


def ratio(ours: float, theirs: float) -> float | None:
    """lstmkit's error over torch's, both raised to FLOOR first; None when ill-conditioned."""
    if theirs > ILL_CONDITIONED:
        return None
    return max(ours, FLOOR) / max(theirs, FLOOR)


def quantity(name: str) -> str:
    """The kind of a quantity, without its layer and direction (d_weight_hh_l2 -> d_weight_hh)."""
    return name.split("_l")[0] if name.startswith("d_") and "_l" in name else name


def main(argv: list[str] | None = None) -> int:
    """Measure a corpus with lstmkit's ``--backend`` (default cpu) and print, per kind of
    quantity, the median and worst ratio of lstmkit's float32 error to torch's, and the worst
    cases."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--cases", type=int, default=400, help="cases 0..N-1 of the corpus")
    parser.add_argument("--first", type=int, default=0, help="the first case's number")
    parser.add_argument("--backend", default="cpu", help="the lstmkit backend to measure")
    parser.add_argument("--worst", type=int, default=5, help="worst cases to print")
    args = parser.parse_args(argv)
    os.environ[backends.BACKEND_ENV] = args.backend
    ratios: dict[str, list[float]] = {}
    worst: list[tuple[float, str, str, float, float]] = []
    ill = 0
    for seed in range(args.first, args.first + args.cases):
        case = draw_case(seed)
        for name, (ours, theirs) in measure(case).items():
            r = ratio(ours, theirs)
            if r is None:
                ill += 1
                continue
            ratios.setdefault(quantity(name), []).append(r)
            worst.append((r, name, str(case), ours, theirs))
    print(
        f"{args.cases} cases, backend {args.backend}, floor {FLOOR_ULPS:g} ulp, "
        f"{ill} ill-conditioned quantities left out (torch's error > {ILL_CONDITIONED:g})"
    )
    print(f"{'quantity':<14} {'n':>6} {'median':>8} {'p90':>8} {'worst':>8}")
    for name, values in ratios.items():
        values.sort()
        p90 = values[int(0.9 * (len(values) - 1))]
        median = statistics.median(values)
        print(f"{name:<14} {len(values):>6} {median:>8.3f} {p90:>8.3f} {values[-1]:>8.3f}")
    print("worst:")
    for r, name, case, ours, theirs in sorted(worst, reverse=True)[: args.worst]:
        print(f"  {r:7.2f} {name} ours {ours:.2e} torch {theirs:.2e}  {case}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
