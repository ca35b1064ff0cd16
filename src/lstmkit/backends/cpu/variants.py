"""One layer with step variants (layer norm, peepholes, zoneout, recurrent dropout) through the
compiled variant kernels (variant.c): directly for inference, as an autograd Function for
training (gradients for x, h0, c0, every weight and every variant parameter; the masks are
inputs without gradient; first derivatives only)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from lstmkit.backends.cpu.function import (
    NO_DIRECTION,
    Param,
    addresses,
    first_derivatives_only,
    run,
    through_function,
)
from lstmkit.backends.cpu.library import GRADS, VARIANT, VARIANT_GRADS, Kernels
from lstmkit.reference import Variant

# The differentiable fields of Variant, in its (and lk_variant's) order.
PARAMS = (
    "ln_weight_ih",
    "ln_bias_ih",
    "ln_weight_hh",
    "ln_bias_hh",
    "ln_weight_c",
    "ln_bias_c",
    "weight_peephole",
)
_NO_VARIANT_DIRECTION = (0,) * 10 + (0.0, 0.0)


class Noise:
    """One layer's masks and zoneout probabilities, contiguous, in the dtype of x, with their
    packing for lk_variant; it keeps the masks alive while the C code holds their addresses."""

    def __init__(self, variants: list[Variant], like: Tensor) -> None:
        self.masks: list[tuple[Tensor | None, Tensor | None, Tensor | None]] = []
        self.keep: list[tuple[float, float]] = []
        for variant in variants:
            zoneout = [variant.zoneout_cell, variant.zoneout_hidden]
            self.masks.append(
                (
                    _contiguous(variant.recurrent_mask, like),
                    *(_contiguous(z, like) if isinstance(z, Tensor) else None for z in zoneout),
                )
            )
            self.keep.append(tuple(0.0 if isinstance(z, Tensor) else float(z) for z in zoneout))

    def pack(self, params: list[Param]) -> bytes:
        """lk_variant for every direction; ``params`` is each direction's PARAMS, flattened."""
        fields: list[int | float] = []
        for d, (masks, keep) in enumerate(zip(self.masks, self.keep)):
            fields += addresses(params[d * len(PARAMS) : (d + 1) * len(PARAMS)])
            fields += [*addresses(masks), *keep]
        if len(self.masks) == 1:
            fields += _NO_VARIANT_DIRECTION
        return VARIANT.pack(*fields)


def _contiguous(mask: Tensor | None, like: Tensor) -> Tensor | None:
    return None if mask is None else mask.to(like.dtype).contiguous()


def run_layer(
    kernels: Kernels,
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: list[Param],
    lengths: Tensor | None,
    cell_sequence: bool,
    variants: list[Variant],
) -> tuple[Tensor, ...]:
    """The layer with its variants, on contiguous x, h0, c0 and ``params`` (each direction's
    LayerWeights, flattened); differentiable where anything requires grad."""
    noise = Noise(variants, x)
    extras = [_param(getattr(v, name)) for v in variants for name in PARAMS]
    if through_function((x, h0, c0, *params, *extras)):
        return VariantLayerFunction.apply(
            kernels, lengths, cell_sequence, noise, x, h0, c0, *params, *extras
        )
    variant = noise.pack(extras)
    _, out, h_n, c_n, cells, _ = run(
        kernels, x, h0, c0, params, lengths, cell_sequence, training=False, variant=variant
    )
    return (out, h_n, c_n, cells) if cell_sequence else (out, h_n, c_n)


def _param(tensor: Tensor | None) -> Tensor | None:
    return None if tensor is None else tensor.contiguous()


class VariantLayerFunction(torch.autograd.Function):
    """``apply(kernels, lengths, cell_sequence, noise, x, h0, c0, *params, *extras)`` -> out,
    h_n, c_n[, cells]: ``params`` each direction's LayerWeights, ``extras`` each direction's
    variant parameters (PARAMS), both flattened; every tensor contiguous."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        kernels: Kernels,
        lengths: Tensor | None,
        cell_sequence: bool,
        noise: Noise,
        x: Tensor,
        h0: Tensor,
        c0: Tensor,
        *tensors: Param,
    ) -> tuple[Tensor, ...]:
        directions = len(noise.masks)
        params, extras = list(tensors[: 5 * directions]), list(tensors[5 * directions :])
        variant = noise.pack(extras)
        layer, out, h_n, c_n, cells, saved = run(
            kernels, x, h0, c0, params, lengths, cell_sequence, training=True, variant=variant
        )
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, h0, c0, out, cells, *tensors)
        # The packed layer and variant hold addresses of these; ctx keeps them alive.
        ctx.kernels, ctx.layer, ctx.variant = kernels, layer, variant
        ctx.lengths, ctx.saved, ctx.noise = lengths, saved, noise
        if cell_sequence:
            return out, h_n, c_n, cells
        return out, h_n, c_n

    @staticmethod
    def backward(ctx: FunctionCtx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        x, h0, c0, _, _, *tensors = ctx.saved_tensors  # checks nothing was modified in place
        inputs = (x, h0, c0, *tensors)
        with torch.no_grad():
            result = _backward(ctx, inputs, grads)
        return None, None, None, None, *first_derivatives_only(result, inputs)


def _backward(
    ctx: FunctionCtx, inputs: tuple[Param, ...], grads: tuple[Tensor | None, ...]
) -> tuple[Tensor | None, ...]:
    """The C backward: gradients of x, h0, c0, every weight and every variant parameter (None
    where not needed)."""
    wanted = [
        torch.empty_like(t) if t is not None and need else None
        for t, need in zip(inputs, ctx.needs_input_grad[4:])
    ]
    directions = len(ctx.noise.masks)
    layer_grads, variant_grads = wanted[: 3 + 5 * directions], wanted[3 + 5 * directions :]
    incoming = [None if g is None else g.contiguous() for g in grads]
    incoming += [None] * (4 - len(incoming))  # no cell_sequence: no gradient of cells
    single = directions == 1
    packed = GRADS.pack(
        *addresses(incoming), *addresses(layer_grads), *(NO_DIRECTION if single else ())
    )
    packed_variant = VARIANT_GRADS.pack(
        *addresses(variant_grads), *((0,) * len(PARAMS) if single else ())
    )
    if ctx.kernels.variant_backward(ctx.layer, ctx.variant, packed, packed_variant) != 0:
        raise MemoryError("lstmkit cpu backend: out of memory for the backward workspace")
    return tuple(wanted)
