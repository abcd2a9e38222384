"""What to scan: one raster, a folder, a list file, a glob, or a STAC catalogue / ItemCollection.

`list_rasters` turns what the user typed into an ordered list of `RasterRef` (a URI GDAL can
open and a short name for the output's ``source`` column). Nothing is opened here: a raster
that cannot be read is found (and reported) when the scan plans it.

    list_rasters("tiles/")                    # every raster file under the folder, sorted
    list_rasters("kampala/*.tif")             # a glob (``**`` recurses)
    list_rasters("scenes.txt")                # one path or URL per line; '#' starts a comment
    list_rasters("catalog.json", asset="visual")  # STAC Catalog/Collection/ItemCollection/Item
"""

from __future__ import annotations

import glob
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: File endings taken from a folder or a glob (what GDAL reads as georeferenced rasters).
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
#: Text files that list rasters, one per line.
LIST_SUFFIXES = (".txt", ".lst", ".list")
#: STAC asset keys tried, in order, when none is given (``visual`` is the true-colour COG).
DEFAULT_ASSETS = ("visual", "image", "rgb", "data")


class SourceListError(ValueError):
    """The input names nothing scannable; the message says what was found instead."""


@dataclass(frozen=True)
class RasterRef:
    """One raster of a scan: ``uri`` for GDAL, ``name`` for people (unique within a scan).

    ``error`` is set for an entry that names no readable raster (a STAC item without the asset):
    the scan reports it and skips it instead of failing the whole list.
    """

    uri: str
    name: str
    error: str = ""


def is_remote(text: str) -> bool:
    return "://" in text or text.startswith("/vsi")


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def list_rasters(spec: str | Path, *, asset: str | None = None) -> list[RasterRef]:
    """The rasters named by ``spec``, in a stable order, without duplicates.

    ``asset`` picks the STAC asset (default: the first of `DEFAULT_ASSETS` an item has).
    """
    text = str(spec).strip()
    if not text:
        raise SourceListError("No imagery given: name a raster, a folder, a list, a glob or STAC.")
    path = Path(text)
    if is_remote(text):
        refs = _stac(text, asset) if text.lower().endswith(".json") else [_ref(text)]
    elif path.is_dir():
        refs = _folder(path)
    elif path.is_file() and path.suffix.lower() == ".json":
        refs = _stac(text, asset)
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        refs = _list_file(path)
    elif path.is_file():
        refs = [_ref(text)]
    elif _is_glob(text):
        matches = sorted(glob.glob(text, recursive=True))
        refs = [_ref(m) for m in matches if Path(m).is_file()]
        if not refs:
            raise SourceListError(f"The pattern {text!r} matches no file.")
    else:
        raise SourceListError(
            f"{text!r} was not found: give a raster file, a folder of rasters, a text file "
            "listing rasters, a glob such as 'tiles/*.tif', or a STAC catalogue (.json)."
        )
    return _unique(refs)


def _ref(uri: str, name: str | None = None) -> RasterRef:
    return RasterRef(uri=uri, name=name or uri.rstrip("/").rsplit("/", 1)[-1])


def _unique(refs: Iterable[RasterRef]) -> list[RasterRef]:
    """Drop repeated URIs; make names unique (two folders may both hold ``tile_1.tif``)."""
    seen: set[str] = set()
    names: dict[str, int] = {}
    out = []
    for ref in refs:
        key = ref.uri if is_remote(ref.uri) or ref.error else str(Path(ref.uri).resolve())
        if key in seen:
            continue
        seen.add(key)
        n = names.get(ref.name, 0)
        names[ref.name] = n + 1
        out.append(ref if n == 0 else RasterRef(ref.uri, f"{ref.name}~{n + 1}", ref.error))
    if not out:
        raise SourceListError("The input lists no raster.")
    return out


def _folder(folder: Path) -> list[RasterRef]:
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES
    )
    if not files:
        raise SourceListError(
            f"The folder {str(folder)!r} holds no raster ({', '.join(RASTER_SUFFIXES)})."
        )
    return [_ref(str(p), str(p.relative_to(folder))) for p in files]


def _list_file(path: Path) -> list[RasterRef]:
    refs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if not is_remote(entry) and not Path(entry).is_absolute():
            entry = str(path.parent / entry)  # relative to the list, not to the shell
        if not is_remote(entry) and not Path(entry).is_file():
            raise SourceListError(f"{path.name} line {number}: {entry!r} is not a file.")
        refs.append(_ref(entry))
    if not refs:
        raise SourceListError(f"The list {str(path)!r} names no raster.")
    return refs


# ----------------------------------------------------------------------------------------------
# STAC
# ----------------------------------------------------------------------------------------------


def _stac(href: str, asset: str | None) -> list[RasterRef]:
    try:
        import pystac
    except ImportError as exc:  # pragma: no cover - the distributed extra installs it
        raise SourceListError(
            "Reading STAC needs pystac: pip install 'rsvlm[distributed]'."
        ) from exc
    try:
        data = pystac.StacIO.default().read_json(href)
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceListError(f"Could not read STAC {href!r}: {exc}") from exc
    kind = data.get("type")
    if kind == "FeatureCollection":
        items: Iterable[Any] = pystac.ItemCollection.from_file(href)
    elif kind == "Feature":
        items = [pystac.Item.from_file(href)]
    elif kind in ("Catalog", "Collection"):
        items = pystac.read_file(href).get_items(recursive=True)
    else:
        raise SourceListError(
            f"{href!r} is JSON but not STAC (type {kind!r}): expected a Catalog, Collection, "
            "ItemCollection or Item."
        )
    refs = [_item_ref(item, asset) for item in items]
    if not refs:
        raise SourceListError(f"The STAC {href!r} holds no item.")
    return refs


def _item_ref(item: Any, asset: str | None) -> RasterRef:
    keys = [asset] if asset else [k for k in DEFAULT_ASSETS if k in item.assets]
    if not keys or keys[0] not in item.assets:
        return RasterRef(
            uri=f"stac-item:{item.id}",
            name=str(item.id),
            error=f"STAC item {item.id!r} has no asset {asset or ' / '.join(DEFAULT_ASSETS)!r} "
            f"(it has: {', '.join(item.assets) or 'none'}); choose one with --asset.",
        )
    href = item.assets[keys[0]].get_absolute_href() or item.assets[keys[0]].href
    return RasterRef(uri=href, name=f"{item.id}/{keys[0]}")
