"""An explanation as a text report (``str(explanation)``) and as JSON-ready data."""

from __future__ import annotations

import dataclasses
import textwrap

from lstmkit.explain.model import CHECKED, NOT_RUN, Check, Explanation
from lstmkit.explain.shapes import gate_rows

WIDTH = 100
MARKS = {"checked": "[checked]", "FAILED": "[FAILED] ", "not run": "[not run]"}


def _mark(check: Check) -> str:
    return f"{MARKS[check.status]} {check.statement}"


def _table(rows: list[list[str]], indent: str = "  ", right: tuple[int, ...] = ()) -> list[str]:
    """Aligned columns (code is never wrapped, so a long statement may pass the width)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def _wrap(text: str, indent: str) -> list[str]:
    more = " " * len(indent)
    return textwrap.wrap(
        text, WIDTH, initial_indent=indent, subsequent_indent=more, break_long_words=False
    )


def _header(e: Explanation) -> list[str]:
    spec, batch = e.spec, e.input
    h_out = f"proj_size = {spec.proj_size}" if spec.proj_size else f"H_cell = {spec.h_size}"
    sizes = (
        f"H_in = {spec.input_size}, H_cell = hidden_size = {spec.hidden_size}, H_out = {h_out}, "
        f"num_layers = {spec.num_layers}, D = {spec.num_directions}"
        + (" (bidirectional)" if spec.bidirectional else "")
    )
    x = e.shape("input")
    if batch.batch is None:
        what = f"one sequence of L = {batch.steps} steps"
    elif batch.lengths is None:
        what = f"N = {batch.batch} sequences of L = {batch.steps} steps"
    else:
        what = f"N = {batch.batch} sequences of up to L = {batch.steps} steps, padded"
    lines = [f"lstmkit explain: {spec}", *_wrap(sizes, "  ")]
    lines.append(f"  input x {x.layout} = {x.sizes}: {what}")
    if batch.lengths is not None:
        lines.append(f"  lengths = {list(batch.lengths)}: run packed (pack_padded_sequence)")
    if not batch.given:
        lines.append("  (an example input: describe yours with --input, --lengths, --unbatched)")
    for note in e.notes:
        lines += _wrap(f"note: {note}", "  ")
    return lines


def _script(e: Explanation) -> list[str]:
    if any(c.status != NOT_RUN for c in e.checks):
        heading = [
            "Live check: lstmkit ran this code, then each pitfall's code; every statement marked",
            "[checked] below held on the result (paste it and try any statement):",
        ]
    else:
        heading = ["The statements below are Python over this code (the live check did not run):"]
    return ["", *heading] + ["    " + line for line in e.script]


def _shapes(e: Explanation) -> list[str]:
    rows = [["tensor", "layout", "shape", "live"]]
    for shape, check in zip(e.shapes, e.shape_checks):
        sizes = "(" + ", ".join(map(str, shape.sizes)) + "," * (len(shape.sizes) == 1) + ")"
        rows.append([shape.tensor, shape.layout, sizes, check.status])
    lines = ["", "Shapes (live: checked that <tensor>.shape is this on the run above)"]
    lines += _table(rows)
    for shape in e.shapes:
        if shape.note:
            lines += _wrap(f"{shape.tensor}: {shape.note}", "  - ")
    return lines


def _parameters(e: Explanation) -> list[str]:
    rows = [["parameter", "layout", "shape", "count"]]
    for p in e.parameters:
        rows.append([p.name, p.layout, str(p.shape).replace(",)", ",)"), f"{p.count:,}"])
    total = e.total_parameters
    lines = ["", "Parameters (torch's names, shapes and order)", *_table(rows, right=(3,))]
    lines.append(f"  total: {total:,} parameters = {4 * total:,} bytes in float32")
    lines.append(f"  rows of each weight and bias, by gate: {gate_rows(e.spec)} (pitfall 9)")
    lines += ["  " + _mark(c) for c in e.parameter_checks]
    return lines


def _rows(e: Explanation) -> list[str]:
    rows = [["k", "layer", "direction", "last step", "in output"]]
    for row in e.state_rows:
        head = [str(row.index), str(row.layer), row.direction, row.last_step]
        if not row.in_output:
            rows.append([*head, "no: output holds the top layer only"])
        for i, check in enumerate(row.in_output):
            rows.append([*(head if i == 0 else ["", "", "", ""]), _mark(check)])
    title = "h_n and c_n rows: k = layer * D + direction (layer-major, direction-minor)"
    return ["", title, *_table(rows)]


def _pitfalls(e: Explanation) -> list[str]:
    lines = ["", "Pitfalls that apply here"]
    for p in e.pitfalls:
        lines.append(f"  {p.number}. {p.title}")
        lines += _wrap(p.text, "     ")
        lines += ["         " + line for line in p.code.splitlines()]
        lines += ["     " + _mark(c) for c in p.checks]
    if e.other_pitfalls:
        lines += ["", "Other pitfalls (not this configuration; see docs/shapes.md)"]
        for other in e.other_pitfalls:
            lines.append(f"  {other.number}. {other.title} (applies with {other.shown_by})")
    return lines


def _summary(e: Explanation) -> list[str]:
    checks = e.checks
    checked = sum(c.status == CHECKED for c in checks)
    failed = [c for c in checks if c.status == "FAILED"]
    if checked == 0 and not failed:
        return ["", f"Live check: not run ({len(checks)} statements not checked)"]
    lines = ["", f"Live check: {checked} of {len(checks)} statements checked (seed {e.seed})"]
    if failed:
        lines.append(f"  {len(failed)} FAILED: lstmkit disagrees with its own explanation: a bug")
    return lines


def render(e: Explanation) -> str:
    """The text report."""
    parts = _header(e) + _script(e) + _shapes(e) + _parameters(e) + _rows(e) + _pitfalls(e)
    return "\n".join(parts + _summary(e)) + "\n"


def _check(check: Check) -> dict[str, str]:
    return {"statement": check.statement, "status": check.status}


def to_dict(e: Explanation) -> dict[str, object]:
    """The same content as :func:`render`, as JSON-ready data."""
    spec, batch = e.spec, e.input
    checks = e.checks
    return {
        "config": str(spec),
        "spec": dataclasses.asdict(spec),
        "sizes": {
            "H_in": spec.input_size,
            "H_cell": spec.hidden_size,
            "H_out": spec.h_size,
            "num_layers": spec.num_layers,
            "D": spec.num_directions,
        },
        "input": {
            "steps": batch.steps,
            "batch": batch.batch,
            "lengths": None if batch.lengths is None else list(batch.lengths),
            "batch_first": spec.batch_first,
            "unbatched": batch.unbatched,
            "packed": batch.packed,
            "given": batch.given,
        },
        "shapes": {
            shape.tensor: {
                "layout": shape.layout,
                "dims": [{"name": d.name, "size": d.size} for d in shape.dims],
                "shape": list(shape.sizes),
                "note": shape.note,
                "check": _check(check),
            }
            for shape, check in zip(e.shapes, e.shape_checks)
        },
        "parameters": [
            {"name": p.name, "layout": p.layout, "shape": list(p.shape), "count": p.count}
            for p in e.parameters
        ],
        "total_parameters": e.total_parameters,
        "bytes_float32": 4 * e.total_parameters,
        "gate_rows": {
            gate: [k * spec.hidden_size, (k + 1) * spec.hidden_size]
            for k, gate in enumerate("ifgo")
        },
        "parameter_checks": [_check(c) for c in e.parameter_checks],
        "h_n_rows": [
            {
                "k": row.index,
                "layer": row.layer,
                "direction": row.direction,
                "last_step": row.last_step,
                "in_output": [_check(c) for c in row.in_output],
            }
            for row in e.state_rows
        ],
        "pitfalls": [
            {
                "number": p.number,
                "title": p.title,
                "text": p.text,
                "code": p.code,
                "checks": [_check(c) for c in p.checks],
            }
            for p in e.pitfalls
        ],
        "other_pitfalls": [
            {"number": o.number, "title": o.title, "shown_by": o.shown_by} for o in e.other_pitfalls
        ],
        "notes": list(e.notes),
        "live_check": {
            "seed": e.seed,
            "script": list(e.script),
            "checked": sum(c.status == CHECKED for c in checks),
            "total": len(checks),
            "all_checked": e.all_checked,
        },
    }
