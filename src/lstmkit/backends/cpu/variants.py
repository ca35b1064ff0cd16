"""Step variants (layer norm, peepholes, zoneout, recurrent dropout) for the variant kernels
(variant.c): each direction's :class:`lstmkit.reference.Variant` as the three lists the
``lstmkit::layer`` op takes, and their packing into lk_variant and lk_variant_grads.

Lists, per direction in turn: ``variant_params`` the differentiable fields (PARAMS),
``masks`` recurrent_mask, zoneout_cell and zoneout_hidden when they are 0/1 masks, ``keep`` the
two zoneout probabilities when they are numbers (evaluation). An absent tensor is an empty one
(address 0, NULL to the kernels).
"""

from __future__ import annotations

from torch import Tensor

from lstmkit.backends.cpu.library import VARIANT, VARIANT_GRADS
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
MASKS = 3  # recurrent_mask, zoneout_cell, zoneout_hidden
_NO_VARIANT_DIRECTION = (0,) * 10 + (0.0, 0.0)


def variant_lists(
    variants: list[Variant], like: Tensor
) -> tuple[list[Tensor], list[Tensor], list[float]]:
    """``variant_params``, ``masks`` (in the dtype of ``like``) and ``keep`` of each direction."""
    empty = like.new_empty(0)
    params: list[Tensor] = []
    masks: list[Tensor] = []
    keep: list[float] = []
    for variant in variants:
        params += [empty if t is None else t for t in (getattr(variant, n) for n in PARAMS)]
        for mask in (variant.recurrent_mask, variant.zoneout_cell, variant.zoneout_hidden):
            masks.append(mask.to(like.dtype) if isinstance(mask, Tensor) else empty)
        for z in (variant.zoneout_cell, variant.zoneout_hidden):
            keep.append(0.0 if isinstance(z, Tensor) else float(z))
    return params, masks, keep


def to_variants(params: list[Tensor], masks: list[Tensor], keep: list[float]) -> list[Variant]:
    """The inverse of :func:`variant_lists`: each direction's Variant (for the reference)."""
    variants = []
    for d in range(len(keep) // 2):
        fields = [_present(t) for t in params[d * len(PARAMS) : (d + 1) * len(PARAMS)]]
        mask, zoneout_cell, zoneout_hidden = masks[d * MASKS : (d + 1) * MASKS]
        variants.append(
            Variant(
                *fields,
                recurrent_mask=_present(mask),
                zoneout_cell=zoneout_cell if zoneout_cell.numel() else keep[2 * d],
                zoneout_hidden=zoneout_hidden if zoneout_hidden.numel() else keep[2 * d + 1],
            )
        )
    return variants


def _present(t: Tensor) -> Tensor | None:
    return t if t.numel() else None


def pack_variant(params: list[Tensor], masks: list[Tensor], keep: list[float]) -> bytes:
    """lk_variant for every direction, from contiguous tensors."""
    fields: list[int | float] = []
    for d in range(len(keep) // 2):
        fields += [t.data_ptr() for t in params[d * len(PARAMS) : (d + 1) * len(PARAMS)]]
        fields += [t.data_ptr() for t in masks[d * MASKS : (d + 1) * MASKS]]
        fields += keep[2 * d : 2 * d + 2]
    if len(keep) == 2:
        fields += _NO_VARIANT_DIRECTION
    return VARIANT.pack(*fields)


def variant_probe(key: tuple[object, ...]) -> bytes:
    """lk_variant with a non-NULL dummy address for each present tensor, for asking the
    kernels a size (they read which tensors are present, never their data). ``key``: the
    presence of every param, then of every mask, then ``keep`` (see function.variant_key)."""
    directions = len(key) // (len(PARAMS) + MASKS + 2)
    present = key[: directions * (len(PARAMS) + MASKS)]
    keep = key[directions * (len(PARAMS) + MASKS) :]
    params = [int(p) for p in present[: directions * len(PARAMS)]]
    masks = [int(m) for m in present[directions * len(PARAMS) :]]
    fields: list[int | float] = []
    for d in range(directions):
        fields += params[d * len(PARAMS) : (d + 1) * len(PARAMS)]
        fields += masks[d * MASKS : (d + 1) * MASKS]
        fields += [float(k) for k in keep[2 * d : 2 * d + 2]]
    if directions == 1:
        fields += _NO_VARIANT_DIRECTION
    return VARIANT.pack(*fields)


def pack_variant_grads(grads: list[Tensor | None]) -> bytes:
    """lk_variant_grads: the addresses of the variant parameters' gradients (0: not wanted)."""
    fields = [0 if g is None else g.data_ptr() for g in grads]
    if len(fields) == len(PARAMS):
        fields += [0] * len(PARAMS)
    return VARIANT_GRADS.pack(*fields)
