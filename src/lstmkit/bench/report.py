"""Results of a benchmark run: the machine, one row per configuration and mode, the printed
table, the CSV, and the summary against the targets of issue 3.

Conventions: ratio = torch p50 / lstmkit p50 (above 1: lstmkit is faster). GFLOP/s counts the
forward FLOPs of :meth:`BenchConfig.forward_flops`; a training step (forward + backward) counts
as 3x the forward FLOPs.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import torch

import lstmkit
from lstmkit.bench.configs import GROUPS, BenchConfig, repo_root
from lstmkit.bench.timing import Timing

TRAINING_FLOP_FACTOR = 3
FLOP_CONVENTION = (
    "GFLOP/s: forward FLOPs per layer and direction 2*4*H*(H_in_layer + H_out) per step, plus "
    "2*H*P per step with proj_size, over L*N steps (the sum of lengths when packed); a training "
    "step counts 3x the forward FLOPs."
)

# Issue 3's targets for the ratio: every config of a group reaches ``each``; the geometric mean
# of a group reaches ``geomean`` where one is set.
GROUP_TARGETS: dict[str, tuple[float, float | None]] = {
    "dense": (1.0, 1.5),
    "latency": (5.0, None),
    "packed+proj": (3.0, None),
}
# Configs whose target the hardware lowers: batch 1 with H=512 re-reads 4 MB of W_hh from L3 every
# step, and torch already sits on that roofline.
EXCEPTIONS: dict[str, float] = {"stream-512": 0.95}
PEAK_FRACTION_TARGET = 0.75
HALF_PEAK_FRACTION_TARGET = 0.5

RowT = TypeVar("RowT")


@dataclass(frozen=True)
class Environment:
    """What the numbers were measured on and with."""

    date: str
    machine: str
    cores: int
    threads: int
    torch_version: str
    python_version: str
    lstmkit_version: str
    git_sha: str
    grid: str
    sgemm_gflops: float  # torch.mm's peak in the run's dtype (fp32 unless --dtype)
    load: float  # 1-minute load average at the start, before the sgemm measurement
    dtype: str = "float32"  # what both libraries run in: float32, bfloat16, float16
    autocast: bool = False  # float32 modules under torch.autocast to dtype

    @property
    def peak_name(self) -> str:
        return "sgemm peak" if self.dtype == "float32" else f"{self.dtype} GEMM peak"

    @property
    def peak_target(self) -> float:
        """The largest config's share of the peak to reach: less for bf16 and fp16, whose
        products torch runs at several times the float32 rate."""
        return PEAK_FRACTION_TARGET if self.dtype == "float32" else HALF_PEAK_FRACTION_TARGET

    def lines(self) -> list[str]:
        return [
            f"date {self.date}; machine {self.machine}, {self.cores} cores; "
            f"torch threads {self.threads}; load average {self.load:.1f}",
            f"torch {self.torch_version}, python {self.python_version}, "
            f"lstmkit {self.lstmkit_version}, git {self.git_sha or '(not a checkout)'}",
            f"grid {self.grid}",
            f"{self.peak_name} (torch.mm {self.dtype}, median): {self.sgemm_gflops:.1f} GFLOP/s",
        ]


def collect_environment(
    grid: str, sgemm_gflops: float, load: float, dtype: str = "float32", autocast: bool = False
) -> Environment:
    """The current machine, versions and checkout, with the measured sgemm peak and the load
    average at the start."""
    return Environment(
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        machine=cpu_model(),
        cores=os.cpu_count() or 0,
        threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        python_version=platform.python_version(),
        lstmkit_version=lstmkit.__version__,
        git_sha=git_sha(),
        grid=grid,
        sgemm_gflops=sgemm_gflops,
        load=load,
        dtype=dtype,
        autocast=autocast,
    )


def load_average() -> float:
    """The 1-minute load average: runnable processes, averaged (0 where unknown)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def busy_warning(env: Environment) -> str | None:
    """A warning when other work already kept the cores busy at the start of the run."""
    if env.load < 0.5 * env.cores:
        return None
    return (
        f"warning: the machine is busy (load average {env.load:.1f} on {env.cores} cores): "
        f"multi-threaded timings, torch's above all, can be many times slower than on a quiet "
        f"machine; compare ratios from quiet runs"
    )


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str:
    """The checkout's short commit, with ``+dirty`` for uncommitted changes; ``""`` if none."""
    root = repo_root()
    if root is None:
        return ""
    try:
        sha = _git(root, "rev-parse", "--short", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return ""
    return sha + ("+dirty" if dirty else "")


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10
    )
    return done.stdout.strip()


@dataclass(frozen=True)
class Row:
    """One configuration in one mode: the check's verdict and, if it passed, the timings."""

    config: BenchConfig
    mode: str
    backend: str
    failure: str | None
    torch: Timing | None = None
    lstmkit: Timing | None = None
    load: float | None = None  # 1-minute load average when the timing ended, this run included

    @property
    def flops(self) -> int:
        factor = TRAINING_FLOP_FACTOR if self.mode == "training" else 1
        return self.config.forward_flops() * factor

    @property
    def ratio(self) -> float | None:
        if self.torch is None or self.lstmkit is None:
            return None
        return self.torch.p50 / self.lstmkit.p50

    def gflops(self, timing: Timing | None) -> float | None:
        return None if timing is None else self.flops / timing.p50 / 1e9

    @property
    def target(self) -> float:
        """The ratio this row must reach."""
        return EXCEPTIONS.get(self.config.name, GROUP_TARGETS[self.config.group][0])


# The columns every benchmark CSV starts with: the run's context, then the configuration.
ENVIRONMENT_COLUMNS = (
    "date", "machine", "cores", "threads", "torch_version", "python_version", "lstmkit_version",
    "git_sha", "grid", "sgemm_gflops", "start_load_avg", "dtype", "autocast",
)  # fmt: skip
CONFIG_COLUMNS = (
    "config", "group", "seq_len", "batch", "input_size", "hidden_size", "num_layers",
    "bidirectional", "proj_size", "lengths",
)  # fmt: skip
CSV_COLUMNS = (
    *ENVIRONMENT_COLUMNS, *CONFIG_COLUMNS,
    "mode", "backend", "check", "check_detail",
    "repeats", "torch_calls_per_sample", "lstmkit_calls_per_sample",
    "torch_p20_ms", "torch_p50_ms", "torch_p80_ms",
    "lstmkit_p20_ms", "lstmkit_p50_ms", "lstmkit_p80_ms",
    "ratio", "target_ratio", "gflop", "torch_gflops", "lstmkit_gflops", "lstmkit_peak_fraction",
    "load_avg",
)  # fmt: skip


def environment_record(env: Environment) -> dict[str, object]:
    """The ``ENVIRONMENT_COLUMNS`` of a CSV line."""
    return {
        "date": env.date, "machine": env.machine, "cores": env.cores, "threads": env.threads,
        "torch_version": env.torch_version, "python_version": env.python_version,
        "lstmkit_version": env.lstmkit_version, "git_sha": env.git_sha, "grid": env.grid,
        "sgemm_gflops": f"{env.sgemm_gflops:.2f}", "start_load_avg": f"{env.load:.2f}",
        "dtype": env.dtype, "autocast": int(env.autocast),
    }  # fmt: skip


def config_record(c: BenchConfig) -> dict[str, object]:
    """The ``CONFIG_COLUMNS`` of a CSV line."""
    return {
        "config": c.name, "group": c.group, "seq_len": c.seq_len, "batch": c.batch,
        "input_size": c.input_size, "hidden_size": c.hidden_size, "num_layers": c.num_layers,
        "bidirectional": c.bidirectional, "proj_size": c.proj_size,
        "lengths": "" if c.lengths is None else f"{c.lengths[0]}:{c.lengths[1]}",
    }  # fmt: skip


def csv_record(env: Environment, row: Row) -> dict[str, object]:
    """One CSV line: every column of ``CSV_COLUMNS``; empty where the check failed."""
    record: dict[str, object] = {
        **environment_record(env), **config_record(row.config),
        "mode": row.mode, "backend": row.backend,
        "check": "ok" if row.failure is None else "FAILED", "check_detail": row.failure or "",
        "target_ratio": row.target, "gflop": f"{row.flops / 1e9:.6g}",
    }  # fmt: skip
    for name, timing in (("torch", row.torch), ("lstmkit", row.lstmkit)):
        if timing is not None:
            record["repeats"] = len(timing.per_call)
            record[f"{name}_calls_per_sample"] = timing.calls
            for q in (20, 50, 80):
                record[f"{name}_p{q}_ms"] = f"{timing.percentile(q) * 1e3:.6g}"
            record[f"{name}_gflops"] = f"{row.gflops(timing):.4g}"
    lstmkit_gflops = row.gflops(row.lstmkit)
    if row.ratio is not None and lstmkit_gflops is not None:
        record["ratio"] = f"{row.ratio:.4g}"
        record["lstmkit_peak_fraction"] = f"{lstmkit_gflops / env.sgemm_gflops:.4g}"
    if row.load is not None:
        record["load_avg"] = f"{row.load:.2f}"
    return {column: record.get(column, "") for column in CSV_COLUMNS}


class CsvFile(Generic[RowT]):
    """A CSV of rows written as they come, so that an interrupted run keeps its finished rows.

    Use as a context manager; creates the folder if needed and writes the header ``columns``
    first; ``record`` turns one row into its line (e.g. ``CSV_COLUMNS`` and
    :func:`csv_record`).
    """

    def __init__(
        self,
        path: Path,
        env: Environment,
        columns: Sequence[str],
        record: Callable[[Environment, RowT], dict[str, object]],
    ) -> None:
        self.path = path
        self.env = env
        self.columns = columns
        self.record = record

    def __enter__(self) -> CsvFile[RowT]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns)
        self._writer.writeheader()
        return self

    def write(self, row: RowT) -> None:
        self._writer.writerow(self.record(self.env, row))
        self._file.flush()

    def __exit__(self, *exc_info: object) -> None:
        self._file.close()


def table_header(name_width: int = 16) -> str:
    """The printed table's header; ``name_width`` fits the longest config name."""
    return (
        f"{'config':<{name_width}} {'mode':<9} {'check':<6} {'torch ms p50 [p20, p80]':>26} "
        f"{'lstmkit ms p50 [p20, p80]':>26} {'ratio':>7} {'target':>10} "
        f"{'torch GF/s':>10} {'lstmkit GF/s':>12} {'peak':>5} {'load':>5}"
    )


def table_line(env: Environment, row: Row, name_width: int = 16) -> str:
    """One row of the printed table (see :func:`table_header`)."""
    start = f"{row.config.name:<{name_width}} {row.mode:<9}"
    if row.failure is not None:
        return f"{start} FAILED {row.failure}"
    ratio = row.ratio or math.nan
    target = f"{row.target:g}x " + ("ok" if ratio >= row.target else "MISS")
    torch_gflops = row.gflops(row.torch) or math.nan
    lstmkit_gflops = row.gflops(row.lstmkit) or math.nan
    return (
        f"{start} {'ok':<6} {_times(row.torch):>26} {_times(row.lstmkit):>26} "
        f"{ratio:>6.2f}x {target:>10} {torch_gflops:>10.1f} {lstmkit_gflops:>12.1f} "
        f"{lstmkit_gflops / env.sgemm_gflops:>5.0%} {row.load or math.nan:>5.1f}"
    )


def _times(timing: Timing | None) -> str:
    if timing is None:
        return "-"
    return f"{format_ms(timing.p50)} [{format_ms(timing.p20)}, {format_ms(timing.p80)}]"


def format_ms(seconds: float) -> str:
    """Milliseconds to three significant digits, or whole ones from 100 up."""
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summary_lines(env: Environment, rows: list[Row]) -> list[str]:
    """Which of issue 3's targets the rows meet, per group and mode, and for the largest config."""
    lines = ["targets (ratio = torch p50 / lstmkit p50):"]
    for group in GROUPS:
        each, wanted_geomean = GROUP_TARGETS[group]
        for mode in ("inference", "training"):
            group_rows = [r for r in rows if r.config.group == group and r.mode == mode]
            if group_rows:
                lines.append(_group_line(group, mode, group_rows, each, wanted_geomean))
    measured = [r for r in rows if r.failure is None]
    if measured:
        largest = max(r.config.forward_flops() for r in measured)
        for row in measured:
            if row.config.forward_flops() == largest:
                lines.append(_peak_line(env, row))
    return lines


def _group_line(
    group: str, mode: str, rows: list[Row], each: float, wanted_geomean: float | None
) -> str:
    target = f"each >= {each:g}x"
    target += "".join(
        f" ({r.config.name} >= {r.target:g}x)" for r in rows if r.config.name in EXCEPTIONS
    )
    if wanted_geomean is not None:
        target += f", geomean >= {wanted_geomean:g}x"
    misses = [
        f"{r.config.name} failed its check"
        if r.ratio is None
        else f"{r.config.name} {r.ratio:.2f}x"
        for r in rows
        if r.ratio is None or r.ratio < r.target
    ]
    ratios = [r.ratio for r in rows if r.ratio is not None]
    measured = ""
    if ratios:
        mean = geomean(ratios)
        measured = f"min {min(ratios):.2f}x, geomean {mean:.2f}x"
        if wanted_geomean is not None and mean < wanted_geomean:
            misses.append(f"geomean {mean:.2f}x")
    verdict = "met" if not misses else "NOT MET: " + ", ".join(misses)
    return f"  {group:<11} {mode:<9} {len(rows):>2} configs  {measured:<30} {target}: {verdict}"


def _peak_line(env: Environment, row: Row) -> str:
    gflops = row.gflops(row.lstmkit) or math.nan
    fraction = gflops / env.sgemm_gflops
    verdict = "met" if fraction >= env.peak_target else "NOT MET"
    return (
        f"  largest config {row.config.name} {row.mode}: lstmkit {gflops:.1f} GFLOP/s = "
        f"{fraction:.0%} of the {env.peak_name} {env.sgemm_gflops:.1f} GFLOP/s; "
        f"target >= {env.peak_target:.0%}: {verdict}"
    )
