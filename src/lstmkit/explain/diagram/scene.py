"""The unrolled network as a scene: boxes, lines and labels in pixels, for any renderer.

Layout, top to bottom: the title; a column per time step (long sequences keep their first and
last steps and each sequence's last step, and elide the rest); the output row; each layer from
the top one down, with its forward row above its backward row; the input row; for a padded
batch, each sequence's valid and padding steps; the legend. Left and right of each row: where
its recurrence starts (h0[k]) and the box of h_n[k] it ends in.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from lstmkit.explain.model import Explanation

# Sizes in pixels (the PNG multiplies them by its scale).
MARGIN, LABEL_W, GUTTER = 18, 122, 78
CELL_W, CELL_H, STEP_GAP, GAP_W = 82, 30, 26, 44
ROW_GAP, LAYER_GAP, IO_H, PAD_H = 8, 34, 26, 16
MAX_STEPS_SHOWN = 8  # longer sequences are elided to their first 3 and last 3 steps
MAX_SEQUENCES_SHOWN = 8

INK, MUTED, WHITE = "#212529", "#6c757d", "#ffffff"
FINAL = "#e8590c"  # the cells that produce h_n, and the h_n boxes
# Cell fills are used by cells only, so a picture's cells can be counted by colour.
CELL_FILL = {
    (True, 0): "#a5d8ff",  # top layer, forward: its h is output[t][..., :H]
    (True, 1): "#b2f2bb",  # top layer, backward
    (False, 0): "#e7f5ff",
    (False, 1): "#ebfbee",
}
OUTPUT_FILL = {0: "#74c0fc", 1: "#8ce99a"}
BLOCK_FILL, INPUT_FILL, VALID_FILL = "#f1f3f5", "#e9ecef", "#ced4da"


@dataclass(frozen=True)
class Box:
    x: float
    y: float
    w: float
    h: float
    fill: str
    stroke: str = INK
    stroke_width: float = 1.0
    radius: float = 4.0
    dashed: bool = False
    role: str = ""  # SVG class: "cell", "cell top final", "output", "h_n", "pad", ...
    data: tuple[tuple[str, str], ...] = ()  # SVG data-* attributes
    tip: str = ""  # SVG tooltip


@dataclass(frozen=True)
class Line:
    points: tuple[tuple[float, float], ...]
    stroke: str = INK
    width: float = 1.2
    arrow: bool = True  # an arrowhead at the last point
    dashed: bool = False


@dataclass(frozen=True)
class Label:
    x: float
    y: float  # the text's vertical centre (SVG shifts the baseline by 0.35em to put it there)
    text: str
    size: float = 12.0
    fill: str = INK
    anchor: str = "start"  # start | middle | end
    bold: bool = False


@dataclass
class Scene:
    width: float
    height: float
    items: list[Box | Line | Label] = field(default_factory=list)

    def cells(self) -> list[Box]:
        return [i for i in self.items if isinstance(i, Box) and i.role.split()[0:1] == ["cell"]]


def text_width(text: str, size: float) -> float:
    """A generous estimate for sans-serif text, used for layout only."""
    return 0.6 * size * len(text)


def shown_steps(e: Explanation) -> list[int | None]:
    """The columns: time steps, with None where steps are elided."""
    steps = e.input.steps
    if steps <= MAX_STEPS_SHOWN:
        return list(range(steps))
    keep = {0, 1, 2, steps - 3, steps - 2, steps - 1}
    keep |= {length - 1 for length in (e.input.lengths or ())[:MAX_SEQUENCES_SHOWN]}
    columns: list[int | None] = []
    for t in sorted(keep):
        if columns and columns[-1] is not None and t != columns[-1] + 1:
            columns.append(None)
        columns.append(t)
    return columns


@dataclass(frozen=True)
class Grid:
    """Where the columns and rows are."""

    columns: list[tuple[int | None, float]]  # (t or None for elided, left x)
    left: float  # x of the first column
    right: float  # x after the last column

    def x(self, t: int) -> float:
        return next(x for step, x in self.columns if step == t)


def _grid(e: Explanation) -> Grid:
    left = MARGIN + LABEL_W + GUTTER
    x = left
    columns = []
    for t in shown_steps(e):
        columns.append((t, x))
        x += (CELL_W if t is not None else GAP_W) + STEP_GAP
    return Grid(columns, left, x - STEP_GAP)


def _final_steps(e: Explanation) -> dict[int, list[int]]:
    """Forward rows: step -> the sequences whose h_n is taken there."""
    if e.input.lengths is None:
        return {e.input.steps - 1: []}
    ends: dict[int, list[int]] = {}
    for n, length in enumerate(e.input.lengths):
        ends.setdefault(length - 1, []).append(n)
    return ends


def _sequence_text(sequences: list[int]) -> str:
    shown = ",".join(map(str, sequences[:3])) + (",…" if len(sequences) > 3 else "")
    return f"end of n={shown}"


def _dots(items: list[Box | Line | Label], cx: float, cy: float) -> None:
    for dx in (-7, 0, 7):
        items.append(Box(cx + dx - 2, cy - 2, 4, 4, MUTED, stroke="", radius=2, role="dot"))


def build(e: Explanation) -> Scene:
    """The scene of ``e``'s configuration, unrolled over its input's steps."""
    spec, batch = e.spec, e.input
    grid = _grid(e)
    directions, h = spec.num_directions, spec.h_size
    top = spec.num_layers - 1
    batch_first = spec.batch_first and not batch.unbatched
    items: list[Box | Line | Label] = []
    x_shape = e.shape("input")
    title = f"{spec} on x {x_shape.layout} = {x_shape.sizes}"
    items.append(Label(MARGIN, MARGIN + 9, title, 15, bold=True))
    subtitle = "unrolled: one cell per layer, direction and step; arrows carry h (and c)"
    items.append(Label(MARGIN, MARGIN + 31, subtitle, 11, MUTED))
    y = MARGIN + 50
    for t, x in grid.columns:
        if t is not None:
            items.append(Label(x + CELL_W / 2, y + 6, f"t = {t}", 11, MUTED, "middle"))
    y += 20

    out_y = y
    out_name = "padded" if batch.packed else "output"
    items.append(
        Label(
            MARGIN,
            out_y + IO_H / 2,
            f"{out_name}[:, t]" if batch_first else f"{out_name}[t]",
            12,
            bold=True,
        )
    )
    for t, x in grid.columns:
        if t is None:
            _dots(items, x + GAP_W / 2, out_y + IO_H / 2)
            continue
        tip = f"{out_name}[{':, ' if batch_first else ''}{t}]: the top layer's h at step {t}"
        if directions == 1:
            items.append(Box(x, out_y, CELL_W, IO_H, OUTPUT_FILL[0], role="output", tip=tip))
            continue
        half = CELL_W / 2
        for d, (text, dx) in enumerate(((f":{h}", 0.0), (f"{h}:", half))):
            items.append(Box(x + dx, out_y, half, IO_H, OUTPUT_FILL[d], role="output", tip=tip))
            items.append(Label(x + dx + half / 2, out_y + IO_H / 2, text, 10, INK, "middle"))
    y = out_y + IO_H + LAYER_GAP

    rows: dict[tuple[int, int], float] = {}
    blocks: dict[int, tuple[float, float]] = {}
    for layer in reversed(range(spec.num_layers)):
        for d in range(directions):
            rows[layer, d] = y + d * (CELL_H + ROW_GAP)
        bottom = y + directions * CELL_H + (directions - 1) * ROW_GAP
        blocks[layer] = (y, bottom)
        y = bottom + LAYER_GAP
    in_y = y

    pad = 4 if directions == 2 else 0
    for block_top, block_bottom in blocks.values():
        for t, x in grid.columns:
            if t is not None and directions == 2:
                items.append(
                    Box(
                        x - pad,
                        block_top - pad,
                        CELL_W + 2 * pad,
                        block_bottom - block_top + 2 * pad,
                        BLOCK_FILL,
                        stroke="",
                        radius=6,
                        role="block",
                    )
                )
    ends = _final_steps(e)
    for (layer, d), row_y in rows.items():
        _row(items, e, grid, layer, d, row_y, top, ends)

    # Data flow up each step: input -> layer 0 -> ... -> top layer -> output.
    for t, x in grid.columns:
        if t is None:
            continue
        cx = x + CELL_W / 2
        items.append(Line(((cx, in_y), (cx, blocks[0][1] + pad))))
        for layer in range(top):
            items.append(Line(((cx, blocks[layer][0] - pad), (cx, blocks[layer + 1][1] + pad))))
        items.append(Line(((cx, blocks[top][0] - pad), (cx, out_y + IO_H))))

    items.append(Label(MARGIN, in_y + IO_H / 2, "input x", 12, bold=True))
    for t, x in grid.columns:
        if t is None:
            _dots(items, x + GAP_W / 2, in_y + IO_H / 2)
            continue
        text = f"x[:, {t}]" if batch_first else f"x[{t}]"
        items.append(Box(x, in_y, CELL_W, IO_H, INPUT_FILL, role="input"))
        items.append(Label(x + CELL_W / 2, in_y + IO_H / 2, text, 11, INK, "middle"))
    y = in_y + IO_H
    if batch.lengths is not None:
        y = _padding(items, e, grid, y + 18)
    y, legend_width = _legend(items, e, y + 20)
    width = max(grid.right + GUTTER + MARGIN, 2 * MARGIN + text_width(title, 15), legend_width)
    return Scene(width, y + MARGIN, items)


def _row(
    items: list[Box | Line | Label],
    e: Explanation,
    grid: Grid,
    layer: int,
    d: int,
    y: float,
    top: int,
    ends: dict[int, list[int]],
) -> None:
    """One layer's one direction: its cells, its recurrence arrows, h0[k] and h_n[k]."""
    spec = e.spec
    k = layer * spec.num_directions + d
    direction = ("forward", "backward")[d]
    cy = y + CELL_H / 2
    if spec.num_directions == 1:
        items.append(Label(MARGIN, cy, f"layer {layer}", 12, bold=True))
    else:
        items.append(Label(MARGIN, cy - 7, f"layer {layer}", 12, bold=True))
        items.append(Label(MARGIN, cy + 8, direction, 11, MUTED))
    last = e.input.steps - 1
    for t, x in grid.columns:
        if t is None:
            _dots(items, x + GAP_W / 2, cy)
            continue
        final = t == 0 if d == 1 else t in ends
        role = "cell" + (" top" if layer == top else "") + (" final" if final else "")
        tip = f"layer {layer}, {direction}, t = {t}"
        if final:
            tip += f"; its h is h_n[{k}]"
        items.append(
            Box(
                x,
                y,
                CELL_W,
                CELL_H,
                CELL_FILL[layer == top, d],
                stroke=FINAL if final else INK,
                stroke_width=2.5 if final else 1.0,
                role=role,
                data=(
                    ("layer", str(layer)),
                    ("direction", direction),
                    ("t", str(t)),
                    ("k", str(k)),
                ),
                tip=tip,
            )
        )
        if final and d == 0 and e.input.lengths is not None:
            items.append(Label(x + CELL_W / 2, cy, _sequence_text(ends[t]), 10, FINAL, "middle"))
    columns = grid.columns
    for (a, xa), (b, xb) in itertools.pairwise(columns):
        left_end = xa + (CELL_W if a is not None else GAP_W - 8)
        right_start = xb + (0 if b is not None else 8)
        if d == 0:
            items.append(Line(((left_end, cy), (right_start, cy)), arrow=b is not None))
        else:
            items.append(Line(((right_start, cy), (left_end, cy)), arrow=a is not None))
    box_w = GUTTER - 24
    start_x, end_x = (grid.left, grid.right) if d == 0 else (grid.right, grid.left)
    outward = -1 if d == 0 else 1  # where h0 comes from, seen from the first cell
    h0_x = start_x + outward * 18
    items.append(Line(((h0_x, cy), (start_x, cy))))
    anchor = "end" if d == 0 else "start"
    items.append(Label(h0_x + outward * 4, cy, f"h0[{k}]", 11, MUTED, anchor))
    box_x = end_x + 18 if d == 0 else end_x - 18 - box_w
    dashed = d == 0 and last not in ends
    items.append(
        Line(((end_x, cy), (box_x if d == 0 else box_x + box_w, cy)), FINAL, 1.6, dashed=dashed)
    )
    items.append(
        Box(
            box_x,
            y + 2,
            box_w,
            CELL_H - 4,
            WHITE,
            FINAL,
            1.6,
            role="h_n",
            data=(("k", str(k)),),
            tip=f"h_n[{k}], c_n[{k}]: layer {layer}, {direction}",
        )
    )
    items.append(Label(box_x + box_w / 2, cy, f"h_n[{k}]", 11, FINAL, "middle", bold=True))


def _padding(items: list[Box | Line | Label], e: Explanation, grid: Grid, y: float) -> float:
    """Each sequence's valid steps and padding, below the input row."""
    lengths = e.input.lengths or ()
    items.append(
        Label(MARGIN, y + 6, "padded batch, run packed: the steps of each sequence", 11, MUTED)
    )
    y += 18
    for n, length in enumerate(lengths[:MAX_SEQUENCES_SHOWN]):
        items.append(Label(MARGIN, y + PAD_H / 2, f"n = {n}: {length} steps", 11))
        for t, x in grid.columns:
            if t is None:
                _dots(items, x + GAP_W / 2, y + PAD_H / 2)
            elif t < length:
                last = t == length - 1
                items.append(
                    Box(
                        x,
                        y,
                        CELL_W,
                        PAD_H,
                        VALID_FILL,
                        FINAL if last else VALID_FILL,
                        2.0 if last else 1.0,
                        3,
                        role="valid",
                    )
                )
            else:
                items.append(
                    Box(x, y, CELL_W, PAD_H, WHITE, MUTED, 1.0, 3, dashed=True, role="pad")
                )
                items.append(Label(x + CELL_W / 2, y + PAD_H / 2, "pad", 9, MUTED, "middle"))
        y += PAD_H + 5
    if len(lengths) > MAX_SEQUENCES_SHOWN:
        items.append(
            Label(MARGIN, y + 6, f"… and {len(lengths) - MAX_SEQUENCES_SHOWN} more", 11, MUTED)
        )
        y += 16
    return y


def _legend(items: list[Box | Line | Label], e: Explanation, y: float) -> tuple[float, float]:
    """The key, one entry a line; returns the y below it and its width."""
    h, packed = e.spec.h_size, e.input.packed
    halves = f" (forward [..., :{h}], backward [..., {h}:])" if e.spec.bidirectional else ""
    batch_first = e.spec.batch_first and not e.input.unbatched
    out_name = "padded" if packed else "output"
    at_t = f"{out_name}[:, t]" if batch_first else f"{out_name}[t]"
    forward_end = "t = lengths[n] - 1 for sequence n" if packed else "the last step"
    identities = [c.statement for row in e.state_rows for c in row.in_output]
    shown = ", ".join(identities[:2]) + (", ..." if len(identities) > 2 else "")
    entries = [
        ("top", f"top layer: its h at step t is {at_t}{halves}"),
        (
            "lower",
            "lower layers: their h at step t"
            + (" (both directions, joined)" if e.spec.bidirectional else "")
            + " is the next layer's input at step t; only their last step is kept, in h_n",
        ),
        (
            "final",
            "the cell whose h and c become h_n[k] and c_n[k] ("
            + (
                f"forward: {forward_end}; backward: t = 0)"
                if e.spec.bidirectional
                else f"{forward_end})"
            ),
        ),
        ("same", f"a top-layer row's end is in both output and h_n: {shown}"),
    ]
    if e.spec.num_layers == 1:
        entries.pop(1)
    if packed:
        entries.append(("pad", "padding: a packed run skips it (each sequence runs its own steps)"))
    width = 0.0
    for kind, text in entries:
        sx, sy = MARGIN, y
        if kind in ("top", "lower"):
            # One swatch per direction, in the colours of that kind of cell.
            for d in range(e.spec.num_directions):
                fill = CELL_FILL[kind == "top", d]
                items.append(
                    Box(
                        sx + 14 * d,
                        sy,
                        13 if d or e.spec.bidirectional else 27,
                        12,
                        fill,
                        radius=2,
                        role="key",
                    )
                )
        elif kind == "final":
            items.append(Box(sx, sy, 27, 12, WHITE, FINAL, 2.0, 2, role="key"))
        elif kind == "same":
            items.append(Box(sx, sy, 27, 12, CELL_FILL[True, 0], FINAL, 2.0, 2, role="key"))
        else:
            items.append(Box(sx, sy, 27, 12, WHITE, MUTED, 1.0, 2, dashed=True, role="key"))
        items.append(Label(sx + 36, sy + 6, text, 11))
        width = max(width, sx + 36 + text_width(text, 11) + MARGIN)
        y += 18
    return y, width
