"""Dihedral augmentation of training chips.

A square chip seen rotated by 90/180/270 degrees or mirrored is still a valid aerial image (there
is no "up" from above), so each training chip can yield up to 7 more with every object's geometry
and box moved along. The task generators then run on the moved objects, so referring expressions
("the building in the top left"), boxes and region questions stay exact. Only training chips are
augmented; the held-back split is untouched.

Transform ``k`` (1-7): mirror left-right when ``k >= 4``, then rotate ``k % 4`` quarter turns
counter-clockwise, the same order for pixels (`dihedral_pixels`) and geometry (`dihedral_context`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from training.region import ChipContext, ChipObject, object_order
from training.samples import rng_for

NAMES = {1: "rot90", 2: "rot180", 3: "rot270", 4: "flip", 5: "flip-rot90", 6: "flip-rot180",
         7: "flip-rot270"}


def _check(k: int) -> None:
    if k not in NAMES:
        raise ValueError(f"dihedral transform {k!r}: choose 1-7")


def dihedral_pixels(pixels: Any, k: int) -> np.ndarray:
    """(H, W, ...) array seen through transform ``k``."""
    _check(k)
    out = np.asarray(pixels)
    if k >= 4:
        out = out[:, ::-1]
    return np.ascontiguousarray(np.rot90(out, k % 4, axes=(0, 1)))


def _affine(size: float, k: int) -> list[float]:
    """shapely affine matrix [a, b, d, e, xoff, yoff] of transform ``k`` in pixel coordinates
    (x right, y down, chip from 0 to ``size``)."""
    a, b, d, e, xo, yo = 1.0, 0.0, 0.0, 1.0, 0.0, 0.0
    if k >= 4:  # x -> size - x
        a, xo = -1.0, size
    for _ in range(k % 4):  # a counter-clockwise quarter turn of the image: (x, y) -> (y, size - x)
        a, b, d, e, xo, yo = d, e, -a, -b, yo, size - xo
    return [a, b, d, e, xo, yo]


def dihedral_context(ctx: ChipContext, k: int) -> ChipContext:
    """The chip's objects as they lie in the transformed chip (a new chip id ``<id>_d<k>``)."""
    import shapely
    from shapely import affinity

    _check(k)
    if ctx.width != ctx.height:
        raise ValueError(f"chip {ctx.chip_id}: dihedral augmentation needs a square chip, "
                         f"got {ctx.width}x{ctx.height}")
    m = _affine(float(ctx.width), k)
    objects: list[ChipObject] = []
    for o in ctx.objects:
        box = affinity.affine_transform(shapely.box(*o.box), m).bounds
        objects.append(dataclasses.replace(o, geom=affinity.affine_transform(o.geom, m),
                                           box=tuple(float(v) for v in box)))
    objects.sort(key=object_order)
    meta = {**ctx.meta, "augment": NAMES[k], "origin_chip": ctx.chip_id}
    return dataclasses.replace(ctx, chip_id=f"{ctx.chip_id}_d{k}", objects=objects, meta=meta)


def augment_choices(n: int, seed: int, region: str, chip_id: str) -> list[int]:
    """Which ``n`` of the 7 transforms a chip gets: a seeded draw per chip, so that over many
    chips each transform appears about equally often."""
    if not 0 <= n <= 7:
        raise ValueError(f"augment={n}: a chip has 7 other dihedral views (0-7)")
    if n == 7:
        return list(NAMES)
    return sorted(rng_for(seed, region, chip_id, "augment").sample(list(NAMES), n))
