"""Where an area's OpenStreetMap features come from: Overpass when online (cached), or a local file.

`open_osm("auto" | path | "none")` returns an `OSMSource`; its ``features(bounds_lonlat)`` gives
the raw features that intersect an area as a GeoDataFrame in EPSG:4326 with one string column per
tag key, ``osm_id`` (``"way/123"``) and the geometry. `training.region.classify_features` turns
them into the visible classes that captions, VQA and grounding use; the app shows their tags.

- `OverpassSource` asks an Overpass API endpoint (configurable; ``$RSVLM_OVERPASS_URL``) for the
  features of the area, snapped outwards to a grid so that neighbouring questions share answers.
  Answers are cached on disk as ``.osm`` files named after the endpoint and the area; an area
  inside a cached one is answered from the cache, offline too. Requests are serialised and
  spaced (Overpass' usage policy asks for few, small, sequential requests), each with a bounded
  timeout and no retry loop: an unreachable or busy server is an `OSMError` that says so.
  The answer is Overpass' native XML, read by GDAL's OSM driver (which assembles multipolygon
  relations), the same reader as for ``.osm`` files.
- `PbfSource` reads a local ``.osm.pbf`` extract with pyrosm, limited to the requested box.
- `VectorFileSource` reads any other vector file once (GeoJSON, GPKG, ``.osm`` XML ...).

OSM data is © OpenStreetMap contributors, ODbL 1.0: `ATTRIBUTION` goes wherever features show.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tiles.atomic import atomic_path

if TYPE_CHECKING:
    import geopandas as gpd

log = logging.getLogger(__name__)

ATTRIBUTION = "© OpenStreetMap contributors (ODbL)"
DEFAULT_OVERPASS_URL = "https://overpass-api.de/api/interpreter"
OVERPASS_URL_ENV = "RSVLM_OVERPASS_URL"
CACHE_ENV = "RSVLM_OSM_CACHE"
#: The keys whose features can show in an image (`training.osm` classifies them).
FEATURE_KEYS = ("building", "highway", "railway", "waterway", "natural", "landuse", "leisure",
                "amenity", "man_made", "aeroway", "power", "historic")
#: Columns that readers add and that are not OSM tags.
_NOT_TAGS = {"id", "osm_type", "osm_way_id", "osm_id", "tags", "other_tags", "z_order", "visible",
             "version", "timestamp", "changeset", "lon", "lat", "geometry", "uid", "user"}
_OSM_LAYERS = ("points", "lines", "multipolygons")


class OSMError(RuntimeError):
    """OSM features could not be had (network, server, file); the message is for a user."""


class OSMSource(Protocol):
    """Raw OSM features of an area."""

    description: str  # for logs, the UI and dataset cards ("Overpass at ...", "Helsinki.osm.pbf")
    attribution: str

    def features(self, bounds_lonlat: tuple[float, float, float, float]) -> gpd.GeoDataFrame:
        """Features intersecting ``(W, S, E, N)``: EPSG:4326, ``osm_id``, one column per tag."""
        ...


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "rsvlm" / "osm")).expanduser()


def open_osm(spec: str | os.PathLike[str] | None, *, endpoint: str | None = None,
             cache_dir: str | os.PathLike[str] | None = None, timeout_s: float = 30.0
             ) -> OSMSource | None:
    """``"auto"``: Overpass (online, cached); a path: that file; ``None``/``"none"``: no OSM."""
    if spec is None or str(spec).strip().lower() in {"", "none", "off"}:
        return None
    if str(spec).strip().lower() == "auto":
        return OverpassSource(endpoint=endpoint, cache_dir=cache_dir, timeout_s=timeout_s)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise OSMError(f"OSM file not found: {path} (give an .osm.pbf extract, a vector file, "
                       "or 'auto' to ask Overpass when online)")
    if path.name.lower().endswith(".pbf"):
        return PbfSource(path)
    return VectorFileSource(path)


def empty_features() -> gpd.GeoDataFrame:
    import geopandas as gpd

    return gpd.GeoDataFrame({"osm_id": []}, geometry=[], crs="EPSG:4326")


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def normalize(frame: Any, id_of: Any) -> gpd.GeoDataFrame:
    """One row per feature: ``osm_id``, tag columns (strings), geometry; untagged rows dropped.

    ``id_of(record) -> "type/id"``. Tags packed by readers (GDAL's ``other_tags`` hstore,
    pyrosm's ``tags`` JSON) are unpacked into columns.
    """
    import geopandas as gpd

    from training.osm import parse_other_tags

    rows, geoms = [], []
    for record, geom in zip(frame.drop(columns="geometry").to_dict("records"), frame.geometry,
                            strict=True):
        if geom is None or geom.is_empty:
            continue
        tags = {k: t for k, v in record.items() if k not in _NOT_TAGS and (t := _text(v))}
        tags.update(parse_other_tags(_text(record.get("other_tags"))))
        packed = record.get("tags")
        if isinstance(packed, str) and packed.startswith("{"):
            with contextlib.suppress(ValueError):
                tags.update({k: str(v) for k, v in json.loads(packed).items() if v is not None})
        if not tags:
            continue
        if not geom.is_valid and geom.geom_type.endswith("Polygon"):
            geom = geom.buffer(0)
        rows.append({"osm_id": id_of(record), **tags})
        geoms.append(geom)
    if not rows:
        return empty_features()
    return gpd.GeoDataFrame(rows, geometry=geoms, crs="EPSG:4326")


def _clip(features: gpd.GeoDataFrame, bounds: tuple[float, float, float, float]
          ) -> gpd.GeoDataFrame:
    """Features that intersect ``bounds`` (whole, not cut: an object on the edge counts once)."""
    if len(features) == 0:
        return features
    from shapely.geometry import box

    idx = features.sindex.query(box(*bounds), predicate="intersects")
    return features.iloc[sorted(idx)].reset_index(drop=True)


def check_bounds(bounds: Any) -> tuple[float, float, float, float]:
    try:
        w, s, e, n = (float(v) for v in bounds)
    except (TypeError, ValueError) as exc:
        raise OSMError(f"an area is four numbers W,S,E,N (lon/lat); got {bounds!r}") from exc
    if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
        raise OSMError(f"not an area in lon/lat: {w},{s},{e},{n}")
    return w, s, e, n


# --- local files -------------------------------------------------------------------------------

def read_osm_xml(path: Path) -> gpd.GeoDataFrame:
    """An ``.osm`` XML file (an Overpass answer) through GDAL's OSM driver."""
    import pandas as pd
    import pyogrio

    frames = []
    for layer in _OSM_LAYERS:
        try:
            frame = pyogrio.read_dataframe(path, layer=layer, on_invalid="ignore")
        except Exception as exc:  # noqa: BLE001 - GDAL raises many types for unreadable files
            if "<node" not in path.read_text(errors="replace")[:1_000_000]:
                return empty_features()  # an answer without elements: nothing here
            raise OSMError(f"cannot read OSM XML {path.name}: {exc}") from exc
        if len(frame):
            kind = {"points": "node", "lines": "way"}.get(layer)
            frame = normalize(frame, lambda r, kind=kind: _gdal_id(r, kind))
            frames.append(frame)
    if not frames:
        return empty_features()
    import geopandas as gpd

    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs="EPSG:4326")


def _gdal_id(record: dict[str, Any], kind: str | None) -> str:
    if kind is not None:
        return f"{kind}/{_text(record.get('osm_id'))}"
    # multipolygons: a closed way has osm_way_id, a relation osm_id
    if _text(record.get("osm_way_id")):
        return f"way/{_text(record['osm_way_id'])}"
    return f"relation/{_text(record.get('osm_id'))}"


class PbfSource:
    """A local ``.osm.pbf`` extract, read with pyrosm for each requested box (results memoised)."""

    def __init__(self, path: str | os.PathLike[str], keys: tuple[str, ...] = FEATURE_KEYS,
                 memo: int = 16) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise OSMError(f"OSM extract not found: {self.path}")
        self.keys = keys
        self.description = f"OpenStreetMap extract {self.path.name}"
        self.attribution = ATTRIBUTION
        self._memo: OrderedDict[tuple[float, ...], gpd.GeoDataFrame] = OrderedDict()
        self._memo_size = memo
        self._lock = threading.Lock()

    def features(self, bounds_lonlat: tuple[float, float, float, float]) -> gpd.GeoDataFrame:
        bounds = check_bounds(bounds_lonlat)
        key = tuple(round(v, 7) for v in bounds)
        with self._lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                return self._memo[key]
        try:
            import pyrosm
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise OSMError("reading .osm.pbf needs pyrosm: pip install pyrosm") from exc
        try:
            with warnings.catch_warnings():  # relations cut by the box: expected here
                warnings.simplefilter("ignore")
                osm = pyrosm.OSM(str(self.path), bounding_box=list(bounds))
                raw = osm.get_data_by_custom_criteria(
                    custom_filter={k: True for k in self.keys}, filter_type="keep",
                    keep_nodes=True, keep_ways=True, keep_relations=True)
        except Exception as exc:  # noqa: BLE001 - pyrosm raises many types for bad files
            raise OSMError(f"cannot read {self.path.name} as an OSM extract: {exc}") from exc
        if raw is None or len(raw) == 0:
            feats = empty_features()
        else:
            feats = _clip(normalize(raw, lambda r: f"{r.get('osm_type')}/{_text(r.get('id'))}"),
                          bounds)
        with self._lock:
            self._memo[key] = feats
            while len(self._memo) > self._memo_size:
                self._memo.popitem(last=False)
        return feats


class VectorFileSource:
    """Any vector file GDAL reads (GeoJSON, GPKG, FlatGeobuf, ``.osm`` XML), read once."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.description = f"OpenStreetMap features {self.path.name}"
        self.attribution = ATTRIBUTION
        self._features: gpd.GeoDataFrame | None = None

    def _load(self) -> gpd.GeoDataFrame:
        if self._features is None:
            if self.path.suffix.lower() in {".osm", ".xml"}:
                self._features = read_osm_xml(self.path)
            else:
                import geopandas as gpd

                try:
                    frame = gpd.read_file(self.path)
                except Exception as exc:  # noqa: BLE001 - GDAL raises many types
                    raise OSMError(f"cannot read vector file {self.path.name}: {exc}") from exc
                frame = frame.set_crs("EPSG:4326") if frame.crs is None else frame.to_crs(4326)
                ids = ("osm_id", "@id", "id", "full_id")
                self._features = normalize(frame, lambda r: next(
                    (str(_text(r[k])) for k in ids if _text(r.get(k))), None))
        return self._features

    def features(self, bounds_lonlat: tuple[float, float, float, float]) -> gpd.GeoDataFrame:
        return _clip(self._load(), check_bounds(bounds_lonlat))


# --- Overpass ----------------------------------------------------------------------------------

_REQUEST_LOCK = threading.Lock()  # one request at a time from this process (Overpass policy)
_LAST_REQUEST: dict[str, float] = {}
_RUNTIME_ERROR = re.compile(r"<remark>\s*(runtime error[^<]*)</remark>", re.I)


def overpass_query(bounds: tuple[float, float, float, float], keys: tuple[str, ...] = FEATURE_KEYS,
                   *, timeout_s: int = 25, maxsize: int = 64 * 2**20) -> str:
    """Overpass QL: every element with one of ``keys`` in the box, with the nodes and ways it
    references (``(._;>;)``), as OSM XML."""
    w, s, e, n = bounds
    box = f"{s:.6f},{w:.6f},{n:.6f},{e:.6f}"
    union = "".join(f'nwr["{k}"]({box});' for k in keys)
    return f"[out:xml][timeout:{timeout_s}][maxsize:{maxsize}];({union});(._;>;);out body;"


def snap(bounds: tuple[float, float, float, float], grid: float) -> tuple[float, ...]:
    """``bounds`` grown outwards to multiples of ``grid`` degrees."""
    w, s, e, n = bounds
    out = (max(-180.0, math.floor(w / grid) * grid), max(-90.0, math.floor(s / grid) * grid),
           min(180.0, math.ceil(e / grid) * grid), min(90.0, math.ceil(n / grid) * grid))
    return tuple(round(v, 6) for v in out)


def area_km2(bounds: tuple[float, ...]) -> float:
    w, s, e, n = bounds
    return (e - w) * (n - s) * 111.32**2 * math.cos(math.radians((s + n) / 2))


class OverpassSource:
    """Features from an Overpass API endpoint, cached on disk per area.

    Args:
        endpoint: the interpreter URL (default ``$RSVLM_OVERPASS_URL`` or overpass-api.de).
        cache_dir: where answers are kept (default ``$RSVLM_OSM_CACHE`` or ``~/.cache/rsvlm/osm``).
        timeout_s: the most one request may take (connect + answer); Overpass is told the same.
        min_interval_s: the least time between two requests from this process.
        grid_deg: areas are snapped outwards to this grid, so nearby questions share an answer.
        max_area_km2: larger areas are refused (use a local extract for those).
        max_bytes: the largest answer accepted; max_cache_bytes: the cache's size, oldest out.
    """

    def __init__(self, endpoint: str | None = None, *, cache_dir: str | os.PathLike[str] | None
                 = None, timeout_s: float = 30.0, min_interval_s: float = 2.0,
                 grid_deg: float = 0.002, max_area_km2: float = 25.0,
                 max_bytes: int = 64 * 2**20, max_cache_bytes: int = 512 * 2**20,
                 keys: tuple[str, ...] = FEATURE_KEYS) -> None:
        self.endpoint = endpoint or os.environ.get(OVERPASS_URL_ENV) or DEFAULT_OVERPASS_URL
        if not re.match(r"https?://", self.endpoint):
            raise OSMError(f"the Overpass endpoint must be an http(s) URL, got {self.endpoint!r}")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.timeout_s, self.min_interval_s = float(timeout_s), float(min_interval_s)
        self.grid_deg, self.max_area_km2, self.max_bytes = grid_deg, max_area_km2, max_bytes
        self.max_cache_bytes = max_cache_bytes
        self.keys = keys
        self.description = f"Overpass API at {self.endpoint}"
        self.attribution = ATTRIBUTION
        self._tag = hashlib.sha256(f"{self.endpoint}|{','.join(keys)}".encode()).hexdigest()[:12]

    # cache files: <endpoint+keys hash>_<w>_<s>_<e>_<n>.osm
    def _cache_path(self, area: tuple[float, ...]) -> Path:
        return self.cache_dir / (f"{self._tag}_" + "_".join(f"{v:.6f}" for v in area) + ".osm")

    def cached_area(self, bounds: tuple[float, float, float, float]) -> Path | None:
        """A cached answer whose area holds ``bounds``, if any."""
        w, s, e, n = bounds
        for path in sorted(self.cache_dir.glob(f"{self._tag}_*.osm")):
            try:
                cw, cs, ce, cn = (float(v) for v in path.stem.split("_")[1:5])
            except ValueError:
                continue
            if cw <= w and cs <= s and ce >= e and cn >= n:
                return path
        return None

    def features(self, bounds_lonlat: tuple[float, float, float, float]) -> gpd.GeoDataFrame:
        bounds = check_bounds(bounds_lonlat)
        path = self.cached_area(bounds)
        if path is None:
            area = snap(bounds, self.grid_deg)
            size = area_km2(area)
            if size > self.max_area_km2:
                raise OSMError(f"the area is {size:.0f} km²; Overpass is asked for at most "
                               f"{self.max_area_km2:g} km² at a time: use a local extract "
                               "(--osm FILE.osm.pbf) for larger areas")
            path = self._fetch(area, bounds)
        else:
            log.info("OSM features from the cache: %s", path.name)
        return _clip(read_osm_xml(path), bounds)

    def _fetch(self, area: tuple[float, ...], bounds: tuple[float, float, float, float]) -> Path:
        import requests

        query = overpass_query(area, self.keys, timeout_s=max(1, int(self.timeout_s)),
                               maxsize=self.max_bytes)
        with _REQUEST_LOCK:
            cached = self.cached_area(bounds)  # fetched meanwhile by another session
            if cached is not None:
                return cached
            wait = _LAST_REQUEST.get(self.endpoint, 0.0) + self.min_interval_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            t0 = time.monotonic()
            try:
                body = self._post(requests, query)
            finally:
                _LAST_REQUEST[self.endpoint] = time.monotonic()
        log.info("Overpass: %d bytes for %s in %.1f s", len(body), area, time.monotonic() - t0)
        path = self._cache_path(area)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:  # readers never see half an answer
            tmp.write_bytes(body)
        self._prune(keep=path)
        return path

    def _prune(self, keep: Path) -> None:
        """Oldest answers go once the cache holds more than ``max_cache_bytes``."""
        files = sorted(self.cache_dir.glob("[!.]*.osm"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for old in files:
            if total <= self.max_cache_bytes:
                break
            if old != keep:
                total -= old.stat().st_size
                old.unlink(missing_ok=True)

    def _post(self, requests: Any, query: str) -> bytes:
        where = f"Overpass at {self.endpoint}"
        offline = ("Areas fetched before are still served from the cache; offline, give a local "
                   "extract with --osm FILE.osm.pbf.")
        try:
            with requests.post(self.endpoint, data={"data": query}, stream=True,
                               timeout=(min(10.0, self.timeout_s), self.timeout_s),
                               headers={"User-Agent": "rsvlm (OSM semantics for imagery)"}) as r:
                if r.status_code in (429, 504):
                    raise OSMError(f"{where} is busy (HTTP {r.status_code}); try again in a "
                                   f"minute. {offline}")
                if r.status_code != 200:
                    raise OSMError(f"{where} answered HTTP {r.status_code}. {offline}")
                body = bytearray()
                deadline = time.monotonic() + self.timeout_s
                for chunk in r.iter_content(65536):
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise OSMError(f"{where} sent more than {self.max_bytes >> 20} MB; ask "
                                       "for a smaller area or use a local extract")
                    if time.monotonic() > deadline:
                        raise OSMError(f"{where} took longer than {self.timeout_s:g} s. {offline}")
        except requests.Timeout as exc:
            raise OSMError(f"{where} did not answer within {self.timeout_s:g} s. {offline}"
                           ) from exc
        except requests.RequestException as exc:
            raise OSMError(f"cannot reach {where} ({type(exc).__name__}). {offline}") from exc
        head = bytes(body[:4096]).decode("utf-8", "replace")
        if "<osm" not in head:
            raise OSMError(f"{where} did not answer with OSM XML. {offline}")
        tail = bytes(body[-4096:]).decode("utf-8", "replace")
        m = _RUNTIME_ERROR.search(head + tail)
        if m:  # Overpass reports timeouts and size limits inside a 200 answer
            raise OSMError(f"{where} stopped: {m.group(1).strip()[:200]}")
        return bytes(body)
