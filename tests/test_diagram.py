"""The drawn diagram: SVG that parses, PNG that decodes, each with the cells it should have."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy
import pytest
from PIL import Image

from lstmkit import cli
from lstmkit.explain import DEFAULT_CONFIG, Explanation, diagram, explain
from lstmkit.explain.diagram import scene

SVG = "{http://www.w3.org/2000/svg}"

CASES = {
    "tutorial": (DEFAULT_CONFIG, {}),
    "deep-long": ("LSTM(8, 16, num_layers=3, bidirectional=True)", {"input": (12, 4, 8)}),
    "padded": ("LSTM(10, 20, bidirectional=True, batch_first=True)", {"lengths": (2, 5, 3)}),
    "padded-long": (
        "LSTM(4, 6, num_layers=2)",
        {"lengths": (20, 3, 11, 9, 1, 14, 20, 2, 5, 7)},
    ),
    "unbatched": ("LSTM(4, 6, proj_size=3)", {"unbatched": True}),
}


def expected_steps(steps: int, lengths: tuple[int, ...] | None) -> list[int]:
    """All steps up to 8; else the first 3, the last 3 and the first 8 sequences' last steps."""
    if steps <= 8:
        return list(range(steps))
    keep = {0, 1, 2, steps - 3, steps - 2, steps - 1}
    return sorted(keep | {n - 1 for n in (lengths or ())[:8]})


def counts(e: Explanation) -> dict[str, int]:
    """What the picture must hold, from the configuration alone."""
    spec, batch = e.spec, e.input
    steps = expected_steps(batch.steps, batch.lengths)
    ends = {n - 1 for n in batch.lengths} if batch.lengths else {batch.steps - 1}
    shown_sequences = (batch.lengths or ())[:8]
    return {
        "cells": spec.num_layers * spec.num_directions * len(steps),
        "final": spec.num_layers * (len(ends & set(steps)) + (spec.num_directions == 2)),
        "output": spec.num_directions * len(steps),
        "h_n": spec.num_layers * spec.num_directions,
        "pad": sum(t >= n for n in shown_sequences for t in steps),
    }


@pytest.mark.parametrize("name", CASES)
def test_svg_parses_with_the_expected_cells(name: str) -> None:
    config, kwargs = CASES[name]
    e = explain(config, check=False, **kwargs)
    expected = counts(e)
    root = ElementTree.fromstring(diagram.svg(e))
    rects = root.iter(f"{SVG}rect")
    classes = [r.get("class", "").split() for r in rects]
    assert sum(c[:1] == ["cell"] for c in classes) == expected["cells"]
    assert sum("final" in c for c in classes) == expected["final"]
    assert sum(c == ["output"] for c in classes) == expected["output"]
    assert sum(c == ["h_n"] for c in classes) == expected["h_n"]
    assert sum(c == ["pad"] for c in classes) == expected["pad"]
    assert sum(c == ["dot"] for c in classes) % 3 == 0
    cells = [r for r in root.iter(f"{SVG}rect") if r.get("class", "").startswith("cell")]
    steps = expected_steps(e.input.steps, e.input.lengths)
    assert sorted({int(r.get("data-t")) for r in cells}) == steps
    top = [r for r in cells if "top" in r.get("class")]
    assert len(top) == e.spec.num_directions * len(steps)
    assert {r.get("data-layer") for r in top} == {str(e.spec.num_layers - 1)}
    finals = {
        (r.get("data-direction"), r.get("data-t")) for r in cells if "final" in r.get("class")
    }
    assert ("backward", "0") in finals or e.spec.num_directions == 1
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert any(t and t.startswith(str(e.spec)) for t in texts)
    assert {f"h_n[{k}]" for k in range(expected["h_n"])} <= set(texts)


def test_long_sequences_are_elided_in_the_middle() -> None:
    e = explain("LSTM(8, 16, num_layers=3, bidirectional=True)", (12, 4, 8), check=False)
    assert scene.shown_steps(e) == [0, 1, 2, None, 9, 10, 11]
    e = explain("LSTM(4, 6)", lengths=(20, 3, 11), check=False)
    assert scene.shown_steps(e) == [0, 1, 2, None, 10, None, 17, 18, 19]


def regions(image: Image.Image, colors: list[str], min_area: float) -> int:
    """Connected areas (4-neighbour) of exactly these colours, at least ``min_area`` pixels
    each: runs of each pixel row, joined with the overlapping runs of the row above."""
    pixels = numpy.asarray(image.convert("RGB")).astype(numpy.int64)
    codes = (pixels[..., 0] << 16) | (pixels[..., 1] << 8) | pixels[..., 2]
    mask = numpy.isin(codes, [int(color[1:], 16) for color in colors])
    parent: list[int] = []
    area: list[int] = []

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    above: list[tuple[int, int, int]] = []  # (start, end, run id) of the previous row
    for row in mask:
        edges = numpy.flatnonzero(numpy.diff(numpy.concatenate(([0], row.view(numpy.int8), [0]))))
        current = []
        for start, end in zip(edges[::2].tolist(), edges[1::2].tolist()):
            run = len(parent)
            parent.append(run)
            area.append(end - start)
            for a_start, a_end, a_run in above:
                if a_start < end and start < a_end:
                    r, q = root(a_run), root(run)
                    if r != q:
                        parent[q] = r
                        area[r] += area[q]
            current.append((start, end, run))
        above = current
    return sum(1 for i in range(len(parent)) if parent[i] == i and area[i] >= min_area)


@pytest.mark.parametrize("name", ["tutorial", "deep-long", "padded"])
def test_png_decodes_with_the_expected_cells(name: str) -> None:
    config, kwargs = CASES[name]
    e = explain(config, check=False, **kwargs)
    drawn = scene.build(e)
    image = Image.open(io.BytesIO(diagram.png(e, scale=1.0)))
    assert image.format == "PNG"
    assert image.size == (round(drawn.width), round(drawn.height))
    cell_area = scene.CELL_W * scene.CELL_H
    found = regions(image, list(scene.CELL_FILL.values()), min_area=0.5 * cell_area)
    assert found == counts(e)["cells"]


def test_png_without_pillow_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "PIL", None)
    e = explain(check=False)
    with pytest.raises(ImportError, match=r"pip install 'lstmkit\[diagram\]'"):
        diagram.png(e)
    assert diagram.svg(e).startswith("<svg")


def run_cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["explain", *args])
    return code, out.getvalue(), err.getvalue()


def test_cli_writes_the_diagram(tmp_path: Path) -> None:
    svg, png = tmp_path / "net.svg", tmp_path / "net.png"
    code, out, err = run_cli(["--json", "--diagram", str(svg)])
    assert code == 0 and json.loads(out)["config"] == DEFAULT_CONFIG
    assert err == f"diagram written to {svg}\n"
    assert svg.read_text(encoding="utf-8") == diagram.svg(explain(check=False))
    assert run_cli(["--no-check", "--diagram", str(png)])[0] == 0
    drawn = scene.build(explain(check=False))
    with Image.open(png) as written:  # the default scale: 2 pixels per SVG unit
        assert written.size == (round(2 * drawn.width), round(2 * drawn.height))
    code, _, err = run_cli(["--diagram", str(tmp_path / "net.gif")])
    assert code == 2 and "written as .svg or .png" in err
