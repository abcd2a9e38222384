"""What the app does, as plain typed functions: a bbox, a file or a question in; an `UIUpdate`
(plain values: HTML strings, arrays, lists) out. No Gradio here, so tests call them directly;
`app.layout` wires them to components.

Every piece of untrusted text (user input, OSM tags, model output) leaves this module escaped:
tables through `html_safe.table`, chat through `html_safe.markdown_text`, map popups as DOM text
nodes (`map_html`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from app.answers import readable_answer, streaming_text
from app.backend import Backend, BackendNotReady, Session
from app.files import FileStore, SessionFiles
from app.guards import (
    MAX_QUESTION_CHARS,
    UserError,
    check_class,
    check_question,
    checked_chip,
    chip_summary,
    public,
    reject,
)
from app.html_safe import esc, markdown_text, table  # noqa: F401 - app.layout uses h.esc
from app.map_html import ImageLayer, MapSpec, map_iframe, overlay_layer, render_map
from app.osm_panel import AreaOSM, AreaStore, features_for, fetch_area, map_layer, panel_html
from app.region import Region, features_geojson
from rsvlm.answer import Answer

if TYPE_CHECKING:
    from tiles import Chip, Detection

log = logging.getLogger(__name__)

Bounds = tuple[float, float, float, float]
QUICK_ACTIONS = {
    "classify": "Classify the scene: what kind of area is this?",
    "describe": "Describe this image in detail.",
    "find": "Find all {cls} in this image.",
    "count": "How many {cls} are in this image?",
}
__all__ = ["MAX_QUESTION_CHARS", "AppContext", "SessionState", "UIUpdate", "UserError"]
TILE_PROVIDER = "Esri.WorldImagery"


@dataclass
class AppContext:
    """What every handler shares: built once in `app.main`, never mutated per request."""

    backend: Backend
    region: Region | None
    export_dir: Path
    chip_size: int = 512
    max_upload_mb: float = 50.0
    online: bool = False
    max_detections: int = 1000
    max_history: int = 40
    tile_provider: str = TILE_PROVIDER
    region_layer: ImageLayer | None = None
    region_osm: dict[str, Any] | None = None
    osm: Any = None  # training.osm_source.OSMSource for imagery outside the region, or None
    osm_areas: AreaStore = field(default_factory=AreaStore)  # fetched areas (prompt context)
    #: Fraction of a chip that must be imagery (see `app.guards`).
    min_coverage: float = 0.25
    #: How long a question waits for a model that is still loading before it gives up.
    ready_timeout_s: float = 900.0
    #: Find/count questions about areas larger than a chip at native resolution are scanned.
    scan_large_areas: bool = True
    #: Per-session folders for uploads and exports, under ``export_dir`` (see `app.files`).
    files: FileStore = field(init=False)

    def __post_init__(self) -> None:
        self.files = FileStore(self.export_dir)
        if self.region is not None and self.region_layer is None:
            self.region_layer = overlay_layer(self.region.preview, f"Imagery: {self.region.name}",
                                              self.region.attribution)
            self.region_osm = features_geojson(self.region.osm)


@dataclass
class SessionState:
    """One browser tab. Small and bounded: chip, history, detections, upload path."""

    chip: Chip | None = None
    chip_source: str = ""
    session: Session | None = None  # opened lazily on the first question about this chip
    upload_path: str = ""
    upload_layer: ImageLayer | None = None
    upload_georeferenced: bool = False
    osm_area: AreaOSM | None = None  # OSM features of the upload / fetched tile's area
    view_bbox: Bounds | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)
    last_boxes: list[tuple[tuple[int, int, int, int], str]] = field(default_factory=list)
    last_answer: Answer | None = None
    exports: list[Path] = field(default_factory=list)
    first_number: int = 1  # the number (map, chip, table) of ``detections[0]``
    min_score: float = 0.0  # detections scored below are hidden in the table and on the map
    cancel: threading.Event = field(default_factory=threading.Event)  # the Stop button
    files: SessionFiles | None = None  # this session's folder (uploads, exports)

    def close(self) -> None:
        """Remove the session's files (the session has ended)."""
        if self.files is not None:
            self.files.close()


@dataclass
class UIUpdate:
    """New values for the panels; ``None`` leaves a panel as it is."""

    map_html: str | None = None
    chip_image: tuple[np.ndarray, list[tuple[tuple[int, int, int, int], str]]] | None = None
    chat: list[dict[str, Any]] | None = None
    semantics_html: str | None = None
    detections_html: str | None = None
    prompt: str | None = None
    progress_html: str | None = None  # the whole-scene progress bar ("" hides it)
    notice: str | None = None  # a message for this user (bad input, model not ready, failure)


# --- parsing what the browser sends -------------------------------------------------------------

def parse_bbox(text: str) -> Bounds:
    """``"W,S,E,N"`` (lon/lat) -> bounds; `UserError` with the reason otherwise."""
    from tiles import check_bbox

    text = str(text)
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p]
    if len(parts) != 4:
        shown = text if len(text) <= 60 else text[:60] + "…"
        raise UserError(f"A bbox is four numbers W,S,E,N (lon/lat); got {shown!r}.")
    try:
        w, s, e, n = check_bbox(parts)
    except ValueError as exc:
        raise UserError(str(exc)[:300]) from exc
    if not (s >= -90 and n <= 90 and w >= -360 and e <= 360):
        raise UserError(f"The bbox {[w, s, e, n]} is not lon/lat: latitudes must be within "
                        "-90..90 and longitudes within -360..360 (W,S,E,N order).")
    return (w, s, e, n)


def bbox_from_geojson(text: str) -> Bounds:
    """The bounds of a drawn shape (Feature, FeatureCollection or geometry GeoJSON text)."""
    from shapely.geometry import shape

    try:
        obj = json.loads(text)
        obj = obj.get("geojson", obj)
        if obj.get("type") == "FeatureCollection":
            obj = obj["features"][-1]
        geom = shape(obj["geometry"] if obj.get("type") == "Feature" else obj)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise UserError("The drawn shape could not be read; draw the rectangle again.") from exc
    w, s, e, n = geom.bounds
    if not (e > w and n > s):
        raise UserError("The drawn rectangle has no area; drag to draw it.")
    return (w, s, e, n)


# --- views ----------------------------------------------------------------------------------------

def _map(ctx: AppContext, state: SessionState, fit: Bounds | None = None) -> str:
    from tiles import to_feature_collection

    images = [layer for layer in (ctx.region_layer, state.upload_layer) if layer is not None]
    dets = None
    if state.detections:
        dets = to_feature_collection(state.detections)
        for i, feature in enumerate(dets["features"]):  # the numbers of the chat and the table
            feature["properties"]["n"] = state.first_number + i
    chip_bounds = state.chip.bounds_lonlat if state.chip is not None else None
    spec = MapSpec(images=images, osm=map_layer(ctx.region_osm, state.osm_area),
                   detections=dets, chip_bounds=chip_bounds,
                   fit_bounds=fit or chip_bounds, online=ctx.online, min_score=state.min_score)
    return map_iframe(render_map(spec))


def distinct_descriptions(retrieved: list[dict[str, Any]]) -> list[tuple[str, float, int]]:
    """Retrieved rows (``{"text", "score", ...}``) without repeats: ``(text, best score, times
    retrieved)``, best first. The database can hold one description for many chips; it is
    shown once."""
    best: dict[str, tuple[str, float, int]] = {}
    for row in retrieved:
        text, score = row.get("text", ""), float(row.get("score") or 0.0)
        key = " ".join(str(text).split()).casefold()
        old = best.get(key)
        if old is None:
            best[key] = (str(text), float(score), 1)
        else:
            best[key] = (old[0], max(old[1], float(score)), old[2] + 1)
    return sorted(best.values(), key=lambda r: -r[1])


def _semantics(ctx: AppContext, state: SessionState) -> str:
    retrieved = state.last_answer.retrieved if state.last_answer is not None else []
    rows = [(t, f"{s:.3f}" + (f" (×{n})" if n > 1 else ""))
            for t, s, n in distinct_descriptions(retrieved)]
    parts = ["<h4>Retrieved descriptions</h4>",
             table(["description", "score"], rows,
                   empty=("ask a question to see what the model retrieved"
                          if state.last_answer is None else
                          "nothing: this model has no semantic database"))]
    bounds = state.chip.bounds_lonlat if state.chip is not None else None
    feats, source, note = features_for(ctx.region, state.osm_area, bounds)
    where = "this chip" if bounds else "no georeferenced chip"
    attribution = state.osm_area.attribution if state.osm_area is not None else ""
    parts.append(panel_html(feats, where, source, note, attribution))
    return "\n".join(parts)


def _shown(det: Detection, min_score: float) -> bool:
    return det.score is None or det.score >= min_score


def _detections_table(state: SessionState) -> str:
    numbered = [(state.first_number + i, d) for i, d in enumerate(state.detections)]
    shown = [(n, d) for n, d in numbered if _shown(d, state.min_score)]
    rows = []
    for n, det in shown[-200:]:
        c = det.geometry.centroid
        score = "" if det.score is None else f"{det.score:.2f}"
        rows.append((n, det.label, score, f"{c.x:.6f}", f"{c.y:.6f}", det.question))
    caption = f"{len(state.detections)} detections this session (exportable)"
    if len(shown) != len(numbered):
        caption += f"; {len(shown)} shown with score ≥ {state.min_score:.2f}"
    return table(["#", "label", "score", "lon", "lat", "question"], rows, caption=caption,
                 empty="no detections yet")


def _chip_view(state: SessionState) -> tuple[np.ndarray, list] | None:
    if state.chip is None:
        return None
    return (state.chip.pixels, list(state.last_boxes))


def _full_update(ctx: AppContext, state: SessionState, fit: Bounds | None = None,
                 notice: str | None = None) -> UIUpdate:
    return UIUpdate(map_html=_map(ctx, state, fit), chip_image=_chip_view(state),
                    semantics_html=_semantics(ctx, state),
                    detections_html=_detections_table(state), notice=notice)


# --- session start, chips -----------------------------------------------------------------------

def start_session(ctx: AppContext, key: str | None = None) -> tuple[SessionState, UIUpdate]:
    """A fresh tab: the whole region is the chip. ``key`` names its file folder (Gradio's
    session hash), so the folder can be removed when the tab goes."""
    state = SessionState(files=ctx.files.open(key))
    if ctx.region is not None:
        _set_chip(ctx, state, str(ctx.region.imagery), None)
    return state, _full_update(ctx, state)


def _set_chip(ctx: AppContext, state: SessionState, source: str, bbox: Bounds | None) -> None:
    from tiles import open_source

    with open_source(source) as src:
        chip = checked_chip(src, bbox, size=ctx.chip_size, min_coverage=ctx.min_coverage)
    state.chip, state.chip_source, state.session = chip, source, None
    state.last_boxes, state.last_answer = [], None


def _source_for(ctx: AppContext, state: SessionState, bbox: Bounds) -> str | None:
    """The local imagery ``bbox`` overlaps: the upload first, then the region."""
    from tiles import intersects

    candidates = []
    if state.upload_layer is not None and state.upload_georeferenced:
        candidates.append((state.upload_path, state.upload_layer.bounds_lonlat))
    if ctx.region is not None and ctx.region.bounds_lonlat is not None:
        candidates.append((str(ctx.region.imagery), ctx.region.bounds_lonlat))
    for path, bounds in candidates:
        if intersects(bbox, bounds):
            return path
    return None


def select_bbox(ctx: AppContext, state: SessionState, bbox: Bounds) -> UIUpdate:
    """Make ``bbox`` (W, S, E, N lon/lat) the chip; the next questions are about it."""
    from tiles import ImageryError

    source = _source_for(ctx, state, bbox)
    if source is None:
        reject("bbox", "no local imagery under the rectangle")
        return UIUpdate(notice="There is no local imagery under that rectangle. Draw inside the "
                               "imagery, upload a GeoTIFF, or click the basemap to fetch a tile.")
    try:
        _set_chip(ctx, state, source, bbox)
    except (ImageryError, UserError) as exc:
        reject("bbox", str(exc))
        return UIUpdate(notice=public(str(exc)))
    return _full_update(ctx, state)


def on_draw(ctx: AppContext, state: SessionState, payload: str) -> UIUpdate:
    """A rectangle drawn on the map (GeoJSON text from the bridge) becomes the chip."""
    if not payload or not payload.strip():
        return UIUpdate()
    try:
        bbox = bbox_from_geojson(payload)
    except UserError as exc:
        return UIUpdate(notice=str(exc))
    return select_bbox(ctx, state, bbox)


def use_view(ctx: AppContext, state: SessionState, payload: str) -> UIUpdate:
    """The map's current view becomes the chip."""
    try:
        bbox = tuple(float(v) for v in json.loads(payload)["bbox"])
    except (ValueError, KeyError, TypeError):
        return UIUpdate(notice="The map has not reported its view yet; pan or zoom it once.")
    if ctx.region is not None and ctx.region.bounds_lonlat is not None:
        # Clamp to local imagery so "the view" of a zoomed-out map still means that imagery.
        from tiles import intersects

        rb = ctx.region.bounds_lonlat
        if intersects(bbox, rb):
            bbox = (max(bbox[0], rb[0]), max(bbox[1], rb[1]), min(bbox[2], rb[2]),
                    min(bbox[3], rb[3]))
    return select_bbox(ctx, state, bbox)  # type: ignore[arg-type]


def on_map_click(ctx: AppContext, state: SessionState, payload: str, allow_network: bool
                 ) -> UIUpdate:
    """A click outside local imagery: fetch that basemap tile as the chip (network opt-in)."""
    import mercantile

    from tiles import ImageryError, open_source

    try:
        click = json.loads(payload)
        lon, lat, zoom = float(click["lon"]), float(click["lat"]), int(click["zoom"])
    except (ValueError, KeyError, TypeError):
        return UIUpdate()
    if not allow_network:
        return UIUpdate(notice="No local imagery here. Tick 'Fetch tiles from the internet' "
                               f"to use {ctx.tile_provider} tiles for this spot.")
    tile = mercantile.tile(lon, lat, min(max(zoom, 3), 19))
    b = mercantile.bounds(tile)
    try:
        with open_source(ctx.tile_provider, allow_network=True) as src:
            chip = src.chip((b.west, b.south, b.east, b.north), crs="EPSG:4326",
                            size=ctx.chip_size)
    except (ImageryError, OSError) as exc:
        reject("map click", str(exc))
        return UIUpdate(notice=public(f"Could not fetch the tile: {exc}"))
    from tiles import overlay_from_chip

    state.chip, state.chip_source, state.session = chip, ctx.tile_provider, None
    state.last_boxes, state.last_answer = [], None
    state.upload_layer = overlay_layer(overlay_from_chip(chip), "Fetched tile")
    state.upload_georeferenced, state.upload_path = False, ""
    state.osm_area = fetch_area(ctx.osm, chip.bounds_lonlat, ctx.osm_areas)
    return _full_update(ctx, state)


# --- uploads ------------------------------------------------------------------------------------

def upload(ctx: AppContext, state: SessionState, path: str | None) -> UIUpdate:
    """An uploaded image: a GeoTIFF becomes an overlay and the chip; a plain picture is
    answered in pixel space. Size and format are checked; a bad file leaves the session as is."""
    from tiles import ImageryError, open_source

    if not path:
        return UIUpdate()
    name = Path(path).name
    if state.files is not None:  # out of Gradio's upload folder, into the session's own
        try:
            path = str(state.files.adopt(path))
        except OSError as exc:
            reject("upload", f"gone before it was read ({type(exc).__name__})")
            return UIUpdate(notice=f"{name} is no longer on the server; upload it again.")
    size_mb = os.path.getsize(path) / 1e6
    if size_mb > ctx.max_upload_mb:
        reject("upload", f"{size_mb:.1f} MB over the {ctx.max_upload_mb:g} MB limit")
        return UIUpdate(notice=f"{name} is {size_mb:.1f} MB; the limit is "
                               f"{ctx.max_upload_mb:g} MB.")
    try:
        with open_source(path) as src:
            georef = src.georeferenced
            layer = overlay_layer(src.preview(1024), f"Upload: {name}") if georef else None
            chip = checked_chip(src, None, size=ctx.chip_size, min_coverage=ctx.min_coverage)
    except (ImageryError, UserError) as exc:
        reject("upload", str(exc))
        return UIUpdate(notice=public(f"{name}: {exc}"))
    except Exception as exc:  # a reader crash must not end the session
        log.exception("upload failed")
        return UIUpdate(notice=f"{name} could not be read as imagery "
                               f"({type(exc).__name__}).")
    state.upload_path, state.upload_layer, state.upload_georeferenced = path, layer, georef
    state.osm_area = fetch_area(ctx.osm, layer.bounds_lonlat if layer is not None else None,
                                ctx.osm_areas)
    state.chip, state.chip_source, state.session = chip, path, None
    state.last_boxes, state.last_answer = [], None
    note = None if georef else (f"{name} has no georeference: answers are in pixel "
                                "space (shown on the image, not on the map).")
    fit = layer.bounds_lonlat if layer is not None else None
    return _full_update(ctx, state, fit=fit, notice=note)


# --- chat -----------------------------------------------------------------------------------------

def quick_question(action: str, cls: str = "buildings") -> str:
    """The question a quick-action button asks."""
    template = QUICK_ACTIONS.get(action)
    if template is None:
        raise UserError(f"Unknown quick action {action!r}.")
    return template.format(cls=check_class(cls))


def wait_until_ready(ctx: AppContext, poll_s: float = 0.5) -> Iterator[str]:
    """Wait (bounded by ``ctx.ready_timeout_s``) for a model that is still loading, yielding its
    loading progress every ``poll_s``; `BackendNotReady` when it failed or took too long."""
    t0 = time.perf_counter()
    while True:
        info = ctx.backend.info
        state = info.get("state", "ready")
        if state == "ready":
            return
        if state == "failed":
            raise BackendNotReady(f"The model failed to load: {info.get('why', '')}")
        waited = time.perf_counter() - t0
        if waited > ctx.ready_timeout_s:
            raise BackendNotReady(f"The model is still loading after {waited:.0f} s "
                                  f"({info.get('why', '')}); try again later.")
        yield f"Waiting for the model to load ({info.get('why', '')})"
        time.sleep(poll_s)


def _say(history: list[dict[str, Any]], text: str) -> None:
    history[-1] = {"role": "assistant", "content": markdown_text(text)}


def _wants_scan(ctx: AppContext, state: SessionState, question: str) -> bool:
    from app.scene import asks_to_find

    return asks_to_find(question) and _area_needs_scan(ctx, state)


def _describes_scanned_area(ctx: AppContext, state: SessionState, question: str) -> bool:
    """A description of an area the app reads in tiles, by a model with a detector, or what
    kind of area it is where the detector answers that (an area smaller than the scene
    classifier's scenes): its count then comes from the same read as a count question's
    (`_ask_described_area`)."""
    from rsvlm.engine import below_scene_scale
    from rsvlm.perception import asks_description
    from rsvlm.scene import asks_scene

    if not _detector_labels(ctx) or state.chip is None:
        return False
    asked = asks_description(question) or (asks_scene(question)
                                            and below_scene_scale(state.chip.ground_area_m2))
    return asked and _area_needs_scan(ctx, state)


def _detector_labels(ctx: AppContext) -> list[str]:
    """The classes the model's detector answers (none: it has no detector)."""
    return list(ctx.backend.info.get("detector_labels") or [])


def _area_needs_scan(ctx: AppContext, state: SessionState) -> bool:
    from app.scene import needs_scan

    if not (ctx.scan_large_areas and state.chip is not None and state.chip.georeferenced
            and state.chip_source and Path(state.chip_source).is_file()):
        return False  # a fetched basemap tile is one look: there is no raster to tile
    from tiles import ImageryError, open_source

    try:
        with open_source(state.chip_source) as src:
            return needs_scan(src, state.chip.bounds, ctx.chip_size)
    except (ImageryError, OSError):  # not a local raster (a fetched tile): one look
        return False


def ask(ctx: AppContext, state: SessionState, question: str) -> Iterator[UIUpdate]:
    """Stream the answer into the chat, then ground its boxes on the map, chip and table. A
    find/count question about an area larger than a chip at native resolution scans it in tiles
    (progress bar, Stop button) instead."""
    try:
        question = check_question(question)
    except UserError as exc:
        reject("question", str(exc))
        yield UIUpdate(notice=str(exc) if (question or "").strip() else "Type a question first.")
        return
    if state.chip is None:
        yield UIUpdate(notice="No imagery yet: upload an image or draw a rectangle on the map.")
        return
    history = state.history
    history.append({"role": "user", "content": markdown_text(question)})
    history.append({"role": "assistant", "content": "…"})
    del history[:-ctx.max_history]
    state.cancel.clear()
    yield UIUpdate(chat=list(history))
    try:
        for message in wait_until_ready(ctx):
            _say(history, message)
            yield UIUpdate(chat=list(history))
            if state.cancel.is_set():
                raise BackendNotReady("Stopped while the model was loading.")
        if _wants_scan(ctx, state, question):
            yield from _ask_scene(ctx, state, question)
        elif _describes_scanned_area(ctx, state, question):
            yield from _ask_described_area(ctx, state, question)
        else:
            yield from _ask_chip(ctx, state, question)
    except BackendNotReady as exc:
        _say(history, str(exc))
        yield UIUpdate(chat=list(history), notice=str(exc), progress_html="")
    except Exception as exc:  # one failed request must not take the session or server down
        log.exception("answer failed")
        msg = public(f"Sorry, this answer failed ({type(exc).__name__}: {exc}).")
        _say(history, msg)
        state.session = None  # a broken session is not reused
        yield UIUpdate(chat=list(history), notice=msg, progress_html="")


def _add_detections(ctx: AppContext, state: SessionState, dets: list[Detection]) -> list[int]:
    """Append ``dets`` to the session's detections; returns their numbers."""
    start = state.first_number + len(state.detections)
    state.detections.extend(dets)
    extra = len(state.detections) - ctx.max_detections
    if extra > 0:  # bounded: the oldest go, the numbers of the rest stay
        del state.detections[:extra]
        state.first_number += extra
    return list(range(start, start + len(dets)))


def _ask_chip(ctx: AppContext, state: SessionState, question: str,
              t0: float | None = None) -> Iterator[UIUpdate]:
    """``t0``: when the answer began (its footer's time), if before this look at the chip."""
    from app.scene import asks_to_find
    from tiles import Detection

    history = state.history
    t0 = time.perf_counter() if t0 is None else t0
    if state.session is None:
        state.session = ctx.backend.new_session(state.chip)
    text, last_yield = "", 0.0
    stream = state.session.ask(question)
    try:
        for delta in stream:
            text += delta
            now = time.perf_counter()
            if now - last_yield > 0.05:  # enough for a live stream, not a flood of diffs
                last_yield = now
                _say(history, streaming_text(text))
                yield UIUpdate(chat=list(history))
            if state.cancel.is_set():
                break
    finally:
        stream.close()  # a stopped answer stops generating
    if state.cancel.is_set():
        _say(history, streaming_text(text) + " (stopped)")
        state.session = None  # its conversation holds half an answer
        yield UIUpdate(chat=list(history))
        return
    answer = state.session.last
    if answer is None:
        raise RuntimeError("the model returned no answer")
    state.last_answer = answer
    geo = [b for b in answer.boxes if b.geometry is not None]
    if geo:
        numbers = _add_detections(ctx, state, [
            Detection(label=b.name, geometry=b.geometry, score=b.score,
                      source=state.chip_source, question=question) for b in geo])
        where = "on the map"
    else:  # pixel space: numbered on the chip only, per answer
        numbers, where = list(range(1, len(answer.boxes) + 1)), "on the chip"
    by_box = dict(zip((id(b) for b in (geo or answer.boxes)), numbers, strict=True))
    state.last_boxes = []
    for b in answer.boxes:
        x1, y1, x2, y2 = (round(v) for v in b.box_px)
        n = by_box.get(id(b))
        state.last_boxes.append(((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)),
                                 f"#{n} {b.name}" if n is not None else b.name))
    readable = readable_answer(answer.text, [b.name for b in answer.boxes],
                               [by_box.get(id(b), 0) for b in answer.boxes], where=where,
                               asks_for_all=asks_to_find(question))
    footer = f"{time.perf_counter() - t0:.1f} s"
    cover = state.chip.meta.get("coverage", 1.0)
    if cover < 0.995:  # say how much of the chip is imagery at all
        footer = f"imagery covers {cover:.0%} of the chip · " + footer
    history[-1] = {"role": "assistant",
                   "content": markdown_text(readable) + f"\n\n*{markdown_text(footer)}*"}
    update = _full_update(ctx, state) if geo else UIUpdate(
        chip_image=_chip_view(state), semantics_html=_semantics(ctx, state),
        detections_html=_detections_table(state))
    update.chat = list(history)
    update.prompt = f"{answer.prompt}\n\n--- raw answer of the model ---\n{answer.text}"
    update.progress_html = ""
    yield update


def _ask_described_area(ctx: AppContext, state: SessionState, question: str
                        ) -> Iterator[UIUpdate]:
    """Describe an area larger than a chip at native resolution: its buildings are found as a
    count question finds them (the tiles at native resolution, merged: drawn on the map), and
    the description says that number rather than the one downsampled look's."""
    from rsvlm.perception import plural

    t0 = time.perf_counter()
    label = _detector_labels(ctx)[0]  # buildings: the class descriptions count first
    yield from _ask_scene(ctx, state, f"Find all {plural(label)} in the image.")
    if state.cancel.is_set():
        return
    yield from _ask_chip(ctx, state, question, t0)  # its time: the scan's and its own


def _adopt_scan(ctx: AppContext, state: SessionState, question: str, result: Any,
                placed: list[tuple[Any, tuple[float, ...]]]) -> None:
    """The chip's conversation takes a finished scan's detections (``placed``: each with its
    chip-pixel bounds) as its own (`rsvlm.engine.ChatSession.adopt_detections`), so its later
    answers about them (a description's count, presence, the area they cover) agree with the
    scan's, none found included."""
    from rsvlm.detector import Detection as Found
    from rsvlm.perception import object_question

    if result.cancelled or state.chip is None or result.place:
        return  # a part of the area is not what the whole of it holds
    asked = object_question(question, _detector_labels(ctx))
    labels = {d.label for d in result.detections} | ({asked[1]} if asked else set())
    if not labels:
        return
    if state.session is None:
        state.session = ctx.backend.new_session(state.chip)
    adopt = getattr(state.session, "adopt_detections", None)
    if adopt is None:  # a model without a detector keeps its own reading
        return
    w, h = state.chip.width, state.chip.height
    found: dict[str, list[Found]] = {label: [] for label in labels}
    for det, (x1, y1, x2, y2) in placed:
        box = (max(x1 / w, 0.0), max(y1 / h, 0.0), min(x2 / w, 1.0), min(y2 / h, 1.0))
        if box[2] > box[0] and box[3] > box[1]:
            found[det.label].append(Found(det.label, det.score if det.score is not None
                                          else 1.0, box))
    for label, dets in found.items():
        adopt(label, dets)


def progress_html(done: int, total: int, note: str = "") -> str:
    """The whole-scene progress bar."""
    pct = 100.0 * done / total if total else 0.0
    return (f'<div class="rsvlm-progress"><progress max="{int(total)}" value="{int(done)}">'
            f'{pct:.0f}%</progress> <span>{int(done)} of {int(total)} tiles read'
            f'{esc(note)}</span></div>')


def _ask_scene(ctx: AppContext, state: SessionState, question: str) -> Iterator[UIUpdate]:
    """Scan the question area tile by tile in a worker thread, reporting progress; the Stop
    button (or the client going away) ends it after the current tile, keeping what was found."""
    from app.scene import scan_area, scan_bounds, tile_count
    from tiles import open_source

    history, chip, cancel = state.history, state.chip, state.cancel
    read = scan_bounds(ctx.backend, question, chip.bounds)[0]
    with open_source(state.chip_source) as src:
        done: dict[str, Any] = {"tiles": (0, tile_count(src, read, ctx.chip_size))}

    def progress(n: int, total: int) -> None:
        done["tiles"] = (n, total)

    def work() -> None:
        try:
            done["result"] = scan_area(ctx.backend, state.chip_source, chip.bounds, question,
                                       chip_size=ctx.chip_size, progress=progress,
                                       cancel=cancel)
        except Exception as exc:  # re-raised in the handler's thread
            done["error"] = exc

    worker = threading.Thread(target=work, name="rsvlm-scene-scan", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.25)
            n, total = done["tiles"]
            stopping = " (stopping…)" if cancel.is_set() else ""
            _say(history, f"Scanning the whole area tile by tile{stopping}: {n} of {total} "
                          "tiles read.")
            yield UIUpdate(chat=list(history), progress_html=progress_html(n, total, stopping))
    finally:
        if worker.is_alive():  # the client went away: stop after the current tile
            cancel.set()
    if "error" in done:
        from rsvlm.scan import ScanError

        if isinstance(done["error"], ScanError):
            raise BackendNotReady(str(done["error"])) from done["error"]
        raise done["error"]
    yield _scene_update(ctx, state, question, done["result"])


def _scene_update(ctx: AppContext, state: SessionState, question: str, result: Any
                  ) -> UIUpdate:
    for det in result.detections:
        det.source = state.chip_source
    numbers = _add_detections(ctx, state, result.detections)
    placed = []  # (number, detection, its chip-pixel bounds) of those on the chip
    for n, det in zip(numbers, result.detections, strict=True):
        px = state.chip.geometry_to_pixels(det.geometry)
        if px is not None and not px.is_empty:
            placed.append((n, det, px.bounds))
    state.last_boxes = [(tuple(round(v) for v in bounds), f"#{n} {det.label}")
                        for n, det, bounds in placed]
    _adopt_scan(ctx, state, question, result, [(det, bounds) for _, det, bounds in placed])
    text = result.said(numbers)
    footer = f"{result.seconds:.1f} s"
    state.history[-1] = {"role": "assistant",
                         "content": markdown_text(text) + f"\n\n*{markdown_text(footer)}*"}
    # The semantics panel shows what the tiles retrieved, each description once.
    state.last_answer = Answer(text=text, retrieved=list(result.retrieved))
    update = _full_update(ctx, state)
    update.chat = list(state.history)
    update.prompt = (f"Whole-area scan: {result.tiles_read} of {result.tiles_total} tiles of "
                     f"{ctx.chip_size} px, question {question!r}\n"
                     f"\n--- exact prompt, tile 1 ---\n{result.prompt}\n" + "".join(
                         f"\n--- raw answer, tile {i} ---\n{raw}\n"
                         for i, raw in enumerate(result.raw, start=1)))
    update.progress_html = ""
    return update


def stop(state: SessionState) -> UIUpdate:
    """The Stop button: the running answer or scan ends after its current token or tile."""
    state.cancel.set()
    return UIUpdate()


def set_min_score(ctx: AppContext, state: SessionState, value: float) -> UIUpdate:
    """Hide detections scored below ``value`` on the map and in the table (exports keep all,
    with their scores, for QGIS to filter)."""
    try:
        state.min_score = min(max(float(value), 0.0), 1.0)
    except (TypeError, ValueError):
        return UIUpdate(notice="The minimum score is a number between 0 and 1.")
    return UIUpdate(map_html=_map(ctx, state), detections_html=_detections_table(state))


def clear_chat(state: SessionState) -> UIUpdate:
    state.history.clear()
    state.session = None
    return UIUpdate(chat=[])


# --- export ---------------------------------------------------------------------------------------

def export(ctx: AppContext, state: SessionState, fmt: str = "geojson") -> tuple[Path | None, str]:
    """All detections of the session as GeoJSON or GeoPackage; returns (path, message)."""
    from tiles import ImageryError, write_geojson, write_gpkg

    if not state.detections:
        return None, "Nothing to export yet: ask the model to find objects first."
    suffix = {"geojson": ".geojson", "gpkg": ".gpkg"}.get(fmt)
    if suffix is None:
        return None, f"Unknown export format {fmt!r}."
    for old in state.exports:  # keep one file per session: disk stays flat
        old.unlink(missing_ok=True)
    if state.files is None:
        state.files = ctx.files.open()
    path = state.files.export_path("detections", suffix)
    try:
        (write_geojson if fmt == "geojson" else write_gpkg)(state.detections, path)
    except ImageryError as exc:
        return None, public(str(exc))
    state.exports = [path]
    return path, f"Exported {len(state.detections)} detections ({fmt})."


# --- API ------------------------------------------------------------------------------------------

Say = Callable[[str, "int | None", "int | None"], None]


def api_ask(ctx: AppContext, image_path: str | None, bbox: str, question: str, *,
            say: Say | None = None, cancel: threading.Event | None = None) -> tuple[str, str]:
    """One stateless question for `gradio_client`: an image file, or a bbox ``W,S,E,N`` over the
    loaded region (empty: the whole region). Returns (readable answer, detections GeoJSON text);
    the FeatureCollection also carries ``answer``, ``raw_answer`` (the model's own text) and,
    for a whole-area scan, ``tiles_read``/``tiles_total``/``cancelled``.

    A model that is still loading is waited for (bounded); ``say(message, done, total)`` hears
    the loading and scan progress; ``cancel`` stops a scan after its current tile. Bad input
    raises `UserError` with the reason."""
    from app.scene import asks_to_find, needs_scan
    from tiles import ImageryError, open_source

    question = check_question(question)
    box = parse_bbox(bbox) if bbox and bbox.strip() else None
    if image_path:
        if not os.path.isfile(image_path):
            raise UserError("The uploaded image is no longer on the server; upload it again.")
        if os.path.getsize(image_path) / 1e6 > ctx.max_upload_mb:
            raise UserError(f"The image is larger than {ctx.max_upload_mb:g} MB.")
        source = image_path
    elif ctx.region is not None:
        source = str(ctx.region.imagery)
    else:
        raise UserError("Give an image: no region is loaded.")
    try:
        with open_source(source) as src:
            chip = checked_chip(src, box, size=ctx.chip_size, min_coverage=ctx.min_coverage)
            scene = (ctx.scan_large_areas and chip.georeferenced and asks_to_find(question)
                     and needs_scan(src, chip.bounds, ctx.chip_size))
    except ImageryError as exc:
        raise UserError(public(str(exc))) from exc
    try:
        for message in wait_until_ready(ctx):
            if say is not None:
                say(message, None, None)
            if cancel is not None and cancel.is_set():
                raise UserError("Cancelled while the model was loading.")
        if scene:
            return _api_scene(ctx, source, chip, question, say, cancel)
        session = ctx.backend.new_session(chip)
        for _ in session.ask(question):
            pass
    except BackendNotReady as exc:
        raise UserError(str(exc)) from exc
    answer = session.last
    if answer is None:
        raise RuntimeError("the model returned no answer")
    return _api_chip_answer(chip, source, question, answer)


def _api_chip_answer(chip: Chip, source: str, question: str, answer: Answer) -> tuple[str, str]:
    from app.scene import asks_to_find
    from tiles import Detection, to_feature_collection

    geo = [b for b in answer.boxes if b.geometry is not None]
    dets = [Detection(label=b.name, geometry=b.geometry, score=b.score,
                      source=Path(source).name, question=question) for b in geo]
    fc = to_feature_collection(dets)
    for i, feature in enumerate(fc["features"], start=1):
        feature["properties"]["n"] = i
    # Pixel-space boxes have no place on Earth: null geometry, and the box in pixels of the
    # uploaded image (the chip may be resized; its transform maps chip -> image pixels).
    pixel = [b for b in answer.boxes if b.geometry is None]
    for i, b in enumerate(pixel, start=len(geo) + 1):
        (x1, x2), (y1, y2) = chip.pixel_to_crs(np.array(b.box_px[0::2]),
                                               np.array(b.box_px[1::2]))
        fc["features"].append({"type": "Feature", "geometry": None, "properties": {
            "n": i, "label": b.name, "score": b.score,
            "box_px": [round(float(v), 2) for v in (x1, y1, x2, y2)], "question": question}})
    ordered = geo + pixel
    numbers = {id(b): i for i, b in enumerate(ordered, start=1)}
    readable = readable_answer(answer.text, [b.name for b in answer.boxes],
                               [numbers[id(b)] for b in answer.boxes],
                               where="on the map" if geo or not pixel else "on the image",
                               asks_for_all=asks_to_find(question))
    fc["chip"] = chip_summary(chip)  # a foreign member (RFC 7946 §6.1): coverage, bounds
    fc.update(answer=readable, raw_answer=answer.text)
    return readable, json.dumps(fc)


def _api_scene(ctx: AppContext, source: str, chip: Chip, question: str, say: Say | None,
               cancel: threading.Event | None) -> tuple[str, str]:
    from app.scene import scan_area
    from rsvlm.scan import ScanError
    from tiles import to_feature_collection

    def progress(done: int, total: int) -> None:
        if say is not None:
            say(f"{done} of {total} tiles read", done, total)

    try:
        result = scan_area(ctx.backend, source, chip.bounds, question, chip_size=ctx.chip_size,
                           progress=progress, cancel=cancel)
    except ScanError as exc:
        raise UserError(public(str(exc))) from exc
    for det in result.detections:
        det.source = Path(source).name
    fc = to_feature_collection(result.detections)
    for i, feature in enumerate(fc["features"], start=1):
        feature["properties"]["n"] = i
    numbers = list(range(1, len(result.detections) + 1))
    text = result.said(numbers, where="")
    fc["chip"] = chip_summary(chip)
    fc.update(answer=text, raw_answer="\n".join(result.raw), tiles_read=result.tiles_read,
              tiles_total=result.tiles_total, cancelled=result.cancelled)
    return text, json.dumps(fc)


# --- status ---------------------------------------------------------------------------------------

def status_markdown(ctx: AppContext) -> str:
    """Which model runs, where, in what precision, how long it took to load, and why."""
    info = ctx.backend.info
    state = info.get("state", "ready")
    if state == "loading":
        return f"⏳ **Loading model** {markdown_text(str(info.get('preset', '')))} — " \
               f"{markdown_text(str(info.get('why', '')))}"
    if state == "failed":
        return f"⚠️ **Model failed to load**: {markdown_text(str(info.get('why', '')))}"
    load_s = info.get("load_s")
    load = f"{float(load_s):.1f} s" if isinstance(load_s, int | float) else "?"
    fields = [f"**Model** {markdown_text(str(info.get('preset', '?')))}",
              f"device {markdown_text(str(info.get('device', '?')))}",
              f"precision {markdown_text(str(info.get('precision', '?')))}",
              f"loaded in {load}"]
    if info.get("decode"):  # who runs the decode steps (ONNX Runtime on a CPU by default)
        fields.insert(3, f"decode {markdown_text(str(info['decode']))}")
    if info.get("detector_tower"):  # who reads the detector's tower (int8 by default)
        fields.insert(-1, f"detector tower {markdown_text(str(info['detector_tower']))}")
    if info.get("trained") is False:  # say it plainly: an untrained connector answers noise
        fields.append("**untrained connector: answers are noise**")
    why = info.get("why")
    return " · ".join(fields) + (f"  \n{markdown_text(str(why))}" if why else "")


def backend_ready(ctx: AppContext) -> bool:
    return ctx.backend.info.get("state", "ready") != "loading"
