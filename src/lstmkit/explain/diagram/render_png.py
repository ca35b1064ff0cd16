"""A scene as PNG, drawn with Pillow (the optional ``lstmkit[diagram]`` extra).

Drawn at twice the requested scale and reduced, so edges are smoothed; areas of one colour
(cell fills) keep their exact colour.
"""

from __future__ import annotations

import io
import itertools

from lstmkit.explain.diagram.render_svg import arrowhead
from lstmkit.explain.diagram.scene import Box, Label, Line, Scene

MISSING = (
    "PNG diagrams need Pillow: pip install 'lstmkit[diagram]' (or pip install pillow); "
    "SVG needs nothing: --diagram out.svg"
)
SUPERSAMPLE = 2


def to_png(scene: Scene, scale: float = 2.0) -> bytes:
    """The scene as PNG bytes, ``scale`` pixels per scene unit."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError as error:
        raise ImportError(MISSING) from error
    k = scale * SUPERSAMPLE
    size = (round(scene.width * k), round(scene.height * k))
    image = Image.new("RGB", size, "#ffffff")
    draw = ImageDraw.Draw(image)
    fonts: dict[float, ImageFont.FreeTypeFont | ImageFont.ImageFont] = {}

    def font(points: float) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
        if points not in fonts:
            fonts[points] = ImageFont.load_default(size=points * k)
        return fonts[points]

    for item in scene.items:
        if isinstance(item, Box):
            _box(draw, item, k)
        elif isinstance(item, Line):
            _line(draw, item, k)
        else:
            _label(draw, item, k, font(item.size))
    image = image.reduce(SUPERSAMPLE)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _box(draw: object, box: Box, k: float) -> None:
    corners = (box.x * k, box.y * k, (box.x + box.w) * k, (box.y + box.h) * k)
    width = max(1, round(box.stroke_width * k)) if box.stroke else 0
    draw.rounded_rectangle(corners, radius=box.radius * k, fill=box.fill)  # type: ignore[attr-defined]
    if not width:
        return
    if box.dashed:
        x0, y0, x1, y1 = corners
        for a, b in (
            ((x0, y0), (x1, y0)),
            ((x1, y0), (x1, y1)),
            ((x1, y1), (x0, y1)),
            ((x0, y1), (x0, y0)),
        ):
            _dashes(draw, a, b, box.stroke, width, k)
        return
    draw.rounded_rectangle(corners, radius=box.radius * k, outline=box.stroke, width=width)  # type: ignore[attr-defined]


def _dashes(
    draw: object, a: tuple[float, float], b: tuple[float, float], color: str, width: int, k: float
) -> None:
    """A dashed segment: 4 on, 3 off, as the SVG's stroke-dasharray."""
    length = ((b[0] - a[0]) ** 2 + (b[1] - a[1]) ** 2) ** 0.5
    if length == 0:
        return
    ux, uy = (b[0] - a[0]) / length, (b[1] - a[1]) / length
    position = 0.0
    while position < length:
        end = min(position + 4 * k, length)
        draw.line(
            ((a[0] + ux * position, a[1] + uy * position), (a[0] + ux * end, a[1] + uy * end)),
            fill=color,
            width=width,
        )  # type: ignore[attr-defined]
        position += 7 * k


def _line(draw: object, line: Line, k: float) -> None:
    points = [(x * k, y * k) for x, y in line.points]
    width = max(1, round(line.width * k))
    tip = line.arrow
    if tip:
        # Stop the stroke at the arrowhead's base so its end does not poke out of the tip.
        head = arrowhead(line)
        base = ((head[1][0] + head[2][0]) / 2 * k, (head[1][1] + head[2][1]) / 2 * k)
        points[-1] = base
    for a, b in itertools.pairwise(points):
        if line.dashed:
            _dashes(draw, a, b, line.stroke, width, k)
        else:
            draw.line((a, b), fill=line.stroke, width=width)  # type: ignore[attr-defined]
    if tip:
        draw.polygon([(x * k, y * k) for x, y in arrowhead(line)], fill=line.stroke)  # type: ignore[attr-defined]


def _label(draw: object, label: Label, k: float, font: object) -> None:
    anchor = {"start": "lm", "middle": "mm", "end": "rm"}[label.anchor]
    extra = (
        {"stroke_width": max(1, round(0.35 * k)), "stroke_fill": label.fill} if label.bold else {}
    )
    draw.text(
        (label.x * k, label.y * k), label.text, fill=label.fill, font=font, anchor=anchor, **extra
    )  # type: ignore[attr-defined]
