"""Perception: the dense detector (`rsvlm.detector`) behind the chat path.

Trained parts may hold a ``detector/`` folder (``detector.json`` + ``detector.safetensors``).
With it, questions about the objects it detects are answered from its detections, not from
the language model's reading of retrieved neighbours (which repeats the nearest training
description on a region it never saw): presence ("Is there a building?"), counts ("How many
buildings are there?", also inside a drawn box), "find all" (every detection as a box), the
ground they cover ("What is the area covered by buildings?"), whether the area is rural or
urban (the training data's own rule, `urban_or_rural`, applied to the detected buildings) and
one building by size or place ("Where is the largest building?",
`referred`). The shipped detector knows buildings, trees and aircraft ("How many planes are on
the apron?"), each at its own thresholds (`DetectorConfig.cut`). Everything else goes to the
language model as before.

The detector runs the frozen vision tower once more, at its own input size (448 px: a 32 x 32
grid, finer than the chat view's 16 x 16), only for such questions; imagery coarser than 0.3 m
a pixel (satellite) as four overlapping crops, each at that size.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsvlm.detector import DenseDetector, Detection, DetectorEnsemble, decode, suppress
from rsvlm.refine import BoxRefiner, load_refiner, refine_detections, save_refiner

DETECTOR_DIR = "detector"
CONFIG_NAME = "detector.json"
WEIGHTS_NAME = "detector.safetensors"


#: The ground a pixel of the detector's training views spans as the tower reads them: 512 px
#: tiles at 0.15 m, read at 448 px.
TRAINED_GSD = 0.15 * 512 / 448


def scaled_count(found: int, factor: float) -> int:
    """``found`` detections times ``factor``, rounded half up (never to even), and never
    below one where any was found (`DetectorConfig.count_factor`)."""
    return found if found == 0 or factor == 1.0 else max(1, math.floor(found * factor + 0.5))


@dataclass
class DetectorConfig:
    labels: list[str] = field(default_factory=lambda: ["building"])
    input_size: int = 448
    layers: list[int] = field(default_factory=lambda: [7, 9, 11])
    hidden: int = 384
    dim: int = 96
    convs: int = 2
    # Maps this many times finer than the patch grid (`rsvlm.detector.DenseDetector`).
    upsample: int = 1
    # The convolutions' growing dilation (`rsvlm.detector.DenseDetector`).
    dilation: int = 1
    # Heads trained from other seeds, read as their average (`rsvlm.detector.DetectorEnsemble`).
    heads: int = 1
    threshold: float = 0.3  # boxes ("find all"): the best F1 on the selection regions
    # presence and counts: the most counts within 20 % there (None: `threshold`)
    count_threshold: float | None = None
    # A count is the detections at `count_threshold` times this, rounded: on regions it never
    # saw the detector finds fewer buildings than there are (precision above recall at any one
    # threshold), and the threshold and factor that count best are chosen together on the
    # folds (scripts/loro.py). Classes with thresholds of their own count 1:1.
    count_factor: float = 1.0
    # presence alone: the most right yes/no answers on the folds' held-out aerial tiles (None:
    # `count_threshold`). The threshold that counts best says "yes" over empty ground too.
    presence_threshold: float | None = None
    # Imagery coarser than `zoom_gsd` metres a pixel is read as four overlapping crops of
    # `zoom_crop` of the chip, each at `input_size`: small roofs then span as many patches as
    # the head learnt them at (scripts/loro_zoom.py: Rio F1 0.146 -> 0.236 left out; the 0.15 m
    # aerial areas lose when zoomed). None: always read whole.
    zoom_gsd: float | None = 0.3
    zoom_crop: float = 0.6
    # Each crop is read at this size (None: `input_size`): four crops at 448 px cost four tower
    # passes, 1.5 s on 2 cores; at 336 px 0.66 s (objects still 1.25 times as many patches
    # across as read whole; scripts/loro_zoom.py --input-size: Rio F1 0.131 -> 0.214 against
    # 0.257 at 448, Atlanta 0.111 -> 0.180 against 0.105).
    zoom_input_size: int | None = 336
    # The ground a pixel of the training views spans as the tower reads them (512 px tiles at
    # 0.15 m read at 448 px). A finer chip (a 38 m box at 0.15 m) is read smaller than
    # `input_size`, at this scale (`read_size`): read at 448 px its roofs span 1.75 times the
    # patches the head learnt them at, and it counts parts of roofs as roofs. None: always
    # `input_size`.
    trained_gsd: float | None = TRAINED_GSD
    # Per class other than the first: [boxes, presence and counts] thresholds, each chosen on
    # that class's held-out sets (scripts/loro.py class folds); a class not here takes
    # `threshold` / `count_threshold`.
    class_thresholds: dict[str, list[float]] = field(default_factory=dict)
    # The classes the chat path answers from (None: every label). A class the head learnt but
    # does not transfer (tree crowns: F1 0.13-0.31 on forests it never saw, none found in the
    # demo towns) stays in the weights for a fine-tune and out of the answers: its questions go
    # to the language model rather than get a confident "0".
    answers: list[str] | None = None
    # A second look at each box in the chip's own pixels (`rsvlm.refine`): the refiner's
    # architecture (size, width, context), how many times it moves a box (steps) and the power
    # of its expected IoU the scores are multiplied by (rescore; 0: scores as detected). None:
    # boxes as the patch grid places them. Its "labels": the classes it moves (None: all).
    refiner: dict[str, Any] | None = None
    # Where the numbers behind the threshold came from (scripts/loro.py), for the model card.
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def answered(self) -> list[str]:
        return [c for c in self.labels if self.answers is None or c in self.answers]

    def cut(self, label: str, kind: str = "find_all") -> float:
        """The score a detection of ``label`` needs to answer a question of ``kind``: boxes at
        the box threshold, presence at its own (when chosen; a class with thresholds of its own
        keeps them), counts, rural/urban and area at the counting one."""
        box, count = self.class_thresholds.get(label, (self.threshold, self.count_threshold))
        if (kind == "presence" and self.presence_threshold is not None
                and label not in self.class_thresholds):
            return self.presence_threshold
        if kind in {"presence", "count", "compare", "rural_urban", "area"} and count is not None:
            return count
        return box

    def scales_counts(self, label: str) -> bool:
        """Whether counts of ``label`` are its detections times `count_factor`."""
        return self.count_factor != 1.0 and label not in self.class_thresholds

    def count_of(self, label: str, found: int) -> int:
        """How many objects of ``label`` there are, by the ``found`` detections at the
        counting threshold (`count_factor`; half up, so that no count rounds to even)."""
        return scaled_count(found, self.count_factor) if self.scales_counts(label) else found

    def build(self) -> DenseDetector | DetectorEnsemble:
        members = [DenseDetector(self.hidden, len(self.layers), classes=len(self.labels),
                                 dim=self.dim, convs=self.convs, upsample=self.upsample,
                                 dilation=self.dilation)
                   for _ in range(self.heads)]
        return members[0] if self.heads == 1 else DetectorEnsemble(members)


def save_detector(head: DenseDetector | DetectorEnsemble, config: DetectorConfig,
                  folder: str | Path, refiner: BoxRefiner | None = None) -> Path:
    """Head, config and (when the config names one) the box refiner into ``folder``'s
    ``detector/``."""
    from safetensors.torch import save_file

    if config.refiner is not None and refiner is None:
        raise ValueError("the detector's config names a refiner: pass it (load_refiner)")
    folder = Path(folder) / DETECTOR_DIR
    folder.mkdir(parents=True, exist_ok=True)
    if refiner is not None:
        config = DetectorConfig(**{**asdict(config), "refiner": {
            **(config.refiner or {"steps": 1, "rescore": 0.0}), **save_refiner(refiner, folder)}})
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()},
              str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps(asdict(config), indent=2) + "\n")
    return folder


def load_detector(folder: str | Path
                  ) -> tuple[DenseDetector | DetectorEnsemble, DetectorConfig] | None:
    """The head and config `save_detector` wrote into ``folder`` (its ``detector/``), in eval
    mode; None when there is none."""
    from safetensors.torch import load_file

    folder = Path(folder) / DETECTOR_DIR
    if not (folder / CONFIG_NAME).is_file():
        return None
    config = DetectorConfig(**json.loads((folder / CONFIG_NAME).read_text()))
    head = config.build()
    head.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    return head.eval(), config


def detector_refiner(folder: str | Path, config: DetectorConfig) -> BoxRefiner | None:
    """The box refiner `save_detector` wrote beside the head (None when the config has none)."""
    if config.refiner is None:
        return None
    return load_refiner(Path(folder) / DETECTOR_DIR, config.refiner)


class Perception:
    """A trained detector head on the model's own frozen vision encoder."""

    def __init__(self, head: DenseDetector, config: DetectorConfig, vision_model: Any,
                 image_mean: Any, image_std: Any, refiner: BoxRefiner | None = None) -> None:
        self.head = head.eval()
        self.config = config
        self.refiner = refiner.eval() if refiner is not None else None
        self.vision = vision_model
        self.mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.onnx: Any = None  # `rsvlm.onnx_tower.OnnxTower`, when `use_onnx` found it can run

    def use_onnx(self, cache_dir: str | Path | None = None, quantize: str | None = None) -> bool:
        """Read the tower's levels through ONNX Runtime from now on (`rsvlm.onnx_tower`), where
        it can run them: a ViT in float32 on the CPU; ``quantize="int8"`` runs its blocks in
        int8, and a size whose int8 graph fails its check is read in float32 instead. The
        graphs of the sizes every whole or zoomed read takes are opened now (exported once for
        these weights), so that the first chip does not wait for them. Whether it will."""
        from rsvlm.onnx_tower import OnnxTower, supported

        if self.onnx is None and supported(self.vision):
            layers = sorted(set(self.config.layers))
            cfg = self.config
            sizes = sorted({cfg.input_size, cfg.zoom_input_size or cfg.input_size})
            self.onnx = OnnxTower(self.vision, layers, cache_dir=cache_dir, quantize=quantize)
            self.onnx.prepare(sizes)
            if quantize is not None and self.onnx.failed:
                self.onnx = OnnxTower(self.vision, layers, cache_dir=cache_dir)
                self.onnx.prepare(sizes)
        return self.onnx is not None

    @classmethod
    def load(cls, parts: str | Path, vision_model: Any, image_processor: Any
             ) -> Perception | None:
        """The detector of a trained-parts folder, or None when it has none."""
        found = load_detector(parts)
        if found is None:
            return None
        head, config = found
        return cls(head, config, vision_model, image_processor.image_mean,
                   image_processor.image_std, detector_refiner(parts, config))

    def features(self, image: Any, size: int | None = None) -> list[torch.Tensor]:
        """The encoder's levels for an RGB PIL image (or a list of them: a batch) at ``size``
        (the detector's input size)."""
        from PIL import Image

        size = size or self.config.input_size
        images = image if isinstance(image, list) else [image]
        arr = torch.from_numpy(np.stack([np.array(
            im.convert("RGB").resize((size, size), Image.BICUBIC)) for im in images])).float()
        x = (arr.permute(0, 3, 1, 2) / 255.0 - self.mean) / self.std
        param = next(self.vision.parameters())
        x = x.to(param.device, param.dtype)
        n = (size // self.vision.config.patch_size) ** 2
        if self.onnx is not None:
            read = self.onnx.levels(x)
            if read is not None:
                by_level = dict(zip(self.onnx.layers, read, strict=True))
                return [by_level[i][:, -n:].float() for i in self.config.layers]
        blocks = getattr(getattr(self.vision, "encoder", None), "layer", None)
        if blocks is None or not hasattr(self.vision, "embeddings"):
            out = self.vision(pixel_values=x, output_hidden_states=True)
            return [out.hidden_states[i][:, -n:].float().cpu() for i in self.config.layers]
        # The blocks up to the deepest level only: the tower's last block (and final norm)
        # feed the chat view, not the detector (layers 7, 9, 11 of 12: a twelfth of the pass).
        hidden = self.vision.embeddings(x)
        levels = {0: hidden}
        for i, block in enumerate(blocks[:max(self.config.layers)], start=1):
            hidden = block(hidden)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            levels[i] = hidden
        return [levels[i][:, -n:].float().cpu() for i in self.config.layers]

    def zooms(self, gsd: float | None) -> bool:
        """Whether imagery of ``gsd`` metres a pixel (None: unknown) is read zoomed in."""
        return gsd is not None and self.config.zoom_gsd is not None and gsd >= self.config.zoom_gsd

    @torch.inference_mode()
    def detect(self, image: Any, gsd: float | None = None) -> list[Detection]:
        """Every detection above the lowest threshold any answer uses (see `select`); imagery
        of a ground sample distance of `zoom_gsd` or more (``gsd``, metres a pixel) is read as
        four overlapping crops, their detections merged in the image's frame."""
        answered = self.config.answered
        low = min([REFER_FLOOR] + [self.config.cut(label, kind) for label in answered
                                   for kind in ("find_all", "count")])
        if not self.zooms(gsd):
            size = read_size(max(image.size), gsd, self.config.input_size,
                             self.config.trained_gsd, self.vision.config.patch_size)
            heat, box = self.head(self.features(image, size))
            return self.refined(image, [d for d in decode(heat, box, self.config.labels, low)[0]
                                        if d.label in answered])
        w, h = image.size
        c = self.config.zoom_crop
        frames = crop_frames(c)
        crops = [image.crop((round(ox * w), round(oy * h), round((ox + c) * w),
                             round((oy + c) * h))) for ox, oy in frames]
        heat, box = self.head(self.features(crops, self.config.zoom_input_size))
        found = []
        for dets, frame in zip(decode(heat, box, self.config.labels, low, nms=False), frames,
                               strict=True):
            found += from_crop([d for d in dets if d.label in answered], frame, c)
        return self.refined(image, suppress(found))

    def refined(self, image: Any, detections: list[Detection]) -> list[Detection]:
        """`detections` of ``image`` after the refiner's look, when the detector has one."""
        if self.refiner is None or not detections:
            return detections
        cfg = self.config.refiner or {}
        # Only the classes it was measured on (scripts/loro_refine.py: buildings).
        labels = cfg.get("labels")
        mine = [d for d in detections if labels is None or d.label in labels]
        rest = [d for d in detections if labels is not None and d.label not in labels]
        moved = refine_detections(self.refiner, image, mine, int(cfg.get("steps", 1)),
                                  float(cfg.get("rescore", 0.0)))
        return sorted(moved + rest, key=lambda d: -d.score)

    def select(self, detections: list[Detection], kind: str, question: str = ""
               ) -> list[Detection]:
        """The detections that answer a question of ``kind``: boxes at the box threshold,
        presence and counts at the counting one (each chosen for its own metric, per class:
        `DetectorConfig.cut`). A referring question says its object is there: when none of its
        class above the threshold lies in the cell it names (or none at all), the ones below it
        (down to `REFER_FLOOR`) there are its candidates."""
        chosen = [d for d in detections if d.score >= self.config.cut(d.label, kind)]
        if kind != "refer":
            return chosen
        for label in self.config.answered:
            asked = referred(question, label)
            if asked is None:
                continue
            sure = [d for d in chosen if d.label == label]
            every = [d for d in detections if d.label == label]
            cell = asked[1]
            if cell is not None and not any(_cell_of(d) == cell for d in sure):
                unsure = [d for d in every if _cell_of(d) == cell]
                return unsure or sure or every
            return sure or every
        return chosen or list(detections)


def read_size(pixels: int, gsd: float | None, input_size: int,
              trained_gsd: float | None = TRAINED_GSD, patch: int = 14) -> int:
    """The size (a multiple of ``patch``) to read an image ``pixels`` across at ``gsd`` metres
    a pixel: ``input_size``, or less for imagery finer than ``trained_gsd`` as the tower reads
    it, so that its objects span as many patches as the detector learnt them at; never below
    half of ``input_size`` (16 x 16 patches at 448 px)."""
    if not gsd or not trained_gsd:
        return input_size
    floor = max(patch, input_size // 2 // patch * patch)
    size = round(pixels * gsd / trained_gsd / patch) * patch
    return int(min(input_size, max(floor, size)))


def crop_frames(crop: float) -> list[tuple[float, float]]:
    """Top-left corners (0-1 of the image) of the 2 x 2 overlapping square crops of side
    ``crop`` that a zoomed-in read takes."""
    return [(ox, oy) for oy in (0.0, 1 - crop) for ox in (0.0, 1 - crop)]


def from_crop(detections: list[Detection], frame: tuple[float, float], crop: float
              ) -> list[Detection]:
    """Detections in 0-1 of a crop at ``frame`` (side ``crop``) -> in 0-1 of the image."""
    ox, oy = frame
    return [Detection(d.label, d.score, (ox + d.box[0] * crop, oy + d.box[1] * crop,
                                         ox + d.box[2] * crop, oy + d.box[3] * crop))
            for d in detections]


# --------------------------------------------------------------------------- questions

# Where a referring question names a cell and no surer detection lies there, the likeliest one
# down to this score is its answer (LORO, scripts/loro_refer.sh).
REFER_FLOOR = 0.1

# RSVQA's rural/urban split as the training data states it (`training.captions.scene_kind`):
# buildings cover a tenth of the ground, or stand 12 or more to the hectare.
URBAN_COVERAGE = 0.10
URBAN_PER_HA = 12.0


def urban_or_rural(coverage: float, per_ha: float | None) -> str:
    """'urban' or 'rural' from building coverage (0-1 of the ground) and buildings per hectare
    (None when the ground size is unknown: a plain photo)."""
    dense = per_ha is not None and per_ha >= URBAN_PER_HA
    return "urban" if coverage >= URBAN_COVERAGE or dense else "rural"


#: Footprints covering this share of the ground make "a densely built-up area".
DENSE_COVERAGE = 0.30


def built_phrase(count: int, dense: bool, urban: bool) -> str:
    """How built-up an area is, in the training captions' words (`training.captions`): its
    number of buildings, whether footprints cover `DENSE_COVERAGE` of it, whether it is urban
    (`urban_or_rural`)."""
    if not count:
        return "an area without buildings"
    if dense:
        return "a densely built-up area"
    return "a built-up area" if urban else "a sparsely built area"


def _built(detections: list[Detection], label: str, ground_m2: float | None,
           area_frac: float) -> tuple[float, float | None, int]:
    """The detected ``label``s' box coverage of an area ``area_frac`` of the image and
    ``ground_m2`` on the ground, their number per hectare, and their number."""
    mine = [d for d in detections if d.label == label]
    coverage = sum((d.box[2] - d.box[0]) * (d.box[3] - d.box[1]) for d in mine)
    per_ha = len(mine) / (ground_m2 / 10_000) if ground_m2 else None
    return min(coverage / max(area_frac, 1e-9), 1.0), per_ha, len(mine)


def scene_of_detections(detections: list[Detection], label: str = "building",
                        ground_m2: float | None = None, area_frac: float = 1.0) -> str:
    """`urban_or_rural` of the detected ``label``s in an area that is ``area_frac`` of the image
    and ``ground_m2`` on the ground: box areas over it (a box covers a little more than its
    footprint, so coverage errs towards urban) and their number per hectare."""
    coverage, per_ha, _ = _built(detections, label, ground_m2, area_frac)
    return urban_or_rural(coverage, per_ha)


def scene_words(detections: list[Detection], label: str = "building",
                ground_m2: float | None = None) -> str:
    """`built_phrase` of the detections: urban or not as `scene_of_detections` says (the two
    answers agree), densely built-up when their boxes, taken as footprints
    (`FOOTPRINT_SHARE`), cover `DENSE_COVERAGE` of the ground."""
    coverage, per_ha, count = _built(detections, label, ground_m2, 1.0)
    return built_phrase(count, coverage * FOOTPRINT_SHARE >= DENSE_COVERAGE,
                        urban_or_rural(coverage, per_ha) == "urban")


#: RSVQA-HR's area answer classes (upper bound in m², name); above the last: "more than 1000 m²".
AREA_BUCKETS = ((0.0, "0 m²"), (10.0, "between 0 m² and 10 m²"),
                (100.0, "between 10 m² and 100 m²"), (1000.0, "between 100 m² and 1000 m²"))
#: The share of its bounding box a footprint fills: OSM building footprints of the four demo
#: areas, area-weighted, fill 0.49 (Catanduanes) to 0.72 (Zanzibar) of their boxes.
FOOTPRINT_SHARE = 0.6


def area_bucket(m2: float) -> str:
    """RSVQA-HR's answer class for ``m2`` square metres."""
    if m2 <= 0:
        return AREA_BUCKETS[0][1]
    for limit, name in AREA_BUCKETS[1:]:
        if m2 <= limit:
            return name
    return "more than 1000 m²"


def covered_share(detections: list[Detection], grid: int = 256) -> float:
    """The share of the image the detections' boxes cover (their union: overlaps once)."""
    mask = np.zeros((grid, grid), bool)
    for d in detections:
        x1, y1, x2, y2 = (min(max(int(round(v * grid)), 0), grid) for v in d.box)
        mask[y1:y2, x1:x2] = True
    return float(mask.mean())


def area_reply(detections: list[Detection], label: str, ground_m2: float | None) -> str:
    """The ground the detected ``label``s cover: their boxes' union, times the share of a
    box a footprint fills, as RSVQA's class with the estimate beside it."""
    if not detections:
        return f"0 m² (no {plural(label)} found)"
    share = covered_share(detections)
    if not ground_m2:  # no ground resolution (a plain picture): the image's share only
        return (f"The {plural(label)} found cover about {share * FOOTPRINT_SHARE:.0%} of the "
                "image (its ground resolution is unknown).")
    m2 = share * FOOTPRINT_SHARE * ground_m2
    return f"{area_bucket(m2)} (about {m2:,.0f} m² of {plural(label)} found)"


_PLURALS = {"building": "buildings", "aircraft": "aircraft"}
# Other words an analyst asks a class by: (singulars, plurals).
_SYNONYMS = {"aircraft": (("airplane", "aeroplane", "plane"), ("airplanes", "aeroplanes", "planes")),
             "tree": (("tree crown",), ("tree crowns",))}
# Words an analyst asks about buildings by, in questions only: a description's sentence about
# "metal roofs" is not a claim about how many buildings there are (`claims_about`).
_ASKED_AS = {"building": (("house", "home", "dwelling", "roof", "rooftop"),
                          ("houses", "homes", "dwellings", "roofs", "rooftops"))}


def plural(label: str) -> str:
    return _PLURALS.get(label, label + "s")


def _label_pattern(label: str, plurals: bool = True, asked: bool = False,
                   singulars: bool = True) -> str:
    """A regex for ``label`` and the words it is asked by (plurals first, so that they win;
    ``asked``: also the words a question may use for it, `_ASKED_AS`)."""
    singular, many = _SYNONYMS.get(label, ((), ()))
    if asked:
        more_one, more_many = _ASKED_AS.get(label, ((), ()))
        singular, many = (*singular, *more_one), (*many, *more_many)
    words = [*((plural(label), *many) if plurals else ()),
             *((label, *singular) if singulars else ())]
    return "(?:" + "|".join(re.escape(w) for w in dict.fromkeys(words)) + ")"


_CELLS = ("top left", "top right", "bottom left", "bottom right", "top", "bottom", "left",
          "right", "center")
_ASKS_WHERE = re.compile(r"^(?:where is|where's|locate|find|show|mark|box|detect|give the bounding "
                         r"box of|output the bounding box of|draw a box around)\b")


def referred(question: str, label: str) -> tuple[str | None, str | None] | None:
    """(size, cell) of a referring expression about one ``label`` that the detections can
    settle: "the largest building" ("largest", None), "the building in the top left" (None,
    "top left"), "the building" (None, None). None for anything else, relations to other
    classes included ("the building closest to the parking lot": the language model's)."""
    q = " ".join(question.lower().replace("centre", "center").replace("middle", "center").split())
    m = re.search(rf"\bthe (?:(largest|biggest|smallest) )?{_label_pattern(label, False, True)}\b"
                  r"(.*)$", q)
    if not m:
        return None
    rest = re.sub(r"\b(?:of|in) (?:the|this) (?:image|picture|scene|chip|area)\b", "", m.group(2))
    if re.search(r"\b(?:closest|nearest|next|near|beside|along|between|adjacent|of|with)\b", rest):
        return None
    cell = re.search(rf"\b(?:in|at|on) the ({'|'.join(_CELLS)})\b", rest)
    size = {"biggest": "largest"}.get(m.group(1) or "", m.group(1))
    return size, cell.group(1) if cell else None


# The part of the image a count, presence, area or "find all" question confines itself to, as
# 0-1 boxes (x1, y1, x2, y2), and what the answer calls it. An analyst counting "in the top left"
# means that corner of the image, not the 3 x 3 cell a referring expression names one building
# by ("the building on the left" is the only one in the middle-left cell, `referred`).
_PLACES = {"top left": ((0.0, 0.0, 0.5, 0.5), "top-left quarter"),
           "top right": ((0.5, 0.0, 1.0, 0.5), "top-right quarter"),
           "bottom left": ((0.0, 0.5, 0.5, 1.0), "bottom-left quarter"),
           "bottom right": ((0.5, 0.5, 1.0, 1.0), "bottom-right quarter"),
           "top": ((0.0, 0.0, 1.0, 0.5), "top half"),
           "bottom": ((0.0, 0.5, 1.0, 1.0), "bottom half"),
           "left": ((0.0, 0.0, 0.5, 1.0), "left half"),
           "right": ((0.5, 0.0, 1.0, 1.0), "right half"),
           "center": ((0.25, 0.25, 0.75, 0.75), "central quarter")}
PLACED_KINDS = frozenset({"count", "presence", "area", "find_all", "compare", "rural_urban"})
_PLACE = re.compile(
    r"(?:\b(?:in|at|on|within|inside)|^(?:please )?(?:describe|summari[sz]e)|^(?:is|are)) the "
    rf"({'|'.join(sorted(_PLACES, key=len, reverse=True))})"
    r"(?: (?:half|part|side|corner|quarter|area|portion|section|edge))?"
    r"(?: of (?:the|this) (\w+))?")


def asked_place(question: str) -> tuple[tuple[float, float, float, float], str] | None:
    """(0-1 box, its name) of the part of the image a question names ("How many houses are in
    the top left?": the top-left quarter), or None: none named, or a place relative to
    something else ("the buildings on the left of the road" is the language model's)."""
    q = " ".join(question.lower().replace("-", " ").split())
    q = re.sub(r"\bupper\b", "top", re.sub(r"\blower\b", "bottom", q))
    q = re.sub(r"\b(?:centre|middle)\b", "center", q)
    m = _PLACE.search(q)
    if m is None or (m.group(2) and m.group(2) not in _WHOLE):
        return None
    return _PLACES[m.group(1)]


_WHOLE = {"image", "picture", "photo", "scene", "chip", "area", "map", "tile", "view", "box",
          "region", "rectangle", "selection"}


def place_box(place: tuple[float, float, float, float], size: tuple[int, int],
              within: tuple[float, float, float, float] | None = None
              ) -> tuple[float, float, float, float]:
    """A 0-1 ``place`` as pixels of an image of ``size``, or of the drawn box ``within``."""
    x1, y1, x2, y2 = within if within is not None else (0.0, 0.0, *size)
    w, h = x2 - x1, y2 - y1
    return (x1 + place[0] * w, y1 + place[1] * h, x1 + place[2] * w, y1 + place[3] * h)


_SIZE = re.compile(
    r"\b(larger|bigger|greater|more|over|above|at least|smaller|less|under|below|at most)"
    r"(?: than)? (\d+(?:\.\d+)?) ?(?:m²|m2|sq\.? ?m\b|square met(?:er|re)s?)")


def asked_size(question: str) -> tuple[bool, float] | None:
    """(larger, m²) of a size a count, presence or "find all" question asks about ("How many
    buildings are larger than 200 m²?": (True, 200.0)), or None."""
    m = _SIZE.search(" ".join(question.lower().replace(",", "").split()))
    if m is None:
        return None
    return m.group(1) in {"larger", "bigger", "greater", "more", "over", "above", "at least"}, \
        float(m.group(2))


def size_words(sized: tuple[bool, float], than: str = "") -> str:
    """" of more than 200 m²" (or, with ``than`` " than", " larger than 200 m²") for an
    `asked_size`: words a question or an answer can carry."""
    larger, m2 = sized
    if than:
        return f" {'larger' if larger else 'smaller'}{than} {m2:g} m²"
    return f" of {'more' if larger else 'less'} than {m2:g} m²"


def box_share(detection: Detection) -> float:
    x1, y1, x2, y2 = detection.box
    return max(x2 - x1, 0.0) * max(y2 - y1, 0.0)


def box_sides_m(detection: Detection, ground_m2: float, size: tuple[int, int]) -> str:
    """"a box of 12 m x 9 m" on an image of ``ground_m2`` and ``size`` pixels (square ones)."""
    w, h = size
    width_m, height_m = (ground_m2 * w / h) ** 0.5, (ground_m2 * h / w) ** 0.5
    x1, y1, x2, y2 = detection.box
    return f"a box of {(x2 - x1) * width_m:.0f} m x {(y2 - y1) * height_m:.0f} m"


def footprint_m2(detection: Detection, ground_m2: float) -> float:
    """The ground a detection's object covers: its box's share of an image of ``ground_m2``
    square metres, times the share of a box a footprint fills (`FOOTPRINT_SHARE`)."""
    return box_share(detection) * ground_m2 * FOOTPRINT_SHARE


def of_size(detections: list[Detection], label: str, sized: tuple[bool, float],
            ground_m2: float) -> list[Detection]:
    """``detections`` without the ``label``s whose footprint (`footprint_m2` on an image of
    ``ground_m2``) misses the `asked_size` ``sized``; other classes stay."""
    larger, m2 = sized
    return [d for d in detections
            if d.label != label or (footprint_m2(d, ground_m2) > m2) == larger]


def object_question(question: str, labels: list[str]) -> tuple[str, str] | None:
    """("presence" | "count" | "compare" | "area" | "find_all" | "rural_urban" | "refer" |
    "measure", label) when the question asks that about a class the detector knows (compare:
    "more than 5?", `compare_reply`; rural or urban: about its buildings; refer: one object by
    size or place, `referred`; measure: how large that one is); None otherwise (the language
    model answers)."""
    q = re.sub(r"^(?:please |(?:can|could|would) you (?!see\b)(?:please )?)", "",
               " ".join(question.lower().split()))
    if "building" in labels and re.search(r"\brural\b.*\burban\b|\burban\b.*\brural\b", q):
        return "rural_urban", "building"
    for label in labels:
        obj = _label_pattern(label, asked=True)
        if re.search(rf"\bhow many {obj}\b", q) or re.search(
                rf"^(?:what(?: is|'s) )?(?:the )?(?:total )?(?:number|count) of {obj}\b"
                rf"|^count (?:the number of |all (?:the )?|every |each |the )?{obj}\b", q):
            return "count", label
        if re.search(rf"\barea (?:is )?covered by (?:the |all )?{obj}\b|^what area do (?:the )?{obj} "
                     rf"cover\b|^how much (?:ground|area|land|space|of the (?:image|area|chip)) "
                     rf"(?:is covered by|do) (?:the )?{obj}\b", q):
            return "area", label
        many = _label_pattern(label, singulars=False, asked=True)
        if re.search(rf"\b(?:find|locate|detect|show|mark|box)\b.*\b(?:all|every|each)\b.*\b{obj}\b",
                     q) or re.search(
                rf"^(?:where are|(?:find|locate|detect|show|mark|box|highlight|outline|draw)"
                rf"(?: me)?)(?: the)? {many}\b(?! (?:of|closest|nearest|next|near|beside|along|between)\b)",
                q):  # "Where are the houses?", "Show me the buildings": every one of them
            return "find_all", label
        if re.search(rf"^(?:is|are) there (?:any |a |an |some )?{obj}\b", q) or re.search(
                rf"^(?:does|do) (?:the|this) (?:image|scene|area|chip|picture) (?:contain|show|"
                rf"have|include) (?:any |a |an |some )?{obj}\b", q) or re.search(
                rf"^(?:is|are) (?:there )?(?:any |a |an |some )?{obj} (?:present|visible|shown|"
                rf"there)\b", q) or re.search(
                rf"^(?:can|do) you see (?:any |a |an |some )?{obj}\b", q):
            return "presence", label
    for label in labels:
        obj = _label_pattern(label, asked=True)
        if re.search(rf"^(?:are|is) there (?:more|fewer|less) than \d+ {obj}\b", q) or re.search(
                rf"^(?:are|is) there at (?:least|most) \d+ {obj}\b", q):
            return "compare", label
        if _POSSESSIVE_SIZE.search(q) and referred(q, label) is not None:
            return "measure", label  # "What is the largest building's area?"
        if _ASKS_SIZE.search(q) and referred(_ASKS_SIZE.sub("", q), label) is not None:
            return "measure", label
        if (_ASKS_WHERE.search(q) or _ASKS_WHICH.search(q)) and referred(q, label) is not None:
            return "refer", label
    return None


# "Which is the largest building?", "What is the building in the top left?": one building.
_ASKS_WHICH = re.compile(r"^(?:which|what)(?: one)? is the (?:(?:largest|biggest|smallest) )?\w+")
_POSSESSIVE_SIZE = re.compile(r"'s (?:size|area|footprint|ground area)\b")
_COMPARED = re.compile(r"\b(more|fewer|less) than (\d+)\b|\bat (least|most) (\d+)\b")


def compare_reply(question: str, label: str, n: int, found: int | None = None) -> str:
    """"yes"/"no" to "Are there more than 5 buildings?" from the count ``n`` (of ``found``
    detections, when the count is estimated from them: `DetectorConfig.count_of`)."""
    m = _COMPARED.search(question.lower())
    if m is None:
        return str(n)
    word, k = (m.group(1), int(m.group(2))) if m.group(1) else (m.group(3), int(m.group(4)))
    holds = {"more": n > k, "fewer": n < k, "less": n < k, "least": n >= k, "most": n <= k}[word]
    said = f"{'yes' if holds else 'no'}: "
    if found is not None and found != n:
        return said + f"about {n} {label if n == 1 else plural(label)} ({found} detected)"
    return said + f"{n} {label if n == 1 else plural(label)} found"


# "What is the size of the largest building?", "How big is the building in the top left?"
_ASKS_SIZE = re.compile(r"^(?:what(?: is|'s) the (?:size|area|footprint|ground area)(?: of)?|how "
                        r"(?:big|large|small) is) ")


def area_question(question: str, labels: list[str]) -> tuple[str, str, str] | None:
    """For a question about a whole area read in tiles: (kind, label, the question each tile
    is asked) when the answer is a number or a yes/no about the objects (count, presence). Each
    tile then answers "find all" instead, so the tiles' boxes merge across borders (an object
    cut by one lies whole in the next) and the area's answer counts each object once; a sum of
    the tiles' own counts would count the overlaps twice. None for other questions."""
    asked = object_question(question, labels)
    if asked is None or asked[0] not in {"count", "presence"}:
        return None
    kind, label = asked
    return kind, label, f"Find all {plural(label)} in the image."


def area_answer(kind: str, label: str, n: int, where: str = "this area", size: str = "") -> str:
    """The answer to an `area_question` from the number of merged detections of ``label``
    (``where``: what was read, "the top-left quarter of this area"; ``size``: the size asked
    about, " of more than 200 m²", `size_words`)."""
    noun = label if n == 1 else plural(label)
    if kind == "presence":
        return (f"Yes: {n} {noun}{size} in {where}" if n
                else f"No {plural(label)}{size} found in {where}")
    return f"{n} {noun}{size} in {where}"


def referred_detection(question: str, label: str, detections: list[Detection]
                       ) -> Detection | None:
    """The one detection a referring question (`referred`) means: among those in its cell (all
    when it names none), the largest, the smallest, or the surest. The question says a building
    is in that cell, so when none is centred there, those within half a cell of it stand in (a
    box whose centre fell just over the line), else the nearest."""
    asked = referred(question, label)
    mine = [d for d in detections if d.label == label]
    if asked is None or not mine:
        return None
    size, cell = asked
    if cell is not None:
        inside = [d for d in mine if _cell_of(d) == cell]
        if not inside:
            away = [_cell_distance(d, cell) for d in mine]
            inside = [d for d, a in zip(mine, away, strict=True) if a <= 1 / 6] or [
                mine[min(range(len(mine)), key=away.__getitem__)]]
        mine = inside
    if size is None:
        return max(mine, key=lambda d: d.score)
    area = [(d.box[2] - d.box[0]) * (d.box[3] - d.box[1]) for d in mine]
    pick = max if size == "largest" else min
    return mine[pick(range(len(mine)), key=area.__getitem__)]


def _cell_counts(detections: list[Detection]) -> list[tuple[str, int]]:
    """(3 x 3 cell, how many detections are centred there), most first."""
    counts = Counter(_cell_of(d) for d in detections)
    return sorted(counts.items(), key=lambda x: -x[1])


_CELL_NAMES = (("top left", "top", "top right"), ("left", "center", "right"),
               ("bottom left", "bottom", "bottom right"))
_CELL_INDEX = {name: (r, c) for r, row in enumerate(_CELL_NAMES) for c, name in enumerate(row)}


def _centre(det: Detection) -> tuple[float, float]:
    return (det.box[0] + det.box[2]) / 2, (det.box[1] + det.box[3]) / 2


def _cell_of(det: Detection) -> str:
    cx, cy = _centre(det)
    return _CELL_NAMES[min(int(cy * 3), 2)][min(int(cx * 3), 2)]


def _cell_distance(det: Detection, cell: str) -> float:
    """How far (0-1 of the image) the detection's centre lies outside the 3 x 3 cell."""
    row, col = _CELL_INDEX[cell]
    cx, cy = _centre(det)
    dx = max(col / 3 - cx, 0.0, cx - (col + 1) / 3)
    dy = max(row / 3 - cy, 0.0, cy - (row + 1) / 3)
    return (dx * dx + dy * dy) ** 0.5


def _centre_in(det: Detection, box: tuple[float, float, float, float] | None,
               size: tuple[int, int]) -> bool:
    if box is None:
        return True
    w, h = size
    cx = (det.box[0] + det.box[2]) / 2 * w
    cy = (det.box[1] + det.box[3]) / 2 * h
    return box[0] <= cx <= box[2] and box[1] <= cy <= box[3]


def answered_detections(label: str, detections: list[Detection], size: tuple[int, int],
                        region_box_px: tuple[float, float, float, float] | None = None
                        ) -> list[Detection]:
    """The detections an answer about ``label`` states, in the order its boxes are written
    (top to bottom, then left to right), so the i-th box and the i-th score belong together."""
    mine = [d for d in detections if d.label == label and _centre_in(d, region_box_px, size)]
    return sorted(mine, key=lambda d: (d.box[1], d.box[0]))


def perception_answer(kind: str, label: str, detections: list[Detection],
                      size: tuple[int, int],
                      region_box_px: tuple[float, float, float, float] | None = None,
                      ground_m2: float | None = None, question: str = "") -> str:
    """The answer to an object question from the detections (`perception_reply`'s text)."""
    return perception_reply(kind, label, detections, size, region_box_px, ground_m2,
                            question)[0]


def perception_reply(kind: str, label: str, detections: list[Detection],
                     size: tuple[int, int],
                     region_box_px: tuple[float, float, float, float] | None = None,
                     ground_m2: float | None = None, question: str = "",
                     sure_from: float | None = None,
                     count_of: Callable[[int], int] | None = None) -> tuple[str, list[Detection]]:
    """The answer to an object question from the detections, and the detections it states (in
    the order its boxes are written): "yes"/"no", the count, every box in the canonical grammar,
    "rural"/"urban" or the ground covered (``ground_m2``: the chip's ground area, when known),
    or the one box a referring ``question`` means. Counts and boxes are the detections',
    nothing else. A referring answer below ``sure_from`` (the score "find all" reports from)
    says that it is a weak candidate: the question presumes the object, so the box stays, but
    the analyst who was just told there is none sees why it is there. ``count_of`` turns the
    detections counted into the count answered (`DetectorConfig.count_of`; None: as many)."""
    from rsvlm.boxes import format_box

    mine = answered_detections(label, detections, size, region_box_px)
    if kind == "measure":  # the one a referring question means, and the ground it covers
        det = referred_detection(_POSSESSIVE_SIZE.sub("", _ASKS_SIZE.sub("", question.lower())),
                                 label, mine)
        if det is None:
            return f"I find no {label} like that in this image.", []
        box = format_box(label, [v * 1000 for v in det.box])
        if not ground_m2:
            return (f"{box} It spans {box_share(det):.1%} of the image; with no ground "
                    "resolution I cannot give its size in metres."), [det]
        return (f"{box} About {footprint_m2(det, ground_m2):,.0f} m² (estimated from its box, "
                f"{box_sides_m(det, ground_m2, size)})."), [det]
    if kind == "refer":
        det = referred_detection(question, label, mine)
        if det is None:
            return f"I find no {label} like that in this image.", []
        text = format_box(label, [v * 1000 for v in det.box])
        if sure_from is not None and det.score < sure_from:
            text += (f" A weak candidate only: the detector scores it {det.score:.2f}, and "
                     f"reports {plural(label)} from {sure_from:.2f}.")
        return text, [det]
    if kind == "rural_urban":
        frac = 1.0
        if region_box_px is not None:  # the drawn box's share of the chip
            x1, y1, x2, y2 = region_box_px
            frac = max(x2 - x1, 0.0) * max(y2 - y1, 0.0) / max(size[0] * size[1], 1)
        ground = ground_m2 * frac if ground_m2 else None
        return scene_of_detections(mine, label, ground, frac), mine
    if kind == "presence":
        return ("yes" if mine else "no"), mine
    if kind == "area":
        return area_reply(mine, label, ground_m2), mine
    counted = count_of(len(mine)) if count_of is not None else len(mine)
    if kind == "count":
        return str(counted), mine
    if kind == "compare":
        return compare_reply(question, label, counted, len(mine)), mine
    if not mine:
        return f"I find no {plural(label)} in this image.", []
    return "".join(format_box(label, [v * 1000 for v in d.box]) for d in mine), mine


_DESCRIBE = re.compile(r"^(?:please )?(?:describe|caption|summari[sz]e|give a (?:short |brief )?"
                       r"description)\b|^what (?:is|can you see|do you see) (?:in|on) (?:this|the) "
                       r"(?:image|picture|scene|area)")


_CELL_PHRASES = {"top": "at the top", "bottom": "at the bottom", "left": "on the left",
                 "right": "on the right", "center": "in the center", "top left": "in the top left",
                 "top right": "in the top right", "bottom left": "in the bottom left",
                 "bottom right": "in the bottom right"}


def asks_description(question: str) -> bool:
    """Whether ``question`` asks for a description of the whole image (the language model
    describes it; the detector adds what it found, `detections_sentence`)."""
    return bool(_DESCRIBE.search(" ".join(question.lower().split())))


_ONE_OF_THEM = re.compile(r"\bthe (?:largest|smallest|biggest) ones?\b")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def claims_about(sentence: str, labels: list[str]) -> bool:
    """Whether a sentence of the language model's says something about objects of ``labels``
    (how many, how large, where: "There's a building of about 100 m²", "The largest one ...").
    Its descriptions repeat the retrieved neighbour's, which on a new region are wrong; the
    detector's sentence says these things from what is in the image."""
    text = sentence.lower()
    return bool(_ONE_OF_THEM.search(text)) or any(
        re.search(r"\b" + _label_pattern(label) + r"\b", text) for label in labels)


def sentences(pieces: Iterator[str]) -> Iterator[str]:
    """A stream of text pieces as whole sentences, each as soon as it ends."""
    buffer = ""
    for piece in pieces:
        buffer += piece
        *done, buffer = _SENTENCE_END.split(buffer)
        yield from (sentence.strip() for sentence in done if sentence.strip())
    if buffer.strip():
        yield buffer.strip()


def without_claims(pieces: Iterator[str], labels: list[str]) -> Iterator[str]:
    """A stream of text pieces, passed on a sentence at a time, leaving out the sentences that
    make claims about ``labels`` (`claims_about`)."""
    sep = ""
    for sentence in sentences(pieces):
        if not claims_about(sentence, labels):
            yield sep + sentence
            sep = " "


# The openings of the training captions that name the scene (`training.captions._OPENINGS`,
# `training.classification._SCENE_TEMPLATES`): "An aerial image of an airport."
_SCENE_OPENING = re.compile(
    r"^(an aerial image of|this overhead image shows|a high-resolution remote sensing image of"
    r"|the image shows|this remote sensing image shows|a satellite view of|the scene is"
    r"|overhead imagery of)\b", re.IGNORECASE)
# What OpenStreetMap holds: the language model never sees the map's data; such sentences are
# a retrieved neighbour's ("OpenStreetMap records no features here.").
_MAP_CLAIM = re.compile(r"openstreetmap|\bmapped (objects|features)\b", re.IGNORECASE)


def grounded_description(pieces: Iterator[str], labels: list[str], opening: str | None = None
                         ) -> Iterator[str]:
    """`without_claims` for a description, which also leaves out the language model's
    sentences about what the map records (it never sees the map's data: "OpenStreetMap records
    no features here." is a retrieved neighbour's). With an ``opening`` (a sentence), that
    comes first, in place of the model's first sentence when that names the scene."""
    sep, first = "", True
    if opening:
        yield opening
        sep = " "
    for sentence in sentences(pieces):
        if first and opening and _SCENE_OPENING.match(sentence):
            first = False
            continue
        first = False
        if not claims_about(sentence, labels) and not _MAP_CLAIM.search(sentence):
            yield sep + sentence
            sep = " "


def detections_sentence(detections: list[Detection], labels: list[str], where: bool = True
                        ) -> str:
    """What the detector found, as a sentence for the end of a description: per class, how
    many and (``where``) the cells of the image most of them are in. A class other than the
    first (buildings) is named only when found: "no aircraft" in every description says
    nothing."""
    parts = []
    for i, label in enumerate(labels):
        mine = [d for d in detections if d.label == label]
        if not mine:
            if i == 0:
                parts.append(f"no {plural(label)}")
            continue
        top = _cell_counts(mine)
        noun = label if len(mine) == 1 else plural(label)
        if not where:
            parts.append(f"{len(mine)} {noun}")
        elif len(mine) == 1:
            parts.append(f"{len(mine)} {noun} {_CELL_PHRASES[top[0][0]]}")
        elif len(top) >= 5:
            parts.append(f"{len(mine)} {noun} spread over the image")
        else:
            parts.append(f"{len(mine)} {noun} mostly "
                         + " and ".join(_CELL_PHRASES[c] for c, _ in top[:2]))
    return "The detector finds " + "; ".join(parts) + (" here." if not where else ".")


def sizes_sentence(detections: list[Detection], label: str, ground_m2: float | None) -> str | None:
    """How large the detected ``label``s are, for a description of an image of ``ground_m2``
    square metres: the middle half of their footprints (each estimated from its box,
    `footprint_m2`), the largest and where it is, and the share of the ground they cover.
    None with fewer than two, or without a ground resolution to measure them by."""
    mine = [d for d in detections if d.label == label]
    if not ground_m2 or len(mine) < 2:
        return None
    sizes = sorted(footprint_m2(d, ground_m2) for d in mine)
    n = len(sizes)
    low, high = _nice_m2(sizes[n // 4]), _nice_m2(sizes[(3 * n) // 4])
    largest = max(mine, key=box_share)
    spread = f"about {low:,.0f} m²" if low == high else f"{low:,.0f}-{high:,.0f} m²"
    cover = covered_share(mine) * FOOTPRINT_SHARE
    return (f"Most {plural(label)} are {spread} (estimated from their boxes); the largest, "
            f"about {_nice_m2(footprint_m2(largest, ground_m2)):,.0f} m², is "
            f"{_CELL_PHRASES[_cell_of(largest)]}. Together they cover about "
            f"{max(cover, 0.01):.0%} of the ground.")


def _nice_m2(m2: float) -> float:
    """``m2`` rounded as an estimate from a box deserves: to 5 m² below 100, to 10 below
    1,000, to 100 above."""
    step = 5.0 if m2 < 100 else 10.0 if m2 < 1000 else 100.0
    return max(step, round(m2 / step) * step)


def detections_summary(detections: list[Detection], labels: list[str]) -> str:
    """Per class: how many, and where (the 3 x 3 cell of the image), as one line of text (a
    class other than the first only when found, as in `detections_sentence`)."""
    parts = []
    for i, label in enumerate(labels):
        mine = [d for d in detections if d.label == label]
        if not mine:
            if i == 0:
                parts.append(f"0 {plural(label)}")
            continue
        where = ", ".join(f"{n} {cell}" for cell, n in _cell_counts(mine))
        noun = label if len(mine) == 1 else plural(label)
        parts.append(f"{len(mine)} {noun} ({where})")
    return "Detected: " + "; ".join(parts) + "."
