"""``lstmkit bench``: check, then time, lstmkit.LSTM against torch.nn.LSTM on the standard grid.

For each configuration and mode: build ``torch.nn.LSTM`` (seed 0) and the candidate with the
same state_dict, check the candidate on the configuration's batch (:mod:`lstmkit.bench.check`),
and only if it passes, time both interleaved (:mod:`lstmkit.bench.timing`). Prints a table as
it goes, then the targets summary, and writes a CSV. Exits non-zero if any check failed.

``--variants`` runs :mod:`lstmkit.bench.variants` instead, with the same options; ``--limits``
runs :mod:`lstmkit.bench.limits`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from importlib.abc import Traversable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import lstmkit
from lstmkit import backends
from lstmkit.backends.cpu import machine
from lstmkit.bench import report
from lstmkit.bench.check import Batch, cast_batch, check, check_half
from lstmkit.bench.configs import (
    SHAPE_SYNTAX,
    BenchConfig,
    default_grid,
    load_grid,
    make_input,
    parse_shape,
    repo_root,
    select,
)
from lstmkit.bench.lengths import bench_lengths
from lstmkit.bench.timing import Budget, sgemm_peak, time_interleaved

MODES = ("inference", "training")

T = TypeVar("T")

# Builds the module to time from the configuration and the oracle whose state_dict it must hold.
MakeCandidate = Callable[[BenchConfig, nn.LSTM], nn.Module]


def make_lstmkit(config: BenchConfig, oracle: nn.LSTM) -> nn.Module:
    """``lstmkit.LSTM`` with the oracle's parameters."""
    candidate = lstmkit.LSTM(**config.lstm_kwargs())
    candidate.load_state_dict(oracle.state_dict())
    return candidate


@dataclass(frozen=True)
class Settings:
    """What to run and for how long: the modes, the timing budget and the sgemm size."""

    modes: tuple[str, ...] = MODES
    budget: Budget = field(
        default_factory=lambda: Budget(seconds=8.0, min_repeats=5, max_repeats=50)
    )
    peak_size: int = 4096
    peak_repeats: int = 5
    # bfloat16 / float16: both modules in that dtype, or (autocast) float32 modules under
    # torch.autocast to it; checked by check_half, the peak is that dtype's torch.mm
    dtype: torch.dtype = torch.float32
    autocast: bool = False


QUICK = Settings(
    budget=Budget(
        0.5, min_repeats=1, max_repeats=10, min_sample_s=0.002, warmup_s=0.0, warmup_calls=1
    ),
    peak_size=2048,
    peak_repeats=3,
)


def step(module: nn.Module, batch: Batch, mode: str, **kwargs: object) -> Callable[[], None]:
    """One timed call: a no_grad forward in eval mode, or a training step (forward, backward
    of output.sum() + h_n.sum() + c_n.sum(), with the gradients reset to None first);
    ``kwargs`` go to the module's forward (``lengths=``)."""
    if mode == "inference":
        module.eval()

        def forward() -> None:
            with torch.no_grad():
                module(batch, **kwargs)

        return forward
    module.train()

    def train() -> None:
        module.zero_grad(set_to_none=True)
        output, (h_n, c_n) = module(batch, **kwargs)
        data = output.data if isinstance(output, PackedSequence) else output
        (data.sum() + h_n.sum() + c_n.sum()).backward()

    return train


def bench_config(
    config: BenchConfig,
    mode: str,
    budget: Budget,
    make_candidate: MakeCandidate = make_lstmkit,
    dtype: torch.dtype = torch.float32,
    autocast: bool = False,
) -> report.Row:
    """Check the candidate on ``config`` in ``mode``; time it against torch only if it passes.
    With a ``dtype`` other than float32: both modules and the batch in it, or with ``autocast``
    both float32 modules under ``torch.autocast`` to it."""
    torch.manual_seed(0)
    oracle = nn.LSTM(**config.lstm_kwargs())
    candidate = make_candidate(config, oracle)
    batch = make_input(config)
    if dtype == torch.float32:
        failure, backend = backend_used(lambda: check(mode, oracle, candidate, batch))
    else:
        if not autocast:
            oracle, candidate = oracle.to(dtype), candidate.to(dtype)
            batch = cast_batch(batch, lambda t: t.to(dtype))
        failure, backend = backend_used(
            lambda: check_half(mode, oracle, candidate, batch, dtype, autocast)
        )
    if failure is not None:
        return report.Row(config, mode, backend, failure)
    steps = {"torch": step(oracle, batch, mode), "lstmkit": step(candidate, batch, mode)}
    if autocast:
        steps = {name: _under_autocast(run, dtype) for name, run in steps.items()}
    timings, timed_backend = backend_used(lambda: time_interleaved(steps, budget))
    if timed_backend != backend:
        # The timed calls took another path than the checked ones: say so rather than hide it.
        backend = f"{timed_backend} (checked: {backend})"
    load = report.load_average()
    return report.Row(config, mode, backend, None, timings["torch"], timings["lstmkit"], load)


def _under_autocast(run: Callable[[], None], dtype: torch.dtype) -> Callable[[], None]:
    def autocast_run() -> None:
        with torch.autocast("cpu", dtype=dtype):
            run()

    return autocast_run


def backend_used(work: Callable[[], T]) -> tuple[T, str]:
    """``work()`` and the lstmkit backend its last lstmkit call used (``""`` if none ran)."""
    backends.note_choice(None)
    result = work()
    choice = backends.last_choice()
    return result, "" if choice is None else choice.backend


@contextlib.contextmanager
def quiet_oracle() -> Iterator[None]:
    """Silences torch.nn.LSTM's announcement, on every call, of its slower path for
    projections."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "LSTM with projections is not supported with oneDNN")
        yield


def run_benchmark(
    configs: Sequence[BenchConfig],
    env: report.Environment,
    settings: Settings,
    make_candidate: MakeCandidate = make_lstmkit,
    out: Callable[[str], None] = print,
    on_row: Callable[[report.Row], None] | None = None,
) -> list[report.Row]:
    """Every configuration in every mode of ``settings``; prints the table as rows finish and
    hands each row to ``on_row``."""
    width = max([16, *(len(c.name) for c in configs)])
    out(report.table_header(width))
    rows = []
    with quiet_oracle():
        for config in configs:
            for mode in settings.modes:
                row = bench_config(
                    config, mode, settings.budget, make_candidate, settings.dtype,
                    settings.autocast,
                )  # fmt: skip
                out(report.table_line(env, row, width))
                if on_row is not None:
                    on_row(row)
                rows.append(row)
            if config.lengths is None or settings.dtype != torch.float32:
                continue  # (lengths= rows: float32 only, for now)
            for mode in settings.modes:
                row = bench_lengths(
                    config, mode, settings.budget, make_candidate, step, backend_used
                )
                out(report.table_line(env, row, width))
                if on_row is not None:
                    on_row(row)
                rows.append(row)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--grid",
        type=Path,
        help="grid JSON file (default: ../shared/bench/grid.json beside the checkout when "
        "present, else the copy shipped in lstmkit/data/grid.json)",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="NAME",
        help="a grid config to run (repeatable; default: the whole grid unless --shape is given)",
    )
    parser.add_argument(
        "--shape",
        action="append",
        default=[],
        type=_shape_argument,
        metavar="SHAPE",
        help=f"an ad-hoc config, {SHAPE_SYNTAX} (repeatable), e.g. 100,8,128,128,layers=2,bi",
    )
    parser.add_argument("--mode", choices=(*MODES, "both"), default="both", help="default both")
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        help="samples per candidate (default: adapted to a time budget)",
    )
    parser.add_argument(
        "--budget",
        type=_seconds,
        help="seconds of timing per config and mode (default 8; quick 0.5)",
    )
    parser.add_argument(
        "--threads", type=_positive_int, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument(
        "--backend",
        choices=backends.PREFERENCE,
        help=f"the lstmkit backend to time (sets {backends.BACKEND_ENV}; default: lstmkit chooses)",
    )
    parser.add_argument(
        "--csv",
        type=Path,
        help="where to write the CSV (default benchmarks/results/<date>-<sha>.csv)",
    )
    parser.add_argument(
        "--peak-size", type=_positive_int, help="sgemm size n for n^3 (default 4096; quick 2048)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: few repeats, short budget, small sgemm"
    )
    parser.add_argument("--list", action="store_true", help="list the grid's configs and exit")
    parser.add_argument(
        "--variants",
        nargs="?",
        const="all",
        metavar="NAMES",
        help="time lstmkit's variants instead (layer_norm, recurrent_dropout, weight_dropout, "
        "zoneout, peepholes; comma-separated, default all) next to plain lstmkit and a Python "
        "loop; default configs tagger and encoder (see benchmarks/README.md)",
    )
    parser.add_argument(
        "--cap",
        choices=sorted(CAPS),
        help="time both libraries as an older CPU would run them: caps torch's oneDNN, MKL and "
        "ATen and lstmkit's tier (LSTMKIT_CPU_TARGET) to that instruction set, in a fresh "
        "process (they read it at start-up)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="the dtype both libraries run in (default float32); bfloat16 and float16 are "
        "checked against a float64 run of the same numbers (lstmkit's error at most torch's "
        "by a quarter), and the peak is torch.mm's in that dtype",
    )
    parser.add_argument(
        "--autocast",
        action="store_true",
        help="with --dtype bfloat16 or float16: float32 modules under torch.autocast to it "
        "instead of modules of that dtype",
    )
    parser.add_argument(
        "--limits",
        action="store_true",
        help="measure what this machine allows instead: one core's FMA rate and cache "
        "bandwidths, a round trip between two cores, and the autograd floor of a training step "
        "against torch's (default configs: the latency ones; see benchmarks/README.md)",
    )


# --cap: the settings that make both libraries run a CPU's instruction set as an older CPU's.
CAPS = {
    "avx2": {
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        machine.TARGET_ENV: "avx2",
    },
}


def _run_capped(cap: str, argv: Sequence[str]) -> int:
    """The benchmark of ``argv`` (without its --cap) in a fresh process with ``cap``'s
    settings in its environment; its exit status."""
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--cap":
            skip = True
        elif not arg.startswith("--cap="):
            rest.append(arg)
    env = {**os.environ, **CAPS[cap]}
    print(f"capped at {cap}: " + " ".join(f"{k}={v}" for k, v in CAPS[cap].items()), flush=True)
    return subprocess.run([sys.executable, "-m", "lstmkit.bench", *rest], env=env).returncode


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return seconds


def _shape_argument(text: str) -> BenchConfig:
    try:
        return parse_shape(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def settings_from(args: argparse.Namespace) -> Settings:
    """The run's settings: the defaults or ``QUICK``, with the command line's overrides."""
    base = QUICK if args.quick else Settings()
    budget = base.budget
    if args.budget is not None:
        budget = replace(budget, seconds=args.budget, repeats=None)
    if args.repeats is not None:
        budget = replace(budget, repeats=args.repeats)
    modes = MODES if args.mode == "both" else (args.mode,)
    peak_size = args.peak_size if args.peak_size is not None else base.peak_size
    dtype = getattr(torch, args.dtype)
    if args.autocast and dtype == torch.float32:
        raise ValueError("--autocast needs --dtype bfloat16 or float16")
    return Settings(modes, budget, peak_size, base.peak_repeats, dtype, args.autocast)


def default_csv(env: report.Environment) -> Path:
    """benchmarks/results/<date>-<sha>.csv in the checkout (else in the current folder)."""
    stamp = env.date.replace("-", "").replace(":", "").replace(" ", "-")
    name = f"{stamp}-{env.git_sha or 'nogit'}.csv"
    return (repo_root() or Path.cwd()) / "benchmarks" / "results" / name


def load_configs(
    args: argparse.Namespace, default: Sequence[str] | None = None
) -> tuple[Path | Traversable, list[BenchConfig], list[BenchConfig]]:
    """The grid file, its configs, and the ones to run: the ``--config`` ones then the
    ``--shape`` ones, or without either the ``default`` names (``None``: the whole grid).

    Raises OSError or ValueError (a usage error) for an unreadable grid or an unknown name.
    """
    grid_path = args.grid if args.grid is not None else default_grid()
    grid = load_grid(grid_path)
    if args.config or args.shape:
        return grid_path, grid, select(grid, args.config) + args.shape
    return grid_path, grid, list(grid) if default is None else select(grid, list(default))


def print_grid(grid: list[BenchConfig]) -> None:
    """``--list``: each config's name, group, forward GFLOP and sizes."""
    for config in grid:
        gflop = config.forward_flops() / 1e9
        print(f"{config.name:<16} {config.group:<11} {gflop:>9.4g} GFLOP  {config.describe()}")


def start(args: argparse.Namespace, settings: Settings, grid: str) -> report.Environment:
    """Applies ``--threads`` and ``--backend``, measures the sgemm peak and prints the machine,
    the load and the backend choice."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.backend is not None:
        os.environ[backends.BACKEND_ENV] = args.backend
    load = report.load_average()
    print(f"measuring the GEMM peak ({settings.peak_size}^3)...", flush=True)
    peak = sgemm_peak(settings.peak_size, settings.peak_repeats, settings.dtype)
    dtype = str(settings.dtype).replace("torch.", "")
    env = report.collect_environment(grid, peak, load, dtype, settings.autocast)
    print("\n".join(env.lines()))
    busy = report.busy_warning(env)
    if busy is not None:
        print(busy)
    forced = backends.forced_name()
    print(f"lstmkit backend: {f'{forced} (forced)' if forced else 'lstmkit chooses'}")
    if settings.dtype != torch.float32:
        how = "float32 modules under torch.autocast to" if settings.autocast else "modules of"
        name = str(settings.dtype).replace("torch.", "")
        print(f"dtype: {how} {name}; the peak above is torch.mm's in {name}")
    names = sorted({name for settings in CAPS.values() for name in settings})
    capped = [f"{name}={os.environ[name]}" for name in names if name in os.environ]
    if capped:
        print(f"instruction sets capped: {' '.join(capped)}")
    return env


def end_peak(env: report.Environment, settings: Settings) -> float:
    """The sgemm peak measured again and printed beside the first, so that a change of the
    machine's load during the run shows."""
    peak = sgemm_peak(settings.peak_size, settings.peak_repeats, settings.dtype)
    print(
        f"\n{env.peak_name} at the end: {peak:.1f} GFLOP/s (start: {env.sgemm_gflops:.1f}); a "
        f"large change means the machine's load changed during the run"
    )
    return peak


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run the benchmark the arguments describe (parsed from ``argv``, default the command
    line's); 1 if any check failed, else 0."""
    if args.cap is not None:
        if argv is None:
            argv = sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]
        return _run_capped(args.cap, argv)
    if args.variants is not None and not args.list:
        # Imported here: the variants benchmark builds on this module.
        from lstmkit.bench import variants

        return variants.run(args)
    try:
        grid_path, grid, configs = load_configs(args)
        settings = settings_from(args)
    except (OSError, ValueError) as error:  # a usage error: say it in one line, no traceback
        print(f"lstmkit bench: error: {error}", file=sys.stderr)
        return 2
    if args.list:
        print_grid(grid)
        return 0
    if args.limits:
        # Imported here: only this option compiles and loads the probes.
        from lstmkit.bench import limits

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        chosen = configs if args.config or args.shape else [c for c in grid if c.latency]
        limits.run(chosen, settings.budget, out=lambda line: print(line, flush=True))
        return 0
    env = start(args, settings, str(grid_path))
    print(report.FLOP_CONVENTION)
    csv_path = args.csv if args.csv is not None else default_csv(env)
    print(f"writing {csv_path}\n", flush=True)
    with report.CsvFile(csv_path, env, report.CSV_COLUMNS, report.csv_record) as csv_file:
        rows = run_benchmark(
            configs, env, settings, out=lambda line: print(line, flush=True), on_row=csv_file.write
        )
    # The targets are judged against the higher of the two peaks, the stricter one.
    summary_env = replace(env, sgemm_gflops=max(env.sgemm_gflops, end_peak(env, settings)))
    print("\n".join(report.summary_lines(summary_env, rows)))
    failed = [f"{r.config.name} {r.mode}" for r in rows if r.failure is not None]
    if failed:
        print(f"checks FAILED, not timed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``benchmarks/run.py`` and ``python -m lstmkit.bench``: the same as ``lstmkit bench``."""
    parser = argparse.ArgumentParser(prog="lstmkit bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv), argv)
