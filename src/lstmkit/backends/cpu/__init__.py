"""The cpu backend: fused C kernels, forward and backward, on CPU tensors.

A small C library with a plain C ABI, compiled with the machine's compiler on first use or by
``lstmkit warmup`` and cached (:mod:`.build`), called through ctypes (:mod:`.library`):
``lstm.h``/``lstm.c`` (the ABI), ``real.h`` (per element type: vectors, tanh and sigmoid, GEMM),
``kernel.c`` (one plain layer; the design is in its header) and ``variant.c`` (one layer with
step variants: layer norm, peepholes, zoneout, recurrent dropout, in any combination).
Reached through torch ops (:mod:`.ops`) whose autograd is the C backward pass: one layer
(:mod:`.function`, with variants :mod:`.variants`), a whole plain stack (:mod:`.stack`).
float32 and float64; everything the reference covers: proj_size, bias=False, both
directions, lengths, cell_sequence, training and inference.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

from lstmkit.backends import Backend, Request
from lstmkit.backends.cpu import (
    autograd,
    build,
    function,
    library,
    machine,
    ops,
    route,
    stack,
    tuner,
)
from lstmkit.backends.cpu.variants import variant_lists
from lstmkit.reference import LayerWeights, Variant

DTYPES = (torch.float32, torch.float64)


class CpuBackend(Backend):
    name = "cpu"
    variants = frozenset({"layer_norm", "peepholes", "zoneout", "recurrent_dropout"})
    fused_stack = True

    @property
    def description(self) -> str:
        reason = library.failure()
        if reason is None:
            loaded = library.load()
            tier = loaded.tier
            narrow = (
                f"; {machine.NARROW_BYTES}-byte ones for layers of few units"
                if loaded.narrow
                else ""
            )
            state = (
                f"tier {tier.name} ({tier.vector_bytes}-byte vectors, {tier.registers} "
                f"registers{', tuned for this CPU' if loaded.native else ''}"
                f"{narrow}): "
                f"{loaded.tier_reason}; GEMM: {loaded.blas}; kernels {loaded.origin}"
            )
        else:
            state = f"GEMM: none, the kernels are not built: {reason}"
        return (
            "fused C kernels (OpenMP, vectorised gates) built with the machine's C compiler; "
            f"float32 and float64 on CPU (bfloat16 and float16 computed in float32); {state}"
        )

    def details(self) -> list[str]:
        lines = machine.describe(machine.machine())
        if library.failure() is None:
            loaded = library.load()
            lines += [f"plan: {line}" for line in loaded.plan.describe()]
            lines.append(
                f"clock of the waits: {library.ticks_per_ns(loaded):.3g} ticks per ns "
                "(the time-stamp counter where there is one, measured when loaded)"
            )
            lines.append(f"choices: {loaded.tuning}")
            kept = tuner.stored(loaded.path)[0]
            lines += [f"  {line}" for line in kept.describe()] if kept is not None else []
        return lines

    def unavailable_reason(self, request: Request) -> str | None:
        if request.device_type != "cpu":
            return f"runs on CPU tensors only, not {request.device_type}"
        if request.dtype not in DTYPES:
            return f"supports float32 and float64 only, not {str(request.dtype).split('.')[-1]}"
        if torch._C._are_functorch_transforms_active():
            reason = func_transform_reason(request.requires_grad)
            if reason is not None:
                return reason
        return library.failure()

    def warmup(self) -> str:
        try:
            loaded = library.load()
        except build.BuildError as error:
            return f"cannot build the kernels: {error}"
        if tuner.stored(loaded.path)[0] is None:
            tuner.tune(progress=lambda line: print(f"cpu: tuning: {line}...", flush=True))
            loaded = library.load()
        return f"kernels {loaded.origin}; GEMM: {loaded.blas}; {loaded.tuning}"

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
        params = [w for layer in weights for w in layer]
        variant_params, masks, keep = [], [], []
        if variants is not None:
            variant_params, masks, keep = variant_lists(variants, x)
        training = torch.is_grad_enabled() and _needs_grad((x, h0, c0, *params, *variant_params))
        lengths = _lengths(lengths)
        if route.direct(x, training):
            out, h_n, c_n, cells, _ = function.forward(
                x, h0, c0, params, lengths, variant_params, masks, keep, cell_sequence, False
            )
        else:
            out, h_n, c_n, cells, _ = ops.layer(
                x, h0, c0, _present(params, x), lengths, variant_params, masks, keep,
                cell_sequence, training,
            )  # fmt: skip
        return (out, h_n, c_n, cells) if cell_sequence else (out, h_n, c_n)

    def run_stack(
        self,
        x: Tensor,
        h0: Tensor,
        c0: Tensor,
        weights: list[list[LayerWeights]],
        lengths: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        params = [w for ws in weights for d in ws for w in d]
        training = torch.is_grad_enabled() and _needs_grad((x, h0, c0, *params))
        lengths, directions = _lengths(lengths), len(weights[0])
        if route.direct(x, training):
            out, h_n, c_n, _ = stack.forward(x, h0, c0, params, lengths, directions, False)
        elif training and route.direct(x, False):
            out, h_n, c_n = autograd.EagerStack.apply(x, h0, c0, lengths, directions, *params)
        else:
            out, h_n, c_n, _ = ops.stack_op(
                x, h0, c0, _present(params, x), lengths, directions, training
            )
        return out, h_n, c_n


def func_transform_reason(requires_grad: bool) -> str | None:
    """Why the kernels' ops cannot run under the torch.func transforms now active, or
    ``None``: torch differentiates a custom op with tensor-list inputs through an
    autograd.Function without the setup_context torch.func needs, and the ops have no
    forward-mode derivative; vmap of a call autograd does not see is fine (the ops' batching
    rules)."""
    transforms = {i.key() for i in retrieve_all_functorch_interpreters()}
    if transforms <= {TransformType.Vmap} and not requires_grad:
        return None
    return (
        "under torch.func's grad, jacrev, jvp (or vmap of a call that autograd records) "
        "its ops cannot be differentiated; the reference can"
    )


def _present(tensors: list[Tensor | None], like: Tensor) -> list[Tensor]:
    """The ops' tensor list: an absent weight (no bias, no projection) as an empty tensor (the
    implementations called directly take ``None`` as well)."""
    if all(t is not None for t in tensors):
        return tensors
    empty = like.new_empty(0)
    return [empty if t is None else t for t in tensors]


def _lengths(lengths: Tensor | None) -> Tensor | None:
    return None if lengths is None else lengths.to(torch.int64).contiguous()


def _needs_grad(tensors: tuple[Tensor | None, ...]) -> bool:
    """Whether, with grad mode on, autograd will differentiate the call: then the forward
    keeps what backward needs."""
    return any(t is not None and t.requires_grad for t in tensors)


BACKEND = CpuBackend()
