"""The drawn diagram of an explanation: the unrolled network as a grid of cells.

``write(explanation, "out.svg")`` needs nothing beyond lstmkit; ``"out.png"`` needs Pillow (the
``lstmkit[diagram]`` extra).
"""

from __future__ import annotations

from pathlib import Path

from lstmkit.explain.diagram.render_png import to_png
from lstmkit.explain.diagram.render_svg import to_svg
from lstmkit.explain.diagram.scene import Scene, build
from lstmkit.explain.model import Explanation


def svg(explanation: Explanation) -> str:
    """The diagram as an SVG document."""
    return to_svg(build(explanation))


def png(explanation: Explanation, scale: float = 2.0) -> bytes:
    """The diagram as PNG bytes; ``scale`` pixels per SVG unit. Needs Pillow."""
    return to_png(build(explanation), scale)


def write(explanation: Explanation, path: str | Path, scale: float = 2.0) -> Path:
    """Write the diagram to ``path``, SVG or PNG by its suffix."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".svg":
        path.write_text(svg(explanation), encoding="utf-8")
    elif suffix == ".png":
        path.write_bytes(png(explanation, scale))
    else:
        raise ValueError(f"the diagram is written as .svg or .png, got {str(path)!r}")
    return path


__all__ = ["Scene", "build", "png", "svg", "write"]
