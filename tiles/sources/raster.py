"""Local rasters through rasterio: GeoTIFF/COG and anything GDAL reads.

Reads are windowed and ask GDAL for the output shape, so GDAL picks the overview level that
fits: a 512 px chip of a 40000 px COG touches a handful of overview tiles, never the whole file.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine

from tiles import display, geometry, limits
from tiles.chip import Chip
from tiles.errors import ImageryError
from tiles.sources.base import (
    MAX_CHIP_SIDE,
    MAX_SOURCE_PIXELS,
    Bounds,
    Size,
    Source,
    check_bbox,
    chip_grid,
    intersects,
    output_shape,
    split_window,
)

log = logging.getLogger(__name__)

#: Pixels read (from overviews when there are some) to compute a source-wide stretch.
STATS_SIZE = 512
#: GDAL's block cache defaults to 5 % of RAM; chips touch a few blocks each, so a small cache
#: keeps a long session's memory flat. ``GDAL_CACHEMAX`` in the environment wins.
BLOCK_CACHE_BYTES = 64 * 2**20
_gdal_configured = False


def configure_gdal() -> None:
    global _gdal_configured
    if not _gdal_configured:
        _gdal_configured = True
        if "GDAL_CACHEMAX" not in os.environ:
            from rasterio.env import set_gdal_config

            set_gdal_config("GDAL_CACHEMAX", BLOCK_CACHE_BYTES)


#: GDAL drivers that decode the whole picture on the first read, whatever the window.
WHOLE_DECODE_DRIVERS = {"WEBP", "GIF"}


def _png_interlaced(path: str) -> bool:
    """Interlaced (Adam7) PNGs are decoded whole by GDAL; Pillow tells from the header."""
    try:
        from PIL import Image

        with Image.open(path) as img:
            return bool(img.info.get("interlace"))
    except Exception:  # unreadable by Pillow: GDAL's own errors will say why
        return False


class NotARasterError(ImageryError):
    """GDAL cannot open the file at all (`open_source` then tries Pillow)."""


def _rio_error(exc: Exception, name: str, doing: str) -> ImageryError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ImageryError(
        f"Could not {doing} {name!r}: the file may be truncated or corrupt ({first})."
    )


class RasterSource(Source):
    """A raster file opened with rasterio.

    ``bands``: 1-based band numbers for R, G, B (or one band for grey); default true colour by
    colour interpretation or band names. ``stretch``: per-band ``(low, high)`` for non-8-bit
    data; default the 2-98 % percentiles over the whole source (from overviews).
    """

    #: Filter from the overview level to the chip: "bilinear" (the default; antialiased: an area
    #: average when reducing, bilinear when enlarging) or "nearest" (cheaper per chip, what
    #: rio-tiler does by default; blockier).
    resampling: str = "bilinear"

    def __init__(
        self,
        path: str | Path,
        *,
        bands: Sequence[int] | None = None,
        stretch: Sequence[tuple[float, float]] | None = None,
        name: str | None = None,
    ) -> None:
        import rasterio
        from rasterio.errors import RasterioError

        configure_gdal()
        # One GDAL dataset handle must not be read from two threads at once (the UI serves
        # several sessions from threads); chips of one source are serialised.
        self._lock = threading.Lock()
        self.path = str(path)
        self.name = name or Path(self.path).name
        self._stack = ExitStack()
        try:
            self._ds = self._stack.enter_context(rasterio.open(self.path))
        except RasterioError as exc:
            raise NotARasterError(
                f"{self.name!r} is not an image or raster this program can read, or it is "
                f"damaged or truncated ({str(exc).splitlines()[0] if str(exc) else exc})."
            ) from exc
        try:
            self._setup(bands, stretch)
        except Exception:
            self.close()
            raise

    def _setup(self, bands: Sequence[int] | None, stretch: Any) -> None:
        from rasterio.vrt import WarpedVRT

        ds = self._ds
        if ds.count < 1 or ds.width < 1 or ds.height < 1:
            raise ImageryError(
                f"{self.name!r} has no pixel data ({ds.count} bands, "
                f"{ds.width}x{ds.height} px); open one of its sub-datasets?"
            )
        for dt in set(ds.dtypes):
            display.check_dtype(dt)
        self._check_decode_memory()
        colorinterp = [c.name for c in ds.colorinterp]
        self.palette = None
        if ds.count == 1 and colorinterp[0] == "palette":
            try:
                self.palette = ds.colormap(1)
            except ValueError:
                self.palette = None
        self.rgb_bands, self.band_reason = display.pick_bands(
            ds.count, colorinterp, ds.descriptions, bands
        )
        self.alpha = display.alpha_band(colorinterp)
        self._mask_mode = self._pick_mask_mode()
        self._needs_stretch = self.palette is None and any(
            ds.dtypes[b - 1] != "uint8" for b in self.rgb_bands
        )
        self._stretch: list[tuple[float, float]] | None = (
            [tuple(map(float, s)) for s in stretch] if stretch is not None else None
        )
        if self._stretch is not None and len(self._stretch) == 1:
            self._stretch = self._stretch * 3

        self._reader = ds
        if ds.crs is None:
            self.crs = None
            self.bounds = (0.0, 0.0, float(ds.width), float(ds.height))
            log.debug("%s has no CRS: chips are in pixel space", self.name)
            return
        self.crs = geometry.as_crs(ds.crs)
        t = ds.transform
        if t.b != 0 or t.d != 0 or t.e > 0:
            # Rotated or south-up grids: a warped VRT presents them north-up, so windows are
            # plain rectangles again; its alpha band marks the corners outside the image.
            add_alpha = self.alpha is None and ds.nodata is None
            self._reader = self._stack.enter_context(WarpedVRT(ds, add_alpha=add_alpha))
            self._mask_mode = "mask"
        self.bounds = tuple(float(v) for v in self._reader.bounds)  # type: ignore[assignment]

    def _check_decode_memory(self) -> None:
        """Refuse files whose smallest read would blow the decode budget (`tiles.limits`): one
        huge compressed strip or tile, or a driver that decodes the whole picture at once."""
        ds = self._ds
        if ds.driver in WHOLE_DECODE_DRIVERS or (ds.driver == "PNG" and _png_interlaced(ds.name)):
            limits.check_whole_decode(self.name, ds.width, ds.height, ds.driver)
            return
        rows, cols = ds.block_shapes[0]
        interleaved = ds.count if ds.profile.get("interleave") == "pixel" else 1
        block = rows * cols * interleaved * max(np.dtype(d).itemsize for d in ds.dtypes)
        if block > limits.max_block_bytes():
            raise ImageryError(
                f"{self.name!r} is stored in blocks of {cols}x{rows} px x {interleaved} band(s) "
                f"({limits.describe_mb(block)} each, limit {limits.describe_mb(limits.max_block_bytes())}"
                "): reading any part of it would decompress a whole block. Save it tiled "
                "(`gdal_translate -co TILED=YES` or `-of COG`)."
            )

    def _pick_mask_mode(self) -> str:
        """How to tell valid pixels: an alpha band, GDAL's mask band, nodata values, or not at all.

        Decided once, because asking GDAL for a dataset mask on every chip is slow (it can read
        the mask at full resolution, ignoring overviews).
        """
        from rasterio.enums import MaskFlags

        if self.alpha is not None:
            return "alpha"
        flags = [self._ds.mask_flag_enums[b - 1] for b in set(self.rgb_bands)]
        if all(MaskFlags.all_valid in f for f in flags):
            return "none"
        if any(MaskFlags.nodata in f for f in flags) and self._ds.nodata is not None:
            return "nodata"
        return "mask"

    # --- info ---------------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        ds = self._ds
        info: dict[str, Any] = {
            "source": self.path,
            "kind": "raster",
            "driver": ds.driver,
            "width": ds.width,
            "height": ds.height,
            "count": ds.count,
            "dtype": ds.dtypes[0],
            "dtypes": list(ds.dtypes),
            "nodata": ds.nodata
            if ds.nodata is None or math.isfinite(ds.nodata)
            else str(ds.nodata),
            "colorinterp": [c.name for c in ds.colorinterp],
            "descriptions": list(ds.descriptions),
            "rgb_bands": list(self.rgb_bands),
            "band_mapping": self.band_reason,
            "georeferenced": self.georeferenced,
            "crs": self.crs.to_string() if self.crs else None,
            "bounds": list(self.bounds),
            "bounds_lonlat": list(self.bounds_lonlat) if self.crs else None,
            "resolution": list(self._reader.res) if self.crs else [1.0, 1.0],
            "overviews": ds.overviews(1),
            "block_shape": list(ds.block_shapes[0]),
            "compression": ds.profile.get("compress"),
        }
        if not self.georeferenced:
            info["note"] = "No coordinate reference system: pixel space only, no map location."
        return info

    # --- chips --------------------------------------------------------------------------------

    def chip(
        self,
        bbox: Sequence[float] | None = None,
        *,
        crs: Any = geometry.LONLAT,
        size: Size = 512,
        out_crs: Any = None,
    ) -> Chip:
        if self.crs is None:
            return self._chip_pixel_space(bbox, size)
        target = self.crs if out_crs is None else geometry.as_crs(out_crs)
        box = self.resolve_bbox(bbox, crs, target)
        out_w, out_h, transform = chip_grid(box, size)
        if geometry.same_crs(target, self.crs):
            data, valid, meta = self._read_bounds(box, out_w, out_h)
        else:
            data, valid, meta = self._read_reprojected(box, target, transform, out_w, out_h)
        pixels = self._to_rgb(data, valid)
        return Chip(
            pixels=pixels,
            crs=target,
            transform=transform,
            source=self.name,
            mask=None if valid.all() else valid,
            meta=meta,
        )

    def _chip_pixel_space(self, bbox: Sequence[float] | None, size: Size) -> Chip:
        x1, y1, x2, y2 = self.bounds if bbox is None else check_bbox(bbox)
        if not intersects((x1, y1, x2, y2), self.bounds):
            raise ImageryError(
                f"The pixel box {[x1, y1, x2, y2]} is outside the image "
                f"{self.name!r} ({self._ds.width}x{self._ds.height} px; it has no "
                "map location, so boxes are in pixels)."
            )
        out_w, out_h = output_shape(x2 - x1, y2 - y1, size)
        data, valid, meta = self._read_window(x1, y1, x2 - x1, y2 - y1, out_w, out_h)
        transform = Affine((x2 - x1) / out_w, 0, x1, 0, (y2 - y1) / out_h, y1)
        pixels = self._to_rgb(data, valid)
        return Chip(
            pixels=pixels,
            crs=None,
            transform=transform,
            source=self.name,
            mask=None if valid.all() else valid,
            meta=meta,
        )

    def _read_bounds(self, box: Bounds, out_w: int, out_h: int):
        from rasterio.windows import from_bounds

        win = from_bounds(*box, transform=self._reader.transform)
        return self._read_window(win.col_off, win.row_off, win.width, win.height, out_w, out_h)

    def _read_reprojected(
        self, box: Bounds, target: Any, transform: Affine, out_w: int, out_h: int
    ):
        """Read the covering area in the source CRS at about the chip's resolution, then warp.

        Reading first (windowed, through overviews) and warping the small array keeps memory
        bounded; warping straight from the file would read full-resolution pixels.
        """
        from rasterio.crs import CRS as RioCRS
        from rasterio.errors import RasterioError
        from rasterio.warp import Resampling, reproject

        src_box = geometry.transform_bounds(box, target, self.crs)
        clip = (
            max(src_box[0], self.bounds[0]),
            max(src_box[1], self.bounds[1]),
            min(src_box[2], self.bounds[2]),
            min(src_box[3], self.bounds[3]),
        )
        # A little oversampling so the warp's bilinear kernel has neighbours to work with.
        if not (clip[2] > clip[0] and clip[3] > clip[1]):
            raise ImageryError(f"The requested area does not overlap {self.name!r}.")
        side = min(int(max(out_w, out_h) * 1.25) + 2, MAX_CHIP_SIDE)
        read_w, read_h = output_shape(clip[2] - clip[0], clip[3] - clip[1], side)
        data, valid, meta = self._read_bounds(clip, read_w, read_h)
        src_t = Affine(
            (clip[2] - clip[0]) / read_w, 0, clip[0], 0, -(clip[3] - clip[1]) / read_h, clip[3]
        )
        src_crs = RioCRS.from_wkt(self.crs.to_wkt())
        dst_crs = RioCRS.from_wkt(geometry.as_crs(target).to_wkt())
        out = np.zeros((data.shape[2], out_h, out_w), dtype=data.dtype)
        out_valid = np.zeros((out_h, out_w), dtype=np.uint8)
        common = dict(
            src_transform=src_t, src_crs=src_crs, dst_transform=transform, dst_crs=dst_crs
        )
        try:
            reproject(
                np.ascontiguousarray(np.moveaxis(data, -1, 0)),
                out,
                resampling=Resampling.bilinear,
                **common,
            )
            reproject(valid.astype(np.uint8), out_valid, resampling=Resampling.nearest, **common)
        except (RasterioError, ValueError) as exc:
            raise ImageryError(
                f"Could not reproject {self.name!r} from {self.crs.to_string()} to "
                f"{geometry.as_crs(target).to_string()}: {exc}"
            ) from exc
        meta["reprojected_from"] = self.crs.to_string()
        return np.moveaxis(out, 0, -1), out_valid.astype(bool), meta

    def _read_window(
        self, col: float, row: float, width: float, height: float, out_w: int, out_h: int
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Bands ``self.rgb_bands`` of a float source window resampled to ``out_w`` x ``out_h``.

        Returns data (H, W, 3), valid mask (H, W) and read metadata.
        """
        reader = self._reader
        part = split_window(col, row, width, height, reader.width, reader.height, out_w, out_h)
        if part is None:
            raise ImageryError(f"The requested area does not overlap {self.name!r}.")
        h, w = part.r1 - part.r0, part.c1 - part.c0
        factor = self._overview_factor(part, w, h)
        window, read_shape, box = self._plan_read(part, factor, w, h)
        band, mask = self._read_bands(window, read_shape, box)
        if box is not None:
            nearest = self.palette is not None or self.resampling == "nearest"
            band, mask = _resize(band, mask, box, (w, h), nearest=nearest)
        if self.palette is not None:
            band = display.apply_colormap(band[..., 0], self.palette)
        if band.shape[:2] == (out_h, out_w):  # the usual case: the request is inside the source
            data = band
            valid = np.ones((out_h, out_w), dtype=bool) if mask is None else mask
        else:
            data = np.zeros((out_h, out_w, 3), dtype=band.dtype)
            valid = np.zeros((out_h, out_w), dtype=bool)
            data[part.r0 : part.r1, part.c0 : part.c1] = band
            valid[part.r0 : part.r1, part.c0 : part.c1] = True if mask is None else mask
        meta = {
            "overview_factor": factor,
            "bands": list(self.rgb_bands),
            "band_mapping": self.band_reason,
        }
        return data, valid, meta

    def _overview_factor(self, part: Any, w: int, h: int) -> int:
        """The coarsest overview no coarser than the output, refusing reads that would touch
        more than `MAX_SOURCE_PIXELS` source pixels."""
        scale = min(part.width / w, part.height / h)  # source pixels per output pixel
        factors = [f for f in (self._ds.overviews(1) or []) if f <= scale] or [1]
        touched = part.width * part.height / max(factors) ** 2
        if touched > MAX_SOURCE_PIXELS:
            raise ImageryError(
                f"This request would read {touched / 1e6:.0f} megapixels of {self.name!r} "
                "because the raster has no overviews at that scale. Ask for a smaller area, or "
                "add overviews once (`gdaladdo FILE 2 4 8 16 32 64`)."
            )
        return max(factors)

    def _read_bands(
        self, window: Any, read_shape: tuple[int, int], box: Any
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The RGB bands (read pixels, (H, W, 3)) of one planned read and their valid mask
        (None: all valid)."""
        from rasterio.enums import Resampling
        from rasterio.errors import RasterioError

        reader = self._reader
        indexes = sorted(
            set(self.rgb_bands) | ({self.alpha} if self._mask_mode == "alpha" else set())
        )
        # Exact overview reads are plain copies (nearest); GDAL resamples only in the fallback.
        resampling = (
            Resampling.nearest
            if box is not None or self.palette is not None or self.resampling == "nearest"
            else Resampling.bilinear
        )
        dtypes = {self._ds.dtypes[i - 1] for i in indexes}
        # Read straight into a pixel-interleaved (H, W, B) buffer: that is the layout Pillow
        # and the chip want, and it saves a copy per chip.
        buf = np.empty(
            (*read_shape, len(indexes)), dtype=dtypes.pop() if len(dtypes) == 1 else np.float64
        )
        pos = {b: i for i, b in enumerate(indexes)}
        with self._lock:
            try:
                reader.read(
                    indexes, window=window, out=np.moveaxis(buf, -1, 0), resampling=resampling
                )
                if self._mask_mode == "alpha":
                    mask = buf[..., pos[self.alpha]] > 0
                elif self._mask_mode == "mask":
                    mask = (
                        reader.read_masks(self.rgb_bands[0], window=window, out_shape=read_shape)
                        > 0
                    )
                elif self._mask_mode == "nodata":
                    nodata = self._ds.nodata
                    bands = buf[..., [pos[b] for b in set(self.rgb_bands)]]
                    nodata_px = np.isnan(bands) if math.isnan(nodata) else bands == nodata
                    mask = ~nodata_px.all(axis=-1)
                else:
                    mask = None
            except RasterioError as exc:
                raise _rio_error(exc, self.name, "read pixels of") from exc
        order = [pos[b] for b in self.rgb_bands]
        band = buf if order == list(range(buf.shape[-1])) else buf[..., order]
        if band.dtype.kind == "f":
            finite = np.isfinite(band).all(axis=-1)
            mask = finite if mask is None else mask & finite
        return band, mask

    def _plan_read(self, part: Any, factor: int, w: int, h: int):
        """Window, read shape and crop box (in read pixels) for one read.

        On a plain file we read the window aligned to the chosen overview's pixel grid at that
        overview's exact size (GDAL then copies overview blocks, the fast path) and resize in
        Pillow with an antialiasing filter, cropping to the exact float window: exact bounds,
        fast, and good-looking. When that array would be much larger than the chip (no
        suitable overview), GDAL resamples while reading instead, so memory stays small.
        """
        from rasterio.windows import Window

        reader = self._reader
        if reader is self._ds:
            f = factor
            a0, b0 = math.floor(part.col / f) * f, math.floor(part.row / f) * f
            a1 = min(math.ceil((part.col + part.width) / f) * f, reader.width)
            b1 = min(math.ceil((part.row + part.height) / f) * f, reader.height)
            rw, rh = max(1, math.ceil((a1 - a0) / f)), max(1, math.ceil((b1 - b0) / f))
            if rw * rh <= 5 * w * h + 4096:
                box = (
                    (part.col - a0) / f,
                    (part.row - b0) / f,
                    (part.col + part.width - a0) / f,
                    (part.row + part.height - b0) / f,
                )
                return Window(a0, b0, a1 - a0, b1 - b0), (rh, rw), box
        return Window(part.col, part.row, part.width, part.height), (h, w), None

    # --- display ------------------------------------------------------------------------------

    def _to_rgb(self, data: np.ndarray, valid: np.ndarray) -> np.ndarray:
        if not self._needs_stretch:
            return display.to_rgb8(data, valid, None)
        stretch = self._stretch or self._source_stretch() or display.compute_stretch(data, valid)
        return display.to_rgb8(data, valid, stretch)

    def _source_stretch(self) -> list[tuple[float, float]] | None:
        """Percentiles over the whole source from a small overview read (same look per chip)."""
        if self._stretch is None:
            full = (0.0, 0.0, float(self._reader.width), float(self._reader.height))
            w, h = output_shape(full[2], full[3], STATS_SIZE)
            try:
                data, valid, _ = self._read_window(*full, w, h)
            except ImageryError as exc:  # no overviews on a huge raster: stretch per chip
                log.info("per-chip stretch for %s: %s", self.name, exc)
                return None
            self._stretch = display.compute_stretch(data, valid)
        return self._stretch

    def close(self) -> None:
        self._stack.close()


def _resize(
    data: np.ndarray,
    mask: np.ndarray | None,
    box: tuple[float, ...],
    size: tuple[int, int],
    nearest: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Crop ``box`` (float pixels of ``data`` (H, W, B)) and resize it to ``size`` (w, h).

    Pillow's filters widen with the reduction factor, so downsampling is antialiased.
    (``resampling="bilinear"`` means a box filter when reducing, bilinear when enlarging.)
    """
    from PIL import Image

    if nearest:
        filt = Image.Resampling.NEAREST
    elif (box[2] - box[0]) > 1.01 * size[0]:
        # Reducing: an area average (box filter) antialiases as well as bilinear here, where
        # the factor is below 2 thanks to overviews, and costs about a third less.
        filt = Image.Resampling.BOX
    else:
        filt = Image.Resampling.BILINEAR
    if data.shape[-1] == 3 and data.dtype == np.uint8:
        # One RGB resize instead of three: the common case (8-bit true colour) stays cheap.
        out = np.asarray(
            Image.fromarray(np.ascontiguousarray(data), mode="RGB").resize(size, filt, box=box)
        )
    else:
        resized = []
        for i in range(data.shape[-1]):
            band = data[..., i]
            if band.dtype == np.uint8:
                img = Image.fromarray(np.ascontiguousarray(band), mode="L")
            else:
                arr = np.array(band, dtype=np.float32)
                if mask is not None and not nearest and mask.any():
                    # Keep no-data values (e.g. -9999) from bleeding into valid edge pixels.
                    arr[~mask] = float(np.mean(arr[mask]))
                img = Image.fromarray(arr, mode="F")
            # uint8 stays uint8; other types are float32 from here on.
            resized.append(np.asarray(img.resize(size, filt, box=box)))
        out = np.stack(resized, axis=-1)
    if mask is not None:
        mask_img = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
        mask = np.asarray(mask_img.resize(size, Image.Resampling.NEAREST, box=box)) > 127
    return out, mask
