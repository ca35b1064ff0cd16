"""The cpu backend: fused C kernels, forward and backward, on CPU tensors.

A small C library with a plain C ABI, compiled with the machine's compiler on first use or by
``lstmkit warmup`` and cached (:mod:`.build`), called through ctypes (:mod:`.library`):
``lstm.h``/``lstm.c`` (the ABI), ``real.h`` (per element type: vectors, tanh and sigmoid, GEMM),
``kernel.c`` (one plain layer; the design is in its header) and ``variant.c`` (one layer with
step variants: layer norm, peepholes, zoneout, recurrent dropout, in any combination).
Differentiated by autograd Functions whose backward is the C backward pass: one layer
(:mod:`.function`), a whole plain stack (:mod:`.stack`), a layer with variants
(:mod:`.variants`). float32 and float64; everything the reference covers: proj_size,
bias=False, both directions, lengths, cell_sequence, training and inference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lstmkit.backends import Backend, Request
from lstmkit.backends.cpu import build, library, machine
from lstmkit.backends.cpu import variants as variants_module
from lstmkit.backends.cpu.function import LayerFunction, run, through_function
from lstmkit.backends.cpu.stack import StackFunction, run_stack
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
            state = (
                f"tier {tier.name} ({tier.vector_bytes}-byte vectors, {tier.registers} "
                f"registers{', tuned for this CPU' if loaded.native else ''}): "
                f"{loaded.tier_reason}; GEMM: {loaded.blas}; kernels {loaded.origin}"
            )
        else:
            state = f"GEMM: none, the kernels are not built: {reason}"
        return (
            "fused C kernels (OpenMP, vectorised gates) built with the machine's C compiler; "
            f"float32 and float64 on CPU; {state}"
        )

    def details(self) -> list[str]:
        lines = machine.describe(machine.machine())
        if library.failure() is None:
            lines += [f"plan: {line}" for line in library.load().plan.describe()]
        return lines

    def unavailable_reason(self, request: Request) -> str | None:
        if request.device_type != "cpu":
            return f"runs on CPU tensors only, not {request.device_type}"
        if request.dtype not in DTYPES:
            return f"supports float32 and float64 only, not {str(request.dtype).split('.')[-1]}"
        return library.failure()

    def warmup(self) -> str:
        try:
            loaded = library.load()
        except build.BuildError as error:
            return f"cannot build the kernels: {error}"
        return f"kernels {loaded.origin}; GEMM: {loaded.blas}"

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
        kernels = library.load().kernels[x.dtype]
        params = [None if w is None else w.contiguous() for layer in weights for w in layer]
        x, h0, c0 = x.contiguous(), h0.contiguous(), c0.contiguous()
        if lengths is not None:
            lengths = lengths.to(torch.int64).contiguous()
        if variants is not None:
            return variants_module.run_layer(
                kernels, x, h0, c0, params, lengths, cell_sequence, variants
            )
        if through_function((x, h0, c0, *params)):
            return LayerFunction.apply(kernels, lengths, cell_sequence, x, h0, c0, *params)
        _, out, h_n, c_n, cells, _ = run(
            kernels, x, h0, c0, params, lengths, cell_sequence, training=False
        )
        return (out, h_n, c_n, cells) if cell_sequence else (out, h_n, c_n)

    def run_stack(
        self,
        x: Tensor,
        h0: Tensor,
        c0: Tensor,
        weights: list[list[LayerWeights]],
        lengths: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        kernels = library.load().kernels[x.dtype]
        params = [None if w is None else w.contiguous() for ws in weights for d in ws for w in d]
        x, h0, c0 = x.contiguous(), h0.contiguous(), c0.contiguous()
        directions = len(weights[0])
        if lengths is not None:
            lengths = lengths.to(torch.int64).contiguous()
        if through_function((x, h0, c0, *params)):
            return StackFunction.apply(kernels, lengths, directions, x, h0, c0, *params)
        return run_stack(kernels, x, h0, c0, params, directions, lengths)


BACKEND = CpuBackend()
