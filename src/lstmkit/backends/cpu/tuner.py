"""Choices the machine's facts cannot settle, measured on the machine and kept beside the library.

Three choices are measured (:func:`tune`), each candidate on representative shapes, the
candidates interleaved and each timing the median of repeats:

- ``gemm``, per dtype: lstmkit's own GEMM (gemm.h, register tiles of the tier) or the BLAS
  torch carries (MKL's ``sgemm_``/``dgemm_``), on the shapes of a layer's backward (the weight
  gradients over a chunk of rows, the input gradient). Which one is faster depends on the CPU
  and on the BLAS's support for it: MKL on an AMD CPU runs its AVX2 code, for one.
- ``serial_flops``: below how many flops a call runs on one thread. Forward calls of growing
  size on one thread and on two; the threshold is the split that costs least over all sizes,
  two threads charged for their second core (they must win by a tenth), see
  :func:`serial_threshold`. Only measured where torch allows two threads.
- ``one_team``: whether a bidirectional layer runs its two directions side by side (a thread
  each) or one after the other on every thread, timed on two bidirectional layers, forward and
  backward.
- ``narrow_cost``, where the tier has 32-byte kernels beside its wider ones: a narrow lane's
  time over a wide one's, on a layer both widths fill without padding. 1 where the CPU runs
  both widths at one flop rate (Zen 4), about 2 where its wide FMAs are twice as fast: whether
  a layer whose units split unevenly over the threads in wide vectors takes the narrow ones
  (machine.narrow_pays).

``lstmkit warmup`` measures them when nothing is kept for this library, ``lstmkit tune``
measures again, ``lstmkit tune --show`` prints what is kept. The choices live in a JSON file
beside the built library (``<library>.tune.json``), whose name already hashes the CPU, the
sources and the flags; the file also records the CPU's identity, torch's version and the
thread count it was measured with, and a file that does not match this process is ignored
(with the reason in ``lstmkit backends``). No choice changes a result beyond the tolerance
table: the GEMMs differ in rounding only, and thread counts and teams not at all (the kernels
compute every element in the same order whatever the threads).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lstmkit.backends.cpu import build, machine

SUFFIX = build.TUNING_SUFFIX
FORMAT = 1
TWO_THREADS_WIN = 0.9  # two threads must take at most this share of one thread's time
TEAM_WIN = 0.95  # one team must take at most this share of a team each's time to be chosen


@dataclass(frozen=True)
class Tuning:
    """What :func:`tune` chose, and what it measured (seconds, medians)."""

    gemm: dict[str, str]  # dtype name ("float32", "float64") -> "own" or "blas"
    serial_flops: float | None  # None: the plan's own (one thread only was measured)
    one_team: bool | None  # None: not measured (one thread)
    measured: dict[str, dict[str, float]]  # candidate -> option -> seconds
    cpu: str
    torch: str
    threads: int
    date: str
    seconds: float
    # a narrow (32-byte) lane's time over a wide one's, where the tier has both (None: not
    # measured; see machine.narrow_pays)
    narrow_cost: float | None = None

    def applied_to(self, plan: machine.Plan) -> machine.Plan:
        changes: dict[str, float] = {}
        if self.serial_flops is not None:
            changes["serial_flops"] = self.serial_flops
        if self.one_team is not None:
            changes["one_team"] = 1.0 if self.one_team else 0.0
        return dataclasses.replace(plan, **changes)

    def gemm_choice(self) -> dict[torch.dtype, str]:
        return {getattr(torch, name): choice for name, choice in self.gemm.items()}

    def describe(self) -> list[str]:
        lines = [
            f"measured {self.date} in {self.seconds:.1f} s on {self.threads} threads "
            f"(torch {self.torch}; {self.cpu})"
        ]
        for name, choice in self.gemm.items():
            times = self.measured.get(f"gemm {name}", {})
            lines.append(f"GEMM {name}: {choice} ({_times(times)})")
        if self.serial_flops is not None:
            threads = self.measured.get("threads", {})
            pairs = [
                f"H={size} {threads[f'H={size} 1 thread'] * 1e3:.3g}/"
                f"{threads[f'H={size} {self.threads} threads'] * 1e3:.3g} ms"
                for size in _sizes(threads)
            ]
            lines.append(
                f"one thread below {self.serial_flops:.3g} flops (one thread/{self.threads}: "
                + ", ".join(pairs)
                + ")"
            )
        if self.one_team is not None:
            choice = "one team, one direction after the other" if self.one_team else "a team each"
            lines.append(f"two directions: {choice} ({_times(self.measured.get('teams', {}))})")
        if self.narrow_cost is not None:
            lines.append(
                f"32-byte kernels: a lane costs {self.narrow_cost:.2f} of a wide one's "
                f"({_times(self.measured.get('narrow', {}))}), so layers whose units split "
                "unevenly over the threads take them where that evens the split by more"
            )
        return lines


def _times(times: dict[str, float]) -> str:
    return ", ".join(f"{option} {seconds * 1e3:.3g} ms" for option, seconds in times.items())


def _sizes(threads: dict[str, float]) -> list[int]:
    """The hidden sizes timed on one thread and on more, in the order measured."""
    sizes = [int(key.split()[0][2:]) for key in threads if key.endswith(" 1 thread")]
    return [size for size in sizes if any(k.startswith(f"H={size} ") for k in threads)]


def path_for(library_path: Path) -> Path:
    return library_path.with_name(library_path.name + SUFFIX)


def stored(library_path: Path) -> tuple[Tuning | None, str]:
    """The choices kept beside the library at ``library_path`` if they hold for this process,
    and where the library's choices come from, in words."""
    return read(path_for(library_path))


def read(path: Path) -> tuple[Tuning | None, str]:
    """The choices kept in the file ``path`` if they hold for this process, and why not."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None, "not tuned (run `lstmkit warmup` or `lstmkit tune`): the GEMM is the BLAS"
    except (OSError, ValueError) as error:
        return None, f"tuning in {path} unreadable ({error}): ignored"
    try:
        if data.pop("format") != FORMAT:
            raise ValueError("another format")
        tuning = Tuning(**data)
    except (KeyError, TypeError, ValueError) as error:
        return None, f"tuning in {path} not of this lstmkit ({error}): ignored"
    mismatch = _mismatch(tuning)
    if mismatch is not None:
        return None, f"tuning in {path} measured {mismatch}: ignored (run `lstmkit tune`)"
    return tuning, f"tuned on this machine ({path})"


def _mismatch(tuning: Tuning) -> str | None:
    if tuning.cpu != machine.machine().identity:
        return f"on another CPU ({tuning.cpu})"
    if tuning.torch != torch.__version__:
        return f"with torch {tuning.torch}"
    if tuning.threads != torch.get_num_threads():
        return f"on {tuning.threads} threads, not {torch.get_num_threads()}"
    return None


def save(tuning: Tuning, path: Path) -> Path:
    """Writes ``tuning`` to ``path`` (a private file renamed into place)."""
    text = json.dumps({"format": FORMAT, **dataclasses.asdict(tuning)}, indent=1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tune-")
    with os.fdopen(fd, "w") as file:
        file.write(text + "\n")
    os.replace(tmp, path)
    return path


def tune(
    quick: bool = False, progress: Callable[[str], None] | None = None, path: Path | None = None
) -> tuple[Tuning, Path]:
    """Measures every choice for the loaded library, applies them and keeps them in ``path``
    (by default beside the library). ``quick``: fewer shapes and repeats (the tests)."""
    from lstmkit.backends.cpu import library

    say = progress or (lambda line: None)
    start = time.perf_counter()
    loaded = library.load()
    repeats = 3 if quick else 7
    measured: dict[str, dict[str, float]] = {}
    gemm = {}
    # the BLAS installed for every dtype while timing: lk_gemm's "blas" is the kernels' BLAS,
    # which is lstmkit's own GEMM again where an earlier choice took it out
    library.configure(gemm=dict.fromkeys(library.DTYPES, "blas"))
    for dtype in library.DTYPES:
        name = str(dtype).split(".")[-1]
        if library.blas_found() is None:
            gemm[name] = "own"
            continue
        say(f"GEMM {name}: lstmkit's own against the BLAS")
        times = _time_gemms(loaded, dtype, quick, repeats)
        measured[f"gemm {name}"] = times
        gemm[name] = min(times, key=times.__getitem__)
    library.configure(gemm={getattr(torch, k): v for k, v in gemm.items()})
    base = machine.plan(machine.machine(), loaded.tier)
    serial, one_team = None, None
    if torch.get_num_threads() >= 2:
        say("threads: one against two, by size")
        serial, measured["threads"] = _time_threads(base, quick, repeats)
        say("two directions: a team each against one team")
        measured["teams"] = _time_teams(dataclasses.replace(base, serial_flops=serial), repeats)
        teams = measured["teams"]
        one_team = teams["one team"] < TEAM_WIN * teams["a team each"]
    narrow_cost = None
    if loaded.narrow:
        say("vectors: the 32-byte kernels against the wide ones")
        narrow_cost, measured["narrow"] = _time_narrow(base, repeats)
    tuning = Tuning(
        gemm=gemm,
        serial_flops=serial,
        one_team=one_team,
        measured=measured,
        cpu=machine.machine().identity,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        seconds=round(time.perf_counter() - start, 2),
        narrow_cost=narrow_cost,
    )
    path = save(tuning, path_for(loaded.path) if path is None else path)
    library.configure(
        plan=tuning.applied_to(base),
        tuning=f"tuned on this machine ({path})",
        narrow_cost=narrow_cost,
    )
    return tuning, path


def _median(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def _interleaved(candidates: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each candidate, the candidates taking turns (one warm-up call each)."""
    for run in candidates.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            samples[name].append(_median(run, 1))
    return {name: statistics.median(times) for name, times in samples.items()}


def gemm_shapes(quick: bool) -> list[tuple[int, int, int, int, int]]:
    """(trans_a, trans_b, m, n, k) of the GEMMs a layer's backward makes: the weight gradient
    over a chunk of rows (dA^T x, A transposed) and the input gradient (dA W_ih), for layers of
    128 and 512 units (gates padded to 4H), 64 rows per step times a few steps."""
    shapes = []
    for hidden, inputs, rows in ((128, 128, 640), (512, 512, 1280)):
        gates = 4 * hidden
        shapes += [(1, 0, gates, inputs, 256), (0, 0, rows, inputs, gates)]
    return shapes[:2] if quick else shapes


def _time_gemms(loaded, dtype: torch.dtype, quick: bool, repeats: int) -> dict[str, float]:
    entry = getattr(loaded.cdll, "lk_gemm_" + ("f32" if dtype == torch.float32 else "f64"))
    threads = torch.get_num_threads()
    total = {"own": 0.0, "blas": 0.0}
    for trans_a, trans_b, m, n, k in gemm_shapes(quick):
        a = torch.randn((k, m) if trans_a else (m, k), dtype=dtype)
        b = torch.randn((n, k) if trans_b else (k, n), dtype=dtype)
        c = torch.empty(m, n, dtype=dtype)

        def run(own: int, a=a, b=b, c=c, ta=trans_a, tb=trans_b, m=m, n=n, k=k) -> None:
            call_gemm(entry, own, ta, tb, a, b, c, threads)

        times = _interleaved({"own": lambda: run(1), "blas": lambda: run(0)}, repeats)
        for option, seconds in times.items():
            total[option] += seconds
    return total


def call_gemm(
    entry,
    own: int,
    trans_a: int,
    trans_b: int,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    threads: int,
    alpha: float = 1.0,
    beta: float = 0.0,
) -> None:
    """c = alpha op(a) op(b) + beta c through lk_gemm_* (contiguous row-major tensors)."""
    import ctypes

    m, n = c.shape
    k = a.shape[0] if trans_a else a.shape[1]
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    entry.restype = ctypes.c_int
    entry.argtypes = [ctypes.c_int] * 3 + [i64] * 3 + [ctypes.c_double, ptr, i64, ptr, i64]
    entry.argtypes += [ctypes.c_double, ptr, i64, ctypes.c_int]
    status = entry(
        own,
        trans_a,
        trans_b,
        m,
        n,
        k,
        alpha,
        a.data_ptr(),
        a.shape[1],
        b.data_ptr(),
        b.shape[1],
        beta,
        c.data_ptr(),
        n,
        threads,
    )
    if status != 0:
        raise MemoryError("lstmkit's own GEMM could not allocate its buffers")


def thread_shapes(quick: bool) -> list[int]:
    """Hidden sizes of the forward calls timed on one thread and on two (L=10, N=16, H_in=H):
    from a third of a megaflop to a third of a gigaflop, four times more each."""
    return [16, 32, 64, 128, 256] if quick else [16, 32, 64, 96, 128, 192, 256, 384, 512]


def _flops(hidden: int) -> float:
    return 2 * 4 * hidden * 2 * hidden * 16 * 10


def _time_threads(base: machine.Plan, quick: bool, repeats: int) -> tuple[float, dict]:
    """The serial_flops threshold, and the times (one thread, two) at each size. The thread
    count is forced through the plan (serial_flops infinite: one thread; zero: every thread),
    never by torch.set_num_threads between calls, whose pool restart would be timed too."""
    from lstmkit.backends.cpu import library
    from lstmkit.modules import LSTM

    one = dataclasses.replace(base, serial_flops=float("inf"))
    every = dataclasses.replace(base, serial_flops=0.0)
    threads = torch.get_num_threads()
    measured, times_one, times_every = {}, [], []
    try:
        for hidden in thread_shapes(quick):
            module = LSTM(hidden, hidden)
            x = torch.randn(10, 16, hidden)

            def run(plan: machine.Plan, module=module, x=x) -> None:
                library.configure(plan=plan)
                with torch.no_grad():
                    module(x)

            times = _interleaved({"1": lambda: run(one), "2": lambda: run(every)}, repeats)
            measured[f"H={hidden} 1 thread"] = times["1"]
            measured[f"H={hidden} {threads} threads"] = times["2"]
            times_one.append(times["1"])
            times_every.append(times["2"])
    finally:
        library.configure(plan=base)
    sizes = [_flops(h) for h in thread_shapes(quick)]
    return serial_threshold(sizes, times_one, times_every), measured


NARROW_SHAPE = (10, 16, 128)  # L, N, H = H_in: whole vectors of both widths, no padding


def _time_narrow(base: machine.Plan, repeats: int) -> tuple[float, dict]:
    """A narrow lane's time over a wide one's: one float32 forward call of NARROW_SHAPE on
    one thread with each width of kernels, forced through the library's choice for that
    width of layer (and given back after)."""
    from lstmkit.backends.cpu import library
    from lstmkit.modules import LSTM

    steps, batch, hidden = NARROW_SHAPE
    module = LSTM(hidden, hidden)
    x = torch.randn(steps, batch, hidden)
    loaded = library.configure(plan=dataclasses.replace(base, serial_flops=float("inf")))
    key = (torch.float32, hidden)
    before = loaded.chosen.get(key)

    def run(kernels: object) -> None:
        loaded.chosen[key] = kernels
        with torch.no_grad():
            module(x)

    widths = {"wide": loaded.kernels[torch.float32], "narrow": loaded.narrow[torch.float32]}
    try:
        times = _interleaved({name: lambda k=k: run(k) for name, k in widths.items()}, repeats)
    finally:
        if before is None:
            loaded.chosen.pop(key, None)
        else:
            loaded.chosen[key] = before
        library.configure(plan=base)
    return times["narrow"] / times["wide"], times


def serial_threshold(sizes: list[float], one: list[float], every: list[float]) -> float:
    """The serial_flops threshold from the times of growing ``sizes`` (flops) on one thread
    and on every thread: the split (one thread below it, every thread from it on) that costs
    least over all sizes, each size's time relative to its better choice and every thread's
    charged 1 / TWO_THREADS_WIN for the cores it takes; a tie keeps one thread. One noisy
    size moves the split by at most that size, where a rule of "the first size from which
    every thread wins everywhere" jumps past the largest one."""
    best = [min(a, b / TWO_THREADS_WIN) for a, b in zip(one, every, strict=True)]
    one_cost = [a / m for a, m in zip(one, best)]
    every_cost = [b / TWO_THREADS_WIN / m for b, m in zip(every, best)]
    splits = range(len(sizes) + 1)
    cost = {i: sum(one_cost[:i]) + sum(every_cost[i:]) for i in splits}
    split = min(splits, key=lambda i: (cost[i], -i))
    if split == 0:
        return float(sizes[0])
    if split == len(sizes):
        return float(2 * sizes[-1])
    return float((sizes[split - 1] * sizes[split]) ** 0.5)


def _time_teams(base: machine.Plan, repeats: int) -> dict[str, float]:
    from lstmkit.backends.cpu import library
    from lstmkit.modules import LSTM

    cases = []
    for steps, batch, features, hidden in ((40, 32, 100, 128), (50, 16, 80, 256)):
        module = LSTM(features, hidden, bidirectional=True)
        x = torch.randn(steps, batch, features, requires_grad=True)
        cases.append((module, x))

    def run(one_team: float) -> None:
        library.configure(plan=dataclasses.replace(base, one_team=one_team))
        for module, x in cases:
            module(x)[0].sum().backward()

    times = _interleaved({"a team each": lambda: run(0.0), "one team": lambda: run(1.0)}, repeats)
    library.configure(plan=base)
    return times


def show(out=sys.stdout) -> int:
    """``lstmkit tune --show``: what is kept for the library this process loads."""
    from lstmkit.backends.cpu import library

    loaded = library.load()
    tuning, words = stored(loaded.path)
    print(f"cpu kernels {loaded.path}: {words}", file=out)
    if tuning is not None:
        for line in tuning.describe():
            print(f"  {line}", file=out)
    return 0


def add_arguments(parser) -> None:
    parser.add_argument(
        "--show", action="store_true", help="print the kept choices instead of measuring again"
    )
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")


def run(args) -> int:
    """``lstmkit tune``: measure again (a few seconds) and keep the choices; ``--show``."""
    if args.show:
        return show()
    tuning, path = tune(quick=args.quick, progress=_progress)
    print(f"kept in {path}")
    for line in tuning.describe():
        print(f"  {line}")
    return 0


def _progress(line: str) -> None:
    print(f"tuning: {line}...", flush=True)
