"""OSM tags -> visible semantics: attribute pruning and semantic classes (LHRS-Align style).

LHRS-Align turned raw OSM tags into captions only after dropping the attributes that say nothing
about what an image shows (sources, notes, ids, addresses, editing metadata). We do the same with
an explicit allow-list of visual keys plus a deny-list for the rest, and map every feature to a
semantic class ("building", "road", "parking lot", ...) with an optional detail ("residential
road", "metal roof"). Features without a visible class (boundaries, places, routes) are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Keys that never describe what is visible: editing metadata, provenance, identifiers, addresses,
# names and contact data. Prefix matches end with ":" or "@".
DENY_KEYS = {
    "source", "note", "fixme", "FIXME", "todo", "description", "comment", "created_by", "id",
    "osm_id", "osm_type", "osm_way_id", "full_id", "wikidata", "wikipedia", "website", "url",
    "phone", "email", "opening_hours", "operator", "ref", "check_date", "survey", "attribution",
    "name", "alt_name", "old_name", "short_name", "official_name", "int_name", "loc_name",
    "is_in", "admin_level", "border_type", "protect_class", "protection_title", "related_law",
    "protection_code", "start_date", "other_tags", "timestamp", "version", "changeset", "user",
    "uid", "z_order", "type",
}
DENY_PREFIXES = (
    "source:", "note:", "fixme:", "addr:", "name:", "alt_name:", "old_name:", "ref:", "is_in:",
    "contact:", "wikipedia:", "wikidata:", "check_date:", "survey:", "@", "tiger:", "gnis:",
    "nhd:", "osmarender:", "seamark:", "payment:", "opening_hours:", "old_", "was:", "disused:",
)

# Keys that carry visual meaning; everything else is pruned even when not denied.
VISUAL_KEYS = {
    "building", "building:levels", "building:material", "building:colour", "roof:shape",
    "roof:material", "roof:colour", "roof:levels", "height", "highway", "surface", "lanes",
    "width", "service", "tracktype", "bridge", "tunnel", "railway", "waterway", "water",
    "natural", "landuse", "leisure", "amenity", "man_made", "historic", "aeroway", "power",
    "sport", "crop", "leaf_type", "leaf_cycle", "wetland", "parking", "religion", "shop",
    "tourism", "barrier", "material", "produce", "trees", "garden:type", "generator:source",
}

# Values that carry no information for a description.
EMPTY_VALUES = {"", "none", "nan", "null", "unknown", "no"}


@dataclass(frozen=True)
class Semantic:
    """The visible class of one OSM feature."""

    cls: str  # grounding/VQA class, singular ("building")
    plural: str  # "buildings"
    detail: str  # more specific noun phrase for captions ("residential road"); may equal cls
    attributes: tuple[str, ...]  # adjectives from pruned tags ("asphalt", "three-storey")


_ROAD_VALUES = {
    "motorway", "trunk", "primary", "secondary", "tertiary", "unclassified", "residential",
    "living_street", "service", "road", "motorway_link", "trunk_link", "primary_link",
    "secondary_link", "tertiary_link", "busway",
}
_PATH_VALUES = {"path", "footway", "cycleway", "bridleway", "steps", "pedestrian", "corridor"}

# (key, value) -> (class, plural). "*" matches any value of the key.
_CLASSES: dict[tuple[str, str], tuple[str, str]] = {
    ("amenity", "parking"): ("parking lot", "parking lots"),
    ("amenity", "school"): ("school", "schools"),
    ("amenity", "hospital"): ("hospital", "hospitals"),
    ("amenity", "place_of_worship"): ("place of worship", "places of worship"),
    ("amenity", "fuel"): ("fuel station", "fuel stations"),
    ("amenity", "marketplace"): ("marketplace", "marketplaces"),
    ("amenity", "grave_yard"): ("graveyard", "graveyards"),
    ("leisure", "park"): ("park", "parks"),
    ("leisure", "pitch"): ("sports pitch", "sports pitches"),
    ("leisure", "swimming_pool"): ("swimming pool", "swimming pools"),
    ("leisure", "playground"): ("playground", "playgrounds"),
    ("leisure", "garden"): ("garden", "gardens"),
    ("leisure", "golf_course"): ("golf course", "golf courses"),
    ("leisure", "stadium"): ("stadium", "stadiums"),
    ("leisure", "track"): ("running track", "running tracks"),
    ("man_made", "water_tower"): ("water tower", "water towers"),
    ("man_made", "water_works"): ("water works", "water works"),
    ("man_made", "storage_tank"): ("storage tank", "storage tanks"),
    ("man_made", "wastewater_plant"): ("wastewater plant", "wastewater plants"),
    ("man_made", "pier"): ("pier", "piers"),
    ("man_made", "silo"): ("silo", "silos"),
    ("man_made", "tower"): ("tower", "towers"),
    ("historic", "ruins"): ("ruins", "ruins"),
    ("aeroway", "runway"): ("runway", "runways"),
    ("aeroway", "taxiway"): ("taxiway", "taxiways"),
    ("aeroway", "apron"): ("apron", "aprons"),
    ("aeroway", "helipad"): ("helipad", "helipads"),
    ("railway", "rail"): ("railway", "railways"),
    ("railway", "tram"): ("tram line", "tram lines"),
    ("railway", "platform"): ("railway platform", "railway platforms"),
    ("waterway", "river"): ("river", "rivers"),
    ("waterway", "stream"): ("stream", "streams"),
    ("waterway", "canal"): ("canal", "canals"),
    ("waterway", "ditch"): ("ditch", "ditches"),
    ("waterway", "drain"): ("ditch", "ditches"),
    ("natural", "water"): ("water body", "water bodies"),
    ("natural", "wood"): ("woodland", "woodlands"),
    ("natural", "tree"): ("tree", "trees"),
    ("natural", "tree_row"): ("tree row", "tree rows"),
    ("natural", "scrub"): ("scrubland", "scrublands"),
    ("natural", "grassland"): ("grassland", "grasslands"),
    ("natural", "heath"): ("heath", "heaths"),
    ("natural", "beach"): ("beach", "beaches"),
    ("natural", "sand"): ("sand area", "sand areas"),
    ("natural", "bare_rock"): ("bare rock", "bare rock areas"),
    ("natural", "cliff"): ("cliff", "cliffs"),
    ("natural", "coastline"): ("coastline", "coastlines"),
    ("natural", "wetland"): ("wetland", "wetlands"),
    ("landuse", "farmland"): ("farmland", "farmlands"),
    ("landuse", "forest"): ("forest", "forests"),
    ("landuse", "grass"): ("grass area", "grass areas"),
    ("landuse", "meadow"): ("meadow", "meadows"),
    ("landuse", "orchard"): ("orchard", "orchards"),
    ("landuse", "vineyard"): ("vineyard", "vineyards"),
    ("landuse", "cemetery"): ("cemetery", "cemeteries"),
    ("landuse", "construction"): ("construction site", "construction sites"),
    ("landuse", "quarry"): ("quarry", "quarries"),
    ("landuse", "reservoir"): ("reservoir", "reservoirs"),
    ("landuse", "basin"): ("basin", "basins"),
    ("landuse", "*"): ("{value} area", "{value} areas"),
    ("power", "line"): ("power line", "power lines"),
    ("power", "tower"): ("power tower", "power towers"),
    ("power", "plant"): ("power plant", "power plants"),
    ("power", "substation"): ("substation", "substations"),
    ("power", "generator"): ("generator", "generators"),
}
# Which key decides the class when a feature has several (a school building is a building).
_PRIORITY = (
    "building", "amenity", "leisure", "man_made", "historic", "aeroway", "railway", "highway",
    "waterway", "natural", "landuse", "power",
)

_NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _text(value: str) -> str:
    return value.replace("_", " ").replace(";", ", ").strip()


def _denied(key: str) -> bool:
    return key in DENY_KEYS or key.lower() in DENY_KEYS or key.startswith(DENY_PREFIXES)


def prune_tags(tags: dict[str, object]) -> dict[str, str]:
    """Keep the visual attributes of a feature: drop empty values, metadata, ids and addresses."""
    kept: dict[str, str] = {}
    for key, value in tags.items():
        if value is None or not isinstance(key, str) or _denied(key) or key not in VISUAL_KEYS:
            continue
        text = str(value).strip()
        if text.lower() in EMPTY_VALUES:
            continue
        kept[key] = text
    return dict(sorted(kept.items()))


_OTHER_TAGS = re.compile(r'"((?:[^"\\]|\\.)*)"=>"((?:[^"\\]|\\.)*)"')


def parse_other_tags(text: str | None) -> dict[str, str]:
    """Parse GDAL's OSM driver hstore column (`"k"=>"v","k2"=>"v2"`)."""
    if not text:
        return {}
    return {k.replace('\\"', '"'): v.replace('\\"', '"') for k, v in _OTHER_TAGS.findall(text)}


def _attributes(tags: dict[str, str], key: str) -> tuple[str, ...]:
    attrs: list[str] = []
    levels = tags.get("building:levels")
    if levels and levels.isdigit():
        n = int(levels)
        attrs.append(f"{_NUMBERS[n]}-storey" if n < len(_NUMBERS) else f"{n}-storey")
    surface = tags.get("surface")
    if surface and key in {"highway", "amenity", "leisure", "aeroway"}:
        paved = {"asphalt", "concrete", "paved", "paving_stones", "sett", "concrete:plates"}
        unpaved = {"unpaved", "dirt", "earth", "ground", "gravel", "sand", "grass", "mud"}
        if surface in paved:
            attrs.append("paved" if surface == "paved" else _text(surface))
        elif surface in unpaved:
            attrs.append("unpaved" if surface == "unpaved" else f"{_text(surface)}")
    for roof in ("roof:material", "roof:colour"):
        if tags.get(roof):
            attrs.append(f"{_text(tags[roof])} roof")
    if tags.get("leaf_type") in {"broadleaved", "needleleaved", "mixed"}:
        attrs.append(_text(tags["leaf_type"]))
    if tags.get("sport"):
        attrs.append(_text(tags["sport"]))
    if tags.get("crop"):
        attrs.append(_text(tags["crop"]))
    return tuple(attrs)


def classify(tags: dict[str, object]) -> Semantic | None:
    """Map a feature's tags to its visible class, or None when it shows nothing in an image."""
    pruned = prune_tags(tags)
    for key in _PRIORITY:
        value = pruned.get(key)
        if value is None:
            continue
        if key == "building":
            detail = "building" if value in {"yes", "building"} else f"{_text(value)} building"
            if value in {"house", "detached", "hut", "shed", "garage", "cabin"}:
                detail = _text(value)
            return Semantic("building", "buildings", detail, _attributes(pruned, key))
        if key == "highway":
            if value in _ROAD_VALUES:
                base = _text(value.removesuffix("_link"))
                if value == "service" and pruned.get("service") == "parking_aisle":
                    detail = "parking aisle"
                elif value in {"road", "living_street", "unclassified"}:
                    detail = "road" if value == "road" else f"{base} road"
                else:
                    detail = f"{base} road"
                return Semantic("road", "roads", detail, _attributes(pruned, key))
            if value == "track":
                return Semantic("track", "tracks", "track", _attributes(pruned, key))
            if value in _PATH_VALUES:
                detail = "flight of steps" if value == "steps" else _text(value)
                return Semantic("path", "paths", detail, _attributes(pruned, key))
            continue
        hit = _CLASSES.get((key, value)) or _CLASSES.get((key, "*"))
        if hit is None:
            continue
        cls, plural = (s.format(value=_text(value)) for s in hit)
        return Semantic(cls, plural, cls, _attributes(pruned, key))
    return None


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeio" else "a"


def number_word(n: int) -> str:
    return _NUMBERS[n] if 0 <= n < len(_NUMBERS) else str(n)


def plural_of(cls: str) -> str:
    """Plural of a class name produced by `classify` (falls back to English rules)."""
    for c, p in _CLASSES.values():
        if c == cls:
            return p
    known = {"building": "buildings", "road": "roads", "track": "tracks", "path": "paths"}
    if cls in known:
        return known[cls]
    if cls.endswith(("s", "sh", "ch", "x")):
        return cls + "es"
    if cls.endswith("y") and cls[-2:-1] not in "aeiou":
        return cls[:-1] + "ies"
    return cls + "s"
