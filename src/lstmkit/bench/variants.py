"""``lstmkit bench --variants``: each variant next to plain lstmkit and a Python loop.

For every configuration, variant and mode, four candidates hold the same weights:
``torch.nn.LSTM`` and plain ``lstmkit.LSTM`` (no variant), ``lstmkit.LSTM`` with the variant,
and :class:`~lstmkit.bench.baselines.LoopLSTM`, the Python loop over a per-step cell that users
write today, with the same variant. They are checked first: plain lstmkit against torch, and
lstmkit with the variant against the loop (values, except in training with random masks; in
training also the gradients' names, shapes and finiteness).
Only what passes is timed, all four interleaved in one process (:mod:`lstmkit.bench.timing`).

Targets (issue 6): lstmkit with the variant within 1.5x of plain lstmkit's time, and at least
5x faster than the loop. In eval mode the two dropouts are off (the identity), so their
inference rows time a plain LSTM.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch
from torch import nn

import lstmkit
from lstmkit.bench import report, variants_report
from lstmkit.bench.baselines import LoopLSTM
from lstmkit.bench.check import TOLERANCES, Batch, Tolerance, check, check_values
from lstmkit.bench.configs import BenchConfig, make_input
from lstmkit.bench.runner import (
    Settings,
    backend_used,
    default_csv,
    end_peak,
    load_configs,
    make_lstmkit,
    quiet_oracle,
    settings_from,
    start,
    step,
)
from lstmkit.bench.timing import Budget, time_interleaved
from lstmkit.bench.variants_report import VariantRow

# Each variant's keyword arguments to lstmkit.LSTM (and LoopLSTM). The rates are moderate values
# within the ranges used in practice; the work of a mask does not depend on its rate.
VARIANTS: dict[str, dict[str, bool | float]] = {
    "layer_norm": {"layer_norm": True},
    "recurrent_dropout": {"recurrent_dropout": 0.25},
    "weight_dropout": {"weight_dropout": 0.25},
    "zoneout": {"zoneout_cell": 0.15, "zoneout_hidden": 0.05},
    "peepholes": {"peepholes": True},
}
# Options that draw random masks in training; a variant without them is deterministic.
NOISY_OPTIONS = frozenset({"recurrent_dropout", "weight_dropout", "zoneout_cell", "zoneout_hidden"})
# Value tolerance of lstmkit with the variant against the loop (float32): the main run's, and
# 10x that for layer norm. Layer norm divides by the standard deviation of each pre-activation
# vector, which amplifies rounding differences where it is small: on tagger and encoder, each
# implementation's float32 output is up to 3x the main tolerance away from the float64 result,
# while in float64 the two agree to 1e-13.
LOOP_TOLERANCE = TOLERANCES["value"]
LOOP_TOLERANCES: dict[str, Tolerance] = {
    "layer_norm": Tolerance(atol=10 * LOOP_TOLERANCE.atol, rtol=10 * LOOP_TOLERANCE.rtol)
}
DEFAULT_CONFIGS = ("tagger", "encoder")

# Builds lstmkit.LSTM with a variant's options and the oracle's weights.
MakeVariant = Callable[[BenchConfig, nn.LSTM, dict[str, bool | float]], nn.Module]


def make_lstmkit_variant(
    config: BenchConfig, oracle: nn.LSTM, options: dict[str, bool | float]
) -> nn.Module:
    """``lstmkit.LSTM`` with ``options``, the oracle's weights, and its own extra parameters
    (layer-norm gains and shifts, peepholes) moved off their init by seeded noise, so that the
    check sees each of them in its place (a gain of 1 and a shift of 0 would hide a swap)."""
    module = lstmkit.LSTM(**config.lstm_kwargs(), **options)
    extras = module.load_state_dict(oracle.state_dict(), strict=False).missing_keys
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in extras:
            param = module.get_parameter(name)
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return module


def make_candidates(
    config: BenchConfig, variant: str, make_variant: MakeVariant = make_lstmkit_variant
) -> dict[str, nn.Module]:
    """The four candidates, by name (``torch``, ``plain``, ``variant``, ``loop``), with the
    same weights; torch.nn.LSTM is built after ``torch.manual_seed(0)``."""
    options = VARIANTS[variant]
    torch.manual_seed(0)
    oracle = nn.LSTM(**config.lstm_kwargs())
    with_variant = make_variant(config, oracle, options)
    loop = LoopLSTM(**config.lstm_kwargs(), **options)
    loop.load_state_dict(with_variant.state_dict())
    return {
        "torch": oracle,
        "plain": make_lstmkit(config, oracle),
        "variant": with_variant,
        "loop": loop,
    }


def check_variant(
    candidates: dict[str, nn.Module], variant: str, mode: str, batch: Batch
) -> str | None:
    """``None`` if plain lstmkit matches torch.nn.LSTM (:func:`check`) and lstmkit with the
    variant matches the loop on ``batch`` in ``mode``, else why not (one line).

    The variant is held to :func:`check_values`: its values (unless training draws random
    masks), and in training its gradients' names, shapes and finiteness. Its float32 gradients
    are not compared: with layer norm both implementations are hundreds of times the gradient
    tolerance away from the float64 result; the test suite compares them in float64.
    """
    problem = check(mode, candidates["torch"], candidates["plain"], batch)
    if problem is not None:
        return f"plain lstmkit vs torch.nn.LSTM: {problem}"
    tolerance = LOOP_TOLERANCES.get(variant, LOOP_TOLERANCE)
    noisy = bool(NOISY_OPTIONS.intersection(VARIANTS[variant]))
    loop, with_variant = candidates["loop"], candidates["variant"]
    problem = check_values(mode, loop, with_variant, batch, tolerance, noisy)
    if problem is not None:
        return f"lstmkit {variant} vs the Python loop: {problem}"
    return None


def bench_variant(
    config: BenchConfig,
    variant: str,
    mode: str,
    budget: Budget,
    make_variant: MakeVariant = make_lstmkit_variant,
) -> VariantRow:
    """Check the candidates on ``config`` in ``mode``; time all four only if they pass."""
    candidates = make_candidates(config, variant, make_variant)
    batch = make_input(config)
    failure, backend = backend_used(lambda: check_variant(candidates, variant, mode, batch))
    if failure is not None:
        return VariantRow(config, variant, VARIANTS[variant], mode, backend, "", failure)
    steps = {name: step(module, batch, mode) for name, module in candidates.items()}
    # One call of each lstmkit step says which backend the timed calls take.
    _, plain_backend = backend_used(steps["plain"])
    _, variant_backend = backend_used(steps["variant"])
    timings = time_interleaved(steps, budget)
    load = report.load_average()
    return VariantRow(
        config,
        variant,
        VARIANTS[variant],
        mode,
        variant_backend,
        plain_backend,
        None,
        timings,
        load,
    )


def run_variants(
    configs: Sequence[BenchConfig],
    names: Sequence[str],
    settings: Settings,
    out: Callable[[str], None] = print,
    on_row: Callable[[VariantRow], None] | None = None,
) -> list[VariantRow]:
    """Every configuration x variant x mode; prints the table as rows finish and hands each
    row to ``on_row``."""
    width = max([8, *(len(c.name) for c in configs)])
    out(variants_report.table_header(width))
    rows = []
    with quiet_oracle():
        for config in configs:
            for variant in names:
                for mode in settings.modes:
                    row = bench_variant(config, variant, mode, settings.budget)
                    out(variants_report.table_line(row, width))
                    if on_row is not None:
                        on_row(row)
                    rows.append(row)
    return rows


def parse_names(text: str) -> list[str]:
    """``all`` or comma-separated variant names, checked."""
    if text == "all":
        return list(VARIANTS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        raise ValueError(
            f"--variants takes 'all' or names among {', '.join(VARIANTS)}, got {text!r}"
        )
    return names


def run(args: argparse.Namespace) -> int:
    """``lstmkit bench --variants``: 1 if any check failed, 2 for a usage error, else 0."""
    try:
        names = parse_names(args.variants)
        grid_path, _, configs = load_configs(args, DEFAULT_CONFIGS)
        packed = [c.name for c in configs if c.lengths is not None]
        if packed:
            raise ValueError(
                f"the variants benchmark times dense batches (the Python loop takes no "
                f"PackedSequence); packed configs: {', '.join(packed)}"
            )
    except (OSError, ValueError) as error:  # a usage error: say it in one line, no traceback
        print(f"lstmkit bench: error: {error}", file=sys.stderr)
        return 2
    settings = settings_from(args)
    env = start(args, settings, str(grid_path))
    for line in variants_report.preamble({name: VARIANTS[name] for name in names}):
        print(line)
    csv_path = args.csv
    if csv_path is None:
        runner_csv = default_csv(env)
        csv_path = runner_csv.with_name(f"{runner_csv.stem}-variants.csv")
    print(f"writing {csv_path}\n", flush=True)
    columns, record = variants_report.CSV_COLUMNS, variants_report.csv_record
    with report.CsvFile(csv_path, env, columns, record) as csv_file:
        rows = run_variants(
            configs,
            names,
            settings,
            out=lambda line: print(line, flush=True),
            on_row=csv_file.write,
        )
    end_peak(env, settings)
    print("\n".join(variants_report.summary_lines(rows)))
    failed = [f"{r.config.name} {r.variant} {r.mode}" for r in rows if r.failure is not None]
    if failed:
        print(f"checks FAILED, not timed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
