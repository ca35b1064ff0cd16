"""Compiling the cpu backend's C library with the machine's compiler, once per machine.

The library is built on first use (or by ``lstmkit warmup``) into a cache directory, under a
name that hashes everything that shapes the binary: the sources, the flags (those of the ISA
tier, see :mod:`.machine`: ``-march=native`` for the native one), the compiler and the CPU. A
later process finds it there and only loads it.
Concurrent builds are safe: each writes a private temporary file and renames it into place.

Integrity: beside each library, its build leaves a record of its size and SHA-256, in a file
named by that hash (``<library>.<sha256>.sha256``, holding ``<size> <sha256>``) and renamed
into place before the library is. Whichever of several concurrent builds renames last, the bytes
at the library's path then have their record, and no record describes other bytes. Before a
process loads the library it hashes it (once per process, about a millisecond) and looks for
that record (:func:`check`). The loader (:mod:`.library`) rebuilds a library without one
(truncated, changed, copied without it) or that fails to load, with a :class:`CacheWarning`;
a cache directory that cannot be created or written gets the same warning, and the library is
built in a private temporary directory (:func:`temporary_dir`) for the process instead.

Cache directory: ``$LSTMKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lstmkit``, else
``~/.cache/lstmkit``. Compiler: ``$CC``, else ``gcc``, else ``cc``. ``$LSTMKIT_SANITIZE`` (e.g.
``address,undefined``) builds the kernels with those ``-fsanitize=`` checks, under a name of its
own (``make sanitize`` runs the tests so; the sanitizer's runtime must then be preloaded).

Each source version has its own build, so old ones would pile up: loading a build marks it
used (its modification time), and every new build removes the builds nobody has loaded for
:data:`STALE_DAYS` days, with their records.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from lstmkit.backends.cpu import machine

SOURCE_DIR = Path(__file__).resolve().parent
HEADERS = (
    "lstm.h",
    "real.h",
    "driver.h",
    "gemm.h",
    "tier_avx512.h",
    "tier_avx2.h",
    "tier_generic.h",
)
# (source, extra flags, object name): kernel.c, variant.c, gemm.c and cell.c are compiled once per
# element type.
UNITS = (
    ("lstm.c", (), "lstm.o"),
    ("kernel.c", ("-DLK_DOUBLE=0",), "kernel_f32.o"),
    ("kernel.c", ("-DLK_DOUBLE=1",), "kernel_f64.o"),
    ("variant.c", ("-DLK_DOUBLE=0",), "variant_f32.o"),
    ("variant.c", ("-DLK_DOUBLE=1",), "variant_f64.o"),
    ("gemm.c", ("-DLK_DOUBLE=0",), "gemm_f32.o"),
    ("gemm.c", ("-DLK_DOUBLE=1",), "gemm_f64.o"),
    ("cell.c", ("-DLK_DOUBLE=0",), "cell_f32.o"),
    ("cell.c", ("-DLK_DOUBLE=1",), "cell_f64.o"),
)
# With vectors wider than 32 bytes, kernel.c once more with 32-byte ones (symbols *_narrow): a
# layer of few units pads them to fewer lanes (see machine.narrow_pays).
NARROW_UNITS = (
    ("kernel.c", ("-DLK_DOUBLE=0", "-ULK_VBYTES", "-DLK_VBYTES=32", "-DLK_NARROW"), "narrow_f32.o"),
    ("kernel.c", ("-DLK_DOUBLE=1", "-ULK_VBYTES", "-DLK_VBYTES=32", "-DLK_NARROW"), "narrow_f64.o"),
)


def units(flags: tuple[str, ...]) -> tuple[tuple[str, tuple[str, ...], str], ...]:
    """The compilation units of a build with a tier's ``flags`` (:func:`target_flags`)."""
    return UNITS + (NARROW_UNITS if "-DLK_VBYTES=64" in flags else ())


FLAGS = (
    "-O3",
    "-std=gnu11",
    "-fPIC",
    "-fopenmp",
    "-fno-math-errno",
    "-fno-trapping-math",
)
LINK_FLAGS = ("-shared", "-fopenmp")
SANITIZE_ENV = "LSTMKIT_SANITIZE"
LIBRARIES = ("-lm",)
PREFIX = "lstmkit_cpu_"
RECORD_SUFFIX = ".sha256"
TUNING_SUFFIX = ".tune.json"  # the tuner's choices beside a library
STALE_DAYS = 30
# What a cached build consists of, in the cache key: 2 is a library with its record, so that a
# build of an older lstmkit, which has none, is not taken for a damaged one.
CACHE_FORMAT = 2


class BuildError(RuntimeError):
    """The library could not be built; the message says why, for ``lstmkit backends``."""


class CacheWarning(UserWarning):
    """The kernel cache could not be used as it was: lstmkit rebuilt a damaged library there,
    or built one in a temporary directory for this process; the message says why."""


def cache_dir() -> Path:
    explicit = os.environ.get("LSTMKIT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lstmkit"


def sanitize_flags() -> tuple[str, ...]:
    """The ``-fsanitize=`` flags ``$LSTMKIT_SANITIZE`` asks for (compile and link), or none."""
    checks = os.environ.get(SANITIZE_ENV, "").strip()
    if not checks:
        return ()
    return (f"-fsanitize={checks}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all", "-g")


def find_compiler() -> str | None:
    """Absolute path of the C compiler to use, or ``None`` if there is none."""
    for name in (os.environ.get("CC"), "gcc", "cc"):
        if name:
            path = shutil.which(name)
            if path:
                return path
    return None


def target_flags(tier: machine.Tier, native: bool) -> tuple[str, ...]:
    """The compiler flags of a build for ``tier``: tuned for this very CPU when ``native``,
    else exactly the tier's instruction set; the kernels' vector width and register tiles
    follow the tier."""
    if not native:
        isa = tier.flags
    elif machine.machine().arch in ("x86_64", "aarch64"):  # where GCC knows -march=native
        wide = ("-mprefer-vector-width=512",) if tier.vector_bytes == 64 else ()
        isa = ("-march=native", *wide)
    else:
        isa = ()
    return (*isa, f"-DLK_VBYTES={tier.vector_bytes}", f"-DLK_VREGS={tier.registers}")


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's identity (x86 vendor, family, model and
    stepping; aarch64 implementer and part), its name and its features."""
    facts = machine.machine()
    return f"{facts.arch} {facts.identity} {facts.model_name} {sorted(facts.features)}"


def library_path(compiler: str, flags: tuple[str, ...] | None = None) -> Path:
    """Where the library built by ``compiler`` with the tier's ``flags`` (default: the tier
    :func:`machine.select` picks) for this machine lives in the cache."""
    if flags is None:
        flags = target_flags(*machine.select(machine.machine())[:2])
    digest = hashlib.sha256()
    for name in sorted({unit[0] for unit in UNITS} | set(HEADERS)):  # NARROW_UNITS: the same
        digest.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes())
    real = os.path.realpath(compiler)
    stat = os.stat(real)
    for part in (
        repr((CACHE_FORMAT, units(flags), FLAGS, flags, LINK_FLAGS, LIBRARIES, sanitize_flags())),
        f"{real} {stat.st_size} {stat.st_mtime_ns}",
        _cpu_identity(),
        platform.platform(),
    ):
        digest.update(part.encode() + b"\0")
    return cache_dir() / f"{PREFIX}{digest.hexdigest()[:20]}.so"


def build(compiler: str, target: Path, flags: tuple[str, ...] = ()) -> None:
    """Compile the sources with ``compiler`` and a tier's ``flags`` (see :func:`target_flags`)
    into the shared library ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        jobs = []
        sanitizing = sanitize_flags()
        for source, extra, obj in units(flags):
            command = [compiler, *FLAGS, *flags, *sanitizing, *extra]
            command += ["-c", str(SOURCE_DIR / source), "-o", obj]
            jobs.append((command, _start(command, tmp)))
        for command, job in jobs:
            _finish(command, job)
        partial = Path(tmp) / target.name
        command = [compiler, *LINK_FLAGS, *sanitizing, "-o", str(partial)]
        command += [*(u[2] for u in units(flags)), *LIBRARIES]
        _finish(command, _start(command, tmp))
        data = partial.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        record = Path(tmp) / "record"
        record.write_text(_record_text(len(data), digest))
        # The record first: bytes at ``target`` always have theirs (see the module docstring).
        os.replace(record, record_path(target, digest))
        os.replace(partial, target)
    prune(target.parent)


def temporary_dir() -> Path:
    """A new private directory for this process's own build, removed when the process exits
    (the loaded library stays mapped)."""
    directory = Path(tempfile.mkdtemp(prefix="lstmkit-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def record_path(library: Path, digest: str) -> Path:
    """Where the record of ``library`` holding the bytes that hash to ``digest`` is."""
    return library.with_name(f"{library.name}.{digest}{RECORD_SUFFIX}")


def _record_text(size: int, digest: str) -> str:
    return f"{size} {digest}\n"


def check(library: Path) -> str | None:
    """``None`` if ``library`` holds the bytes a build recorded, else what is wrong with it, as
    the end of a sentence about it. Raises OSError if it cannot be read."""
    data = library.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    with contextlib.suppress(FileNotFoundError):
        if record_path(library, digest).read_text() == _record_text(len(data), digest):
            return None
    recorded = sorted(_recorded_sizes(library))
    if not recorded:
        return (
            "has no record of the size and SHA-256 its build wrote (copied without it, or the "
            "record was lost)"
        )
    if len(data) not in recorded:
        wrote = " or ".join(str(size) for size in recorded)
        return f"is {len(data)} bytes where its build wrote {wrote} (truncated or overwritten)"
    return "has the size its build wrote but another SHA-256 (its bytes were changed)"


def _recorded_sizes(library: Path) -> set[int]:
    sizes = set()
    for record in library.parent.glob(f"{library.name}.*{RECORD_SUFFIX}"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            sizes.add(int(record.read_text().split()[0]))
    return sizes


def mark_used(path: Path) -> None:
    """Record that ``path`` was loaded now, so that :func:`prune` keeps it."""
    with contextlib.suppress(OSError):  # a read-only cache still works
        os.utime(path)


def prune(directory: Path, max_age_days: float = STALE_DAYS) -> list[Path]:
    """Remove the builds in ``directory`` not used for ``max_age_days``, and the records and
    tunings as old whose library is gone; returns them.

    A process that still has one loaded keeps its mapping: removing the file is safe. A record
    is written just before its library is renamed into place, so a young record without its
    library may be a build's that is finishing: only old ones are removed."""
    cutoff = time.time() - max_age_days * 86400
    removed = []
    for path in directory.glob(f"{PREFIX}*.so"):
        if _remove_if_older(path, cutoff):
            removed.append(path)
    for record in directory.glob(f"{PREFIX}*.so.*{RECORD_SUFFIX}"):
        library = record.with_name(record.name.rsplit(".", 2)[0])
        if not library.exists() and _remove_if_older(record, cutoff):
            removed.append(record)
    for tuning in directory.glob(f"{PREFIX}*.so{TUNING_SUFFIX}"):  # lstmkit.backends.cpu.tuner
        library = tuning.with_name(tuning.name[: -len(TUNING_SUFFIX)])
        if not library.exists() and _remove_if_older(tuning, cutoff):
            removed.append(tuning)
    return removed


def _remove_if_older(path: Path, cutoff: float) -> bool:
    try:
        if path.stat().st_mtime < cutoff:
            path.unlink()
            return True
    except OSError:
        pass  # another process pruned it, or it is not ours to remove
    return False


def _start(command: list[str], cwd: str) -> subprocess.Popen[str]:
    try:
        return subprocess.Popen(
            command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    except OSError as error:  # the compiler's fault, not the cache directory's
        raise BuildError(f"cannot run the C compiler {command[0]}: {error}") from error


def _finish(command: list[str], job: subprocess.Popen[str]) -> None:
    output, _ = job.communicate()
    if job.returncode != 0:
        raise BuildError(
            f"compiling the cpu kernels failed ({' '.join(command)}):\n{output.strip()}"
        )
