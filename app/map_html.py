"""The map panel: a self-contained leafmap page shown in an ``<iframe srcdoc>``; every script and
stylesheet is inlined (folium-offline carries Leaflet, Leaflet.draw and the fullscreen control),
so the map renders with no network at all.

leafmap (`leafmap.foliumap.Map`) builds the page, its basemap catalogue (online only), the
layer control, fullscreen and scale; folium's draw control draws the rectangle. Our own layers
(imagery overlays, OSM features, the chip rectangle, numbered detections) are added by one small
script from JSON data, because that lets popups and labels be built from DOM text nodes: an OSM
tag or a model label can never become HTML (folium's GeoJSON popups write tags as HTML). The page
talks to the app by ``postMessage`` (``rsvlm-draw``, ``rsvlm-view``, ``rsvlm-click``); the parent
page's bridge script (`BRIDGE_JS`) writes the payloads into hidden textboxes.
"""

from __future__ import annotations

import base64
import html
import io
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from app.html_safe import json_for_script

if TYPE_CHECKING:
    from tiles import Overlay

#: leafmap basemap catalogue entries offered when the network is usable (the first is shown).
BASEMAPS = ("SATELLITE", "OpenStreetMap")
MAP_HEIGHT_PX = 560


@dataclass
class ImageLayer:
    name: str
    url: str  # data: URL
    bounds_lonlat: tuple[float, float, float, float]
    attribution: str = ""


@dataclass
class MapSpec:
    """Everything the map shows; `render_map` turns it into a page."""

    images: list[ImageLayer] = field(default_factory=list)
    osm: dict[str, Any] | None = None  # GeoJSON FeatureCollection
    detections: dict[str, Any] | None = None  # GeoJSON FeatureCollection
    chip_bounds: tuple[float, float, float, float] | None = None
    fit_bounds: tuple[float, float, float, float] | None = None
    online: bool = False
    min_score: float = 0.0  # detections scored below are hidden (unscored ones stay)


def overlay_layer(overlay: Overlay, name: str, attribution: str = "") -> ImageLayer | None:
    """A tiles `Overlay` as an image layer; JPEG when fully opaque (about 10x smaller than PNG,
    and the page is re-sent on every answer), PNG when it has transparent no-data."""
    if overlay.bounds_lonlat is None:
        return None
    if bool((overlay.rgba[..., 3] == 255).all()):
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(overlay.rgba[..., :3]).save(buf, format="JPEG", quality=88)
        url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    else:
        url = overlay.to_data_url()
    return ImageLayer(name, url, tuple(float(v) for v in overlay.bounds_lonlat), attribution)


_APP_JS = """
(function (map, drawn, control, D) {
  function post(type, payload) {
    try { window.parent.postMessage({type: type, payload: payload}, "*"); } catch (e) {}
  }
  function popup(props, keys) {
    var div = document.createElement("div");
    div.className = "rsvlm-popup";
    (keys || Object.keys(props || {})).forEach(function (k) {
      if (props[k] === undefined || props[k] === null || props[k] === "") return;
      var b = document.createElement("b");
      b.textContent = k + ": ";
      div.appendChild(b);
      div.appendChild(document.createTextNode(String(props[k])));
      div.appendChild(document.createElement("br"));
    });
    return div;
  }
  function number(n) {  // a text node: a label can never become HTML
    var span = document.createElement("span");
    span.textContent = String(n);
    return span;
  }
  function ll(b) { return [[b[1], b[0]], [b[3], b[2]]]; }
  D.images.forEach(function (im) {
    control.addOverlay(L.imageOverlay(im.url, ll(im.bounds), {attribution: im.attribution})
      .addTo(map), im.name);
  });
  if (D.osm) {
    control.addOverlay(L.geoJSON(D.osm, {
      style: {color: "#ffd400", weight: 1, fillOpacity: 0.08, className: "rsvlm-osm"},
      onEachFeature: function (f, layer) { layer.bindPopup(popup(f.properties)); }
    }).addTo(map), "OSM features");
  }
  if (D.chip) {
    control.addOverlay(L.rectangle(ll(D.chip), {
      color: "#00e5ff", weight: 2, dashArray: "6 4", fill: false, className: "rsvlm-chip",
      interactive: false}).addTo(map), "Question area");
  }
  if (D.detections && D.detections.features.length) {
    var shown = D.detections.features.filter(function (f) {
      var s = f.properties.score;
      return s === null || s === undefined || s >= D.minScore;
    });
    control.addOverlay(L.geoJSON({type: "FeatureCollection", features: shown}, {
      style: {color: "#ff2d6f", weight: 2, fillOpacity: 0.2, className: "rsvlm-det"},
      onEachFeature: function (f, layer) {
        layer.bindPopup(popup(f.properties, ["n", "label", "score", "question", "time"]));
        layer.bindTooltip(number(f.properties.n), {permanent: true, direction: "center",
                                                   className: "rsvlm-num", opacity: 0.9});
      }
    }).addTo(map), "Detections (score \\u2265 " + D.minScore + ")");
  }
  if (D.fit) { map.fitBounds(ll(D.fit)); }
  // The iframe can be laid out after this script runs (Gradio re-renders the component): a map
  // fitted while its container had no size shows the wrong place, so refit once it has one.
  var sized = map.getSize().x > 0 && map.getSize().y > 0;
  function refit() {
    var size = map.getSize(), el = map.getContainer();
    if (el.clientWidth === size.x && el.clientHeight === size.y && sized) { return; }
    map.invalidateSize(false);
    if (!sized && el.clientWidth > 0 && el.clientHeight > 0) {
      sized = true;
      if (D.fit) { map.fitBounds(ll(D.fit)); }
    }
  }
  if (window.ResizeObserver) { new ResizeObserver(refit).observe(map.getContainer()); }
  window.addEventListener("resize", refit);
  window.addEventListener("load", refit);
  map.on("draw:drawstart", function () { drawn.clearLayers(); });
  map.on("draw:created", function (e) {
    post("rsvlm-draw", {geojson: e.layer.toGeoJSON(), t: Date.now()});
  });
  function view() {
    var b = map.getBounds();
    post("rsvlm-view", {bbox: [b.getWest(), b.getSouth(), b.getEast(), b.getNorth()],
                        zoom: map.getZoom()});
  }
  map.on("moveend", view);
  view();
  map.on("click", function (e) {
    var inside = D.local.some(function (b) {
      return e.latlng.lng >= b[0] && e.latlng.lng <= b[2] && e.latlng.lat >= b[1] &&
             e.latlng.lat <= b[3];
    });
    if (!inside) post("rsvlm-click", {lon: e.latlng.lng, lat: e.latlng.lat, zoom: map.getZoom(),
                                      t: Date.now()});
  });
  window.rsvlmMap = map;
})(%(map)s, drawnItems_%(draw)s, %(control)s, %(data)s);
"""

#: Assets the page needs, inlined from folium-offline's copies: Leaflet, Leaflet.draw and
#: leafmap's fullscreen control. Everything else folium/leafmap link (jQuery, Bootstrap, icon
#: fonts, awesome-markers: about 1.3 MB) serves markers and popups we never use and is left out,
#: because the page is re-sent with every map update.
_KEEP_ASSETS = ("leaflet.js", "leaflet.css", "leaflet.draw.js", "leaflet.draw.css",
                "Control.FullScreen.min.js", "Control.FullScreen.css")
_ASSET_TAG = re.compile(
    r'<script[^>]*\bsrc="(?P<js>[^"]+)"[^>]*>\s*</script>'
    r'|<link[^>]*\brel="stylesheet"[^>]*\bhref="(?P<css>[^"]+)"[^>]*/?>')
_STYLE = ("<style>html,body{margin:0;height:100%;background:#d9dde3}"
          ".leaflet-container,.leaflet-control-layers{font:12px/1.4 sans-serif}"
          ".leaflet-control-attribution{font-size:10px}"
          ".rsvlm-popup{font:12px/1.4 sans-serif;max-width:260px;word-break:break-word}"
          ".rsvlm-num{background:#ff2d6f;color:#fff;border:0;border-radius:9px;"
          "padding:0 5px;font:bold 11px/16px sans-serif;box-shadow:none}"
          ".rsvlm-num:before{display:none}</style>")


class MapAssetError(RuntimeError):
    """A script or stylesheet the map needs has no offline copy."""


def inline_assets(page: str) -> str:
    """``page`` with every external script and stylesheet inlined from folium-offline's copies
    or left out (see `_KEEP_ASSETS`), so the map needs no network. Raises `MapAssetError` when
    a needed asset has no offline copy."""
    # folium-offline keeps its copies in one table keyed by the CDN URL folium links to.
    from offlinefolium.elements import _res as offline_copies

    def replace(m: re.Match[str]) -> str:
        url = m.group("js") or m.group("css")
        if url.rsplit("/", 1)[-1] not in _KEEP_ASSETS:
            return ""
        text = offline_copies.get(url)
        if text is None:
            raise MapAssetError(f"No offline copy of {url}: the map would need the network.")
        text = text.replace("</script", "<\\/script") if m.group("js") else text
        return f"<script>{text}</script>" if m.group("js") else f"<style>{text}</style>"

    return _ASSET_TAG.sub(replace, page)


@lru_cache(maxsize=2)
def _base_page(online: bool) -> tuple[str, str, str, str]:
    """leafmap's page (the map, its basemap catalogue when ``online``, layer control, fullscreen,
    scale, a rectangle-only draw control) with its assets inlined; rendered once per ``online``.

    Returns (page, map variable, draw control variable, layer control variable); only our data
    script changes between renders. leafmap takes about 2 s to import (it brings ipyleaflet,
    plotly and pandas), so it is imported here, on first use, never when the app starts.
    """
    import leafmap.foliumap as leafmap
    from branca.element import Element
    from folium import LayerControl, plugins

    # leafmap's fullscreen_control also sets Leaflet's ``fullscreenControl`` map option, whose
    # init hook adds a second button: the control is added once, here.
    m = leafmap.Map(center=[0, 0], zoom=2, tiles=None, max_zoom=22, draw_control=False,
                    fullscreen_control=False, scale_control=True, search_control=False,
                    layers_control=False)
    plugins.Fullscreen(position="topleft").add_to(m)
    if online:
        for i, name in enumerate(BASEMAPS):
            m.add_basemap(name, show=i == 0)
    draw = plugins.Draw(
        position="topleft", show_geometry_on_click=False,
        draw_options={"polyline": False, "polygon": False, "circle": False, "marker": False,
                      "circlemarker": False, "rectangle": {"shapeOptions": {"color": "#00e5ff"}}},
        edit_options={"edit": False, "remove": True},
    )
    draw.add_to(m)
    control = LayerControl(collapsed=False)
    control.add_to(m)
    root = m.get_root()
    root.header.add_child(Element(_STYLE))
    return inline_assets(root.render()), m.get_name(), draw.get_name(), control.get_name()


def warm_up(online: bool) -> None:
    """Build the base page now (imports leafmap), so the first visitor does not wait for it."""
    _base_page(online)


def render_map(spec: MapSpec) -> str:
    """The whole Leaflet page as HTML text (JS and CSS inline)."""
    page, map_name, draw_name, control_name = _base_page(spec.online)
    fit = spec.fit_bounds or spec.chip_bounds or (spec.images[0].bounds_lonlat if spec.images
                                                  else None)
    data = {
        "images": [{"name": i.name, "url": i.url, "bounds": i.bounds_lonlat,
                    "attribution": html.escape(i.attribution)} for i in spec.images],
        "osm": spec.osm,
        "detections": spec.detections,
        "minScore": float(spec.min_score),
        "chip": spec.chip_bounds,
        "fit": fit,
        "local": [i.bounds_lonlat for i in spec.images],
    }
    script = "<script>" + _APP_JS % {"map": map_name, "draw": draw_name,
                                     "control": control_name,
                                     "data": json_for_script(data)} + "</script>"
    # After leafmap's own scripts, so the map, the draw control and the layer control exist.
    head, sep, tail = page.rpartition("</html>")
    return f"{head}{script}\n{sep}{tail}" if sep else page + script


def map_iframe(page: str, height: int = MAP_HEIGHT_PX) -> str:
    """The page in a sandboxed ``<iframe srcdoc>``: scripts run, but it cannot touch the app
    page, its cookies or open pop-ups; it can only ``postMessage`` to it."""
    return (f'<iframe id="rsvlm-map-frame" title="map" sandbox="allow-scripts" '
            f'style="width:100%;height:{int(height)}px;border:0;border-radius:6px" '
            f'srcdoc="{html.escape(page, quote=True)}"></iframe>')


#: Runs in the app page (``launch(head=...)``): map messages -> hidden textboxes -> `.change`.
BRIDGE_JS = """
<script>
window.addEventListener("message", function (ev) {
  var d = ev.data;
  if (!d || typeof d !== "object" || typeof d.type !== "string") return;
  var target = {"rsvlm-draw": "rsvlm-drawn", "rsvlm-view": "rsvlm-view",
                "rsvlm-click": "rsvlm-click"}[d.type];
  if (!target) return;
  var el = document.querySelector("#" + target + " textarea, #" + target + " input");
  if (!el) return;
  el.value = JSON.stringify(d.payload || {});
  el.dispatchEvent(new Event("input", {bubbles: true}));
});
</script>
"""
