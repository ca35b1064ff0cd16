"""The cpu backend's kernel cache heals itself (lstmkit.backends.cpu.build and .library).

Each scenario runs in a fresh Python process: the library is loaded once per process, and a
damaged one could kill its process (SIGBUS on a truncated file), which must show as a failed
test rather than end pytest. The process runs a small forward and backward pass, compared
here with ``torch.nn.LSTM``, and then ``lstmkit backends``, whose report must say what happened.

No scenario compiles: a stand-in compiler (``CC``) "builds" by copying the library this test
process loaded, so a rebuild or a build in a temporary directory costs only a process start.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import lstmkit
from compare import assert_close
from lstmkit import backends
from lstmkit.backends.cpu import build, library

# One forward and backward pass of lstmkit on the state and input of argv[1], saved to argv[2],
# then the report of ``lstmkit backends``.
SCRIPT = """
import sys
import torch
import lstmkit
from lstmkit import cli

case = torch.load(sys.argv[1])
ours = lstmkit.LSTM(3, 5, num_layers=2)
ours.load_state_dict(case["state"])
x = case["x"].clone().requires_grad_()
out, (h, c) = ours(x)
(out.sum() + h.sum() + c.sum()).backward()
torch.save({"out": out.detach(), "h": h.detach(), "c": c.detach(), "grad": x.grad}, sys.argv[2])
cli.main(["backends"])
"""

# A compiler that compiles nothing: objects are empty, and the link writes the library given.
STAND_IN = """#!/bin/sh
while [ "$#" -gt 1 ]; do
  if [ "$1" = "-o" ]; then out=$2; fi
  shift
done
case "$out" in
  *.o) : > "$out" ;;
  *) cp "{library}" "$out" ;;
esac
"""

FAILING = """#!/bin/sh
echo "cc: error: this compiler fails on purpose" >&2
exit 1
"""


def _script(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The stand-in compiler, copying a library built (once) by the real one."""
    directory = tmp_path_factory.mktemp("compiler")
    good = directory / "good.so"
    shutil.copyfile(library.load().path, good)
    return _script(directory / "cc", STAND_IN.format(library=good))


def _environment(compiler: str, changes: dict[str, str | None]) -> dict[str, str]:
    env = dict(os.environ, CC=compiler)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(lstmkit.__file__).parents[1]), env.get("PYTHONPATH", "")]
    )
    env.pop(backends.BACKEND_ENV, None)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def _run(tmp_path: Path, compiler: str, changes: dict[str, str | None]) -> tuple[str, list[str]]:
    """Run SCRIPT in a fresh process with ``changes`` to the environment; check that it exits
    0 with torch.nn.LSTM's results; return its report and the CacheWarnings it printed."""
    torch.manual_seed(0)
    oracle = torch.nn.LSTM(3, 5, num_layers=2)
    x = torch.randn(4, 2, 3, requires_grad=True)
    torch.save({"state": oracle.state_dict(), "x": x.detach()}, tmp_path / "case.pt")
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", SCRIPT, tmp_path / "case.pt", tmp_path / "out.pt"],
        env=_environment(compiler, changes),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"exit status {result.returncode}:\n{result.stderr}"
    out, (h, c) = oracle(x)
    (out.sum() + h.sum() + c.sum()).backward()
    ours = torch.load(tmp_path / "out.pt")
    for name, expected in (("out", out), ("h", h), ("c", c)):
        assert_close(ours[name], expected.detach(), name)
    assert_close(ours["grad"], x.grad, "grad of x", "grad")
    return result.stdout, re.findall(r"CacheWarning: (.*)", result.stderr)


def _under_a_file(tmp_path: Path) -> tuple[dict[str, str | None], Path]:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return {"LSTMKIT_CACHE_DIR": str(blocker / "cache")}, blocker / "cache"


def _home_under_a_file(tmp_path: Path) -> tuple[dict[str, str | None], Path]:
    """A HOME that cannot be written, as in a read-only container, with the default cache."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    home = blocker / "home"
    changes = {"HOME": str(home), "XDG_CACHE_HOME": None, "LSTMKIT_CACHE_DIR": None}
    return changes, home / ".cache" / "lstmkit"


def _read_only(tmp_path: Path) -> tuple[dict[str, str | None], Path]:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o500)
    return {"LSTMKIT_CACHE_DIR": str(cache)}, cache


# Root writes into a directory of mode 0o500; there the paths under a file stand for it.
UNWRITABLE = [_under_a_file, _home_under_a_file] + ([_read_only] if os.geteuid() != 0 else [])


@pytest.mark.parametrize("unwritable", UNWRITABLE, ids=lambda f: f.__name__.strip("_"))
def test_unwritable_cache_builds_in_a_temporary_directory(
    unwritable: Callable[[Path], tuple[dict[str, str | None], Path]],
    stand_in: str,
    tmp_path: Path,
) -> None:
    changes, cache = unwritable(tmp_path)
    report, warned = _run(tmp_path, stand_in, changes)
    why = f"the cache directory {cache} cannot be created or written ("
    assert len(warned) == 1 and warned[0].startswith(f"lstmkit cannot use its kernel cache: {why}")
    found = re.search(r"kernels built in the temporary directory (\S+) \(", report)
    assert found is not None, report
    assert f"because {why}" in report
    assert "last call in this thread: cpu (chosen)" in report
    assert not Path(found[1]).exists(), "the temporary directory outlived its process"


def _truncate(path: Path) -> str:
    size = path.stat().st_size
    os.truncate(path, size // 2)
    return f"is {size // 2} bytes where its build wrote {size} (truncated or overwritten)"


def _text_section(data: bytes) -> tuple[int, int]:
    """Offset and size of the code (.text) in a 64-bit little-endian ELF file."""
    assert data[:6] == b"\x7fELF\x02\x01", "not a 64-bit little-endian ELF file"
    (sections,) = struct.unpack_from("<Q", data, 0x28)
    entry_size, count, names_index = struct.unpack_from("<HHH", data, 0x3A)

    def section(index: int) -> tuple[int, int, int]:  # name, offset, size
        name, _, _, _, offset, size = struct.unpack_from(
            "<IIQQQQ", data, sections + index * entry_size
        )
        return name, offset, size

    names = section(names_index)[1]
    for index in range(count):
        name, offset, size = section(index)
        if data[names + name : names + name + 6] == b".text\0":
            return offset, size
    raise AssertionError("no .text section")


def _scribble_on_code(path: Path) -> str:
    data = bytearray(path.read_bytes())
    offset, size = _text_section(bytes(data))
    start = offset + size // 4
    data[start : start + size // 2] = random.Random(0).randbytes(size // 2)
    path.write_bytes(data)
    return "has the size its build wrote but another SHA-256 (its bytes were changed)"


def _lose_record(path: Path) -> str:
    build.record_path(path, hashlib.sha256(path.read_bytes()).hexdigest()).unlink()
    return "has no record of the size and SHA-256 its build wrote"


@pytest.mark.parametrize(
    "damage", [_truncate, _scribble_on_code, _lose_record], ids=lambda f: f.__name__.strip("_")
)
def test_damaged_library_is_rebuilt(
    damage: Callable[[Path], str], stand_in: str, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    target = cache / build.library_path(stand_in).name
    build.build(stand_in, target)
    what = damage(target)
    report, warned = _run(tmp_path, stand_in, {"LSTMKIT_CACHE_DIR": str(cache)})
    assert len(warned) == 1 and warned[0].startswith(
        f"lstmkit rebuilt its cpu kernels {target}: it {what}"
    )
    assert f"kernels rebuilt in the cache {target} (" in report
    assert f"because it {what}" in report
    assert "last call in this thread: cpu (chosen)" in report
    assert build.check(target) is None


def test_unbuildable_anywhere_runs_on_the_reference(tmp_path: Path) -> None:
    failing = _script(tmp_path / "cc", FAILING)
    changes, cache = _under_a_file(tmp_path)
    report, warned = _run(tmp_path, failing, changes)
    assert warned == []
    cannot = f"cpu        cannot run: the cache directory {cache} cannot be created or written ("
    assert cannot in report
    assert "and building in a temporary directory failed too: compiling the cpu kernels" in report
    assert "this compiler fails on purpose" in report
    assert "last call in this thread: reference (chosen)" in report


def test_no_temporary_directory_is_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    changes, cache = _under_a_file(tmp_path)
    monkeypatch.setenv("LSTMKIT_CACHE_DIR", str(changes["LSTMKIT_CACHE_DIR"]))

    def no_temporary_directory(prefix: str) -> str:
        raise PermissionError(13, "Permission denied", tempfile.gettempdir())

    monkeypatch.setattr(tempfile, "mkdtemp", no_temporary_directory)
    with pytest.raises(build.BuildError) as raised:
        library._load("native")
    message = str(raised.value)
    assert message.startswith(f"the cache directory {cache} cannot be created or written (")
    assert "and building in a temporary directory failed too: [Errno 13] Permission denied" in (
        message
    )


def test_a_build_records_its_bytes_before_they_appear(
    stand_in: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrent builds stay safe: when a build's library is renamed into place, the record
    of its bytes is already there, whichever build renames last."""
    target = tmp_path / "lstmkit_cpu_0.so"
    replace = os.replace
    recorded_first = []

    def checked_replace(source: str | Path, destination: str | Path) -> None:
        if Path(destination) == target:
            digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
            recorded_first.append(build.record_path(target, digest).exists())
        replace(source, destination)

    monkeypatch.setattr(build.os, "replace", checked_replace)
    build.build(stand_in, target)
    assert recorded_first == [True]
    assert build.check(target) is None
