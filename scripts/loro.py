"""Leave-one-region-out cross-validation of the dense detector (and the chat-path baselines).

For every labelled region (the 4 OAM demo areas, SpaceNet Rio, SpaceNet Atlanta): train the
detector head on the other regions' augmented views, choose its threshold on the other
regions' tiles (the selection set), and score the held-out region's tiles: find-all precision /
recall / F1 at IoU 0.5, counts (exact, MAPE, within 20 %) and presence. Resumable: the frozen
features are cached per region, every fold writes its own result file and finished ones are
skipped. Run it in the background:

    nice -n 10 nohup python scripts/loro.py --out runs/loro > runs/loro.log 2>&1 &

`--table` renders the folds (and chat-path reports in `--baseline`, from
`rsvlm-train eval --task findall|vqa|grounding` per region) as markdown and JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsvlm.perception import DetectorConfig, load_detector, save_detector  # noqa: E402
from training.detection import (  # noqa: E402
    INPUT_SIZE,
    THRESHOLDS,
    FrozenTower,
    View,
    augment_view,
    cache_views,
    choose_threshold,
    predict,
    score_detections,
    score_large,
    train_heads,
)
from training.labelled import (  # noqa: E402
    CLASS_SETS,
    DETECTOR_CLASSES,
    NAMED_SETS,
    SETS,
    cut_tiles,
    known_classes,
    load_sets,
    set_class,
    tiles,
)

log = logging.getLogger("loro")


def eval_tile_size(gsd: float) -> int:
    """About 77 m at 0.15 m (the build-data chip of 512 px) and 225 m at 0.5 m."""
    return 512 if gsd < 0.3 else 450


CHUNK = 100  # training views per cache file: a larger --max-views adds files, keeps the old


def build_cache(root: Path, out: Path, names: list[str], views_per_tile: int,
                min_views: int, max_views: int, seed: int, input_size: int = INPUT_SIZE,
                zoom_gsd: float | None = None, zoom_crop: float = 0.6, gray: float = 0.0,
                hue: float = 0.0, coarse: float = 0.0, layers: list[int] | None = None) -> None:
    """Per region: its scoring tiles and augmented training views through the frozen tower,
    cached (`NAME.eval.pt`, `NAME.train*.pt`). Training views are added in files of `CHUNK`,
    each from its own seed, until the region has as many as asked: raising the counts tops a
    cache up instead of rebuilding it. With ``zoom_gsd``, views of regions that coarse are cut
    `zoom_crop` as large, as the chat path reads such imagery (`DetectorConfig.zoom_gsd`).
    ``layers``: the tower's levels a new cache holds (None: those the cache holds, or the
    detector's, `DetectorConfig.layers`); a run reads all of them or those its `--levels`
    names (`_load`)."""
    held = _cache_levels(out)
    if held is not None and layers and list(layers) != held:
        raise SystemExit(f"{out} caches the tower's levels {held}, not {list(layers)}: use "
                         "another --out")
    layers = held or list(layers or DetectorConfig().layers)  # one set of levels a cache
    tower = None
    for name in names:
        path = out / "cache" / f"{name}.pt"
        meta = torch.load(path, weights_only=False) if path.is_file() else {}
        if meta and meta.get("input_size", INPUT_SIZE) != input_size:
            raise SystemExit(f"{out} caches features at {meta.get('input_size', INPUT_SIZE)} px, "
                             f"not {input_size}: use another --out")
        items = None
        if "eval" not in meta or "gsd" not in meta:
            items = load_sets(root, [name]).get(name)
            if not items:
                continue
            size = items[0].tile or eval_tile_size(items[0].gsd)
            evals = [View(n, im, b) for it in items for n, im, b in tiles(it, size)]
            if "eval" not in meta:
                tower = tower or FrozenTower(size=input_size, layers=layers)
                cache_views(tower, evals, path.with_name(f"{name}.eval.pt"))
            meta = {**meta, "region": name, "eval": len(evals), "gsd": items[0].gsd,
                    "input_size": input_size, "layers": layers}
            torch.save(meta, path)
        zoom = zoom_crop if zoom_gsd is not None and meta["gsd"] >= zoom_gsd else 1.0
        if meta.get("train") and meta.get("view_zoom", 1.0) != zoom:
            raise SystemExit(f"{out} caches {name}'s views at zoom {meta.get('view_zoom', 1.0)}, "
                             f"not {zoom}: use another --out")
        meta["view_zoom"] = zoom
        # cut wider only imagery the chat path reads unzoomed: coarser would blur past use
        wide = coarse if meta["gsd"] < DetectorConfig().zoom_gsd else 0.0
        changes = {k: v for k, v in {"gray": gray, "hue": hue, "coarse": wide}.items() if v}
        if meta.get("train") and meta.get("view_changes", {}) != changes:
            raise SystemExit(f"{out} caches {name}'s views made with {meta.get('view_changes', {})}"
                             f", not {changes}: use another --out")
        meta["view_changes"] = changes
        wanted = min(max(views_per_tile * meta["eval"], min_views), max_views)
        have = sum(_chunk_sizes(out, name).values())
        t0, k = time.perf_counter(), len(_chunk_sizes(out, name))
        while have < wanted:
            items = items or load_sets(root, [name])[name]
            tower = tower or FrozenTower(size=input_size, layers=layers)
            rng = random.Random(f"{seed}:{name}" + (f":{k}" if k else ""))
            weights = [it.image.shape[0] * it.image.shape[1] for it in items]
            size = int((items[0].tile or eval_tile_size(items[0].gsd)) * zoom)
            n = min(CHUNK, wanted - have)
            views = [augment_view(rng.choices(items, weights)[0], rng, size, f"{name}_aug{k}_{i}",
                                  gray=gray, hue=hue, coarse=wide) for i in range(n)]
            cache_views(tower, views, out / "cache" / f"{name}.train{k or ''}.pt")
            have, k = have + n, k + 1
            meta["train"] = have
            torch.save(meta, path)
            log.info("cached %s: %d eval tiles, %d training views (%.0f s)", name, meta["eval"],
                     have, time.perf_counter() - t0)


def _chunk_sizes(out: Path, name: str) -> dict[Path, int]:
    """The region's cached training-view files and how many views each holds."""
    meta_path = out / "cache" / f"{name}.pt"
    meta = torch.load(meta_path, weights_only=False) if meta_path.is_file() else {}
    sizes = meta.get("chunks", {})
    files = sorted(out.glob(f"cache/{name}.train*.pt"),
                   key=lambda p: int(p.name.split(".")[1][5:] or 0))
    changed = False
    for f in files:
        if f.name not in sizes:
            sizes[f.name] = len(torch.load(f, weights_only=False)["names"])
            changed = True
    if changed:
        torch.save({**meta, "chunks": sizes}, meta_path)
    return {f: sizes[f.name] for f in files}


def _train_parts(out: Path, name: str, files: int | None = None) -> list[str]:
    """The region's first ``files`` training-view files (all when None): a cache topped up
    for one run still serves a run of fewer views."""
    return [f.name.split(".")[1] for f in _chunk_sizes(out, name)][:files]


def _ints(text: str | None) -> list[int] | None:
    return [int(v) for v in text.split(",")] if text else None


def read_levels(out: Path) -> list[int] | None:
    """The tower's levels ``out``'s folds read (`--levels`, kept in ``out/levels.json``); None:
    every level its cache holds."""
    path = out / "levels.json"
    return json.loads(path.read_text())["levels"] if path.is_file() else None


def keep_levels(out: Path, levels: list[int] | None) -> None:
    """Record ``levels`` as ``out``'s (`read_levels`); a run whose folds read others stops."""
    if levels is None:
        return
    recorded = read_levels(out)
    if recorded not in (None, levels):
        raise SystemExit(f"{out}'s folds read the levels {recorded}, not {levels}: use "
                         "another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "levels.json").write_text(json.dumps({"levels": levels}))


def cached_layers(out: Path, name: str) -> list[int]:
    return _meta_levels(out / "cache" / f"{name}.pt")


def _cache_levels(out: Path) -> list[int] | None:
    """The tower's levels ``out``'s cache holds (every region the same); None: no region yet."""
    metas = sorted(p for p in (out / "cache").glob("*.pt") if p.name.count(".") == 1)
    return _meta_levels(metas[0]) if metas else None


@functools.lru_cache(maxsize=64)  # `_load` asks for every part it reads; a cache's levels stay
def _meta_levels(path: Path) -> list[int]:
    meta = torch.load(path, weights_only=False)
    return list(meta.get("layers", DetectorConfig().layers))


def _load(out: Path, name: str, part: str) -> dict:
    # Memory-mapped: a fold concatenates gigabytes of features, read once into the result.
    data = torch.load(out / "cache" / f"{name}.{part}.pt", weights_only=False, mmap=True)
    levels = read_levels(out)
    if levels is None:
        return data
    cached = cached_layers(out, name)
    missing = sorted(set(levels) - set(cached))
    if missing:
        raise SystemExit(f"{out}'s cache of {name} holds the levels {cached}, not {missing}")
    if levels == cached:
        return data
    return {**data, "features": data["features"][:, [cached.index(v) for v in levels]]}


@functools.lru_cache(maxsize=1)  # `relabelled_stack` reads a region's parts one after another
def _region_items(name: str) -> list:
    return load_sets(DATA, [name])[name]


def cut_again(out: Path, name: str, part: str, min_visible: float = 0.5, seed: int = 0
              ) -> list[View]:
    """``name``'s cached views of ``part`` ("eval" or "trainK") with their pixels, cut again
    from the seeds `build_cache` cut them from (no tower pass); their boxes cut under
    ``min_visible``."""
    meta = torch.load(out / "cache" / f"{name}.pt", weights_only=False)
    items = _region_items(name)
    cached = _load(out, name, part)
    size = items[0].tile or eval_tile_size(items[0].gsd)
    if part == "eval":
        views = [View(n, im, b, c) for it in items
                 for n, im, b, c in cut_tiles(it, size, min_visible)]
    else:
        k = int(part[5:] or 0)
        rng = random.Random(f"{seed}:{name}" + (f":{k}" if k else ""))
        weights = [it.image.shape[0] * it.image.shape[1] for it in items]
        changes = meta.get("view_changes", {})
        size = int(size * meta.get("view_zoom", 1.0))
        views = [augment_view(rng.choices(items, weights)[0], rng, size, f"{name}_aug{k}_{i}",
                              gray=changes.get("gray", 0.0), hue=changes.get("hue", 0.0),
                              coarse=changes.get("coarse", 0.0), min_visible=min_visible)
                 for i in range(len(cached["names"]))]
    if [v.name for v in views] != list(cached["names"]) or [
            (int(v.image.shape[1]), int(v.image.shape[0])) for v in views] != [
            tuple(z) for z in cached["sizes"]]:
        raise SystemExit(f"{name}.{part}: the views cut again are not the cached ones "
                         f"(another --seed or data?)")
    return views


def relabelled(out: Path, name: str, part: str, min_visible: float, seed: int = 0) -> dict:
    """The boxes of ``name``'s cached views (``part``: "eval" or "trainK") as cut under
    ``min_visible`` instead of the cache's 0.5, with the boxes each view's edge cuts further
    (``ignore``, 0-1 of the view). The views are cut again from the same seeds as
    `build_cache` cut them (no tower pass), kept beside the cache."""
    path = out / "cache" / f"visible{min_visible:g}" / f"{name}.{part}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    views = cut_again(out, name, part, min_visible, seed)

    def norm(b: Any, v: View) -> torch.Tensor:
        wh = torch.tensor([v.image.shape[1], v.image.shape[0]] * 2, dtype=torch.float32)
        return torch.from_numpy(b.reshape(-1, 4).astype("float32")) / wh

    data = {"boxes": [norm(v.boxes, v) for v in views],
            "ignore": [norm(v.ignore, v) for v in views], "min_visible": min_visible}
    path.parent.mkdir(exist_ok=True)
    torch.save(data, path)
    return data


def scene_accuracy(preds: list, truths: list, sizes: list, gsd: float, threshold: float
                   ) -> dict[str, Any]:
    """Rural/urban as the chat path answers it (`rsvlm.perception.scene_of_detections` on the
    detections at the count threshold) against the same rule on the labelled boxes."""
    from rsvlm.detector import Detection
    from rsvlm.perception import scene_of_detections

    hits, urban = [], 0
    for pred, truth, (w, h) in zip(preds, truths, sizes, strict=True):
        ground = w * h * gsd * gsd
        said = scene_of_detections([Detection("building", d[4], tuple(d[:4])) for d in pred
                                    if d[4] >= threshold], ground_m2=ground)
        true = scene_of_detections([Detection("building", 1.0, tuple(b)) for b in
                                    truth.tolist()], ground_m2=ground)
        hits.append(said == true)
        urban += true == "urban"
    return {"accuracy": sum(hits) / len(hits) if hits else None, "urban_tiles": urban,
            "tiles": len(hits)}


FOLD_FORMAT = 2  # 2: FCOS-style boxes (rsvlm.detector.box_edges)


def fold_classes(names: list[str]) -> list[str]:
    """The detector's classes for a run over these sets: buildings alone, unless sets of
    other classes (`training.labelled.CLASS_SETS`) are among them."""
    present = {set_class(n) for n in names}
    return [c for c in DETECTOR_CLASSES if c in present or c == "building"]


def training_stack(out: Path, names: list[str], train_files: int | None, classes: list[str]
                   ) -> tuple[torch.Tensor, list, list[int], torch.Tensor]:
    """Every cached training view and scoring tile of ``names``: features, boxes, each view's
    class (index into ``classes``) and the heatmaps it trains (`training.labelled.known_classes`)."""
    feats, boxes, view_classes, known = [], [], [], []
    for n in names:
        own = classes.index(set_class(n))
        row = [c in known_classes(n) for c in classes]
        for part in _stack_parts(out, n, train_files):
            d = _load(out, n, part)
            feats.append(d["features"])
            boxes += d["boxes"]
            view_classes += [own] * len(d["boxes"])
            known += [row] * len(d["boxes"])
    return torch.cat(feats), boxes, view_classes, torch.tensor(known, dtype=torch.bool)


def _stack_parts(out: Path, name: str, train_files: int | None) -> list[str]:
    return [*_train_parts(out, name, train_files), "eval"]


def relabelled_stack(out: Path, names: list[str], train_files: int | None, min_visible: float,
                     seed: int = 0) -> tuple[list, list]:
    """`training_stack`'s boxes as cut under ``min_visible``, and what each view ignores
    (`relabelled`), in the same order."""
    boxes, ignore = [], []
    for n in names:
        for part in _stack_parts(out, n, train_files):
            cut = relabelled(out, n, part, min_visible, seed)
            boxes += cut["boxes"]
            ignore += cut["ignore"]
    return boxes, ignore


def class_training(classes: list[str], view_classes: list[int], known: torch.Tensor,
                   object_negatives: bool = False) -> dict[str, Any]:
    """`train_heads`' arguments for a detector of ``classes`` (none for buildings alone)."""
    if len(classes) == 1:
        return {}
    return {"classes": len(classes), "view_classes": view_classes, "known": known,
            "object_negatives": object_negatives}


def building_sets(names: list[str]) -> list[str]:
    return [n for n in names if set_class(n) == "building"]


def run_fold(out: Path, fold: str, names: list[str], epochs: int, seed: int, dim: int = 64,
             reduce: int | None = 128, convs: int = 2, train_files: int | None = None,
             heads: int = 1, input_dropout: float = 0.0,
             object_negatives: bool = False, iou_target: bool = False,
             ignore_below: float = 0.0, min_visible: float | None = None,
             upsample: int = 1, centre_radius: int = 0, dilation: int = 1,
             lr: float = 2e-3, weight_decay: float = 0.05,
             batch_size: int = 16, balance_levels: bool = False) -> dict | None:
    """One fold: a head trained without the sets of ``fold`` ("kampala_ug", or a group
    "kampala_ug+trees_osbs+aircraft_b": one training holds out a building region and sets of
    other classes at once), scored on each of them (a building region: `folds/NAME.json`, its
    report; a set of another class: `class_folds/NAME.json`, `class_scores`). With
    ``min_visible``, the training views' boxes are cut under that rule and the objects cut
    further are ignored (`relabelled`)."""
    group = fold.split("+")
    held_buildings = building_sets(group)
    if len(held_buildings) > 1:
        raise SystemExit(f"fold {fold}: one building region a fold")
    held = held_buildings[0] if held_buildings else None
    path = out / "folds" / f"{held}.json" if held else None
    class_paths = {n: out / "class_folds" / f"{n}.json" for n in group if n not in
                   held_buildings}
    others = [n for n in names if n not in group]
    if all(p.is_file() for p in class_paths.values()) and path is not None and path.is_file():
        report = json.loads(path.read_text())
        if report.get("format") == FOLD_FORMAT:
            return report
        # A fold of an earlier detector (another box encoding): its head cannot be rescored.
        log.info("fold %s: written by an earlier version, trained again", held)
    elif path is None and class_paths and all(p.is_file() for p in class_paths.values()):
        return None
    classes = fold_classes(names)
    x, boxes, view_classes, known = training_stack(out, others, train_files, classes)
    ignore = None
    if min_visible is not None:
        boxes, ignore = relabelled_stack(out, others, train_files, min_visible, seed)
    t0 = time.perf_counter()
    extra = class_training(classes, view_classes, known, object_negatives)
    head = train_heads(x, boxes, heads=heads, seed=seed, members=out / "members" / fold,
                       hidden=x.shape[-1], levels=x.shape[1], epochs=epochs, dim=dim,
                       reduce=reduce, convs=convs, input_dropout=input_dropout,
                       iou_target=iou_target, ignore_below=ignore_below, ignore=ignore,
                       upsample=upsample, centre_radius=centre_radius, dilation=dilation,
                       lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                       balance_levels=balance_levels, **extra)
    train_s = time.perf_counter() - t0
    settings = {"format": FOLD_FORMAT, "fold": fold, "trained_on": others,
                "train_views": len(x), "epochs": epochs, "dim": dim, "convs": convs,
                "reduce": reduce, "heads": heads, "train_files": train_files,
                "input_dropout": input_dropout, "train_s": round(train_s, 1), "seed": seed,
                "classes": classes, "object_negatives": object_negatives,
                "iou_target": iou_target, "ignore_below": ignore_below,
                "min_visible": min_visible, "upsample": upsample,
                "centre_radius": centre_radius, "dilation": dilation, "lr": lr,
                "weight_decay": weight_decay, "batch_size": batch_size,
                "balance_levels": balance_levels}
    # The tower's levels the head read: the detector that loads it must run the same.
    settings["levels"] = read_levels(out) or cached_layers(out, others[0])
    config = {"labels": classes, "hidden": x.shape[-1], "dim": dim, "convs": convs,
              "heads": heads, "upsample": upsample, "dilation": dilation,
              "layers": settings["levels"]}
    if class_paths:  # the fold's head, for the card's examples (scripts/loro_examples.py)
        save_detector(head, DetectorConfig(**config, notes={"held_out": group}),
                      out / "class_folds" / fold)
    for name, cpath in class_paths.items():
        cpath.parent.mkdir(parents=True, exist_ok=True)
        cpath.write_text(json.dumps({**settings, "held_out": name,
                                     **class_scores(out, name, head, classes)}, indent=2))
        log.info("fold %s: %s scored (%.0f s)", fold, name, train_s)
    if held is None:
        return None
    # Threshold: best F1 on the other regions' tiles (selection), never on the held-out one.
    sel_p, sel_t, sel_s = [], [], []
    for n in building_sets(others):
        d = _load(out, n, "eval")
        sel_p += predict(head, d["features"], 0.1)
        sel_t += d["boxes"]
        sel_s += d["sizes"]
    threshold = choose_threshold(sel_p, sel_t, sel_s)
    count_threshold = choose_threshold(sel_p, sel_t, sel_s, THRESHOLDS, metric="count")
    report = {**settings, "held_out": held,
              "selection": score_detections(sel_p, sel_t, sel_s, threshold),
              **score_fold(out, held, head, threshold, count_threshold)}
    path.parent.mkdir(parents=True, exist_ok=True)
    # The fold's head, for whole-scene scans of its held-out region (scripts/bench_scene.py).
    meta = torch.load(out / "cache" / f"{held}.pt", weights_only=False)
    save_detector(head, DetectorConfig(**config,
                                       input_size=meta.get("input_size", INPUT_SIZE),
                                       threshold=threshold,
                                       count_threshold=count_threshold,
                                       notes={"held_out": held, "trained_on": others}),
                  out / "folds" / held)
    path.write_text(json.dumps(report, indent=2))
    log.info("fold %s: F1 %.3f P %.3f R %.3f presence %.3f count within 20%% %.3f (%.0f s)",
             held, report["f1"], report["precision"], report["recall"], report["presence"],
             report["counting"]["within_20pct"], train_s)
    return report


def class_scores(out: Path, name: str, head: Any, classes: list[str]) -> dict:
    """A held-out set of another class, scored on its class's heatmap at every threshold of
    the grid (the threshold is chosen on the other held-out sets of that class,
    `class_table`): find-all and counts per threshold, and the tiles' true counts."""
    test = _load(out, name, "eval")
    preds = predict(head, test["features"], 0.1, cls=classes.index(set_class(name)))
    curves = {str(t): r for t, r in threshold_scores(test, preds).items()}
    return {"class": set_class(name), "tiles": len(preds),
            "objects": sum(len(b) for b in test["boxes"]), "curves": curves}


def threshold_scores(test: dict, preds: list) -> dict[float, dict]:
    """Per threshold of the grid: `score_detections` of the tiles and their mean absolute log
    count ratio, |log((said + 1) / (true + 1))| ("count_log_error")."""
    scores = {}
    for t in THRESHOLDS:
        r = score_detections(preds, test["boxes"], test["sizes"], t)
        said = [sum(d[4] >= t for d in p) for p in preds]
        error = [abs(math.log((n + 1) / (len(b) + 1))) for n, b in
                 zip(said, test["boxes"], strict=True)]
        scores[t] = {**r, "count_log_error": sum(error) / max(len(error), 1)}
    return scores


def class_thresholds(reports: list[dict]) -> tuple[float, float]:
    """Box threshold (best mean F1) and counting threshold (most counts within 20 %, then the
    closest counts; as `pooled_thresholds`) over these held-out sets' curves, each set once."""
    def mean(t: float, key: Any) -> float:
        return sum(key(r["curves"][str(t)]) for r in reports) / len(reports)

    return (max(THRESHOLDS[1:], key=lambda t: mean(t, lambda c: c["f1"])),
            max(THRESHOLDS, key=lambda t: (
                round(mean(t, lambda c: c["counting"]["within_20pct"] or 0.0), 6),
                -mean(t, lambda c: c["count_log_error"]))))


def held_out_thresholds(report: dict, reports: list[dict]) -> tuple[float, float]:
    """The thresholds a held-out set of another class is scored at: those the other held-out
    sets of its class favour (its own when it is the only one)."""
    rest = [o for o in reports if o["class"] == report["class"]
            and o["held_out"] != report["held_out"]]
    return class_thresholds(rest or [report])


def class_f1(out: Path) -> dict[str, float]:
    """Per class of the held-out sets of other classes: their mean find-all F1, each at the
    thresholds the other held-out sets of its class favour."""
    reports = [json.loads(p.read_text()) for p in sorted((out / "class_folds").glob("*.json"))]
    scores: dict[str, list[float]] = {}
    for r in reports:
        t, _ = held_out_thresholds(r, reports)
        scores.setdefault(r["class"], []).append(r["curves"][str(t)]["f1"])
    return {c: sum(v) / len(v) for c, v in scores.items()}


def class_table(out: Path) -> tuple[str, dict[str, tuple[float, float]]]:
    """The held-out sets of other classes, each scored at the thresholds the other held-out
    sets of its class favour (out of sample; a class held out once is scored at its own best,
    and the row says so), and the thresholds all of a class's sets favour together (shipped)."""
    reports = [json.loads(p.read_text()) for p in sorted((out / "class_folds").glob("*.json"))]
    lines = ["| held-out set | class | tiles | objects | F1 | P | R | counts within 20 % | "
             "presence | thresholds (from) |", "|---|---|---|---|---|---|---|---|---|---|"]
    shipped = {}
    for cls in sorted({r["class"] for r in reports}):
        mine = [r for r in reports if r["class"] == cls]
        shipped[cls] = class_thresholds(mine)
        for r in mine:
            rest = [o for o in mine if o is not r]
            t, ct = held_out_thresholds(r, reports)
            box, cnt = r["curves"][str(t)], r["curves"][str(ct)]
            src = ", ".join(o["held_out"] for o in rest) if rest else "itself: not out of sample"
            lines.append(f"| {r['held_out']} | {cls} | {r['tiles']} | {r['objects']} | "
                         f"{box['f1']:.3f} | {box['precision']:.3f} | {box['recall']:.3f} | "
                         f"{cnt['counting']['within_20pct']:.3f} | {cnt['presence']:.3f} | "
                         f"{t} / {ct} ({src}) |")
    return "\n".join(lines), shipped


# Box refiners of the folds (`scripts/loro_refine.py`'s REGION.pt, each trained without its
# region; several folders: one refiner of each, their outputs averaged) and the data their
# tiles are read from: set by --refiners; None reads boxes as the detector places them.
REFINERS: list[Path] | None = None
DATA = Path("/work/shared/data")


def held_out_tiles(root: Path, region: str) -> tuple[list[str], list]:
    """The region's scoring tiles (names, RGB arrays), as `build_cache` cut them."""
    items = load_sets(root, [region])[region]
    size = items[0].tile or eval_tile_size(items[0].gsd)
    got = [(n, im) for it in items for n, im, _ in tiles(it, size)]
    return [n for n, _ in got], [im for _, im in got]


@functools.lru_cache(maxsize=2)
def held_out_images(out: Path, held: str) -> list:
    """The cached scoring tiles' pixels (read once, however often a fold is scored)."""
    names, images = held_out_tiles(DATA, held)
    if list(_load(out, held, "eval")["names"]) != names:
        raise SystemExit(f"{held}: the cached scoring tiles are not these tiles")
    return images


def fold_refiner(held: str) -> Any:
    """The held-out region's refiner from `REFINERS` (None: none, or no --refiners)."""
    from rsvlm.refine import RefinerEnsemble
    from training.refine import load_checkpoint

    paths = [d / f"{held}.pt" for d in REFINERS or []]
    if not paths or not all(p.is_file() for p in paths):
        return None
    members = [load_checkpoint(p) for p in paths]
    return members[0] if len(members) == 1 else RefinerEnsemble(members).eval()


def _held_out_predictions(out: Path, held: str, head: Any = None) -> list:
    head = head if head is not None else _fold_head(out, held)[0]
    preds = predict(head, _load(out, held, "eval")["features"], 0.1)
    refiner = fold_refiner(held)
    if refiner is None:
        return preds
    from training.refine import refined_predictions

    return refined_predictions(refiner, held_out_images(out, held), preds)


def score_fold(out: Path, held: str, head: Any, threshold: float, count_threshold: float,
               preds: list | None = None, presence_threshold: float | None = None,
               count_factor: float = 1.0) -> dict:
    """The held-out region's scores: find-all at ``threshold``; counts and rural/urban at
    ``count_threshold``, counts times ``count_factor``; presence at ``presence_threshold``
    (None: the counting one), as the chat path answers it (`DetectorConfig.cut`, `count_of`)."""
    test = _load(out, held, "eval")
    meta = torch.load(out / "cache" / f"{held}.pt", weights_only=False)
    preds = preds if preds is not None else _held_out_predictions(out, held, head)
    counted = score_detections(preds, test["boxes"], test["sizes"], count_threshold,
                               count_factor)
    large = None
    if "gsd" in meta:
        min_px = LARGE_M2 / meta["gsd"] ** 2
        large = {**score_large(preds, test["boxes"], test["sizes"], threshold, min_px),
                 "counting": score_large(preds, test["boxes"], test["sizes"], count_threshold,
                                         min_px)["counting"], "min_m2": LARGE_M2}
    chips = relabelled(out, held, "eval", CHIP_VISIBLE)["boxes"] if DATA.is_dir() else None
    return {**score_detections(preds, test["boxes"], test["sizes"], threshold),
            "large": large,
            # the chat evaluation's truths (`training.region.chip_objects`): 30 % inside
            "chip_rule": ({**score_detections(preds, chips, test["sizes"], threshold),
                           "counting": score_detections(preds, chips, test["sizes"],
                                                        count_threshold,
                                                        count_factor)["counting"]}
                          if chips is not None else None),
            "threshold": threshold, "count_threshold": count_threshold,
            "count_factor": count_factor, "presence_threshold": presence_threshold,
            "counting_at_count_threshold": {**counted["counting"], "presence": (
                counted if presence_threshold is None else score_detections(
                    preds, test["boxes"], test["sizes"], presence_threshold))["presence"]},
            "rural_urban": (scene_accuracy(preds, test["boxes"], test["sizes"], meta["gsd"],
                                           count_threshold) if "gsd" in meta else None),
            "per_tile": [{"tile": n, "true": len(b), "predicted": sum(d[4] >= threshold
                                                                     for d in p)}
                         for n, b, p in zip(test["names"], test["boxes"], preds, strict=True)]}


CHIP_VISIBLE = 0.3  # build-data's chips hold an object at least this share inside
LARGE_M2 = 50.0  # the new region: "large, clearly visible buildings"


def large_table(out: Path) -> str:
    """The folds scored over buildings of at least `LARGE_M2` (`score_large`): what the
    held-out regions say of an area of large, clearly visible buildings."""
    from training.labelled import DEMO_AREAS

    rows = [r for r in (json.loads(p.read_text()) for p in sorted((out / "folds").glob("*.json")))
            if r.get("large")]
    if not rows:
        return ""
    lines = [f"| held-out region | buildings of {LARGE_M2:g} m² or more | detector F1 | P | R | "
             "count within 20 % |", "|---|---|---|---|---|---|"]
    for r in rows:
        g = r["large"]
        lines.append(f"| {r['held_out']} | {g['true']} | {_fmt(g['f1'])} | "
                     f"{_fmt(g['precision'])} | {_fmt(g['recall'])} | "
                     f"{_fmt(g['counting']['within_20pct'])} |")
    oam = [r["large"] for r in rows if r["held_out"] in DEMO_AREAS]
    if oam:
        def mean(get: Any) -> float:
            return sum(map(get, oam)) / len(oam)

        lines.append(f"| mean of the {len(oam)} OAM areas | | {mean(lambda g: g['f1']):.3f} | "
                     f"{mean(lambda g: g['precision']):.3f} | "
                     f"{mean(lambda g: g['recall']):.3f} | "
                     f"{mean(lambda g: g['counting']['within_20pct']):.3f} |")
    return "\n".join(lines) + "\n"


def _curves(out: Path, held: str, preds: list) -> dict[float, tuple[float, ...]]:
    """Per threshold of the grid: the held-out region's find-all F1, its tiles' mean absolute
    log count ratio, |log((said + 1) / (true + 1))|, its share of counts within 20 % and its
    share of right answers to "is there one?"."""
    return {t: (r["f1"], r["count_log_error"], r["counting"]["within_20pct"] or 0.0,
                r["presence"] or 0.0)
            for t, r in threshold_scores(_load(out, held, "eval"), preds).items()}


def pooled_presence(curves: dict[str, dict[float, tuple[float, ...]]],
                    counting: float | None = None) -> float:
    """The presence threshold with the most right answers on the given folds' held-out regions
    (the mean of each region's share). A region whose tiles all hold buildings says nothing
    here but "not too high"; the ones with empty tiles choose. A tie keeps ``counting`` (the
    counting threshold) when it is among the best, as where no region has empty tiles; else
    the lowest."""
    def mean(t: float) -> float:
        return round(sum(c[t][3] for c in curves.values()) / len(curves), 6)

    best = max(mean(t) for t in THRESHOLDS)
    if counting is not None and counting in THRESHOLDS and mean(counting) == best:
        return counting
    return next(t for t in THRESHOLDS if mean(t) == best)


def pooled_thresholds(curves: dict[str, dict[float, tuple[float, ...]]]
                      ) -> tuple[float, float]:
    """The find-all threshold with the best mean F1 over the given folds' held-out regions
    (each region counting once), and the counting threshold with the most counts within 20 %
    there (the bar's measure; the mean of each region's share), the closest counts (mean log
    ratio) breaking ties: chosen where every score is out of sample."""
    def mean(t: float, k: int) -> float:
        return sum(c[t][k] for c in curves.values()) / len(curves)

    return (max(THRESHOLDS[1:], key=lambda t: mean(t, 0)),
            max(THRESHOLDS, key=lambda t: (round(mean(t, 2), 6), -mean(t, 1))))


COUNT_FACTORS = tuple(round(0.8 + 0.05 * i, 2) for i in range(15))  # 0.8 .. 1.5


def count_reads(out: Path, held: str, preds: list) -> list[tuple[list[list[float]], list[int]]]:
    """What a region's counting is chosen on: per image, its detections' scores and its true
    count, on its scoring tiles (``preds``, the fold's) and on its augmented training views,
    which its fold never trained on either (as many files as the fold took)."""
    head, _ = _fold_head(out, held)
    report = json.loads((out / "folds" / f"{held}.json").read_text())
    tiles = ([[d[4] for d in p] for p in preds], [len(b) for b in _load(out, held, "eval")["boxes"]])
    scores, truth = [], []
    with torch.inference_mode():
        for part in _train_parts(out, held, report.get("train_files")):
            d = _load(out, held, part)
            scores += [[x[4] for x in p] for p in predict(head, d["features"], THRESHOLDS[0])]
            truth += [len(b) for b in d["boxes"]]
    return [tiles, (scores, truth)]


def pooled_count(reads: dict[str, list[tuple[list[list[float]], list[int]]]]
                 ) -> tuple[float, float]:
    """The counting threshold and factor (`DetectorConfig.count_factor`) chosen together: the
    most counts within 20 % over the given regions' reads (the mean of each region's and
    read's share), then the factor nearest 1, then the lower threshold."""
    from rsvlm.perception import scaled_count

    cells = []  # per read: the true counts and, per threshold, the detections counted
    for region in reads.values():
        for scores, truth in region:
            cells.append((truth, {t: [sum(v >= t for v in s) for s in scores]
                                  for t in THRESHOLDS}))

    def mean(t: float, k: float) -> float:
        shares = [sum(abs(scaled_count(n, k) - m) <= 0.2 * m
                      for n, m in zip(found[t], truth, strict=True)) / len(truth)
                  if truth else 0.0 for truth, found in cells]
        return round(sum(shares) / len(shares), 6)

    return max(((t, k) for t in THRESHOLDS for k in COUNT_FACTORS),
               key=lambda tk: (mean(*tk), -abs(tk[1] - 1.0), -tk[0]))


def cross_thresholds(out: Path) -> dict[str, dict[float, tuple[float, float]]]:
    """Thresholds chosen out of sample. A fold's own selection scores the regions its head
    trained on, where its scores run high; here each fold is scored again at the thresholds
    the other folds' held-out regions agree on (`pooled_thresholds`), and its detector takes
    them. The regions pooled are those the chat path reads whole, as these tiles are read
    (finer than `DetectorConfig.zoom_gsd`). Returns those folds' curves (for the shipped
    detector's thresholds)."""
    paths = sorted((out / "folds").glob("*.json"))
    reports = {p.stem: json.loads(p.read_text()) for p in paths}
    preds = {held: _held_out_predictions(out, held) for held in reports}
    curves = {held: _curves(out, held, preds[held]) for held in reports}
    zoom = DetectorConfig().zoom_gsd
    whole = {held for held in reports if zoom is None or torch.load(
        out / "cache" / f"{held}.pt", weights_only=False).get("gsd", 0.0) < zoom}
    curves = {k: v for k, v in curves.items() if k in whole} or curves
    reads = {held: count_reads(out, held, preds[held]) for held in curves}
    if reads:  # what the shipped detector counts by (`scripts/ship_detector.py`)
        (out / "counting.json").write_text(json.dumps(dict(zip(
            ("count_threshold", "count_factor"), pooled_count(reads), strict=True))) + "\n")
    for held, report in reports.items():
        others = {k: v for k, v in curves.items() if k != held}
        if not others:
            continue
        threshold, _ = pooled_thresholds(others)
        count_threshold, count_factor = pooled_count(
            {k: v for k, v in reads.items() if k != held})
        presence_threshold = pooled_presence(others, count_threshold)
        report.setdefault("selection_thresholds", [report["threshold"],
                                                   report.get("count_threshold")])
        report.update(score_fold(out, held, None, threshold, count_threshold, preds[held],
                                 presence_threshold, count_factor))
        report["thresholds_from"] = "the other folds' held-out regions"
        refiner = fold_refiner(held)
        report["refined_by"] = ([str(d / f"{held}.pt") for d in REFINERS or []]
                                if refiner is not None else None)
        (out / "folds" / f"{held}.json").write_text(json.dumps(report, indent=2))
        folder = out / "folds" / held / "detector" / "detector.json"
        config = json.loads(folder.read_text())
        config.pop("refiner", None)
        if refiner is not None:  # the fold's detector reads as it was scored (loro_refer.sh)
            from rsvlm.refine import save_refiner
            from training.refine import MOVES

            config["refiner"] = {"steps": 1, "rescore": 0.0, "labels": MOVES,
                                 **save_refiner(refiner, folder.parent)}
        folder.write_text(json.dumps({**config, "threshold": threshold,
                                      "count_threshold": count_threshold,
                                      "count_factor": count_factor,
                                      "presence_threshold": presence_threshold},
                                     indent=2) + "\n")
    return curves


def _scene_cell(r: dict) -> str:
    ru = r.get("rural_urban")
    return f"{_fmt(ru['accuracy'])} ({ru['urban_tiles']}/{ru['tiles']})" if ru else "–"


def _scene_mean(rows: list[dict]) -> str:
    acc = [r["rural_urban"]["accuracy"] for r in rows if r.get("rural_urban")]
    return f"{sum(acc) / len(acc):.3f}" if acc else ""


def placement(out: Path) -> str:
    """Each fold's find-all F1 at IoU 0.1, 0.3 and 0.5 (its head, its threshold): how much of
    what is missed at 0.5 is placement rather than detection; then the recall at the lowest
    threshold (0.1), and the share of buildings that the best box of any patch (whatever its
    score) reaches IoU 0.5 with: the head's ceiling."""
    from rsvlm.detector import box_edges
    from training.metrics import box_iou, detection_scores, match_boxes

    lines = ["| held-out region | F1 @ IoU 0.1 | @ 0.3 | @ 0.5 | recall @ threshold 0.1 | "
             "best box of any patch >= IoU 0.5 |", "|---|---|---|---|---|---|"]
    for fold in sorted((out / "folds").glob("*.json")):
        held = fold.stem
        head, config = _fold_head(out, held)
        test = _load(out, held, "eval")
        preds = predict(head, test["features"], config.threshold)
        x = test["features"].float()
        with torch.inference_mode():
            edges = box_edges(head([x[:, j] for j in range(x.shape[1])])[1])
        reached = total = 0
        for i, (truth, (w, h)) in enumerate(zip(test["boxes"], test["sizes"], strict=True)):
            scale = torch.tensor([w, h, w, h]) / edges.shape[-1]
            every = (edges[i].reshape(4, -1).T * scale).tolist()
            for b in truth.tolist():
                t = [v * s for v, s in zip(b, [w, h, w, h], strict=True)]
                reached += max(box_iou(p, t) for p in every) >= 0.5
                total += 1
        low = score_detections(predict(head, test["features"], 0.1), test["boxes"],
                               test["sizes"], 0.1)
        cells = []
        for iou in (0.1, 0.3, 0.5):
            tp = n_pred = n_true = 0
            for pred, truth, (w, h) in zip(preds, test["boxes"], test["sizes"], strict=True):
                scale = [w, h, w, h]
                p = [[v * s for v, s in zip(d[:4], scale, strict=True)] for d in pred]
                t = [[v * s for v, s in zip(b, scale, strict=True)] for b in truth.tolist()]
                tp, n_pred, n_true = tp + match_boxes(p, t, iou), n_pred + len(p), n_true + len(t)
            cells.append(_fmt(detection_scores(tp, n_pred, n_true)["f1"]))
        cells += [_fmt(low["recall"]), _fmt(reached / total if total else None)]
        lines.append(f"| {held} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fold_head(out: Path, held: str) -> tuple[Any, DetectorConfig]:
    found = load_detector(out / "folds" / held)
    if found is None:
        raise SystemExit(f"{out}/folds/{held} holds no detector")
    return found


def _fmt(v: object) -> str:
    return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def table(out: Path, baseline: Path | None) -> str:
    rows = [json.loads(p.read_text()) for p in sorted((out / "folds").glob("*.json"))]
    lines = ["| held-out region | tiles | objects | detector F1 | P | R | presence | "
             "count exact | count within 20 % | count MAPE | rural/urban (urban tiles) | "
             "thresholds: boxes / counts / presence |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        # Presence and counts at their own threshold when the fold chose one.
        c = r.get("counting_at_count_threshold") or r["counting"]
        presence = c.get("presence", r["presence"])
        lines.append(f"| {r['held_out']} | {r['n']} | {r['true']} | {_fmt(r['f1'])} | "
                     f"{_fmt(r['precision'])} | {_fmt(r['recall'])} | {_fmt(presence)} | "
                     f"{_fmt(c['exact'])} | {_fmt(c['within_20pct'])} | {_fmt(c['mape'])} | "
                     f"{_scene_cell(r)} | {r['threshold']}"
                     + (f" / {r['count_threshold']}" if "count_threshold" in r else "")
                     + (f" / {r['presence_threshold']}" if r.get("presence_threshold") else "")
                     + " |")
    if rows:
        def mean(get: Any) -> float:
            return sum(get(r) for r in rows) / len(rows)

        def cnt(r: dict) -> dict:
            return r.get("counting_at_count_threshold") or r["counting"]

        lines.append(f"| mean of {len(rows)} folds | | | {mean(lambda r: r['f1']):.3f} | "
                     f"{mean(lambda r: r['precision']):.3f} | {mean(lambda r: r['recall']):.3f} | "
                     f"{mean(lambda r: cnt(r).get('presence', r['presence'])):.3f} | "
                     f"{mean(lambda r: cnt(r)['exact']):.3f} | "
                     f"{mean(lambda r: cnt(r)['within_20pct']):.3f} | | {_scene_mean(rows)} | |")
    text = "\n".join(lines) + "\n"
    if baseline is not None and baseline.is_dir():
        text += "\n" + baseline_table(baseline)
    summary = {"folds": rows}
    (out / "loro.json").write_text(json.dumps(summary, indent=2))
    (out / "loro.md").write_text(text)
    return text


def baseline_table(folder: Path) -> str:
    """The chat path's reports per region (`rsvlm-train eval` JSONs named REGION.TASK.json)."""
    regions = sorted({p.name.split(".")[0] for p in folder.glob("*.json")})
    lines = ["| region | find-all F1 (P / R) | find-all count within 20 % | presence | "
             "counting exact | counting within 20 % | rural/urban | area | grounding acc@0.5 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for reg in regions:
        def read(task: str, reg: str = reg) -> dict:
            p = folder / f"{reg}.{task}.json"
            return json.loads(p.read_text()) if p.is_file() else {}
        fa, vqa, gr = read("findall"), read("vqa"), read("grounding")
        pt = vqa.get("per_type", {})
        fa_cell = (f"{_fmt(fa.get('f1'))} ({_fmt(fa.get('precision'))} / "
                   f"{_fmt(fa.get('recall'))})" if fa else "–")
        lines.append(
            f"| {reg} | {fa_cell} | {_fmt(fa.get('counting', {}).get('within_20pct'))} | "
            f"{_fmt(pt.get('presence'))} | {_fmt(vqa.get('counting', {}).get('exact'))} | "
            f"{_fmt(vqa.get('counting', {}).get('within_20pct'))} | "
            f"{_fmt(pt.get('rural_urban'))} | {_fmt(pt.get('area'))} | "
            f"{_fmt(gr.get('acc@0.5'))} |")
    return "\n".join(lines) + "\n"


OAM_MEAN = "mean of the OpenAerialMap areas"


def fold_chat_reports(folder: Path) -> dict[str, tuple[dict, dict]]:
    """(VQA report, find-all report) per held-out region of `scripts/loro_refer.sh`'s folder
    (`REGION.vqa.json`, `REGION.findall.json`: the chat path with each fold's detector, as
    `rsvlm-train eval` asks), and under `OAM_MEAN` their means over the aerial areas."""
    from training.labelled import DEMO_AREAS

    reports = {}
    for reg in sorted({p.name.split(".")[0] for p in folder.glob("*.vqa.json")}):
        fa_path = folder / f"{reg}.findall.json"
        reports[reg] = (json.loads((folder / f"{reg}.vqa.json").read_text()),
                        json.loads(fa_path.read_text()) if fa_path.is_file() else {})
    aerial = [r for reg, r in reports.items() if reg in DEMO_AREAS]
    if len(aerial) > 1:  # each area once, however many questions its chips gave

        def mean(get: Any) -> float | None:
            got = [v for v in map(get, aerial) if v is not None]
            return sum(got) / len(got) if len(got) == len(aerial) else None

        reports[OAM_MEAN] = (
            {"n": sum(v["n"] for v, _ in aerial),
             "per_type": {k: mean(lambda r, k=k: r[0].get("per_type", {}).get(k))
                          for k in ("presence", "rural_urban", "area")},
             "counting": {k: mean(lambda r, k=k: r[0].get("counting", {}).get(k))
                          for k in ("within_20pct", "exact", "mape")}},
            {k: mean(lambda r, k=k: r[1].get(k)) for k in ("f1", "precision", "recall")})
    return reports


def _tower_words(folder: Path) -> str:
    """How the reports in ``folder`` read the detector's tower (`rsvlm-train eval`'s
    ``engine``), as words for the card; empty where they do not say."""
    from rsvlm.engine import DETECTOR_TOWER

    towers = {json.loads(p.read_text()).get("engine", {}).get("detector_tower")
              for p in folder.glob("*.json")}
    words = {"onnx-int8": "in int8 through ONNX Runtime", "onnx": "in float32 through ONNX "
             "Runtime", "torch": "by PyTorch"}
    if len(towers) != 1 or None in towers:
        return ""
    tower = towers.pop()
    default = ", as the engine reads it by default" if tower == DETECTOR_TOWER else ""
    return (f" (the detector's tower read {words.get(tower, tower)}{default}; a chip whose "
            "read size has no prepared graph is read by PyTorch)")


def fold_chat_table(folder: Path) -> str:
    """`fold_chat_reports` as the card's table: the questions the bar names, each phrasing of
    the VQA generator, answered and scored as an analyst's would be."""
    lines = ["| held-out region | VQA questions | presence | counting within 20 % (exact; MAPE) "
             "| rural/urban | area | find-all F1 on the chips (P / R) |",
             "|---|---|---|---|---|---|---|"]
    for reg, (vqa, fa) in fold_chat_reports(folder).items():
        fa = fa if fa and fa.get("f1") is not None else {}
        pt, c = vqa.get("per_type", {}), vqa.get("counting", {})
        fa_cell = (f"{_fmt(fa.get('f1'))} ({_fmt(fa.get('precision'))} / "
                   f"{_fmt(fa.get('recall'))})" if fa else "–")
        lines.append(f"| {reg} | {vqa['n']} | {_fmt(pt.get('presence'))} | "
                     f"{_fmt(c.get('within_20pct'))} ({_fmt(c.get('exact'))}; "
                     f"{_fmt(c.get('mape'))}) | {_fmt(pt.get('rural_urban'))} | "
                     f"{_fmt(pt.get('area'))} | {fa_cell} |")
    return "\n".join(lines) + "\n"


CARD_START, CARD_END = "<!-- loro:start -->", "<!-- loro:end -->"


CHAT_TABLE_HEAD = "| region | find-all F1 (P / R) |"


def refer_table(folder: Path, chat: str = "") -> str:
    """Referring grounding through the chat path with each fold's detector (`REGION.grounding
    .json` from `rsvlm-train eval --task grounding --model PARTS`, PARTS = the shipped parts
    with the fold's detector), beside the language model's from the chat-path table."""
    before = {}
    for line in chat.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and cells[0] not in {"region", "---"}:
            before[cells[0]] = cells[8]
    lines = ["| held-out region | referring questions | acc@0.5, fold's detector | per rule | "
             "acc@0.5, language model + box head |", "|---|---|---|---|---|"]
    from training.labelled import DEMO_AREAS

    sums = {"all questions": [0.0, 0], "the OpenAerialMap areas' questions": [0.0, 0],
            "another kind's questions (0.5 m satellite)": [0.0, 0]}
    for path in sorted(folder.glob("*.grounding.json")):
        r = json.loads(path.read_text())
        region = path.name.split(".")[0]
        rules = ", ".join(f"{k} {v['acc@0.5']:.2f} ({v['n']})" for k, v in r["per_rule"].items())
        lines.append(f"| {region} | {r['n']} | {r['acc@0.5']:.3f} | {rules} | "
                     f"{before.get(region, '–')} |")
        for key in sums:
            if key == "all questions" or (region in DEMO_AREAS) == key.startswith("the Open"):
                sums[key][0] += r["acc@0.5"] * r["n"]
                sums[key][1] += r["n"]
    for key, (hits, total) in sums.items():
        if total:
            lines.append(f"| {key} | {total} | {hits / total:.3f} | | |")
    return "\n".join(lines) + "\n"


def card_section(out: Path, baseline: Path | None, previous: str = "",
                 refer: Path | None = None, zoom: Path | None = None) -> str:
    """The model card's headline section: the folds and the chat path, per region. Without the
    chat path's reports (``baseline``), the table ``previous`` (the card's section) holds is
    kept: the language model did not change."""
    text = table(out, baseline).split("\n\n")
    folds, chat = text[0], (text[1] if len(text) > 1 else "")
    if not chat.strip() and CHAT_TABLE_HEAD in previous:
        kept = previous.split(CHAT_TABLE_HEAD, 1)[1].split("\n\n", 1)[0]
        chat = CHAT_TABLE_HEAD + kept
    lines = [
        CARD_START,
        "## Leave-one-region-out (regions the scored part never saw)",
        "",
        "`scripts/loro.py`: for each labelled region the detector (`rsvlm/perception.py`; "
        f"{_heads_words(out)}) is "
        "trained on the other regions' augmented views (scale, quarter turns, mirrors, colour, "
        "contrast, blur, resolution, JPEG)" + _refiner_words(out) + " and its thresholds "
        "are those the other folds' "
        "held-out regions favour (aerial ones, as they are read whole; each scored by its own "
        "fold's detector; boxes: the best find-all F1, counts: the threshold and the factor "
        "the detections are multiplied by (`DetectorConfig.count_factor`) that bring the most "
        "counts within 20 % on their tiles and their held-out augmented views, "
        "and in the chat path presence: the most right answers, the counting threshold where "
        "no region has empty tiles to choose on); then the held-out region's tiles are scored (512 px tiles at 0.15 m, 450 px at "
        "0.5 m; SpaceNet Rio's chips whole). Presence, counts, rural/urban and find-all of "
        "buildings in the chat path are these detections (rural/urban: the training data's "
        "rule, a tenth of the ground built or 12 buildings a hectare, on the detected boxes, "
        "scored against the same rule on the labelled boxes). Objects: OSM footprints (OAM "
        "areas), SpaceNet footprints (Atlanta) and connected components of SpaceNet masks "
        "(Rio: adjacent buildings can merge, so its counts are a floor). The held-back-split "
        "numbers further down were measured before the detector, through the language model "
        "and the box head (`--ablate detector` reproduces them).",
        "",
        folds.strip(),
        "",
        _bar_line(out, zoom, refer),
        "",
    ]
    large = large_table(out)
    if large:
        lines += [
            f"The same folds over the buildings of {LARGE_M2:g} m² or more (COCO's rule: a "
            "smaller footprint is neither to be found nor wrong to find, and the counts "
            "compare boxes and footprints that large). Nearly half of the buildings missed "
            "above are footprints under 40 m² (sheds, outbuildings, unfinished walls); an area "
            "of large, clearly visible buildings reads as this table does "
            "(`training.detection.score_large`):",
            "",
            large.strip(),
            "",
        ]
    if zoom is not None and zoom.is_file():
        lines += [
            "The chat path reads imagery of 0.3 m a pixel or coarser as four overlapping crops "
            "of 0.6 of the chip, each at 336 px (`DetectorConfig.zoom_gsd`, "
            "`zoom_input_size`); the rows above read the tiles whole. The same folds both ways "
            "(`scripts/loro_zoom.py`):",
            "",
            "\n".join(line for line in zoom.read_text().splitlines() if line.startswith("|")),
            "",
        ]
    if (out / "class_folds").is_dir() and any((out / "class_folds").glob("*.json")):
        lines += [
            "**Other classes.** The same head detects tree crowns and aircraft: NEON's 10 cm "
            "tree-crown plots of three forests (Yellowstone, Ordway-Swisher in Florida, "
            "Soaproot Saddle in California; deepforest's fixtures) and Airbus's Pleiades "
            "airport sample (40 images of 2560 px at 0.5 m, 640 px chips, two halves by file "
            "name; the airports are unnamed, so the halves may share one). Each set labels its "
            "own class only, and its images train only the heatmaps they tell about "
            "(`training.labelled.known_classes`). Held out as the building regions are (a fold "
            "leaves out a building region and these sets together; Yellowstone, the bulk of "
            "the trees, is never held out), each scored at the thresholds the other held-out "
            "sets of its class favour. The shipped detector answers a class other than "
            "buildings only when its held-out sets' mean F1 reaches 0.5 "
            "(`scripts/ship_detector.py --min-f1`): aircraft are answered; tree crowns, "
            "which do not transfer between forests (and are not found in the demo towns), stay "
            "in the weights for a fine-tune on one's own forest, and questions about them go "
            "to the language model.",
            "",
            class_table(out)[0],
            "",
        ]
    if refer is not None and any(refer.glob("*.grounding.json")):
        lines += [
            "Referring questions about one building (\"Where is the largest building?\", "
            "\"Locate the building in the top left.\") are answered from the detections (the "
            "largest, the smallest, or the surest in the named 3 x 3 cell, looking below the "
            "threshold there when no sure one lies in it); the "
            "rest (relations to other classes) by the language model. Through the chat path "
            "with each fold's detector (`rsvlm-train eval --task grounding --data REGION "
            "--model PARTS --limit 60`, PARTS = the shipped parts with the fold's detector; the "
            "language model itself trained on these areas):",
            "",
            refer_table(refer, chat).strip(),
            "",
        ]
    if refer is not None and any(refer.glob("*.vqa.json")):
        lines += [
            "The same parts asked as `rsvlm-train eval --task vqa|findall --data REGION` asks "
            "(every chip of the region; each phrasing of the VQA generator: \"How many "
            "buildings are there?\", \"What is the number of buildings?\", \"Is a building "
            "present in this image?\", \"What is the area covered by buildings?\"; 512 px "
            "chips at 0.15 m, Atlanta's 450 px, Rio's 400 px). The chips' truths are the "
            "footprints at least 30 % inside a chip, so counts differ a little from the tiles' "
            f"above{_tower_words(refer)}:",
            "",
            fold_chat_table(refer).strip(),
            "",
        ]
    if chat.strip():
        lines += [
            "Chat path of the language model (presence, counting, rural/urban and area are VQA "
            "questions; find-all before the detector; `rsvlm-train eval --task findall|vqa|"
            "grounding --data REGION --limit 60`, 512 px chips; Rio's 400 px, with `--ablate "
            "detector`). Atlanta and Rio are regions "
            "the language model never saw; the four OAM areas are in its training data, so "
            "their rows are optimistic:",
            "",
            chat.strip(),
            "",
        ]
    lines.append(CARD_END)
    return "\n".join(lines) + "\n"


def _zoomed_rows(zoom: Path | None) -> dict[str, tuple[float, float]]:
    """(F1, presence) per region of `scripts/loro_zoom.py`'s table, read zoomed in."""
    rows = {}
    if zoom is not None and zoom.is_file():
        for line in zoom.read_text().splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) == 7 and cells[1].endswith("crops"):
                rows[cells[0]] = (float(cells[2]), float(cells[6]))
    return rows


def _refiner_words(out: Path) -> str:
    """How the folds' boxes were refined, when they were (`--refiners`)."""
    rows = [json.loads(p.read_text()) for p in sorted((out / "folds").glob("*.json"))]
    if not any(r.get("refined_by") for r in rows):
        return ""
    return (", each building box then refined in the tile's own pixels by a box refiner "
            "trained without the held-out region either (`rsvlm/refine.py`, "
            "`scripts/loro_refine.py`),")


def _chat_bar_words(refer: Path | None) -> str:
    """The same bar through the chat path, as `rsvlm-train eval` asks (`fold_chat_reports`)."""
    means = fold_chat_reports(refer).get(OAM_MEAN) if refer is not None else None
    if means is None:
        return ""
    vqa, fa = means
    return (f" Asked through the chat path as `rsvlm-train eval` asks, on the held-out areas' "
            f"chips (the table further down): find-all F1 {_fmt(fa.get('f1'))}, counts within "
            f"20 % {_fmt(vqa['counting'].get('within_20pct'))}, presence "
            f"{_fmt(vqa['per_type'].get('presence'))}.")


def _bar_line(out: Path, zoom: Path | None = None, refer: Path | None = None) -> str:
    """The folds against issue 18's bar, met or not: the OpenAerialMap areas are the "unseen
    region of the same kind", SpaceNet Rio and Atlanta (0.5 m satellite) "another kind"."""
    from training.labelled import DEMO_AREAS

    rows = [json.loads(p.read_text()) for p in sorted((out / "folds").glob("*.json"))]
    if not rows:
        return ""

    def cnt(r: dict) -> dict:
        return r.get("counting_at_count_threshold") or r["counting"]

    def mean(rs: list[dict], get: Any) -> float:
        vals = [v for v in (get(r) for r in rs) if v is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    def met(v: float, goal: float) -> str:
        return "met" if v >= goal else "**not met**"

    same = [r for r in rows if r["held_out"] in DEMO_AREAS]
    other = [r for r in rows if r["held_out"] not in DEMO_AREAS]
    f1 = mean(same, lambda r: r["f1"])
    within = mean(same, lambda r: cnt(r)["within_20pct"])
    presence = mean(same, lambda r: cnt(r).get("presence", r["presence"]))
    scene = mean(same, lambda r: (r.get("rural_urban") or {}).get("accuracy"))
    text = (f"Against the bar for an unseen region of the same kind (mean of the "
            f"{len(same)} OpenAerialMap folds): find-all F1 {f1:.3f} (goal >= 0.60: "
            f"{met(f1, 0.6)}), counts within 20 % for {within:.3f} of the tiles (goal >= 0.60: "
            f"{met(within, 0.6)}), presence {presence:.3f} (goal >= 0.90: {met(presence, 0.9)}), "
            f"rural/urban {scene:.3f} (goal >= 0.90: {met(scene, 0.9)}; these areas' tiles are "
            "nearly all urban, Zanzibar's are mixed).") + _chat_bar_words(refer)
    zoomed = _zoomed_rows(zoom)
    if other and all(r["held_out"] in zoomed for r in other):
        # The chat path reads such imagery zoomed in: the bar is about its answers.
        p_other = mean(other, lambda r: zoomed[r["held_out"]][1])
        f1_other = mean(other, lambda r: zoomed[r["held_out"]][0])
        how = "read zoomed in, as the chat path reads them"
    elif other:
        p_other = mean(other, lambda r: cnt(r).get("presence", r["presence"]))
        f1_other = mean(other, lambda r: r["f1"])
        how = "read whole"
    if other:
        text += (f" Another kind ({', '.join(r['held_out'] for r in other)}, 0.5 m "
                 f"satellite, {how}): presence {p_other:.3f} (goal >= 0.85: "
                 f"{met(p_other, 0.85)}), find-all F1 {f1_other:.3f}.")
    return text + (" The shipped detector is trained on all the regions and sets with the "
                   "thresholds the folds' held-out aerial regions favour together "
                   "(`scripts/ship_detector.py`); these folds are its honest estimate.")


def _heads_words(out: Path) -> str:
    rows = [json.loads(p.read_text()) for p in sorted((out / "folds").glob("*.json"))]
    heads = rows[0].get("heads", 1) if rows else 1
    return ("one head" if heads == 1 else
            f"{heads} heads from consecutive seeds, their heatmaps and boxes averaged")


def write_card(card: Path, section: str, start: str = CARD_START, end: str = CARD_END) -> None:
    """``section`` (which opens with ``start`` and closes with ``end``) in place of the card's,
    or, the first time, before its held-back-split numbers."""
    text = card.read_text()
    if start in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1].lstrip("\n")
    else:
        marker = "## Numbers on the held-back split"
        head, rest = text.split(marker, 1) if marker in text else (text, "")
        text = head + section + "\n" + (marker + rest if rest else "")
    card.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data", help="shared data folder")
    ap.add_argument("--out", default="runs/loro")
    ap.add_argument("--regions", default=",".join(SETS),
                    help="comma list (folds are held out of these); sets of other classes "
                         f"({', '.join(CLASS_SETS)}) make a multi-class detector; building "
                         f"sets outside the default ({', '.join(NAMED_SETS)}) train when named")
    ap.add_argument("--cache-only", action="store_true",
                    help="only cache the regions' features (another --min/--max-views each)")
    ap.add_argument("--views-per-tile", type=int, default=4)
    ap.add_argument("--min-views", type=int, default=40)
    ap.add_argument("--max-views", type=int, default=100)
    ap.add_argument("--train-files", type=int, default=None,
                    help="a region's training-view cache files a fold uses (the first; all)")
    ap.add_argument("--heads", type=int, default=1,
                    help="detector heads from consecutive seeds, read as their average")
    ap.add_argument("--input-dropout", type=float, default=0.0,
                    help="dropout on the features while training")
    ap.add_argument("--object-negatives", action="store_true",
                    help="inside a labelled object, the other classes' heatmaps learn background")
    ap.add_argument("--centre-radius", type=int, default=0,
                    help="cells this near an object's centre learn it as a centre too")
    ap.add_argument("--iou-target", action="store_true",
                    help="an object's centre learns to score its own box's IoU with it")
    ap.add_argument("--ignore-below", type=float, default=0.0,
                    help="buildings whose box covers less than this share of a view train "
                         "nothing (0.004: four patches of 32 x 32)")
    ap.add_argument("--min-visible", type=float, default=None,
                    help="train on boxes cut under this rule (the chat evaluation's chips: 0.3) "
                         "and ignore objects cut further (default: the cache's 0.5, none ignored)")
    ap.add_argument("--upsample", type=int, default=1,
                    help="the detector's maps this many times finer than the patch grid")
    ap.add_argument("--dilation", type=int, default=1,
                    help="the i-th 3 x 3 convolution looks this ** i patches apart")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    ap.add_argument("--weight-decay", type=float, default=0.05, help="AdamW's weight decay")
    ap.add_argument("--batch-size", type=int, default=16, help="training views a step")
    ap.add_argument("--balance-levels", action="store_true",
                    help="the levels scaled to one spread before their principal components")
    ap.add_argument("--dim", type=int, default=64, help="detector width")
    ap.add_argument("--convs", type=int, default=2, help="3 x 3 convolutions of the detector")
    ap.add_argument("--reduce", type=int, default=128,
                    help="train on this many principal components of the levels (0: all)")
    ap.add_argument("--cache-layers", default=None,
                    help="the tower's levels a new cache holds, comma-separated (default: the "
                         "detector's, 7,9,11); 12 is the last block's")
    ap.add_argument("--levels", default=None,
                    help="the cached levels this run's folds read, comma-separated (default: "
                         "all the cache holds); kept in OUT/levels.json")
    ap.add_argument("--input-size", type=int, default=INPUT_SIZE,
                    help="px the vision tower sees each tile at (a multiple of 14)")
    ap.add_argument("--zoom-gsd", type=float, default=None,
                    help="cut training views of regions this coarse (m/px) --zoom-crop as large")
    ap.add_argument("--zoom-crop", type=float, default=0.6)
    ap.add_argument("--gray", type=float, default=0.0,
                    help="share of training views made panchromatic")
    ap.add_argument("--hue", type=float, default=0.0,
                    help="half the training views' hues turn by up to this share of the circle")
    ap.add_argument("--coarse", type=float, default=0.0,
                    help="this share of fine imagery's training views cut 2-3.5 x as large "
                         "(roofs as a 0.5 m sensor shows them)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", default=None, help="held-out regions to run (default: all)")
    ap.add_argument("--table", action="store_true", help="only render the table")
    ap.add_argument("--rescore", action="store_true",
                    help="score the trained folds again (their thresholds and every measure "
                         "of this version), then render the table")
    ap.add_argument("--placement", action="store_true",
                    help="only print each fold's F1 at IoU 0.1 / 0.3 / 0.5")
    ap.add_argument("--baseline", default="runs/baseline", help="chat-path reports folder")
    ap.add_argument("--card", default=None, help="write the section into this MODEL_CARD.md")
    ap.add_argument("--zoom", default=None,
                    help="scripts/loro_zoom.py's table (a file) for the card")
    ap.add_argument("--refer", default=None,
                    help="folder of REGION.grounding.json reports made with the folds' detectors")
    ap.add_argument("--refiners", default=None,
                    help="scripts/loro_refine.py's folder(s), comma-separated: each held-out "
                         "region's boxes refined by its refiner (several: averaged), the "
                         "thresholds chosen again on them")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    out = Path(args.out)
    global REFINERS, DATA
    REFINERS = [Path(d) for d in args.refiners.split(",")] if args.refiners else None
    DATA = Path(args.data)
    if args.placement:
        print(placement(out))
        return 0
    names = [n.strip() for n in args.regions.split(",") if n.strip()]
    if args.rescore:
        cross_thresholds(out)
    elif not args.table:
        build_cache(Path(args.data), out, names, args.views_per_tile, args.min_views,
                    args.max_views, args.seed, args.input_size, args.zoom_gsd, args.zoom_crop,
                    args.gray, args.hue, args.coarse, _ints(args.cache_layers))
        names = [n for n in names if (out / "cache" / f"{n}.pt").is_file()]
        if args.cache_only:
            return 0
        keep_levels(out, _ints(args.levels))
        folds = args.folds.split(",") if args.folds else building_sets(names)
        missing = {n for f in folds for n in f.split("+")} - set(names)
        if missing:
            raise SystemExit(f"folds name sets that are not cached in {out}: {sorted(missing)}")
        for held in folds:
            run_fold(out, held, names, args.epochs, args.seed, dim=args.dim,
                     reduce=args.reduce or None, convs=args.convs, train_files=args.train_files,
                     heads=args.heads, input_dropout=args.input_dropout,
                     object_negatives=args.object_negatives, iou_target=args.iou_target,
                     ignore_below=args.ignore_below, min_visible=args.min_visible,
                     upsample=args.upsample, centre_radius=args.centre_radius,
                     dilation=args.dilation, lr=args.lr, weight_decay=args.weight_decay,
                     batch_size=args.batch_size, balance_levels=args.balance_levels)
        cross_thresholds(out)
    baseline = Path(args.baseline) if args.baseline else None
    print(table(out, baseline))
    large = large_table(out)
    if large:
        print("\n" + large)
    if (out / "class_folds").is_dir():
        print("\n" + class_table(out)[0])
    if args.card:
        old = Path(args.card).read_text() if Path(args.card).is_file() else ""
        previous = old.split(CARD_START, 1)[1].split(CARD_END, 1)[0] if CARD_START in old else ""
        section = card_section(out, baseline, previous,
                               Path(args.refer) if args.refer else None,
                               Path(args.zoom) if args.zoom else None)
        # scripts/model_card.py puts this file back when it re-renders the card.
        (Path(args.card).parent / "eval").mkdir(exist_ok=True)
        (Path(args.card).parent / "eval" / "loro.md").write_text(section)
        write_card(Path(args.card), section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
