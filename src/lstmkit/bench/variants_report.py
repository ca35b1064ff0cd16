"""Results of ``lstmkit bench --variants``: one row per configuration, variant and mode, the
printed table, the CSV and the summary against issue 6's targets.

Conventions: ``variant/plain`` = lstmkit-with-variant p50 / plain-lstmkit p50 (target at most
1.5x); ``loop/variant`` = Python-loop p50 / lstmkit-with-variant p50 (target at least 5x);
``loop/plain`` = Python-loop p50 / plain-lstmkit p50, the loop/variant a variant reaches when it
costs nothing, so the ceiling of the second target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from lstmkit.bench import report
from lstmkit.bench.configs import BenchConfig
from lstmkit.bench.timing import Timing

# The timed candidates, in the table's order (see lstmkit.bench.variants).
CANDIDATES = ("torch", "plain", "variant", "loop")
TARGET_VARIANT_OVER_PLAIN = 1.5
TARGET_LOOP_OVER_VARIANT = 5.0
# Options that are the identity in eval mode: a variant of only these times a plain LSTM there.
OFF_IN_EVAL = frozenset({"recurrent_dropout", "weight_dropout"})
EVAL_NOTE = "dropout off in eval"


@dataclass(frozen=True)
class VariantRow:
    """One configuration, variant and mode: the check's verdict and, if it passed, the
    timings of the four candidates (keys of ``CANDIDATES``)."""

    config: BenchConfig
    variant: str  # a name of lstmkit.bench.variants.VARIANTS
    options: dict[str, bool | float]  # its keyword arguments to lstmkit.LSTM
    mode: str
    backend: str  # the lstmkit backend that ran the variant
    plain_backend: str  # the one that ran plain lstmkit
    failure: str | None
    timings: dict[str, Timing] = field(default_factory=dict)
    load: float | None = None  # 1-minute load average when the timing ended

    def p50(self, candidate: str) -> float | None:
        timing = self.timings.get(candidate)
        return None if timing is None else timing.p50

    def _over(self, numerator: str, denominator: str) -> float | None:
        top, bottom = self.p50(numerator), self.p50(denominator)
        return None if top is None or bottom is None else top / bottom

    @property
    def variant_over_plain(self) -> float | None:
        """lstmkit with the variant p50 / plain lstmkit p50: the variant's cost."""
        return self._over("variant", "plain")

    @property
    def loop_over_variant(self) -> float | None:
        """Python loop p50 / lstmkit with the variant p50: lstmkit's speedup."""
        return self._over("loop", "variant")

    @property
    def loop_over_plain(self) -> float | None:
        """Python loop p50 / plain lstmkit p50: the speedup a variant that costs nothing
        would have."""
        return self._over("loop", "plain")

    @property
    def note(self) -> str:
        off = self.mode == "inference" and set(self.options) <= OFF_IN_EVAL
        return EVAL_NOTE if off else ""


def options_text(options: dict[str, bool | float]) -> str:
    """A variant's keyword arguments, e.g. ``zoneout_cell=0.15 zoneout_hidden=0.05``."""
    return " ".join(f"{key}={value}" for key, value in options.items())


def preamble(variants: dict[str, dict[str, bool | float]]) -> list[str]:
    """What the variants and the table's columns are, printed before the table."""
    return [
        "variants: " + "; ".join(f"{n} ({options_text(o)})" for n, o in variants.items()),
        "ms p50 per call: torch = torch.nn.LSTM, plain = lstmkit.LSTM, both without variant; "
        "variant = lstmkit.LSTM with the variant; loop = a Python loop over a per-step cell "
        "with the variant (lstmkit.bench.baselines); loop/plain: the loop/variant of a variant "
        "that would cost nothing",
        f"targets: variant/plain <= {TARGET_VARIANT_OVER_PLAIN:g}x, "
        f"loop/variant >= {TARGET_LOOP_OVER_VARIANT:g}x; inference runs in eval mode, where "
        f"recurrent and weight dropout are off (the identity)",
    ]


def table_header(name_width: int = 8) -> str:
    """The printed table's header; ``name_width`` fits the longest config name."""
    times = " ".join(f"{name + ' ms':>10}" for name in CANDIDATES)
    return (
        f"{'config':<{name_width}} {'variant':<17} {'mode':<9} {'check':<6} {times} "
        f"{'variant/plain':>13} {'loop/variant':>13} {'loop/plain':>10} {'backend':<9} "
        f"{'load':>5}  note"
    )


def table_line(row: VariantRow, name_width: int = 8) -> str:
    """One row of the printed table (see :func:`table_header`)."""
    start = f"{row.config.name:<{name_width}} {row.variant:<17} {row.mode:<9}"
    if row.failure is not None:
        return f"{start} FAILED {row.failure}"
    times = " ".join(f"{report.format_ms(row.p50(name) or math.nan):>10}" for name in CANDIDATES)
    cost = _verdict(row.variant_over_plain, TARGET_VARIANT_OVER_PLAIN, at_most=True)
    speedup = _verdict(row.loop_over_variant, TARGET_LOOP_OVER_VARIANT, at_most=False)
    ceiling = row.loop_over_plain if row.loop_over_plain is not None else math.nan
    load = row.load if row.load is not None else math.nan
    return (
        f"{start} {'ok':<6} {times} {cost:>13} {speedup:>13} {ceiling:>9.2f}x "
        f"{row.backend:<9} {load:>5.1f}  {row.note}"
    ).rstrip()


def _verdict(ratio: float | None, target: float, at_most: bool) -> str:
    if ratio is None:
        return "-"
    met = ratio <= target if at_most else ratio >= target
    return f"{ratio:.2f}x {'ok' if met else 'MISS'}"


CSV_COLUMNS = (
    *report.ENVIRONMENT_COLUMNS, *report.CONFIG_COLUMNS,
    "variant", "variant_options", "mode", "backend", "plain_backend", "check", "check_detail",
    "note", "repeats",
    *(f"{name}_calls_per_sample" for name in CANDIDATES),
    *(f"{name}_p{q}_ms" for name in CANDIDATES for q in (20, 50, 80)),
    "variant_over_plain", "target_variant_over_plain",
    "loop_over_variant", "target_loop_over_variant", "loop_over_plain", "load_avg",
)  # fmt: skip


def csv_record(env: report.Environment, row: VariantRow) -> dict[str, object]:
    """One CSV line: every column of ``CSV_COLUMNS``; empty where the check failed."""
    record: dict[str, object] = {
        **report.environment_record(env), **report.config_record(row.config),
        "variant": row.variant, "variant_options": options_text(row.options), "mode": row.mode,
        "backend": row.backend, "plain_backend": row.plain_backend,
        "check": "ok" if row.failure is None else "FAILED", "check_detail": row.failure or "",
        "note": row.note, "target_variant_over_plain": TARGET_VARIANT_OVER_PLAIN,
        "target_loop_over_variant": TARGET_LOOP_OVER_VARIANT,
    }  # fmt: skip
    for name, timing in row.timings.items():
        record["repeats"] = len(timing.per_call)
        record[f"{name}_calls_per_sample"] = timing.calls
        for q in (20, 50, 80):
            record[f"{name}_p{q}_ms"] = f"{timing.percentile(q) * 1e3:.6g}"
    for column in ("variant_over_plain", "loop_over_variant", "loop_over_plain"):
        ratio = getattr(row, column)
        if ratio is not None:
            record[column] = f"{ratio:.4g}"
    if row.load is not None:
        record["load_avg"] = f"{row.load:.2f}"
    return {column: record.get(column, "") for column in CSV_COLUMNS}


def summary_lines(rows: Sequence[VariantRow]) -> list[str]:
    """Per mode and target, the worst ratio and every row that misses the target."""
    lines = ["targets:"]
    targets = (
        ("variant/plain", "variant_over_plain", TARGET_VARIANT_OVER_PLAIN, True),
        ("loop/variant", "loop_over_variant", TARGET_LOOP_OVER_VARIANT, False),
    )
    for mode in ("inference", "training"):
        mode_rows = [r for r in rows if r.mode == mode]
        if not mode_rows:
            continue
        failed = [_name(r) for r in mode_rows if r.failure is not None]
        if failed:
            lines.append(f"  {mode:<9} checks FAILED, not timed: {', '.join(failed)}")
        for label, attribute, target, at_most in targets:
            ratios = [(r, getattr(r, attribute)) for r in mode_rows if r.failure is None]
            if not ratios:
                continue
            values = [ratio for _, ratio in ratios]
            worst = max(values) if at_most else min(values)
            misses = [
                f"{_name(r)} {ratio:.2f}x"
                for r, ratio in ratios
                if (ratio > target if at_most else ratio < target)
            ]
            sign = "<=" if at_most else ">="
            verdict = f"missed by {len(misses)}: {', '.join(misses)}" if misses else "met"
            lines.append(
                f"  {mode:<9} {label:<13} {sign} {target:g}x: {len(ratios)} rows, "
                f"{'max' if at_most else 'min'} {worst:.2f}x; {verdict}"
            )
    return lines


def _name(row: VariantRow) -> str:
    return f"{row.config.name}/{row.variant}"
