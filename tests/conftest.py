from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lstmkit import backends
from lstmkit.backends.cpu import machine


@pytest.fixture(params=backends.PREFERENCE)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test using this fixture runs once per backend, forced through LSTMKIT_BACKEND."""
    monkeypatch.setenv(backends.BACKEND_ENV, request.param)
    return request.param


@pytest.fixture(params=[tier.name for tier in machine.TIERS])
def cpu_tier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test using this fixture runs once per ISA tier of the cpu kernels, selected through
    LSTMKIT_CPU_TARGET; a tier this CPU cannot execute is skipped, with the reason."""
    reason = machine.machine().runs(machine.tier_named(request.param))
    if reason is not None:
        pytest.skip(f"the {request.param} tier cannot run here: {reason}")
    monkeypatch.setenv(machine.TARGET_ENV, request.param)
    return request.param


# Golden files: tests/golden/* and the docs' generated diagrams are compared, never rewritten,
# unless pytest runs with --regen-golden (then review the diff before committing).
@pytest.fixture(params=["own", "blas"])
def gemm_choice(request: pytest.FixtureRequest, cpu_tier: str) -> Iterator[str]:
    """Each GEMM the tuner chooses between (lstmkit's own, the BLAS torch carries), forced for
    every dtype of the tier's library for one test; the choice kept before is restored after."""
    from lstmkit.backends.cpu import library

    before = library.load().gemm
    words = library.configure(gemm=dict.fromkeys(library.DTYPES, request.param)).blas
    own = words.startswith("lstmkit's own")
    assert own == (request.param == "own" or library.blas_found() is None), words
    yield request.param
    library.configure(gemm=before)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--regen-golden",
        action="store_true",
        default=False,
        help="rewrite golden files (tests/golden/, docs diagrams) from the current output",
    )


@pytest.fixture
def golden(request: pytest.FixtureRequest) -> Callable[[Path, str], None]:
    """``golden(path, text)``: assert ``text`` equals the file, or rewrite it on --regen-golden."""
    regen = bool(request.config.getoption("--regen-golden"))

    def compare(path: Path, text: str) -> None:
        if regen:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            return
        assert path.exists(), f"{path} is missing; create it with: pytest --regen-golden"
        expected = path.read_text(encoding="utf-8")
        if text != expected:
            diff = difflib.unified_diff(
                expected.splitlines(), text.splitlines(), "golden", "now", lineterm=""
            )
            pytest.fail(
                f"{path} differs from the output (regenerate with --regen-golden if intended):\n"
                + "\n".join(list(diff)[:60])
            )

    return compare
