"""Turning source bands into display RGB: band mapping and contrast stretch.

8-bit RGB passes through untouched. Anything else (16-bit, float, a single band, multispectral)
is mapped to three bands and stretched linearly between per-band percentiles, because models and
screens expect 8-bit true colour.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from tiles.errors import ImageryError

SUPPORTED_DTYPES = {
    "uint8",
    "int8",
    "uint16",
    "int16",
    "uint32",
    "int32",
    "uint64",
    "int64",
    "float16",
    "float32",
    "float64",
}
Stretch = list[tuple[float, float]]

# Descriptions seen in the wild for true-colour bands: plain names and Sentinel-2 band ids.
_NAME_PATTERNS = {
    "red": re.compile(r"^(red|r|b0?4|sr_b4|band_?red)$", re.I),
    "green": re.compile(r"^(green|g|b0?3|sr_b3|band_?green)$", re.I),
    "blue": re.compile(r"^(blue|b|b0?2|sr_b2|band_?blue)$", re.I),
}


def check_dtype(dtype: str) -> None:
    if str(dtype) not in SUPPORTED_DTYPES:
        raise ImageryError(
            f"Pixel type {dtype} is not supported (complex or unknown data cannot be shown); "
            "use a raster with integer or floating-point bands."
        )


def pick_bands(
    count: int,
    colorinterp: Sequence[str],
    descriptions: Sequence[str | None],
    bands: Sequence[int] | None = None,
) -> tuple[tuple[int, ...], str]:
    """Choose 1-based band indexes for R, G, B and say why.

    Order of preference: the caller's ``bands``; colour interpretation (red/green/blue);
    band descriptions (``red``, ``B04``...); a single grey band; the first three non-alpha bands.
    """
    if count < 1:
        raise ImageryError(
            "The raster has no bands (it may be a container of sub-datasets; "
            "open one of them instead)."
        )
    if bands is not None:
        if len(bands) not in (1, 3) or any(not 1 <= int(b) <= count for b in bands):
            raise ImageryError(
                f"Band mapping {list(bands)} is invalid for a raster with {count} "
                "band(s): give 1 or 3 band numbers between 1 and the band count."
            )
        chosen = tuple(int(b) for b in bands)
        return (chosen * 3 if len(chosen) == 1 else chosen), "requested"
    ci = [str(c).lower() for c in colorinterp]
    if all(name in ci for name in ("red", "green", "blue")):
        return tuple(ci.index(n) + 1 for n in ("red", "green", "blue")), "colour interpretation"
    desc = [(d or "").strip() for d in descriptions]
    found = {}
    for name, pat in _NAME_PATTERNS.items():
        for i, d in enumerate(desc):
            if pat.match(d):
                found[name] = i + 1
                break
    if len(found) == 3:
        return (found["red"], found["green"], found["blue"]), "band names"
    data_bands = [i + 1 for i, c in enumerate(ci) if c != "alpha"] or list(range(1, count + 1))
    if len(data_bands) < 3:
        return (data_bands[0],) * 3, "single band shown as grey"
    return tuple(data_bands[:3]), "first three bands (no colour names found)"


def alpha_band(colorinterp: Sequence[str]) -> int | None:
    ci = [str(c).lower() for c in colorinterp]
    return ci.index("alpha") + 1 if "alpha" in ci else None


def compute_stretch(
    data: np.ndarray, valid: np.ndarray | None, lo_pct: float = 2.0, hi_pct: float = 98.0
) -> Stretch:
    """Per-band ``(low, high)`` percentiles of the valid, finite pixels of ``data`` (H, W, B)."""
    out: Stretch = []
    for band in np.moveaxis(data, -1, 0):
        values = band[valid] if valid is not None else band.ravel()
        values = values[np.isfinite(values)] if values.dtype.kind == "f" else values
        if values.size > 1_000_000:  # percentiles of a sample are as good and much cheaper
            values = values[:: values.size // 1_000_000 + 1]
        if values.size == 0:
            out.append((0.0, 1.0))
            continue
        lo, hi = np.percentile(values, [lo_pct, hi_pct])
        if not hi > lo:
            lo, hi = float(values.min()), float(values.max())
        out.append((float(lo), float(hi) if hi > lo else float(lo) + 1.0))
    return out


def to_rgb8(data: np.ndarray, valid: np.ndarray | None, stretch: Stretch | None) -> np.ndarray:
    """(H, W, 3) bands -> (H, W, 3) uint8; invalid pixels become black.

    ``stretch=None`` means the data is already 8-bit display values and is only clipped.
    """
    if stretch is None:
        rgb = np.clip(data, 0, 255).astype(np.uint8) if data.dtype != np.uint8 else data
    else:
        rgb = np.empty(data.shape, dtype=np.uint8)
        for i, (lo, hi) in enumerate(stretch):
            scaled = (data[..., i].astype(np.float32) - lo) * (255.0 / (hi - lo))
            np.nan_to_num(scaled, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
            rgb[..., i] = np.clip(scaled, 0, 255)
    if valid is not None and not valid.all():
        rgb = rgb.copy() if rgb is data else rgb
        rgb[~valid] = 0
    return np.ascontiguousarray(rgb)


def apply_colormap(band: np.ndarray, colormap: dict[int, Sequence[int]]) -> np.ndarray:
    """A palette band (H, W) -> (H, W, 3) uint8 through its colour table."""
    lut = np.zeros((max(256, max(colormap) + 1), 3), dtype=np.uint8)
    for k, v in colormap.items():
        lut[k] = v[:3]
    return lut[np.clip(band, 0, len(lut) - 1).astype(np.intp)]
