"""The docs run: every ```python block of a page runs (in order, in one namespace), every
```console block of `lstmkit ...` prints what the page shows, every image exists, and the
committed diagrams are what lstmkit draws now (regenerated with --regen-golden)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

from lstmkit import cli
from lstmkit.explain import diagram, explain
from lstmkit.explain.diagram import scene
from lstmkit.explain.live import one_thread

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# page -> the folder its links are relative to
PAGES = {
    DOCS / "shapes.md": DOCS,
    DOCS / "extras.md": DOCS,
    DOCS / "onnx.md": DOCS,
    ROOT / "README.md": ROOT,
}
# What torch.onnx.export says about itself: a deprecated pytree check, and that the lengths
# share the input's batch dimension.
EXPORTER_WARNINGS = [
    pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)`"),
    pytest.mark.filterwarnings("ignore:# The axis name. batch will not be used"),
]
# docs/<name>.svg and .png -> the explanation drawn
DIAGRAMS = {
    "diagram-tutorial": ((), {}),
    "diagram-deep": (("LSTM(8, 16, num_layers=3, bidirectional=True)", (12, 4, 8)), {}),
    "diagram-padded": (("LSTM(10, 20, bidirectional=True)",), {"lengths": (2, 5, 3)}),
}
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks(page: Path, kind: str) -> list[str]:
    return [body for info, body in FENCE.findall(page.read_text(encoding="utf-8")) if info == kind]


@pytest.mark.parametrize(
    "page",
    [pytest.param(p, marks=EXPORTER_WARNINGS if p.name == "onnx.md" else []) for p in PAGES],
    ids=lambda p: p.name,
)
def test_python_blocks_run(page: Path) -> None:
    namespace: dict[str, object] = {}
    code = blocks(page, "python")
    assert code or page.name.startswith("README"), f"{page.name} has no python blocks"
    with one_thread():
        for number, block in enumerate(code):
            exec(compile(block, f"{page.name} block {number + 1}", "exec"), namespace)


def _run(command: str) -> str:
    args = shlex.split(command)
    assert args[0] == "lstmkit", command
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(args[1:])
    assert code == 0, command
    return out.getvalue()


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "console")], ids=lambda p: p.name)
def test_console_blocks_show_the_real_output(page: Path) -> None:
    """A line ``...`` in a shown output stands for lines left out; the rest must match."""
    shown = blocks(page, "console")
    for block in shown:
        command, *expected = block.rstrip("\n").split("\n")
        assert command.startswith("$ "), command
        actual = _run(command[2:]).rstrip("\n").split("\n")
        segments, current = [], []
        for line in expected:
            if line == "...":
                segments.append(current)
                current = []
            else:
                current.append(line)
        segments.append(current)
        position = 0
        for segment in segments:
            if not segment:
                continue
            starts = [
                i
                for i in range(position, len(actual) - len(segment) + 1)
                if actual[i : i + len(segment)] == segment
            ]
            assert starts, f"{page.name}: not in the output of {command!r}:\n" + "\n".join(segment)
            position = starts[0] + len(segment)
        if "..." not in expected:
            assert actual == expected, f"{page.name}: {command!r} prints something else"


def links(page: Path) -> list[str]:
    return re.findall(r"\]\(([^)#\s]+)\)", page.read_text(encoding="utf-8"))


@pytest.mark.parametrize("page", [p for p in PAGES if links(p)], ids=lambda p: p.name)
def test_images_and_links_exist(page: Path) -> None:
    targets = links(page)
    for target in targets:
        if "://" not in target:
            assert (PAGES[page] / target).exists(), f"{page.name} links to missing {target}"


@pytest.mark.parametrize("name", DIAGRAMS)
def test_committed_diagrams_are_current(name: str, golden, request: pytest.FixtureRequest) -> None:
    args, kwargs = DIAGRAMS[name]
    e = explain(*args, check=False, **kwargs)
    golden(DOCS / f"{name}.svg", diagram.svg(e))
    # The PNG's pixels depend on Pillow's font rendering, so only its size is compared.
    png = DOCS / f"{name}.png"
    if request.config.getoption("--regen-golden"):
        png.write_bytes(diagram.png(e))
    drawn = scene.build(e)
    with Image.open(png) as committed:
        assert committed.format == "PNG"
        assert committed.size == (round(2 * drawn.width), round(2 * drawn.height)), (
            f"{png.name} is stale: run pytest --regen-golden"
        )
