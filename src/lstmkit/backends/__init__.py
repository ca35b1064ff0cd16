"""Backends: who runs the recurrence, and how one is chosen.

A backend runs one LSTM layer (every direction of it) on canonical tensors: time-major,
contiguous, with states already resolved by :mod:`lstmkit.functional`. Before it is used it
answers :meth:`Backend.unavailable_reason` for the call at hand with ``None`` or a sentence a
person can act on.

Choice, per call: the ``LSTMKIT_BACKEND`` environment variable, read at call time, names one
backend, which must be able to run the call or the call raises with its reason. Otherwise the
first backend in :data:`PREFERENCE` that can run it is used; the reasons the others gave are
kept and can be read back with :func:`last_choice` or seen with ``lstmkit backends``.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from lstmkit import env
from lstmkit.reference import LayerWeights, Variant

BACKEND_ENV = "LSTMKIT_BACKEND"

# Backends in order of preference; each module defines ``BACKEND``. Imported on first use.
PREFERENCE: tuple[str, ...] = ("cpu", "reference")
_MODULES = {name: f"lstmkit.backends.{name}" for name in PREFERENCE}


class Request(NamedTuple):
    """What a forward call needs from a backend, resolved before any backend is asked (a
    named tuple: made on every call, and cheaper to make than a frozen dataclass)."""

    device_type: str
    dtype: torch.dtype
    requires_grad: bool
    bidirectional: bool
    proj: bool
    variable_lengths: bool
    variants: frozenset[str] = frozenset()


class Backend:
    """A way to run one LSTM layer. Subclasses set ``name`` and implement both methods."""

    name: str = ""
    description: str = ""
    # The step variants (see LSTMSpec.step_variants) this backend implements.
    variants: frozenset[str] = frozenset()
    # Whether run_stack is implemented (else stacks run layer by layer through run_layer).
    fused_stack: bool = False

    def unavailable_reason(self, request: Request) -> str | None:
        """``None`` if this backend can run ``request``, else why not, in one sentence."""
        raise NotImplementedError

    def details(self) -> list[str]:
        """Facts behind this backend's plans (the machine, for the cpu backend), a line each."""
        return []

    def warmup(self) -> str:
        """Do any one-time work (compiling, loading) now; say what was done."""
        return "nothing to prepare"

    def run_layer(
        self,
        x: Tensor,
        h0: Tensor,
        c0: Tensor,
        weights: list[LayerWeights],
        lengths: Tensor | None,
        cell_sequence: bool = False,
        variants: list[Variant] | None = None,
    ) -> tuple[Tensor, ...]:
        """Run one layer, every direction, differentiably.

        Args:
            x: (L, N, I) contiguous input.
            h0: (D, N, P) initial hidden states, one per direction.
            c0: (D, N, H) initial cell states.
            weights: D entries, forward direction first.
            lengths: ``None`` when every sequence has L steps, else an (N,) int64 tensor on
                the CPU, sorted in non-increasing order, each value in [0, L] (0 is allowed:
                that sequence's output is all zeros and its final state is its initial one).
            cell_sequence: also return every step's cell state.
            variants: D entries of the variants' parameters and noise (see
                :class:`lstmkit.reference.Variant`), passed only when the call uses a variant
                this backend lists in ``variants``.

        Returns:
            output (L, N, D*P) with zeros at padded steps, h_n (D, N, P), c_n (D, N, H), and
            with ``cell_sequence`` the cells (L, N, D*H), zeros at padded steps. Gradients
            flow to x, h0, c0 and every weight from all of these.
        """
        raise NotImplementedError

    def run_stack(
        self,
        x: Tensor,
        h0: Tensor,
        c0: Tensor,
        weights: list[list[LayerWeights]],
        lengths: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run every layer of a plain stack at once, differentiably (only with
        ``fused_stack``). Plain: no step variant, no dropout between layers, no per-layer
        sequences; the arguments are as for :meth:`run_layer`, with
        ``weights[layer][direction]``.

        Shape: x (L, N, H_in), h0 (num_layers*D, N, P), c0 (num_layers*D, N, H) -> output
        (L, N, D*P), h_n and c_n like h0 and c0.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class Choice:
    """The backend a call used and why the ones preferred to it were passed over."""

    backend: str
    forced: bool
    passed_over: tuple[tuple[str, str], ...]

    def __str__(self) -> str:
        how = f"forced by {BACKEND_ENV}" if self.forced else "chosen"
        lines = [f"{self.backend} ({how})"]
        lines += [f"  {name} not used: {reason}" for name, reason in self.passed_over]
        return "\n".join(lines)


_loaded: dict[str, Backend] = {}
_last = threading.local()


def get(name: str) -> Backend:
    """The backend called ``name``; ``ValueError`` naming the known ones if there is none."""
    if name not in _MODULES:
        known = ", ".join(PREFERENCE)
        raise ValueError(f"unknown lstmkit backend {name!r}; known backends: {known}")
    backend = _loaded.get(name)
    if backend is None:
        backend = importlib.import_module(_MODULES[name]).BACKEND
        _loaded[name] = backend
    return backend


def forced_name() -> str:
    """The backend ``LSTMKIT_BACKEND`` names now, or ``""``."""
    return env.read(BACKEND_ENV)


def _reason(backend: Backend, request: Request) -> str | None:
    missing = request.variants - backend.variants
    if missing:
        return f"does not implement the variant(s) {', '.join(sorted(missing))}"
    return backend.unavailable_reason(request)


def choose(request: Request) -> Backend:
    """Pick the backend for ``request`` (see the module docstring) and remember why.

    Under torch.compile and torch.export the choice (which may import, build and load a
    backend) is made once, at trace time, outside the traced code: the compiled graph keeps
    the backend chosen then.
    """
    if torch.compiler.is_compiling():
        return _loaded[_choose_while_tracing(*request)]
    return _choose(request)


def _choose_while_tracing(*fields: object) -> str:
    return _choose(Request(*fields)).name


# torch.compiler.assume_constant_result(_choose_while_tracing), without what calling it costs:
# it imports torch._dynamo (about a second, and some 120,000 objects that every full garbage
# collection walks from then on, which slows every small eager call of a process that never
# compiles). The decorator sets this attribute, which dynamo reads when it meets the call;
# tests/test_compile.py fails if it stops working.
_choose_while_tracing._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _choose(request: Request) -> Backend:
    forced = forced_name()
    if forced:
        backend = get(forced)
        reason = _reason(backend, request)
        if reason is not None:
            raise RuntimeError(
                f"{BACKEND_ENV}={forced} asks for the {forced!r} backend, which cannot run "
                f"this call: {reason}. Unset {BACKEND_ENV} to let lstmkit choose."
            )
        _last.choice = _plain_choice(forced, True)
        return backend
    passed_over: list[tuple[str, str]] = []
    for name in PREFERENCE:
        backend = get(name)
        reason = _reason(backend, request)
        if reason is None:
            _last.choice = (
                Choice(name, False, tuple(passed_over)) if passed_over else _plain_choice(name)
            )
            return backend
        passed_over.append((name, reason))
    reasons = "; ".join(f"{n}: {r}" for n, r in passed_over)
    raise RuntimeError(f"no lstmkit backend can run this call ({reasons})")


_plain_choices: dict[tuple[str, bool], Choice] = {}


def _plain_choice(name: str, forced: bool = False) -> Choice:
    """The choice of ``name`` with nothing passed over, made once (it is frozen, and making
    one costs about half a microsecond on every call)."""
    choice = _plain_choices.get((name, forced))
    if choice is None:
        choice = _plain_choices[name, forced] = Choice(name, forced, ())
    return choice


def note_choice(choice: Choice | None) -> None:
    """Record a choice made after the forward call (a backward that ran another backend);
    ``None`` forgets the last one."""
    _last.choice = choice


def last_choice() -> Choice | None:
    """The choice made by the last forward call in this thread, or ``None`` before any."""
    return getattr(_last, "choice", None)
