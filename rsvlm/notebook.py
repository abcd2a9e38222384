"""A small API for analysts in Jupyter: open an area, ask, get a GeoDataFrame, show it on a map.

    from rsvlm.notebook import Assistant

    ai = Assistant.load()                       # the default model for this machine
    area = ai.open("scene.tif", bbox=(32.5940, 0.3503, 32.5950, 0.3512))   # lon/lat W,S,E,N
    result = ai.ask(area, "Find all buildings in this image.")
    result.text                                 # the answer as the model wrote it
    result.detections                           # GeoDataFrame, EPSG:4326: label, score, question
    result.show()                               # a leafmap map: the imagery and the boxes

Everything goes through the engine's public interface (`rsvlm.loading.load`,
`rsvlm.engine.ChatEngine`, its `rsvlm.answer.Answer`, `rsvlm.scan.scan`) and `tiles`; nothing
here knows about CRSs.
Maps are `leafmap.foliumap.Map` when leafmap is installed, plain folium otherwise (said once).
Labels and questions are escaped before they reach a map popup: model output is untrusted text.
"""

from __future__ import annotations

import html
import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import geopandas as gpd

    from tiles import Chip

log = logging.getLogger(__name__)

COLUMNS = ("label", "score", "question", "source")
Bounds = tuple[float, float, float, float]


def open_area(image: str | Path | Any, bbox: Sequence[float] | None = None, *, size: int = 512,
              allow_network: bool = False) -> Chip:
    """A chip of ``image`` (a raster path, a plain picture, an XYZ provider name or a
    `tiles.Chip`): ``bbox`` is lon/lat ``(W, S, E, N)`` for georeferenced sources (pixels
    ``(x1, y1, x2, y2)`` for a plain picture), ``None`` for all of it. Raises
    `tiles.ImageryError` with the reason for bad input."""
    from tiles import Chip, open_source

    if isinstance(image, Chip):
        return image
    with open_source(image, allow_network=allow_network) as src:
        box = tuple(float(v) for v in bbox) if bbox is not None else None
        return src.chip(box, crs="EPSG:4326", size=size)


def detections_frame(detections: Iterable[Any]) -> gpd.GeoDataFrame:
    """`tiles.export.Detection` objects -> GeoDataFrame in EPSG:4326 (label, score, question,
    source, geometry); an empty frame keeps the columns."""
    import geopandas as gpd

    detections = list(detections)
    rows = [{"label": d.label, "score": d.score, "question": d.question, "source": d.source}
            for d in detections]
    geoms = [d.geometry for d in detections]
    frame = gpd.GeoDataFrame(rows, columns=list(COLUMNS), geometry=geoms, crs="EPSG:4326")
    frame["score"] = frame["score"].astype("float64")
    return frame


@dataclass(repr=False)
class Result:
    """One answer: the text, its detections on the map, and what produced them."""

    question: str
    text: str
    detections: gpd.GeoDataFrame
    chip: Chip | None = None
    boxes_px: list[tuple[str, tuple[float, float, float, float]]] = field(default_factory=list)
    retrieved: list[tuple[str, float]] = field(default_factory=list)
    raw: Any = None  # the engine's answer (or the scan result), for everything else
    note: str = ""

    @property
    def summary(self) -> str:
        """The answer for a reader: "Found 8 buildings." for boxes, else the text."""
        if not self.boxes_px:
            return self.text
        from collections import Counter

        counts = Counter(label for label, _ in self.boxes_px)
        parts = [f"{n} {_plural(label) if n > 1 else label}" for label, n in
                 counts.most_common()]
        return "Found " + ", ".join(parts) + "."

    def show(self, m: Any = None, *, image: bool = True, **kwargs: Any) -> Any:
        """A map of the imagery and the detections (see `show`)."""
        return show(self.detections, m=m, chip=self.chip if image else None, **kwargs)

    def __repr__(self) -> str:
        return (f"Result(question={self.question!r}, summary={self.summary!r}, "
                f"detections={len(self.detections)})")

    def _repr_markdown_(self) -> str:
        n = len(self.detections)
        lines = [f"**{html.escape(self.question)}**", "", html.escape(self.summary)]
        if n or self.boxes_px:
            where = "on the map" if n else "in pixel space (the image has no georeference)"
            lines += ["", f"*{n or len(self.boxes_px)} detection(s) {where}*"]
        if self.note:
            lines += ["", f"*{html.escape(self.note)}*"]
        return "\n".join(lines)


class Assistant:
    """One loaded model for a notebook: ``open``, ``ask`` and ``scan`` areas."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    @classmethod
    def load(cls, model: str | None = None, *, device: str | None = None,
             quantize: bool | None = None, decode: str | None = "auto",
             max_new_tokens: int = 160) -> Assistant:
        """Load ``model`` (a preset name or model folder; None: the default for this machine)."""
        from rsvlm.engine import ChatEngine
        from rsvlm.loading import load

        loaded = load(model, device=device, quantize=quantize)
        engine = ChatEngine(loaded, max_new_tokens=max_new_tokens, decode_backend=decode)
        log.info("model: %s", loaded.info.get("summary", loaded.info))
        return cls(engine)

    @property
    def info(self) -> dict[str, Any]:
        return dict(self.engine.info)

    def open(self, image: str | Path | Any, bbox: Sequence[float] | None = None, *,
             size: int = 512, allow_network: bool = False) -> Chip:
        """See `open_area`."""
        return open_area(image, bbox, size=size, allow_network=allow_network)

    def ask(self, image: str | Path | Any, question: str, *, bbox: Sequence[float] | None = None,
            region: Sequence[float] | None = None, size: int = 512) -> Result:
        """Ask one question about ``image`` (a chip from `open`, or a path and ``bbox``).

        ``region`` is a lon/lat box ``(W, S, E, N)`` inside the area that the question is about
        (as a rectangle drawn in the app): the model still sees the whole area.
        """
        from tiles import Detection

        question = str(question or "").strip()
        if not question:
            raise ValueError("The question is empty.")
        chip = open_area(image, bbox, size=size)
        region_px = None
        if region is not None:
            if not chip.georeferenced:
                raise ValueError("region= needs a georeferenced image (lon/lat box)")
            region_px = chip.bbox_lonlat_to_box_px(*(float(v) for v in region))
        session = self.engine.session(chip)
        for _ in session.ask(question, region_box_px=region_px):
            pass
        answer = session.last  # rsvlm.answer.Answer
        source = Path(str(getattr(chip, "source", "") or "")).name
        dets, boxes_px = [], []
        for b in answer.boxes:
            boxes_px.append((b.name, tuple(float(v) for v in b.box_px[:4])))
            if b.geometry is not None:
                dets.append(Detection(label=b.name, geometry=b.geometry,
                                      score=getattr(b, "score", None), source=source,
                                      question=question))
        retrieved = [(str(h.get("text", "")), float(h.get("score") or 0.0))
                     for h in answer.retrieved]
        note = "" if chip.georeferenced else "no georeference: boxes are in image pixels"
        return Result(question, answer.text, detections_frame(dets), chip, boxes_px, retrieved,
                      answer, note)

    def scan(self, image: str | Path, question: str, *, chip_size: int = 512,
             overlap: float = 0.125, batch_size: int = 4, progress: Any = None) -> Result:
        """Ask ``question`` of every chip of a whole georeferenced raster, boxes merged across
        chip borders (`rsvlm.scan.scan`)."""
        from rsvlm.scan import scan
        from tiles import open_source

        with open_source(image) as src:
            found = scan(src, question, engine=self.engine, chip_size=chip_size,
                         overlap=overlap, batch_size=batch_size, progress=progress)
            chip = src.chip(None, crs="EPSG:4326", size=1024)
        text = (f"Found {len(found)} object(s) in {found.chips_done} of {found.chips_total} "
                "chips" + (" (cancelled)" if found.cancelled else "") + ".")
        return Result(question, text, detections_frame(list(found)), chip, raw=found)


def _plural(word: str) -> str:
    if word.endswith(("s", "sh", "ch", "x")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


# --- maps ----------------------------------------------------------------------------------------

_warned_folium = False


def new_map(bounds: Bounds | None = None, **kwargs: Any) -> Any:
    """A `leafmap.foliumap.Map` (folium when leafmap is not installed, said once)."""
    global _warned_folium
    try:
        import leafmap.foliumap as leafmap

        m = leafmap.Map(**kwargs)
    except ImportError:
        if not _warned_folium:
            warnings.warn("leafmap is not installed (pip install leafmap): showing a plain "
                          "folium map", stacklevel=2)
            _warned_folium = True
        import folium

        m = folium.Map(**kwargs)
    if bounds is not None:
        w, s, e, n = bounds
        m.fit_bounds([[s, w], [n, e]])
    return m


def _escaped(frame: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """Text columns HTML-escaped: folium builds tooltips and popups as HTML."""
    from pandas.api.types import is_object_dtype, is_string_dtype

    out = frame.copy()
    for col in out.columns:
        if col != out.geometry.name and (is_string_dtype(out[col]) or is_object_dtype(out[col])):
            out[col] = out[col].map(lambda v: html.escape(str(v)) if isinstance(v, str) else v)
    return out


def make_offline(m: Any) -> Any:
    """Point every script and stylesheet of ``m`` and its layers at folium-offline's copies
    (as ``data:`` URLs), so the map shows in a notebook with no network. Assets without an
    offline copy keep their CDN link. Returns ``m``."""
    import base64

    try:
        # folium-offline keeps its copies in one table keyed by the CDN URL folium links to.
        from offlinefolium.elements import _res as offline_copies
    except ImportError:  # pragma: no cover - a dependency of the package
        log.warning("folium-offline is not installed: the map loads Leaflet from the network")
        return m

    def data_url(url: str, kind: str) -> str:
        text = offline_copies.get(url)
        if text is None:
            return url
        return f"data:{kind};base64," + base64.b64encode(text.encode()).decode("ascii")

    stack = [m]
    while stack:
        element = stack.pop()
        stack.extend(getattr(element, "_children", {}).values())
        if getattr(element, "default_js", None):
            element.default_js = [(n, data_url(u, "text/javascript"))
                                  for n, u in element.default_js]
        if getattr(element, "default_css", None):
            element.default_css = [(n, data_url(u, "text/css")) for n, u in element.default_css]
    return m


def show(detections: gpd.GeoDataFrame | Result, m: Any = None, *, chip: Chip | None = None,
         layer_name: str = "detections", color: str = "#ff3b30", offline: bool = True,
         **map_kwargs: Any) -> Any:
    """Detections (and the chip's imagery, when given) on a leafmap map; returns the map.

    ``m`` adds the layers to an existing leafmap/folium map instead of a new one. ``offline``
    inlines Leaflet and the other assets (`make_offline`); basemap tiles still need the network,
    the imagery of the area does not.
    """
    import folium

    if isinstance(detections, Result):
        chip = chip if chip is not None else detections.chip
        detections = detections.detections
    bounds = None
    if chip is not None and chip.bounds_lonlat is not None:
        bounds = tuple(chip.bounds_lonlat)
    elif len(detections):
        bounds = tuple(detections.total_bounds)
    if m is None:
        m = new_map(bounds, **map_kwargs)
    if chip is not None and chip.bounds_lonlat is not None:
        from tiles.overlay import overlay_from_chip

        w, s, e, n = chip.bounds_lonlat
        folium.raster_layers.ImageOverlay(
            image=overlay_from_chip(chip).to_data_url(), bounds=[[s, w], [n, e]],
            name=f"imagery: {html.escape(Path(str(chip.source)).name)}").add_to(m)
    if len(detections):
        frame = _escaped(detections)
        fields = [c for c in ("label", "score", "question") if c in frame.columns]
        folium.GeoJson(
            frame.to_json(), name=html.escape(layer_name),
            style_function=lambda _f: {"color": color, "weight": 2, "fillOpacity": 0.05},
            tooltip=folium.GeoJsonTooltip(fields=fields),
        ).add_to(m)
    folium.LayerControl().add_to(m)
    return make_offline(m) if offline else m
