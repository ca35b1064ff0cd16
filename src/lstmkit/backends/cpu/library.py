"""The compiled kernels, loaded once per process and cpu target (ISA tier, see :mod:`.machine`),
and the layout of their arguments (lstm.h).

:func:`load` builds the library on first use (see :mod:`.build`), loads it and hands it the
GEMM it will call: ``sgemm_``/``dgemm_`` from the BLAS torch already loaded (MKL on x86-64
Linux), checked on a small product first, else the kernels' own loop.

The cache heals itself: a cached library is loaded only once it holds the bytes its build
recorded (:func:`.build.check`), loads, and agrees with the argument layout below. One that
fails is rebuilt in place; a cache directory that cannot be created or written, or a rebuild
that fails too, gives way to a private temporary directory; only a failure there makes the
backend unavailable (the reason is :func:`failure`). A rebuild or a temporary directory gives
one :class:`~.build.CacheWarning`, and :attr:`Library.origin` says what happened, for
``lstmkit backends``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import struct
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from lstmkit import env
from lstmkit.backends.cpu import build, machine, tuner

_ptr = ctypes.c_void_p
_int = ctypes.c_int64

# lk_layer and lk_grads of lstm.h, packed: every field is 8 bytes, sizes int64 and addresses
# uint64 (0 for NULL). Packing a struct.Struct costs well under a microsecond, building a
# ctypes.Structure several. lk_layer: T B I H P D threads, then the addresses of lengths x h0
# c0, the weights (direction-major, each direction as lstmkit.reference.LayerWeights: w_ih
# w_hh b_ih b_hh w_hr; zeros for a second direction that does not exist), out h_n c_n cells
# saved packed.
# lk_grads: d_out d_h_n d_c_n d_cells d_x d_h0 d_c0, then the weights' gradients likewise.
# lk_variant, per direction (zeros for an absent second one): the addresses of the variant
# parameters (as lstmkit.reference.Variant: ln_weight_ih ln_bias_ih ln_weight_hh ln_bias_hh
# ln_weight_c ln_bias_c weight_peephole), recurrent_mask zoneout_cell zoneout_hidden (masks),
# then the two zoneout keep probabilities as doubles. lk_variant_grads: the variant parameters'
# gradients, direction-major.
LAYER = struct.Struct("=7q20Q")
GRADS = struct.Struct("=17Q")
VARIANT = struct.Struct("=10Q2d10Q2d")
VARIANT_GRADS = struct.Struct("=14Q")
# lk_cell: N H I, then the addresses of x h w_ih w_hh b_ih b_hh c gates h_out c_out.
# lk_cell_grads: acts c_out d_h d_c d_gates d_c_prev db_ih db_hh d_x d_h_prev d_w_ih d_w_hh.
CELL = struct.Struct("=3q10Q")
CELL_GRADS = struct.Struct("=12Q")
# lk_plan: machine.Plan's fields as doubles, in its order.
PLAN = struct.Struct(f"={len(dataclasses.fields(machine.Plan))}d")
GEMM_ENV = "LSTMKIT_GEMM"  # "own" or "blas": the GEMM for every dtype, whatever was tuned
GEMMS = ("own", "blas")
DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class Kernels:
    """The entry points for one dtype."""

    forward: ctypes._CFuncPtr
    backward: ctypes._CFuncPtr
    saved_elems: ctypes._CFuncPtr
    packed_elems: ctypes._CFuncPtr
    tanh: ctypes._CFuncPtr
    sigmoid: ctypes._CFuncPtr
    variant_forward: ctypes._CFuncPtr
    variant_backward: ctypes._CFuncPtr
    variant_saved_elems: ctypes._CFuncPtr
    cell_forward: ctypes._CFuncPtr  # cell.c, one step of lstmkit.LSTMCell
    cell_backward: ctypes._CFuncPtr


@dataclass(frozen=True)
class Library:
    """The loaded library: where it is, how it was obtained, and its entry points."""

    path: Path
    origin: str  # how this process obtained it, in words: loaded, built or rebuilt, and why
    compiled_seconds: float | None  # None: found in the cache
    blas: str  # which GEMM the kernels call, in words
    kernels: dict[torch.dtype, Kernels]
    cdll: ctypes.CDLL
    tier: machine.Tier  # the ISA tier it is built for
    native: bool  # tuned for this very CPU (-march=native)
    tier_reason: str  # why that tier, in words
    plan: machine.Plan  # the thresholds handed to the kernels
    # kernel.c with machine.NARROW_BYTES vectors, where the tier's are wider (else empty)
    narrow: dict[torch.dtype, Kernels]
    gemm: dict[torch.dtype, str]  # per dtype "own" (lstmkit's, gemm.h) or "blas"
    tuning: str  # where the choices come from, in words (lstmkit.backends.cpu.tuner)
    chosen: dict[tuple[torch.dtype, int], Kernels] = dataclasses.field(default_factory=dict)
    # a narrow lane's time over a wide one's, as tuned (None: not measured; see narrow_pays)
    narrow_cost: float | None = None

    def kernels_for(self, dtype: torch.dtype, hidden: int) -> Kernels:
        """The plain kernels for a layer of ``hidden`` units (machine.narrow_pays); forward
        and backward of one layer must take the same."""
        chosen = self.chosen.get((dtype, hidden))
        if chosen is None:
            chosen = self.chosen[dtype, hidden] = self._kernels_for(dtype, hidden)
        return chosen

    def _kernels_for(self, dtype: torch.dtype, hidden: int) -> Kernels:
        narrow = self.narrow.get(dtype)
        if narrow is not None:
            item = dtype.itemsize
            wide, lanes = self.tier.vector_bytes // item, machine.NARROW_BYTES // item
            threads = torch.get_num_threads()
            if machine.narrow_pays(hidden, wide, lanes, threads, self.narrow_cost):
                return narrow
        return self.kernels[dtype]


_lock = threading.Lock()
# Per cpu target (LSTMKIT_CPU_TARGET: "native" or a tier's name): its library, or why not.
_libraries: dict[str, Library] = {}
_failures: dict[str, str] = {}


class _Rejected(Exception):
    """A library that must not be used; the message ends a sentence about it."""


class _CacheUnusable(Exception):
    """The cache gives no usable library; the message says why."""


def current_target() -> str:
    """The cpu target asked for now: ``$LSTMKIT_CPU_TARGET``, read at each call, or native."""
    return env.read(machine.TARGET_ENV) or "native"


def load(target: str | None = None) -> Library:
    """The library for ``target`` (default: :func:`current_target`), built and loaded on its
    first call; raises BuildError if it cannot be, or if this CPU cannot run that target."""
    if target is None:
        target = current_target()
    library = _libraries.get(target)
    if library is not None:
        return library
    warning = None
    with _lock:
        library = _libraries.get(target)
        if library is None:
            if target in _failures:
                raise build.BuildError(_failures[target])
            try:
                library, warning = _load(target)
            except (build.BuildError, RuntimeError, ValueError) as error:
                _failures[target] = str(error)
                raise build.BuildError(str(error)) from error
            _libraries[target] = library
    if warning is not None:
        # Given once the library is in place: where warnings are errors, later calls still run.
        warnings.warn(warning, build.CacheWarning, stacklevel=2)
    return library


def failure(target: str | None = None) -> str | None:
    """``None`` if the library for ``target`` loads (building it if needed), else why not."""
    try:
        load(target)
    except build.BuildError as error:
        return str(error)
    return None


def _load(target: str) -> tuple[Library, str | None]:
    """The library, and the warning to give about how it was obtained (or ``None``)."""
    tier, native, why_tier = machine.select(machine.machine(), target)
    flags = build.target_flags(tier, native)
    compiler = build.find_compiler()
    if compiler is None:
        raise build.BuildError("no C compiler found (set CC, or install gcc)")
    path = build.library_path(compiler, flags)
    try:
        cdll, origin, seconds, warning = _from_cache(compiler, path, flags)
    except _CacheUnusable as unusable:
        why = str(unusable)
        path, cdll, seconds = _build_privately(compiler, path.name, flags, why)
        origin = (
            f"built in the temporary directory {path.parent} ({seconds:.1f} s; removed at "
            f"exit) because {why}"
        )
        warning = (
            f"lstmkit cannot use its kernel cache: {why}. It built the cpu kernels in the "
            f"temporary directory {path.parent} for this process instead (removed at exit); "
            "set LSTMKIT_CACHE_DIR to a writable directory to build them once."
        )
    plan = machine.plan(machine.machine(), tier)
    gemm = {dtype: "blas" for dtype in DTYPES}
    kept, tuning = tuner.stored(path)
    narrow_cost = None
    if kept is not None:
        plan = kept.applied_to(plan)
        gemm = kept.gemm_choice()
        narrow_cost = kept.narrow_cost
    forced = env.read(GEMM_ENV)
    if forced:
        if forced not in GEMMS:
            raise ValueError(f"{GEMM_ENV}={forced!r} is not a GEMM; known: {', '.join(GEMMS)}")
        gemm = {dtype: forced for dtype in DTYPES}
        tuning += f"; GEMM {forced} for every dtype as {GEMM_ENV} asks"
    blas = _set_blas(cdll, gemm)
    _set_plan(cdll, plan)
    kernels = _kernels(cdll)
    narrow = _kernels(cdll, "_narrow") if tier.vector_bytes > machine.NARROW_BYTES else {}
    library = Library(
        path,
        origin,
        seconds,
        blas,
        kernels,
        cdll,
        tier,
        native,
        why_tier,
        plan,
        narrow,
        gemm,
        tuning,
        narrow_cost=narrow_cost,
    )
    return library, warning


def _from_cache(
    compiler: str, path: Path, flags: tuple[str, ...]
) -> tuple[ctypes.CDLL, str, float | None, str | None]:
    """The library at ``path`` in the cache: loaded if :func:`_open` accepts it, else built
    there. Returns it, how it was obtained, the seconds spent compiling and the warning to
    give; raises _CacheUnusable if the cache cannot be written or its build is rejected too."""
    damage = None
    try:
        if path.exists():
            try:
                cdll = _open(path)
            except _Rejected as rejected:
                damage = str(rejected)
            else:
                build.mark_used(path)
                return cdll, f"loaded from the cache {path}", None, None
        seconds = _timed_build(compiler, path, flags)
    except OSError as error:
        unwritable = f"the cache directory {path.parent} cannot be created or written ({error})"
        why = (
            unwritable
            if damage is None
            else f"the cached library {path} {damage}, and {unwritable}"
        )
        raise _CacheUnusable(why) from error
    try:
        cdll = _open(path)
    except _Rejected as rejected:
        if damage is None:
            raise _CacheUnusable(f"the library built in the cache, {path}, {rejected}") from None
        raise _CacheUnusable(
            f"the cached library {path} {damage}, and rebuilt, it {rejected}"
        ) from None
    if damage is None:
        return cdll, f"built now in the cache {path} ({seconds:.1f} s)", seconds, None
    origin = f"rebuilt in the cache {path} ({seconds:.1f} s) because it {damage}"
    return cdll, origin, seconds, f"lstmkit rebuilt its cpu kernels {path}: it {damage}."


def _build_privately(
    compiler: str, name: str, flags: tuple[str, ...], why: str
) -> tuple[Path, ctypes.CDLL, float]:
    """The library built as ``name`` in a temporary directory of this process's own: its
    path, the library and the seconds compiling took; BuildError (with ``why``) if it fails."""
    try:
        path = build.temporary_dir() / name
        seconds = _timed_build(compiler, path, flags)
        return path, _open(path), seconds
    except (OSError, build.BuildError) as error:
        raise build.BuildError(
            f"{why}, and building in a temporary directory failed too: {error}"
        ) from error
    except _Rejected as rejected:
        raise build.BuildError(
            f"{why}, and the library built in a temporary directory, {path}, {rejected}"
        ) from rejected


def _timed_build(compiler: str, path: Path, flags: tuple[str, ...]) -> float:
    start = time.perf_counter()
    build.build(compiler, path, flags)
    return time.perf_counter() - start


def _open(path: Path) -> ctypes.CDLL:
    """The library at ``path``, loaded once it holds the bytes its build recorded; raises
    _Rejected if it does not, cannot be loaded, or does not match lstmkit's argument layout."""
    try:
        damage = build.check(path)
    except OSError as error:
        damage = f"cannot be read ({error})"
    if damage is not None:
        raise _Rejected(damage)
    try:
        cdll = ctypes.CDLL(str(path))
    except OSError as error:
        raise _Rejected(f"cannot be loaded ({error})") from error
    sizes = (
        cdll.lk_layer_bytes(),
        cdll.lk_grads_bytes(),
        2 * cdll.lk_variant_bytes(),  # one per direction
        cdll.lk_variant_grads_bytes(),
        cdll.lk_plan_bytes(),
    )
    packed = (LAYER.size, GRADS.size, VARIANT.size, VARIANT_GRADS.size, PLAN.size)
    if sizes != packed:
        raise _Rejected(
            f"does not match this lstmkit: its lk_layer, lk_grads, two lk_variant, "
            f"lk_variant_grads and lk_plan take {sizes} bytes, lstmkit packs {packed}"
        )
    return cdll


def _kernels(cdll: ctypes.CDLL, width: str = "") -> dict[torch.dtype, Kernels]:
    """The entry points for each dtype; ``width`` "_narrow": kernel.c's narrow copy (with the
    one variant.c, which has no second width)."""
    layer, grads = ctypes.c_char_p, ctypes.c_char_p  # packed LAYER and GRADS
    variant, variant_grads = ctypes.c_char_p, ctypes.c_char_p  # VARIANT and VARIANT_GRADS
    cell, cell_grads = ctypes.c_char_p, ctypes.c_char_p  # CELL and CELL_GRADS
    return {
        dtype: Kernels(
            forward=_function(cdll, f"lk_forward_{suffix}{width}", ctypes.c_int, [layer]),
            backward=_function(cdll, f"lk_backward_{suffix}{width}", ctypes.c_int, [layer, grads]),
            saved_elems=_function(cdll, f"lk_saved_elems_{suffix}{width}", ctypes.c_int64, [layer]),
            packed_elems=_function(
                cdll, f"lk_packed_elems_{suffix}{width}", ctypes.c_int64, [layer]
            ),
            tanh=_function(cdll, f"lk_tanh_{suffix}{width}", None, [_ptr, _ptr, ctypes.c_int64]),
            sigmoid=_function(
                cdll, f"lk_sigmoid_{suffix}{width}", None, [_ptr, _ptr, ctypes.c_int64]
            ),
            variant_forward=_function(
                cdll, f"lk_variant_forward_{suffix}", ctypes.c_int, [layer, variant]
            ),
            variant_backward=_function(
                cdll,
                f"lk_variant_backward_{suffix}",
                ctypes.c_int,
                [layer, variant, grads, variant_grads],
            ),
            variant_saved_elems=_function(
                cdll, f"lk_variant_saved_elems_{suffix}", ctypes.c_int64, [layer, variant]
            ),
            cell_forward=_function(cdll, f"lk_cell_forward_{suffix}", None, [cell]),
            cell_backward=_function(cdll, f"lk_cell_backward_{suffix}", None, [cell, cell_grads]),
        )
        for dtype, suffix in ((torch.float32, "f32"), (torch.float64, "f64"))
    }


def _function(cdll: ctypes.CDLL, name: str, restype: object, argtypes: list) -> ctypes._CFuncPtr:
    function = getattr(cdll, name)
    function.restype = restype
    function.argtypes = argtypes
    return function


def use_builtin_gemm(builtin: bool) -> str:
    """Make the kernels call lstmkit's own GEMM (``True``) or the BLAS found (``False``), for
    every dtype. Returns the choice in words. The tests use it to cover both."""
    choice = "own" if builtin else "blas"
    return configure(gemm={dtype: choice for dtype in DTYPES}).blas


_UNSET = object()


def configure(
    gemm: dict[torch.dtype, str] | None = None,
    plan: machine.Plan | None = None,
    tuning: str | None = None,
    narrow_cost: float | object | None = _UNSET,
) -> Library:
    """The loaded library for the current target, with its GEMMs (per dtype "own" or "blas")
    and its plan set to these where given. The tuner measures its candidates so, and the
    tests force each. Returns the library as now configured."""
    target = current_target()
    library = load(target)
    with _lock:
        library = _libraries[target]
        if gemm is not None:
            chosen = {**library.gemm, **gemm}
            blas = _set_blas(library.cdll, chosen)
            library = dataclasses.replace(library, gemm=chosen, blas=blas)
        if plan is not None:
            _set_plan(library.cdll, plan)
            library = dataclasses.replace(library, plan=plan)
        if tuning is not None:
            library = dataclasses.replace(library, tuning=tuning)
        if narrow_cost is not _UNSET:
            # for layer widths not yet chosen in this process: one chosen stays, so that the
            # backward of a graph recorded before takes the kernels its forward took
            library = dataclasses.replace(library, narrow_cost=narrow_cost)
        _libraries[target] = library
    return library


def _set_blas(cdll: ctypes.CDLL, gemm: dict[torch.dtype, str]) -> str:
    """Hands the kernels the GEMM of each dtype (the BLAS's where asked and found, else
    lstmkit's own); returns the choice in words."""
    cdll.lk_set_blas.argtypes = [_ptr, _ptr, _ptr]  # addresses: 64 bits, not a C int
    cdll.lk_set_blas.restype = None
    found = _find_blas()
    wants = [gemm.get(dtype, "blas") == "blas" for dtype in DTYPES]
    if found is None or not any(wants):
        cdll.lk_set_blas(None, None, None)
        why = "no working sgemm_/dgemm_ in torch's libraries" if found is None else "chosen"
        return f"lstmkit's own (gemm.h; {why})"
    sgemm, dgemm, threads, where = found
    cdll.lk_set_blas(sgemm if wants[0] else None, dgemm if wants[1] else None, threads)
    if all(wants):
        return where
    own = " and ".join(str(d).split(".")[-1] for d, w in zip(DTYPES, wants) if not w)
    return f"lstmkit's own for {own} (gemm.h; chosen), else {where}"


def blas_found() -> str | None:
    """The BLAS the kernels can call, in words, or ``None`` if torch's libraries have none."""
    found = _find_blas()
    return None if found is None else found[3]


def ticks_per_ns(library: Library) -> float:
    """The rate of the kernels' clock for short waits, as lk_set_plan measured it."""
    library.cdll.lk_ticks_per_ns.restype = ctypes.c_double
    return float(library.cdll.lk_ticks_per_ns())


def _set_plan(cdll: ctypes.CDLL, plan: machine.Plan) -> None:
    cdll.lk_set_plan.argtypes = [ctypes.c_char_p]
    cdll.lk_set_plan.restype = None
    cdll.lk_set_plan(PLAN.pack(*dataclasses.astuple(plan)))


@functools.cache
def _find_blas() -> tuple[int, int, int | None, str] | None:
    """Addresses of a working LP64 ``sgemm_``/``dgemm_`` in torch's own libraries, of MKL's
    per-thread thread-count setter if there is one, and where they are, in words."""
    kind = "MKL" if torch.backends.mkl.is_available() else "BLAS"
    lib_dir = Path(torch.__file__).resolve().parent / "lib"
    for path in sorted(lib_dir.glob("libtorch_cpu.*")):
        try:
            lib = ctypes.CDLL(str(path))
            sgemm, dgemm = lib.sgemm_, lib.dgemm_
        except (OSError, AttributeError):
            continue
        if _gemm_works(sgemm, ctypes.c_float) and _gemm_works(dgemm, ctypes.c_double):
            threads = getattr(lib, "MKL_Set_Num_Threads_Local", None)
            return (
                _address(sgemm),
                _address(dgemm),
                None if threads is None else _address(threads),
                f"{kind} sgemm_/dgemm_ from torch's {path.name}",
            )
    return None


def _address(function: ctypes._CFuncPtr) -> int:
    return ctypes.cast(function, _ptr).value


def _gemm_works(gemm: ctypes._CFuncPtr, real: type) -> bool:
    """Whether ``gemm``, given 32-bit sizes as the kernels pass them (torch's BLAS is LP64),
    squares [[1, 2], [3, 4]] right."""
    matrix = (real * 4)(1, 3, 2, 4)  # column-major
    result = (real * 4)(-1, -1, -1, -1)
    two = ctypes.c_int(2)
    one, zero = real(1), real(0)
    trans = ctypes.c_char_p(b"N")
    size = ctypes.byref(two)
    gemm.restype = None
    gemm(
        trans,
        trans,
        size,
        size,
        size,
        ctypes.byref(one),
        matrix,
        size,
        matrix,
        size,
        ctypes.byref(zero),
        result,
        size,
    )
    return list(result) == [7.0, 15.0, 10.0, 22.0]
