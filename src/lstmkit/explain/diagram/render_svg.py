"""A scene as SVG text, written directly (no dependency)."""

from __future__ import annotations

from xml.sax.saxutils import escape, quoteattr

from lstmkit.explain.diagram.scene import Box, Label, Line, Scene

FONT = "DejaVu Sans, Verdana, Arial, Helvetica, sans-serif"
ARROW_LENGTH, ARROW_HALF_WIDTH = 7.0, 3.5


def _n(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def arrowhead(line: Line) -> tuple[tuple[float, float], ...]:
    """The arrowhead triangle at the line's last point, shared with the PNG renderer."""
    (x0, y0), (x1, y1) = line.points[-2], line.points[-1]
    length = max(((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5, 1e-9)
    ux, uy = (x1 - x0) / length, (y1 - y0) / length
    bx, by = x1 - ux * ARROW_LENGTH, y1 - uy * ARROW_LENGTH
    return (
        (x1, y1),
        (bx - uy * ARROW_HALF_WIDTH, by + ux * ARROW_HALF_WIDTH),
        (bx + uy * ARROW_HALF_WIDTH, by - ux * ARROW_HALF_WIDTH),
    )


def _box(box: Box) -> str:
    attributes = [
        f'x="{_n(box.x)}" y="{_n(box.y)}" width="{_n(box.w)}" height="{_n(box.h)}"',
        f'rx="{_n(box.radius)}" fill="{box.fill}"',
        f'stroke="{box.stroke or "none"}" stroke-width="{_n(box.stroke_width)}"',
    ]
    if box.dashed:
        attributes.append('stroke-dasharray="4 3"')
    if box.role:
        attributes.append(f'class="{box.role}"')
    attributes += [f"data-{key}={quoteattr(value)}" for key, value in box.data]
    if box.tip:
        return f"<rect {' '.join(attributes)}><title>{escape(box.tip)}</title></rect>"
    return f"<rect {' '.join(attributes)}/>"


def _line(line: Line) -> list[str]:
    points = " ".join(f"{_n(x)},{_n(y)}" for x, y in line.points)
    dash = ' stroke-dasharray="4 3"' if line.dashed else ""
    parts = [
        f'<polyline points="{points}" fill="none" stroke="{line.stroke}" '
        f'stroke-width="{_n(line.width)}"{dash}/>'
    ]
    if line.arrow:
        head = " ".join(f"{_n(x)},{_n(y)}" for x, y in arrowhead(line))
        parts.append(f'<polygon points="{head}" fill="{line.stroke}"/>')
    return parts


def _label(label: Label) -> str:
    weight = ' font-weight="bold"' if label.bold else ""
    return (
        f'<text x="{_n(label.x)}" y="{_n(label.y)}" font-size="{_n(label.size)}" '
        f'fill="{label.fill}" text-anchor="{label.anchor}" dy="0.35em"{weight}>'
        f"{escape(label.text)}</text>"
    )


def to_svg(scene: Scene) -> str:
    """The scene as a standalone SVG document."""
    width, height = _n(scene.width), _n(scene.height)
    lines = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="{FONT}">',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    for item in scene.items:
        if isinstance(item, Box):
            lines.append(_box(item))
        elif isinstance(item, Line):
            lines += _line(item)
        else:
            lines.append(_label(item))
    lines.append("</svg>")
    return "\n".join(lines) + "\n"
