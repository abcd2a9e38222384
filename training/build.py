"""Region / image folder -> LLaVA-style JSONL dataset, PNG chips, texts and a dataset card.

Reads top to bottom: `RegionBuilder.contexts()` cuts the grid and joins OSM objects per chip
(vectors only, fast); `RegionBuilder.chips()` reads the pixels through `tiles`; `samples_for`
runs the task generators; `build_dataset` writes everything. Every random choice comes from an
RNG seeded by (seed, region, chip, task), so two builds with one seed give identical bytes.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tiles.atomic import atomic_path
from training.augment import augment_choices, dihedral_context, dihedral_pixels
from training.captions import RegionStats, Rewriter, caption_samples, descriptions
from training.classification import (
    classification_sample,
    scan_image_folder,
    scene_caption,
    scene_caption_sample,
    split_of_item,
)
from training.grounding import grounding_samples, region_samples
from training.osm_source import OSMSource
from training.region import (
    ChipContext,
    GridCell,
    RasterInfo,
    RegionSpec,
    assign_splits,
    chip_grid,
    chip_objects,
    classify_features,
    ground_resolution,
    raster_info,
    read_features,
)
from training.samples import Sample, rng_for
from training.vqa import balance_answers, vqa_samples

log = logging.getLogger(__name__)

ALL_TASKS = ("caption", "vqa", "grounding", "region")


@dataclass
class BuildConfig:
    """Knobs of the generators (the region spec holds the chip grid)."""

    seed: int = 0
    tasks: tuple[str, ...] = ALL_TASKS  # which instruction tasks to generate per chip
    caption_repeats: int = 3  # most caption variants for a chip with rare classes
    vqa_per_type: int = 2  # questions per type and chip (before balancing)
    max_refs: int = 4  # referring expressions per chip
    max_boxes: int = 12  # "find all X" only when the chip has at most this many X
    region_items: int = 2  # region (box-as-input) questions per chip
    balance: bool = True  # even out yes/no and rural/urban answers per split
    descriptions: bool = True  # scene/object texts for the semantic database
    png_compress: int = 3  # zlib level of chip PNGs: 3 is ~3x faster than 6 for ~5% more bytes
    augment: int = 0  # rotated/mirrored copies per training chip (0-7; training.augment)
    bbox_lonlat: tuple[float, float, float, float] | None = None  # only chips overlapping it
    rewrite: Rewriter | None = field(default=None, repr=False)  # optional caption paraphraser
    # Where OSM features come from (`training.osm_source`): None = the region's vector files.
    osm: OSMSource | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.augment <= 7:
            raise ValueError(f"augment={self.augment}: a chip has 7 other dihedral views (0-7)")
        unknown = set(self.tasks) - set(ALL_TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {list(ALL_TASKS)}")


@dataclass
class ChipRecord:
    """One chip's context plus where it lies (for eval and retrieval training)."""

    ctx: ChipContext
    cell: GridCell
    info: RasterInfo


class RegionBuilder:
    """Chips and samples of one region."""

    def __init__(self, spec: RegionSpec, config: BuildConfig | None = None) -> None:
        self.spec = spec
        self.config = config or BuildConfig()
        self.stats = RegionStats()
        self._records: list[ChipRecord] | None = None

    def contexts(self, progress: bool = False) -> list[ChipRecord]:
        """Grid cells with their OSM objects (no pixels read yet)."""
        if self._records is not None:
            return self._records
        from tqdm.auto import tqdm

        from tiles.geometry import LONLAT, transform_bounds
        from tiles.sources.base import intersects

        spec, records = self.spec, []
        infos = [raster_info(p) for p in spec.rasters]
        features_by_crs: dict[str, Any] = {}
        cells_all = [(i, c) for i, info in enumerate(infos) for c in chip_grid(info, spec, i)]
        splits = assign_splits([c for _, c in cells_all], spec, self.config.seed)
        for i, cell in tqdm(cells_all, desc=f"{spec.name}: join OSM", disable=not progress,
                            unit="chip"):
            info = infos[i]
            key = info.crs.to_wkt()
            if key not in features_by_crs:
                features_by_crs[key] = self._features(infos, info.crs)
            if splits[cell.chip_id] == "gap":
                continue
            lonlat = transform_bounds(cell.bounds, info.crs, LONLAT)
            if self.config.bbox_lonlat is not None and not intersects(lonlat,
                                                                      self.config.bbox_lonlat):
                continue
            size = spec.chip_size
            gsd = ground_resolution(lonlat, size, (cell.bounds[2] - cell.bounds[0]) / size)
            objs = chip_objects(features_by_crs[key], cell.bounds, size, size, gsd)
            ctx = ChipContext(cell.chip_id, size, size, gsd, objs, splits[cell.chip_id],
                              {"region": spec.name, "raster": info.path.name,
                               "bounds": [round(v, 3) for v in cell.bounds],
                               "bounds_lonlat": [round(v, 7) for v in lonlat],
                               "gsd_m": round(gsd, 4)})
            records.append(ChipRecord(ctx, cell, info))
            self.stats.add(ctx)
        self._records = records
        return records

    def _features(self, infos: list[RasterInfo], crs: Any) -> Any:
        """Classified features in ``crs``: from the build's OSM source over the rasters' area
        when it has one (in place of the region's vector files), else the region's files."""
        osm = self.config.osm
        if osm is None:
            return read_features(self.spec.vectors, crs)
        from tiles.geometry import LONLAT, transform_bounds

        boxes = [transform_bounds(i.bounds, i.crs, LONLAT) for i in infos if i.crs == crs]
        area = (min(b[0] for b in boxes), min(b[1] for b in boxes),
                max(b[2] for b in boxes), max(b[3] for b in boxes))
        if self.spec.vectors:
            log.info("%s: OSM features from %s, not from %s", self.spec.name, osm.description,
                     ", ".join(p.name for p in self.spec.vectors))
        features = classify_features([osm.features(area)], crs)
        log.info("%s: %d visible OSM features (%d classes) from %s", self.spec.name,
                 len(features), features["cls"].nunique() if len(features) else 0,
                 osm.description)
        return features

    def chips(self, progress: bool = False) -> Iterator[tuple[ChipRecord, Any]]:
        """(record, tiles.Chip) for chips with enough valid pixels, in grid order."""
        from tqdm.auto import tqdm

        from tiles import open_source

        records = self.contexts(progress)
        by_raster: dict[Path, list[ChipRecord]] = defaultdict(list)
        for r in records:
            by_raster[r.info.path].append(r)
        bar = tqdm(total=len(records), desc=f"{self.spec.name}: chips", disable=not progress,
                   unit="chip")
        for path, recs in by_raster.items():
            with open_source(path) as src:
                for rec in recs:
                    bar.update(1)
                    chip = src.chip(rec.cell.bounds, crs=rec.info.crs, size=self.spec.chip_size)
                    if (chip.width, chip.height) != (rec.ctx.width, rec.ctx.height):
                        # Objects were placed on the grid's pixel frame; a different chip
                        # shape would misplace every box.
                        raise RuntimeError(f"{path}: chip {rec.ctx.chip_id} came back "
                                           f"{chip.width}x{chip.height}, expected "
                                           f"{rec.ctx.width}x{rec.ctx.height}")
                    if chip.mask is not None and chip.mask.mean() < self.spec.min_valid:
                        continue
                    yield rec, chip
        bar.close()

    def samples_for(self, ctx: ChipContext) -> list[Sample]:
        cfg, region = self.config, self.spec.name
        out: list[Sample] = []
        if "caption" in cfg.tasks:
            rng = rng_for(cfg.seed, region, ctx.chip_id, "caption")
            out += caption_samples(ctx, self.stats, rng, cfg.rewrite, cfg.caption_repeats)
        if "vqa" in cfg.tasks:
            rng = rng_for(cfg.seed, region, ctx.chip_id, "vqa")
            out += vqa_samples(ctx, self.stats, rng, cfg.vqa_per_type)
        if "grounding" in cfg.tasks:
            rng = rng_for(cfg.seed, region, ctx.chip_id, "grounding")
            out += grounding_samples(ctx, rng, cfg.max_refs, cfg.max_boxes)
        if "region" in cfg.tasks:
            rng = rng_for(cfg.seed, region, ctx.chip_id, "region")
            out += region_samples(ctx, rng, cfg.region_items)
        for s in out:
            s.meta["split"] = ctx.split
        return out


# --------------------------------------------------------------------------------- writing


@dataclass
class BuildResult:
    out_dir: Path
    counts: dict[str, Any]


def _write_png(pixels: Any, path: Path, compress: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    # No metadata chunks, fixed compression: identical pixels give identical bytes.
    with atomic_path(path) as tmp:
        Image.fromarray(pixels, mode="RGB").save(tmp, format="PNG", compress_level=compress)


def _record(sample_id: str, image: str, s: Sample) -> dict[str, Any]:
    return {"id": sample_id, "image": image, "conversations": s.conversation(), "task": s.task,
            "meta": s.meta}


@dataclass
class _Collected:
    """What `build_dataset` gathers before writing: samples with their ids and image paths,
    database texts, chip metadata rows and counts for the dataset card."""

    out: Path
    cfg: BuildConfig
    pairs: list[tuple[str, Sample]] = field(default_factory=list)  # (image path, sample)
    ids: list[str] = field(default_factory=list)
    texts: list[dict[str, Any]] = field(default_factory=list)
    chip_rows: list[dict[str, Any]] = field(default_factory=list)
    class_counts: Counter[str] = field(default_factory=Counter)
    skipped: int = 0
    augmented: int = 0

    def add(self, sample_id: str, image: str, s: Sample) -> None:
        self.ids.append(sample_id)
        self.pairs.append((image, s))

    def add_chip(self, region: str, builder: RegionBuilder, ctx: ChipContext, image: str,
                 **extra: str) -> None:
        """A chip's metadata row and its instruction samples."""
        self.chip_rows.append({"id": f"{region}/{ctx.chip_id}", "image": image,
                               "split": ctx.split, "classes": ctx.classes,
                               "n_objects": len(ctx.objects), **extra, **ctx.meta})
        per_task: Counter[str] = Counter()
        for s in builder.samples_for(ctx):
            self.add(f"{region}/{ctx.chip_id}/{s.task}/{per_task[s.task]}", image, s)
            per_task[s.task] += 1


def build_dataset(out_dir: str | Path, regions: Sequence[RegionSpec] = (),
                  image_folders: Sequence[str | Path] = (),
                  config: BuildConfig | None = None, *, folder_val_fraction: float = 0.1,
                  progress: bool = True) -> BuildResult:
    """Build one dataset folder from regions and ImageFolder classification sets.

    Layout: train.jsonl, val.jsonl (LLaVA conversations), texts.jsonl (semantic database
    descriptions), chips.jsonl (chip metadata), images/, dataset_card.json, dataset_card.md.
    """
    cfg = config or BuildConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [r.name for r in regions] + [Path(f).name for f in image_folders]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"two inputs share the name {dupes[0]!r} (their images would collide); "
                         "give regions a `name:` in a spec file")
    acc = _Collected(out, cfg)
    for spec in regions:
        _collect_region(acc, spec, progress)
    for folder in image_folders:
        _collect_image_folder(acc, folder, folder_val_fraction, progress)
    return _write_dataset(acc, regions, image_folders)


def _collect_region(acc: _Collected, spec: RegionSpec, progress: bool) -> None:
    """A region's chips (and their augmented views) as PNGs, samples and database texts."""
    cfg, out = acc.cfg, acc.out
    builder = RegionBuilder(spec, cfg)
    builder.contexts(progress)
    n_ctx = len(builder.contexts())
    n_done = 0
    for rec, chip in builder.chips(progress):
        ctx = rec.ctx
        n_done += 1
        image = f"images/{spec.name}/{ctx.chip_id}.png"
        _write_png(chip.pixels, out / image, cfg.png_compress)
        for o in ctx.objects:
            acc.class_counts[o.cls] += 1
        acc.add_chip(spec.name, builder, ctx, image)
        if cfg.augment and ctx.split == "train":
            # Views of a training chip: instruction samples only (no database texts, which
            # would repeat the chip's own), each remembering its origin for retrieval.
            for k in augment_choices(cfg.augment, cfg.seed, spec.name, ctx.chip_id):
                view = dihedral_context(ctx, k)
                view_image = f"images/{spec.name}/{view.chip_id}.png"
                _write_png(dihedral_pixels(chip.pixels, k), out / view_image,
                           cfg.png_compress)
                acc.add_chip(spec.name, builder, view, view_image, origin=image)
                acc.augmented += 1
        if cfg.descriptions:
            rng = rng_for(cfg.seed, spec.name, ctx.chip_id, "descriptions")
            for row in descriptions(ctx, builder.stats, rng):
                acc.texts.append({**row, "image": image, "region": spec.name,
                                  "split": ctx.split})
    acc.skipped += n_ctx - n_done


def _collect_image_folder(acc: _Collected, folder: str | Path, folder_val_fraction: float,
                          progress: bool) -> None:
    """An ImageFolder set's images as PNGs with classification (and caption) samples."""
    import numpy as np
    from PIL import Image
    from tqdm.auto import tqdm

    cfg, out = acc.cfg, acc.out
    classes, items = scan_image_folder(folder)
    name = Path(folder).name
    for item in tqdm(items, desc=f"{name}: images", disable=not progress, unit="img"):
        image = f"images/{name}/{item.folder}/{item.path.stem}.png"
        with Image.open(item.path) as im:
            _write_png(np.asarray(im.convert("RGB")), out / image, cfg.png_compress)
        split = split_of_item(item, cfg.seed, folder_val_fraction)
        s = classification_sample(item, classes)
        s.meta["split"] = split
        s.meta["dataset"] = name
        acc.add(f"{name}/{item.folder}/{item.path.stem}/classification/0", image, s)
        rng = rng_for(cfg.seed, name, item.folder, item.path.stem, "scene")
        if "caption" in cfg.tasks:
            cap = scene_caption_sample(item, rng)
            cap.meta.update({"split": split, "dataset": name})
            acc.add(f"{name}/{item.folder}/{item.path.stem}/caption/0", image, cap)
        if cfg.descriptions:
            acc.texts.append({"text": scene_caption(item.label, rng), "level": "scene",
                              "cls": item.label, "classes": [item.label], "image": image,
                              "region": name, "split": split})
        if cfg.augment and split == "train":
            _collect_image_views(acc, item, classes, name, image, split)


def _collect_image_views(acc: _Collected, item: Any, classes: Any, name: str, image: str,
                         split: str) -> None:
    """Dihedral views of a training image. A scene class does not depend on which way is
    up: the views get the image's class instructions (no database texts), and remember their
    origin."""
    import numpy as np
    from PIL import Image

    cfg, out = acc.cfg, acc.out
    view_id = f"{item.folder}/{item.path.stem}"
    pixels = None
    for k in augment_choices(cfg.augment, cfg.seed, name, view_id):
        if pixels is None:
            with Image.open(item.path) as im:
                pixels = np.asarray(im.convert("RGB"))
        view_image = f"images/{name}/{item.folder}/{item.path.stem}_d{k}.png"
        _write_png(dihedral_pixels(pixels, k), out / view_image, cfg.png_compress)
        acc.chip_rows.append({"id": f"{name}/{view_id}_d{k}", "image": view_image,
                              "split": split, "classes": [item.label], "n_objects": 0,
                              "origin": image})
        view = classification_sample(item, classes)
        view.meta.update({"split": split, "dataset": name, "view": k})
        acc.add(f"{name}/{view_id}_d{k}/classification/0", view_image, view)
        acc.augmented += 1


def _write_dataset(acc: _Collected, regions: Sequence[RegionSpec],
                   image_folders: Sequence[str | Path]) -> BuildResult:
    """Balance, split and write the JSONL files and the dataset card."""
    cfg, out = acc.cfg, acc.out
    keyed = [(sid, (image, s)) for sid, (image, s) in zip(acc.ids, acc.pairs, strict=True)]
    if cfg.balance:
        kept = balance_answers(((sid, s) for sid, (_, s) in keyed), cfg.seed)
        keep_ids = {sid for sid, _ in kept}
        keyed = [kv for kv in keyed if kv[0] in keep_ids]
    records: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    for sid, (image, s) in keyed:
        records["val" if s.meta.get("split") == "val" else "train"].append(_record(sid, image, s))
    for split, rows in records.items():
        _write_jsonl(out / f"{split}.jsonl", rows)
    _write_jsonl(out / "texts.jsonl", acc.texts)
    _write_jsonl(out / "chips.jsonl", acc.chip_rows)
    card = dataset_card(records, acc.class_counts, cfg, regions, image_folders, acc.skipped,
                        len(acc.texts), acc.augmented)
    (out / "dataset_card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    (out / "dataset_card.md").write_text(card_markdown(card))
    log.info("wrote %d train / %d val samples to %s", len(records["train"]),
             len(records["val"]), out)
    return BuildResult(out, card)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n")


def dataset_card(records: dict[str, list[dict]], class_counts: Counter[str], cfg: BuildConfig,
                 regions: Sequence[RegionSpec], folders: Sequence[str | Path], skipped: int,
                 n_texts: int, augmented: int = 0) -> dict[str, Any]:
    """Counts per split, task, question type, class and answer (no timestamps: reproducible)."""
    per_split: dict[str, Any] = {}
    for split, rows in records.items():
        tasks = Counter(r["task"] for r in rows)
        types = Counter(f"{r['task']}/{r['meta'].get('type', '-')}" for r in rows)
        answers: dict[str, Counter[str]] = defaultdict(Counter)
        for r in rows:
            if r["task"] in {"vqa", "classification"}:
                key = r["meta"].get("type", r["task"])
                answers[key][r["conversations"][1]["value"]] += 1
        per_split[split] = {
            "samples": len(rows),
            "images": len({r["image"] for r in rows}),
            "tasks": dict(sorted(tasks.items())),
            "types": dict(sorted(types.items())),
            "answers": {k: dict(sorted(v.items(), key=lambda kv: (-kv[1], kv[0]))[:30])
                        for k, v in sorted(answers.items())},
        }
    # Generators and sources are objects (locks, models): the card records what they were.
    cfg_dict = {f.name: getattr(cfg, f.name) for f in fields(cfg)
                if f.name not in {"rewrite", "osm"}}
    cfg_dict["tasks"] = list(cfg.tasks)
    cfg_dict["rewrite"] = cfg.rewrite is not None
    if cfg.osm is not None:
        cfg_dict["osm"] = {"source": cfg.osm.description, "attribution": cfg.osm.attribution}
    return {
        "format": "llava-jsonl",
        "config": cfg_dict,
        "regions": [{"name": r.name, "rasters": [p.name for p in r.rasters],
                     "vectors": [p.name for p in r.vectors], "chip_size": r.chip_size,
                     "overlap": r.overlap, "resolution": r.resolution,
                     "val_fraction": r.val_fraction, "block_chips": r.block_chips}
                    for r in regions],
        "image_folders": [Path(f).name for f in folders],
        "chips_skipped_empty": skipped,
        "augmented_chips": augmented,
        "objects_per_class": dict(sorted(class_counts.items())),
        "texts": n_texts,
        "splits": per_split,
    }


def card_markdown(card: dict[str, Any]) -> str:
    lines = ["# Dataset card", "", "Generated by `rsvlm-train build-data` (LLaVA-style JSONL).", ""]
    if card["regions"]:
        lines.append("Regions: " + ", ".join(r["name"] for r in card["regions"]))
    if card["image_folders"]:
        lines.append("Image folders: " + ", ".join(card["image_folders"]))
    lines += ["", "| split | samples | images | tasks |", "|---|---|---|---|"]
    for split, s in card["splits"].items():
        tasks = ", ".join(f"{k} {v}" for k, v in s["tasks"].items())
        lines.append(f"| {split} | {s['samples']} | {s['images']} | {tasks} |")
    lines += ["", "## Question types", ""]
    for split, s in card["splits"].items():
        lines.append(f"- {split}: " + ", ".join(f"{k} {v}" for k, v in s["types"].items()))
    lines += ["", "## Objects per class (OSM)", ""]
    lines += [f"- {k}: {v}" for k, v in card["objects_per_class"].items()]
    lines += ["", "## Answers (train, most frequent)", ""]
    for key, answers in card["splits"].get("train", {}).get("answers", {}).items():
        lines.append(f"- {key}: " + ", ".join(f"{a!r} {n}" for a, n in list(answers.items())[:12]))
    lines += ["", f"Semantic-database texts: {card['texts']}; chips skipped as empty: "
              f"{card['chips_skipped_empty']}; rotated/mirrored training chips and "
              f"classification images: {card.get('augmented_chips', 0)}.", ""]
    return "\n".join(lines)
