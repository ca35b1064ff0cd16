"""``lstmkit bench --limits``: what this machine allows the configs that miss their targets.

Three measurements, each a median of repeats:

- **Reading weights once per step** (``limits.c``'s ``lk_stream_fma``, one core): one FMA per
  vector (the width of the kernels' tier: ``LSTMKIT_CPU_TARGET``, or the native one) of a
  buffer held in L1, in L2 or in L3. In L1 this is the core's FMA rate; past
  it, the bandwidth of the level that holds the buffer. A batch-1 step reads all of ``W_hh``
  once, so the step cannot be faster than those bytes at the rate of the level they sit in
  (:func:`step_bound`; ``x W_ih^T`` for all steps at most runs at both cores' FMA rate).
- **A round trip between two cores** (``lk_round_trip``): two threads hand a counter back and
  forth through one cache line. Splitting a step across the two cores costs at least half of
  it per step, for each core learns when the other's half of h is ready.
- **Fixed costs.** lstmkit's inference call on one step of the config's batch: what a call
  costs besides its steps, plus one step (for configs with much work per step, a one-step call
  may also run on fewer threads than a whole one). For a batch-1 config, where the step is
  small, ``fixed + L x step bound + x W_ih^T`` bounds a call from below.
- **The autograd floor** of a training step: ``zero_grad``, a ``torch.autograd.Function`` that
  takes the module's parameters and returns outputs of the right shapes without computing
  anything, and backward of the benchmark's loss. Any LSTM differentiated through a Python
  ``autograd.Function`` pays at least this; timed interleaved with ``torch.nn.LSTM``'s real
  step, whose time over the floor is the most any such LSTM could be faster.

The C part is compiled on demand into a temporary directory with the compiler and the tier's
flags the kernels use (``build.target_flags``).
"""

from __future__ import annotations

import ctypes
import statistics
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from lstmkit.backends.cpu import build, machine
from lstmkit.bench.configs import BenchConfig, make_input
from lstmkit.bench.runner import make_lstmkit
from lstmkit.bench.timing import Budget, time_interleaved

# Buffer sizes for the weight reads: in L1 (32 KB here), two in L2 (stream-128's W_hh on one
# core, 256 KB, and its half on each of two, 128 KB) and one in L3 (stream-512's W_hh, 4 MB).
STREAM_KB = (24, 128, 256, 4096)
REPEATS = 7


@dataclass(frozen=True)
class Stream:
    """Reading a buffer of ``kb`` KB once per pass, one FMA per vector, on one core."""

    kb: int
    seconds_per_pass: float
    vector_bytes: int  # one FMA per vector of this many bytes (2 flops a float)

    @property
    def gb_per_s(self) -> float:
        return self.kb * 1024 / self.seconds_per_pass / 1e9

    @property
    def gflops(self) -> float:
        return self.kb * 1024 / 4 * 2 / self.seconds_per_pass / 1e9  # an FMA per float


@dataclass(frozen=True)
class Floor:
    """p50 seconds: a training step of a do-nothing autograd Function against torch's, and an
    lstmkit inference call of one step (its fixed cost per call) against torch's whole call."""

    config: str
    floor_s: float
    torch_s: float
    one_step_s: float
    torch_inference_s: float

    @property
    def cap(self) -> float:
        """torch's time over the floor: the highest ratio an autograd.Function LSTM can reach."""
        return self.torch_s / self.floor_s


def compile_probes(directory: Path) -> ctypes.CDLL:
    """limits.c as a shared library in ``directory``; raises build.BuildError if it cannot."""
    compiler = build.find_compiler()
    if compiler is None:
        raise build.BuildError("no C compiler found (set CC, or install gcc)")
    source = resources.files("lstmkit.bench").joinpath("limits.c")
    target = directory / "limits.so"
    flags = build.target_flags(*machine.select(machine.machine())[:2])
    with resources.as_file(source) as path:
        command = [compiler, "-O3", *flags, "-shared", "-fPIC", str(path)]
        done = subprocess.run(
            [*command, "-o", str(target), "-lpthread"], capture_output=True, text=True
        )
    if done.returncode != 0:
        raise build.BuildError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    library = ctypes.CDLL(str(target))
    library.lk_stream_fma.restype = ctypes.c_double
    library.lk_stream_fma.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.POINTER(ctypes.c_float),
    ]
    library.lk_vector_bytes.restype = ctypes.c_int64
    library.lk_vector_bytes.argtypes = []
    library.lk_round_trip.restype = ctypes.c_double
    library.lk_round_trip.argtypes = [ctypes.c_int64]
    return library


def stream(library: ctypes.CDLL, kb: int, seconds: float = 0.05) -> Stream:
    """Median seconds per pass over ``kb`` KB, each repeat lasting about ``seconds``."""
    buffer = torch.rand(kb * 1024 // 4)
    sink = ctypes.c_float()
    address, count = buffer.data_ptr(), buffer.numel()
    library.lk_stream_fma(address, count, 2, ctypes.byref(sink))  # into the cache
    once = max(library.lk_stream_fma(address, count, 1, ctypes.byref(sink)), 1e-9)
    passes = max(1, int(seconds / once))
    times = [
        library.lk_stream_fma(address, count, passes, ctypes.byref(sink)) / passes
        for _ in range(REPEATS)
    ]
    return Stream(kb, statistics.median(times), library.lk_vector_bytes())


def round_trip(library: ctypes.CDLL, trips: int = 20000) -> float | None:
    """Median seconds per round trip between two threads; None if a thread cannot start."""
    times = [library.lk_round_trip(trips) for _ in range(REPEATS)]
    if min(times) < 0:
        return None
    return statistics.median(times)


class _Nothing(torch.autograd.Function):
    """``apply(shapes, x, *params)`` -> empty tensors of ``shapes``; gradients for x and every
    parameter, empty as well. An LSTM's autograd plumbing, with no LSTM in it."""

    @staticmethod
    def forward(
        ctx: FunctionCtx, shapes: tuple[tuple[int, ...], ...], x: Tensor, *params: Tensor
    ) -> tuple[Tensor, ...]:
        ctx.save_for_backward(x, *params)
        return tuple(x.new_empty(shape) for shape in shapes)

    @staticmethod
    def backward(ctx: FunctionCtx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        return None, *(torch.empty_like(t) if t.requires_grad else None for t in saved)


def floor(config: BenchConfig, budget: Budget) -> Floor:
    """The autograd floor of ``config``'s training step and lstmkit's fixed cost of an inference
    call, each timed interleaved with torch on the (dense) batch."""
    torch.manual_seed(0)
    oracle = nn.LSTM(**config.lstm_kwargs())
    module = make_lstmkit(config, oracle)
    params = list(module.parameters())
    x = make_input(replace(config, lengths=None))
    rows = config.num_layers * (2 if config.bidirectional else 1)
    h_out = config.proj_size or config.hidden_size
    shapes = (
        (config.seq_len, config.batch, h_out * rows // config.num_layers),
        (rows, config.batch, h_out),
        (rows, config.batch, config.hidden_size),
    )

    def nothing() -> None:
        module.zero_grad(set_to_none=True)
        out, h_n, c_n = _Nothing.apply(shapes, x, *params)
        (out.sum() + h_n.sum() + c_n.sum()).backward()

    def torch_step() -> None:
        oracle.zero_grad(set_to_none=True)
        out, (h_n, c_n) = oracle(x)
        (out.sum() + h_n.sum() + c_n.sum()).backward()

    train = time_interleaved({"floor": nothing, "torch": torch_step}, budget)
    module.eval()
    oracle.eval()
    one_step = x[:1]
    with torch.no_grad():
        infer = time_interleaved(
            {"one step": lambda: module(one_step), "torch": lambda: oracle(x)}, budget
        )
    return Floor(
        config.name,
        train["floor"].p50,
        train["torch"].p50,
        infer["one step"].p50,
        infer["torch"].p50,
    )


@dataclass(frozen=True)
class StepBound:
    """Lower bounds for a one-layer, one-direction batch-1 call: a step reads W_hh once, from
    the cache level that holds it, on one core or split over two (half the bytes each, plus half
    a round trip); x W_ih^T for all steps runs at both cores' FMA rate (from L1)."""

    w_hh_bytes: int
    one_core_s: float
    two_cores_s: float | None
    projection_s: float

    @property
    def step_s(self) -> float:
        return (
            self.one_core_s if self.two_cores_s is None else min(self.one_core_s, self.two_cores_s)
        )


def step_bound(
    config: BenchConfig, streams: dict[int, Stream], trip: float | None
) -> StepBound | None:
    """The bounds of ``config`` (fp32) from the measured rates; None unless it is a one-layer,
    one-direction batch-1 config without proj_size."""
    if config.batch != 1 or config.num_layers != 1 or config.bidirectional or config.proj_size:
        return None
    w_hh_bytes = 4 * 4 * config.hidden_size * config.hidden_size

    def rate(nbytes: float) -> float:  # bytes/s of the smallest probed buffer that holds them
        fits = [kb for kb in sorted(streams) if kb * 1024 >= nbytes] or [max(streams)]
        return streams[fits[0]].gb_per_s * 1e9

    one = w_hh_bytes / rate(w_hh_bytes)
    two = None if trip is None else w_hh_bytes / 2 / rate(w_hh_bytes / 2) + trip / 2
    fma_flops = 2 * streams[min(streams)].gflops * 1e9
    projection = 8 * config.hidden_size * config.input_size * config.seq_len / fma_flops
    return StepBound(w_hh_bytes, one, two, projection)


def measure(configs: list[BenchConfig], budget: Budget) -> Iterator[str]:
    """The report, line by line, as each measurement finishes."""
    streams: dict[int, Stream] = {}
    trip = None
    try:
        with tempfile.TemporaryDirectory(prefix="lstmkit-limits-") as directory:
            library = compile_probes(Path(directory))
            tier = machine.select(machine.machine())[0].name
            yield (
                f"one core, one FMA per {library.lk_vector_bytes()}-byte vector read (limits.c, "
                f"built for the kernels' tier, {tier}), median of {REPEATS} repeats:"
            )
            for kb in STREAM_KB:
                s = streams[kb] = stream(library, kb)
                yield (
                    f"  {kb:>5} KB buffer: {s.gb_per_s:6.1f} GB/s = {s.gflops:5.1f} GFLOP/s, "
                    f"{s.seconds_per_pass * 1e6:8.2f} us per pass"
                )
            trip = round_trip(library)
            if trip is None:
                yield "two threads: the second thread could not start"
            else:
                yield f"round trip between two threads through one cache line: {trip * 1e9:.0f} ns"
    except build.BuildError as error:
        yield f"  not measured: {error}"
    for config in configs:
        f = floor(config, budget)
        bound = step_bound(config, streams, trip) if streams else None
        if bound is not None:
            two = "" if bound.two_cores_s is None else f", two cores {bound.two_cores_s * 1e6:.2f}"
            least = f.one_step_s + config.seq_len * bound.step_s + bound.projection_s
            yield (
                f"{config.name}: a step reads {bound.w_hh_bytes / 1024:.0f} KB of W_hh: at least "
                f"one core {bound.one_core_s * 1e6:.2f}{two} us per step before any gate math; "
                f"x W_ih^T at least {bound.projection_s * 1e3:.3f} ms; with the fixed cost "
                f"below, an inference call takes at least {least * 1e3:.3f} ms: "
                f"{f.torch_inference_s / least:.2f}x torch's at most"
            )
        yield (
            f"{f.config} training: autograd floor {f.floor_s * 1e3:.3f} ms, torch.nn.LSTM "
            f"{f.torch_s * 1e3:.3f} ms: at most {f.cap:.2f}x for any LSTM behind an "
            "autograd.Function"
        )
        yield (
            f"{f.config} inference: lstmkit on one step {f.one_step_s * 1e3:.3f} ms (the fixed "
            f"cost of a call, plus one step), torch.nn.LSTM on all {config.seq_len} "
            f"{f.torch_inference_s * 1e3:.3f} ms"
        )


def run(configs: list[BenchConfig], budget: Budget, out: Callable[[str], None]) -> None:
    for line in measure(configs, budget):
        out(line)
