"""XYZ tile services (xyzservices providers, URL templates), MBTiles and z/x/y folders.

Tiles come from, in order: a local MBTiles file or z/x/y folder; the disk cache
(``~/.cache/rsvlm/tiles`` or ``$RSVLM_TILE_CACHE``); the network, only when
``allow_network=True``. Offline, a chip is mosaicked from what is cached; when the chosen zoom
is missing, coarser cached zooms are tried before giving up with a clear message.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine

from tiles import geometry
from tiles.atomic import atomic_path
from tiles.chip import Chip
from tiles.errors import ImageryError
from tiles.sources.base import Size, Source, chip_grid

log = logging.getLogger(__name__)

WEB_MERCATOR = "EPSG:3857"
MAX_LAT = 85.0511287798066
#: Most tiles mosaicked for one chip; beyond it a coarser zoom is used.
MAX_TILES = 256
#: Coarser zooms tried offline when the wanted zoom is not cached.
FALLBACK_ZOOMS = 6
TILE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
EARTH_CIRCUMFERENCE = 2 * math.pi * 6378137.0


def default_cache_dir() -> Path:
    return Path(os.environ.get("RSVLM_TILE_CACHE", Path.home() / ".cache" / "rsvlm" / "tiles"))


class TileStore:
    """Where tiles come from. ``get`` returns encoded image bytes or None when not available."""

    min_zoom: int = 0
    max_zoom: int = 22
    bounds_lonlat: tuple[float, float, float, float] = (-180.0, -MAX_LAT, 180.0, MAX_LAT)
    attribution: str = ""

    def get(self, z: int, x: int, y: int) -> bytes | None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class MBTilesStore(TileStore):
    """An MBTiles file (SQLite). Rows are TMS: y counts from the south, so it is flipped."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            meta = dict(self._db.execute("SELECT name, value FROM metadata").fetchall())
            zooms = self._db.execute("SELECT MIN(zoom_level), MAX(zoom_level) FROM tiles")
            zmin, zmax = zooms.fetchone()
        except sqlite3.DatabaseError as exc:
            raise ImageryError(f"{path.name!r} is not a readable MBTiles file ({exc}).") from exc
        if zmin is None:
            raise ImageryError(f"The MBTiles file {path.name!r} contains no tiles.")
        self.min_zoom, self.max_zoom = int(zmin), int(zmax)
        if "bounds" in meta:
            try:
                self.bounds_lonlat = tuple(float(v) for v in meta["bounds"].split(","))
            except ValueError:
                log.warning("ignoring malformed MBTiles bounds %r", meta["bounds"])
        self.attribution = meta.get("attribution", "")
        self.format = meta.get("format", "png")

    def get(self, z: int, x: int, y: int) -> bytes | None:
        with self._lock:  # one sqlite connection, possibly used from several UI threads
            row = self._fetch(z, x, y)
        return bytes(row[0]) if row else None

    def _fetch(self, z: int, x: int, y: int) -> Any:
        return self._db.execute(
            "SELECT tile_data FROM tiles WHERE zoom_level=? AND tile_column=? AND tile_row=?",
            (z, x, (1 << z) - 1 - y),
        ).fetchone()

    def close(self) -> None:
        self._db.close()


class FolderStore(TileStore):
    """A ``{z}/{x}/{y}.ext`` folder (or an explicit local template with those fields)."""

    def __init__(self, template: str) -> None:
        self.template = template
        root = Path(template.split("{z}")[0])
        zooms = sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())
        if not zooms:
            raise ImageryError(f"The tile folder {str(root)!r} has no zoom-level folders (0..22).")
        self.min_zoom, self.max_zoom = zooms[0], zooms[-1]
        self.bounds_lonlat = self._scan_bounds(root, zooms[0])

    @staticmethod
    def _scan_bounds(root: Path, z: int) -> tuple[float, float, float, float]:
        import mercantile

        xs, ys = [], []
        for xdir in (root / str(z)).iterdir():
            if xdir.name.isdigit():
                for f in xdir.iterdir():
                    stem = f.name.split(".")[0]
                    if stem.isdigit():
                        xs.append(int(xdir.name))
                        ys.append(int(stem))
        if not xs:
            raise ImageryError(f"The tile folder {str(root)!r} has no tiles at zoom {z}.")
        nw = mercantile.bounds(min(xs), min(ys), z)
        se = mercantile.bounds(max(xs), max(ys), z)
        return (nw.west, se.south, se.east, nw.north)

    def get(self, z: int, x: int, y: int) -> bytes | None:
        path = self.template.format(z=z, x=x, y=y)
        candidates = [path] if Path(path).suffix else [path + ext for ext in TILE_EXTS]
        for p in candidates:
            if os.path.isfile(p):
                return Path(p).read_bytes()
        return None


class HTTPStore(TileStore):
    """A URL template behind a disk cache; the network is used only when allowed."""

    def __init__(
        self,
        url: str,
        *,
        name: str,
        cache_dir: Path,
        allow_network: bool,
        max_zoom: int = 19,
        min_zoom: int = 0,
        attribution: str = "",
        bounds_lonlat: Sequence[float] | None = None,
    ) -> None:
        self.url = url
        self.allow_network = allow_network
        self.cache = Path(cache_dir) / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        self.min_zoom, self.max_zoom = min_zoom, max_zoom
        self.attribution = attribution
        if bounds_lonlat is not None:
            self.bounds_lonlat = tuple(float(v) for v in bounds_lonlat)  # type: ignore[assignment]
        self._session: Any = None

    def _cached(self, z: int, x: int, y: int) -> Path:
        return self.cache / str(z) / str(x) / f"{y}.tile"

    def get(self, z: int, x: int, y: int) -> bytes | None:
        path = self._cached(z, x, y)
        if path.is_file():
            return path.read_bytes()
        if not self.allow_network:
            return None
        return self._download(z, x, y, path)

    def _download(self, z: int, x: int, y: int, path: Path) -> bytes | None:
        import requests

        if self._session is None:
            self._session = requests.Session()
            self._session.headers["User-Agent"] = "rsvlm-tiles/0.1 (+offline GIS assistant)"
        url = self.url.format(z=z, x=x, y=y, s="a", r="")
        try:
            resp = self._session.get(url, timeout=15)
        except requests.RequestException as exc:
            log.warning("tile %s/%s/%s not downloaded: %s", z, x, y, exc)
            return None
        if resp.status_code != 200 or not resp.content:
            log.info("tile %s/%s/%s: HTTP %s", z, x, y, resp.status_code)
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # readers never see half a tile
            tmp.write_bytes(resp.content)
        return resp.content

    def close(self) -> None:
        if self._session is not None:
            self._session.close()


class XYZSource(Source):
    """Web-Mercator tiles as a source: chips are mosaicked at a zoom that fits ``size``."""

    def __init__(self, store: TileStore, *, name: str) -> None:
        self.store = store
        self.name = name
        self.crs = geometry.as_crs(WEB_MERCATOR)
        w, s, e, n = store.bounds_lonlat
        s, n = max(s, -MAX_LAT), min(n, MAX_LAT)
        self.bounds = geometry.transform_bounds((w, s, e, n), geometry.LONLAT, self.crs)

    def info(self) -> dict[str, Any]:
        return {
            "source": self.name,
            "kind": "xyz tiles",
            "driver": type(self.store).__name__,
            "georeferenced": True,
            "crs": WEB_MERCATOR,
            "bounds": list(self.bounds),
            "bounds_lonlat": list(self.bounds_lonlat or ()),
            "min_zoom": self.store.min_zoom,
            "max_zoom": self.store.max_zoom,
            "resolution": [self.resolution(self.store.max_zoom)] * 2,
            "count": 3,
            "dtype": "uint8",
            "overviews": list(range(self.store.min_zoom, self.store.max_zoom + 1)),
            "attribution": self.store.attribution,
            "network": bool(getattr(self.store, "allow_network", False)),
        }

    @staticmethod
    def resolution(z: int, tile_size: int = 256) -> float:
        """Metres per pixel (at the equator) of zoom ``z``."""
        return EARTH_CIRCUMFERENCE / (tile_size * (1 << z))

    def zoom_for(self, box: Sequence[float], out_w: int) -> int:
        """Smallest zoom at least as sharp as the chip, within the store's zooms and tile budget."""
        import mercantile

        res = (box[2] - box[0]) / out_w
        z = math.ceil(math.log2(EARTH_CIRCUMFERENCE / (256 * res)) - 1e-9)
        z = min(max(z, self.store.min_zoom), self.store.max_zoom)
        while z > self.store.min_zoom:
            (x0, y0, x1, y1) = _tile_range(box, z, mercantile)
            if (x1 - x0 + 1) * (y1 - y0 + 1) <= MAX_TILES:
                break
            z -= 1
        return z

    def chip(
        self,
        bbox: Sequence[float] | None = None,
        *,
        crs: Any = geometry.LONLAT,
        size: Size = 512,
        out_crs: Any = None,
    ) -> Chip:
        target = self.crs if out_crs is None else geometry.as_crs(out_crs)
        box = self.resolve_bbox(bbox, crs, target)
        out_w, out_h, transform = chip_grid(box, size)
        merc_box = geometry.transform_bounds(box, target, self.crs)
        # The chip covers about the same ground across as merc_box, so out_w sets the zoom.
        z = self.zoom_for(merc_box, out_w)
        pixels = mask = None
        used: list[int] = []
        # Coarser zooms fill what the chosen zoom lacks (offline caches are often patchy).
        for zoom in range(z, max(self.store.min_zoom, z - FALLBACK_ZOOMS) - 1, -1):
            mosaic = self._mosaic(merc_box, zoom)
            if mosaic is None:
                continue
            px, m = _warp(*mosaic, self.crs, transform, target, out_w, out_h)
            if pixels is None:
                pixels, mask = px, m
            else:
                fill = m & ~mask
                pixels[fill] = px[fill]
                mask |= m
            used.append(zoom)
            if mask.all():
                break
        if pixels is None:
            network = getattr(self.store, "allow_network", None)
            hint = (
                " Downloading is off: pass allow_network=True (or --allow-network) or use a "
                "local MBTiles file."
                if network is False
                else ""
            )
            raise ImageryError(
                f"No tiles of {self.name!r} are available for this area "
                f"(zoom {z} and {FALLBACK_ZOOMS} coarser levels).{hint}"
            )
        return Chip(
            pixels=pixels,
            crs=target,
            transform=transform,
            source=self.name,
            mask=None if mask.all() else mask,
            meta={"zoom": used[0], "zooms": used},
        )

    def _mosaic(self, box: Sequence[float], z: int):
        """Tiles covering ``box`` at zoom ``z`` as (3, H, W) uint8 + valid mask + transform."""
        import mercantile
        from PIL import Image

        x0, y0, x1, y1 = _tile_range(box, z, mercantile)
        ts = 256
        data = np.zeros((3, (y1 - y0 + 1) * ts, (x1 - x0 + 1) * ts), dtype=np.uint8)
        valid = np.zeros(data.shape[1:], dtype=bool)  # (3, H, W): the layout reproject takes
        found = 0
        for ty in range(y0, y1 + 1):
            for tx in range(x0, x1 + 1):
                blob = self.store.get(z, tx, ty)
                if blob is None:
                    continue
                try:
                    img = Image.open(io.BytesIO(blob)).convert("RGBA")
                except Exception as exc:  # one bad tile must not lose the whole chip
                    log.warning("unreadable tile %s/%s/%s: %s", z, tx, ty, exc)
                    continue
                if img.size != (ts, ts):  # 512 px "retina" tiles
                    img = img.resize((ts, ts), Image.Resampling.BILINEAR)
                arr = np.asarray(img)
                r, c = (ty - y0) * ts, (tx - x0) * ts
                data[:, r : r + ts, c : c + ts] = np.moveaxis(arr[:, :, :3], -1, 0)
                valid[r : r + ts, c : c + ts] = arr[:, :, 3] > 0
                found += 1
        if not found:
            return None
        left, _, _, top = mercantile.xy_bounds(x0, y0, z)
        res = self.resolution(z, ts)
        return data, valid, Affine(res, 0, left, 0, -res, top)

    def close(self) -> None:
        self.store.close()


def _tile_range(box: Sequence[float], z: int, mercantile: Any) -> tuple[int, int, int, int]:
    w, s = mercantile.lnglat(box[0], box[1])
    e, n = mercantile.lnglat(box[2], box[3])
    eps = 1e-9
    nw = mercantile.tile(w + eps, min(n, MAX_LAT) - eps, z)
    se = mercantile.tile(e - eps, max(s, -MAX_LAT) + eps, z)
    top = (1 << z) - 1
    return (max(nw.x, 0), max(nw.y, 0), min(se.x, top), min(se.y, top))


def _warp(
    data: np.ndarray,
    valid: np.ndarray,
    src_t: Affine,
    src_crs: Any,
    dst_t: Affine,
    dst_crs: Any,
    out_w: int,
    out_h: int,
) -> tuple[np.ndarray, np.ndarray]:
    from rasterio.crs import CRS as RioCRS
    from rasterio.errors import RasterioError
    from rasterio.warp import Resampling, reproject

    common = dict(
        src_transform=src_t,
        src_crs=RioCRS.from_wkt(geometry.as_crs(src_crs).to_wkt()),
        dst_transform=dst_t,
        dst_crs=RioCRS.from_wkt(geometry.as_crs(dst_crs).to_wkt()),
    )
    out = np.zeros((3, out_h, out_w), dtype=np.uint8)
    mask = np.zeros((out_h, out_w), dtype=np.uint8)
    try:
        reproject(data, out, resampling=Resampling.bilinear, **common)
        reproject(valid.astype(np.uint8), mask, resampling=Resampling.nearest, **common)
    except (RasterioError, ValueError) as exc:
        raise ImageryError(f"Could not warp tiles to the requested chip: {exc}") from exc
    pixels = np.ascontiguousarray(np.moveaxis(out, 0, -1))
    mask_b = mask.astype(bool)
    pixels[~mask_b] = 0
    return pixels, mask_b


def open_xyz(
    src: str, *, allow_network: bool = False, cache_dir: str | Path | None = None
) -> XYZSource | None:
    """An `XYZSource` if ``src`` names tiles (MBTiles, folder, template, provider), else None."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = Path(src)
    if src.lower().endswith(".mbtiles"):
        if not path.is_file():
            raise ImageryError(f"MBTiles file {src!r} not found.")
        return XYZSource(MBTilesStore(path), name=path.name)
    if "{z}" in src and not re.match(r"^https?://", src):
        return XYZSource(FolderStore(src), name=src)
    if path.is_dir():
        return XYZSource(FolderStore(str(path / "{z}" / "{x}" / "{y}")), name=path.name)
    if re.match(r"^https?://", src):
        if not all(k in src for k in ("{z}", "{x}", "{y}")):
            raise ImageryError(f"A tile URL needs {{z}}, {{x}} and {{y}} placeholders: {src!r}.")
        return XYZSource(
            HTTPStore(
                src,
                name=src.split("//", 1)[1].split("/")[0],
                cache_dir=cache,
                allow_network=allow_network,
            ),
            name=src,
        )
    if path.exists() or not re.fullmatch(r"[A-Za-z][\w-]*(\.[\w-]+)*", src):
        return None
    import xyzservices

    try:
        provider = xyzservices.providers.query_name(src)
    except ValueError:
        return None
    if provider.requires_token():
        raise ImageryError(
            f"The tile provider {src!r} needs an API key; use one that does not, "
            "or a URL template that includes your key."
        )
    return XYZSource(
        HTTPStore(
            provider.build_url(scale_factor=""),
            name=provider.name,
            cache_dir=cache,
            allow_network=allow_network,
            max_zoom=int(provider.get("max_zoom", 19)),
            min_zoom=int(provider.get("min_zoom", 0)),
            attribution=provider.get("attribution", ""),
            bounds_lonlat=_provider_bounds(provider),
        ),
        name=provider.name,
    )


def _provider_bounds(provider: Any) -> tuple[float, float, float, float] | None:
    b = provider.get("bounds")  # xyzservices: [[south, west], [north, east]]
    if not b:
        return None
    (s, w), (n, e) = b
    return (float(w), float(s), float(e), float(n))
