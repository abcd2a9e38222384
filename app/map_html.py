"""The map panel: a self-contained Leaflet page (folium-offline inlines Leaflet, Leaflet.draw and
their CSS) shown in an ``<iframe srcdoc>``, so the map renders with no network at all.

folium builds the page, the map and the draw control; our own layers (imagery overlays, OSM
features, the chip rectangle, detections) are added by one small script from JSON data, because
that lets popups be built from DOM text nodes: an OSM tag or a model label can never become HTML.
The page talks to the app by ``postMessage`` (``rsvlm-draw``, ``rsvlm-view``, ``rsvlm-click``);
the parent page's bridge script (`BRIDGE_JS`) writes the payloads into hidden textboxes.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from app.html_safe import json_for_script

if TYPE_CHECKING:
    from tiles import Overlay

#: xyzservices providers offered as basemaps when the network is usable.
BASEMAPS = (("Satellite (Esri)", "Esri.WorldImagery"), ("OpenStreetMap", "OpenStreetMap.Mapnik"))
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


@lru_cache(maxsize=4)
def _basemap_data(online: bool) -> tuple[dict[str, Any], ...]:
    if not online:
        return ()
    import xyzservices.providers as xyz

    out = []
    for label, key in BASEMAPS:
        provider = xyz.query_name(key)
        out.append({"name": label, "url": provider.build_url(),
                    "attribution": provider.get("html_attribution", provider.get("attribution", "")),
                    "maxNativeZoom": int(provider.get("max_zoom", 19))})
    return tuple(out)


_APP_JS = """
(function (map, drawn, D) {
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
  function ll(b) { return [[b[1], b[0]], [b[3], b[2]]]; }
  var bases = {}, overlays = {};
  D.basemaps.forEach(function (bm, i) {
    var layer = L.tileLayer(bm.url, {attribution: bm.attribution, maxNativeZoom: bm.maxNativeZoom,
                                     maxZoom: 22});
    if (i === 0) layer.addTo(map);
    bases[bm.name] = layer;
  });
  D.images.forEach(function (im) {
    overlays[im.name] = L.imageOverlay(im.url, ll(im.bounds), {attribution: im.attribution})
      .addTo(map);
  });
  if (D.osm) {
    overlays["OSM features"] = L.geoJSON(D.osm, {
      style: {color: "#ffd400", weight: 1, fillOpacity: 0.08, className: "rsvlm-osm"},
      onEachFeature: function (f, layer) { layer.bindPopup(popup(f.properties)); }
    }).addTo(map);
  }
  if (D.chip) {
    overlays["Question area"] = L.rectangle(ll(D.chip), {
      color: "#00e5ff", weight: 2, dashArray: "6 4", fill: false, className: "rsvlm-chip",
      interactive: false}).addTo(map);
  }
  if (D.detections && D.detections.features.length) {
    overlays["Detections"] = L.geoJSON(D.detections, {
      style: {color: "#ff2d6f", weight: 2, fillOpacity: 0.2, className: "rsvlm-det"},
      onEachFeature: function (f, layer) {
        layer.bindPopup(popup(f.properties, ["label", "score", "question", "time"]));
      }
    }).addTo(map);
  }
  L.control.layers(bases, overlays, {collapsed: false}).addTo(map);
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
})(%(map)s, drawnItems_%(draw)s, %(data)s);
"""


@lru_cache(maxsize=1)
def _base_page() -> tuple[str, str, str]:
    """folium's page (Leaflet, Leaflet.draw, CSS inline; about 1.5 MB), rendered once.

    Returns (page, map variable, draw control variable); only our data script changes between
    renders, so re-rendering folium for every answer would be wasted time.
    """
    import offlinefolium as folium
    from branca.element import Element
    from offlinefolium import plugins

    m = folium.Map(location=[0, 0], zoom_start=2, tiles=None, max_zoom=22, control_scale=True)
    # Leaflet and Leaflet.draw only: folium's jQuery, Bootstrap and icon fonts (about 1.3 MB we
    # never use) would be re-sent and re-parsed with every map update.
    m.default_js = [(n, u) for n, u in m.default_js if n == "leaflet"]
    m.default_css = [(n, u) for n, u in m.default_css if n == "leaflet_css"]
    draw = plugins.Draw(
        position="topleft", show_geometry_on_click=False,
        draw_options={"polyline": False, "polygon": False, "circle": False, "marker": False,
                      "circlemarker": False, "rectangle": {"shapeOptions": {"color": "#00e5ff"}}},
        edit_options={"edit": False, "remove": True},
    )
    draw.add_to(m)
    root = m.get_root()
    root.header.add_child(Element(
        "<style>html,body{margin:0;height:100%;background:#d9dde3}"
        ".leaflet-container,.leaflet-control-layers{font:12px/1.4 sans-serif}"
        ".leaflet-control-attribution{font-size:10px}"
        ".rsvlm-popup{font:12px/1.4 sans-serif;max-width:260px;word-break:break-word}</style>"))
    return root.render(), m.get_name(), draw.get_name()


def render_map(spec: MapSpec) -> str:
    """The whole Leaflet page as HTML text (JS and CSS inline)."""
    page, map_name, draw_name = _base_page()
    fit = spec.fit_bounds or spec.chip_bounds or (spec.images[0].bounds_lonlat if spec.images
                                                  else None)
    data = {
        "basemaps": list(_basemap_data(spec.online)),
        "images": [{"name": i.name, "url": i.url, "bounds": i.bounds_lonlat,
                    "attribution": html.escape(i.attribution)} for i in spec.images],
        "osm": spec.osm,
        "detections": spec.detections,
        "chip": spec.chip_bounds,
        "fit": fit,
        "local": [i.bounds_lonlat for i in spec.images],
    }
    script = f"<script>{_APP_JS % {'map': map_name, 'draw': draw_name, 'data': json_for_script(data)}}</script>"
    # After folium's own scripts, so the map and the draw control exist.
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
