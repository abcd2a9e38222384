"""scripts/loro.py's mechanics on two synthetic regions and a stand-in tower: the cache is
built once and topped up (never rebuilt), a fold trains without its held-out region, scores
it (find-all, counts, presence, rural/urban) and is not trained again when run twice."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from training.labelled import LabelledImage

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def loro(monkeypatch):
    spec = importlib.util.spec_from_file_location("loro", ROOT / "scripts" / "loro.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []

    class Tower:  # the features of a view: its mean colour per patch, 3 levels of 8
        def __init__(self, *a, **k) -> None:
            pass

        def __call__(self, images):
            calls.append(len(images))
            out = []
            for im in images:
                small = torch.from_numpy(np.asarray(im, np.float32)[::16, ::16][:32, :32] / 255)
                small = torch.nn.functional.pad(small, (0, 0, 0, 32 - small.shape[1],
                                                        0, 32 - small.shape[0]))
                f = small.reshape(1024, 3).repeat(1, 3)[:, :8]
                out.append(torch.stack([f, f.flip(-1), f]))
            return torch.stack(out).half()

    def load_sets(root, names):
        rng = np.random.default_rng(len(names[0]))
        sets = {}
        for name in names:
            image = rng.integers(0, 255, (600, 600, 3), dtype=np.uint8)
            boxes = np.array([[50, 60, 150, 140], [300, 300, 420, 380]], np.float32)
            sets[name] = [LabelledImage(name, name, image, boxes, ["building"] * 2, 0.15)]
        return sets

    monkeypatch.setattr(module, "FrozenTower", Tower)
    monkeypatch.setattr(module, "load_sets", load_sets)
    module.calls = calls
    return module


def test_the_cache_is_topped_up_and_a_fold_runs_once(loro, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "run"
    loro.build_cache(tmp_path, out, ["aa", "bb"], 1, 3, 3, seed=0)
    first = out / "cache" / "aa.train.pt"
    stamp = first.stat().st_mtime_ns
    assert sum(loro.calls) == 2 * (1 + 3)  # one scoring tile and three views per region
    loro.build_cache(tmp_path, out, ["aa", "bb"], 1, 5, 5, seed=0)
    assert sum(loro.calls) == 2 * (1 + 3) + 2 * 2  # only the two views each region lacked
    assert first.stat().st_mtime_ns == stamp
    assert [p.name for p in loro._chunk_sizes(out, "aa")] == ["aa.train.pt", "aa.train1.pt"]
    assert list(loro._chunk_sizes(out, "aa").values()) == [3, 2]

    report = loro.run_fold(out, "aa", ["aa", "bb"], epochs=1, seed=0, dim=8, reduce=None,
                           convs=1)
    assert report["trained_on"] == ["bb"] and report["train_views"] == 5 + 1
    assert set(report) >= {"f1", "precision", "recall", "presence", "counting", "rural_urban"}
    assert report["rural_urban"]["tiles"] == 1
    assert (out / "folds" / "aa" / "detector" / "detector.json").is_file()

    def no_training(*a, **k):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(loro, "train_heads", no_training)
    assert loro.run_fold(out, "aa", ["aa", "bb"], 1, 0, 8, None, 1) == report
    assert "| aa | 1 | 2 |" in loro.table(out, None)
    # The placement table: F1 at three IoUs, recall at the lowest threshold, the head's ceiling.
    rows = loro.placement(out).splitlines()
    assert rows[2].startswith("| aa |") and rows[2].count("|") == 7
    # A cache holds one input size; the fold's detector says which.
    saved = (out / "folds" / "aa" / "detector" / "detector.json").read_text()
    assert '"input_size": 448' in saved
    with pytest.raises(SystemExit, match="448 px, not 672"):
        loro.build_cache(tmp_path, out, ["aa"], 1, 5, 5, seed=0, input_size=672)


def test_folds_of_several_heads_take_thresholds_from_the_other_folds(loro, tmp_path: Path,
                                                                    monkeypatch) -> None:
    out = tmp_path / "run"
    loro.build_cache(tmp_path, out, ["aa", "bb"], 1, 3, 3, seed=0)
    loro.build_cache(tmp_path, out, ["aa", "bb"], 1, 5, 5, seed=0)
    assert loro._train_parts(out, "bb", 1) == ["train"]  # the first file's 3 views of 5
    report = loro.run_fold(out, "aa", ["aa", "bb"], epochs=1, seed=0, dim=8, reduce=None,
                           convs=1, train_files=1, heads=2)
    assert report["heads"] == 2 and report["train_views"] == 3 + 1
    assert sorted(p.name for p in (out / "members" / "aa").iterdir()) == [
        "seed0.safetensors", "seed1.safetensors"]
    loro.run_fold(out, "bb", ["aa", "bb"], 1, 0, 8, None, 1, 1, 2)
    # Each fold is scored again at the thresholds the other fold's held-out region favours.
    curves = loro.cross_thresholds(out)
    assert sorted(curves) == ["aa", "bb"] and set(curves["aa"]) == set(loro.THRESHOLDS)
    aa = __import__("json").loads((out / "folds" / "aa.json").read_text())
    # Counts: the threshold and factor chosen together on the other fold's tiles and views.
    bb_preds = loro._held_out_predictions(out, "bb")
    counting = loro.pooled_count({"bb": loro.count_reads(out, "bb", bb_preds)})
    want = (loro.pooled_thresholds({"bb": curves["bb"]})[0], counting[0])
    assert (aa["threshold"], aa["count_threshold"], aa["count_factor"]) == (*want, counting[1])
    assert aa["thresholds_from"] == "the other folds' held-out regions"
    assert len(aa["selection_thresholds"]) == 2
    head, config = loro._fold_head(out, "aa")
    assert (config.threshold, config.count_threshold) == want and config.heads == 2
    assert config.count_factor == counting[1]
    # What the shipped detector counts by: chosen on both folds' regions.
    both = {r: loro.count_reads(out, r, loro._held_out_predictions(out, r)) for r in ("aa", "bb")}
    assert __import__("json").loads((out / "counting.json").read_text()) == dict(
        zip(("count_threshold", "count_factor"), loro.pooled_count(both), strict=True))
    # Presence at its own threshold, chosen on the other fold, and reported as answered there.
    assert config.presence_threshold == loro.pooled_presence({"bb": curves["bb"]}, want[1])
    assert aa["counting_at_count_threshold"]["presence"] == curves["aa"][
        config.presence_threshold][3]
    assert aa["presence_threshold"] == config.presence_threshold  # the card's table says it


def test_a_cache_cut_again_under_another_rule_trains_a_fold_of_finer_maps(loro, tmp_path: Path,
                                                                         monkeypatch) -> None:
    monkeypatch.setattr(loro, "DATA", tmp_path)  # the labelled sets are the fixture's
    out = tmp_path / "run"
    loro.build_cache(tmp_path, out, ["aa", "bb"], 1, 4, 4, seed=0)
    for part in ("train", "eval"):  # the views cut again from their seeds are the cached ones
        again = loro.relabelled(out, "bb", part, 0.5)
        cached = torch.load(out / "cache" / f"bb.{part}.pt")
        assert all(torch.allclose(a, b) for a, b in zip(again["boxes"], cached["boxes"],
                                                        strict=True))
    boxes, ignore = loro.relabelled_stack(out, ["bb"], None, 0.3)
    assert len(boxes) == len(ignore) == 4 + 1
    report = loro.run_fold(out, "aa", ["aa", "bb"], epochs=1, seed=0, dim=8, reduce=None,
                           convs=1, min_visible=0.3, upsample=2)
    assert report["min_visible"] == 0.3 and report["upsample"] == 2
    head, config = loro._fold_head(out, "aa")
    assert config.upsample == 2 and head(
        [torch.zeros(1, 1024, 8)] * 3)[0].shape[-1] == 64
    # scored against the chips' truths too (30 % inside): here every box is well inside
    assert report["chip_rule"]["f1"] == report["f1"]


def test_views_of_coarse_regions_are_cut_as_the_chat_path_reads_them(loro, tmp_path: Path
                                                                      ) -> None:
    out = tmp_path / "zoomed"
    loro.build_cache(tmp_path, out, ["aa"], 1, 6, 6, seed=0, zoom_gsd=0.1, zoom_crop=0.5)
    sides = [max(s) for s in torch.load(out / "cache" / "aa.train.pt")["sizes"]]
    assert max(sides) <= int(512 * 0.5) * 1.4  # half the tile, then the usual 0.7-1.4
    whole = tmp_path / "whole"
    loro.build_cache(tmp_path, whole, ["aa"], 1, 6, 6, seed=0, zoom_gsd=0.3)  # 0.15 m: whole
    assert max(max(s) for s in torch.load(whole / "cache" / "aa.train.pt")["sizes"]) > max(sides)
    with pytest.raises(SystemExit, match="zoom 0.5, not 1.0"):
        loro.build_cache(tmp_path, out, ["aa"], 1, 8, 8, seed=0)


def test_a_fold_holds_out_a_region_and_sets_of_other_classes_at_once(loro, tmp_path: Path
                                                                    ) -> None:
    import json

    out = tmp_path / "run"
    names = ["aa", "bb", "trees_osbs", "trees_soap"]
    loro.build_cache(tmp_path, out, names, 1, 3, 3, seed=0)
    report = loro.run_fold(out, "aa+trees_osbs", names, epochs=1, seed=0, dim=8, reduce=None,
                           convs=1)
    assert report["held_out"] == "aa" and report["trained_on"] == ["bb", "trees_soap"]
    assert report["classes"] == ["building", "tree"]
    trees = json.loads((out / "class_folds" / "trees_osbs.json").read_text())
    assert trees["class"] == "tree" and trees["objects"] == 2
    assert set(trees["curves"]) == {str(t) for t in loro.THRESHOLDS}
    head, config = loro._fold_head(out, "aa")
    assert config.labels == ["building", "tree"] and head.heat.out_channels == 2
    # The other tree set held out in another fold: each is scored at the other's thresholds.
    assert loro.run_fold(out, "trees_soap", names, 1, 0, 8, None, 1) is None
    rows, shipped = loro.class_table(out)
    assert "| trees_osbs | tree | 1 | 2 |" in rows and "(trees_soap)" in rows
    assert set(shipped) == {"tree"}
    # A finished group is not trained again.
    train_heads, loro.train_heads = loro.train_heads, None
    assert loro.run_fold(out, "trees_soap", names, 1, 0, 8, None, 1) is None
    loro.train_heads = train_heads

    # The shipped head: every set, both classes, each at its own thresholds.
    spec = importlib.util.spec_from_file_location("ship_detector",
                                                  ROOT / "scripts" / "ship_detector.py")
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    # A box refiner's thresholds come from folds scored on refined boxes: say which.
    with pytest.raises(SystemExit, match="--refiners"):
        ship.main(["--loro", str(out), "--parts", str(tmp_path / "parts")])
    # The shipped heads are trained with the folds' recipe (here, as if with centre sampling,
    # dilation and another optimiser).
    fold_json = sorted((out / "folds").glob("*.json"))[0]
    fold_json.write_text(json.dumps({**json.loads(fold_json.read_text()), "centre_radius": 1,
                                     "dilation": 2, "lr": 1e-3, "weight_decay": 0.2,
                                     "batch_size": 8}))
    recipes, train = [], ship.train_heads
    ship.train_heads = lambda *a, **k: recipes.append(k) or train(*a, **k)
    assert ship.main(["--loro", str(out), "--parts", str(tmp_path / "parts"),
                      "--refiner-epochs", "0"]) == 0
    assert [(k["centre_radius"], k["dilation"], k["lr"], k["weight_decay"], k["batch_size"])
            for k in recipes] == [(1, 2, 1e-3, 0.2, 8)]
    from rsvlm.perception import load_detector

    head, config = load_detector(tmp_path / "parts")
    assert config.labels == ["building", "tree"] and head.heat.out_channels == 2
    assert config.dilation == head.dilation == 2
    assert config.class_thresholds == {"tree": list(shipped["tree"])}
    # A class is answered only when its held-out sets' F1 reaches --min-f1 (these can't).
    assert config.answers == ["building"] and config.answered == ["building"]
    assert set(config.notes["class_f1"]) == {"tree"}
    assert sorted(config.notes["trained_on"]) == sorted(names)
    # ... and the weights say how they were trained.
    assert (config.notes["dilation"], config.notes["lr"], config.notes["batch_size"]) == (2, 1e-3, 8)

    # The model card's examples of the other classes: text, each set's tiles under its fold.
    spec = importlib.util.spec_from_file_location("loro_examples",
                                                  ROOT / "scripts" / "loro_examples.py")
    examples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(examples)
    text = "\n".join(examples.class_examples(out))
    assert "### trees_osbs (trees; fold trained on bb, trees_soap)" in text
    assert "How many trees are there? -> **" in text and "(truth: 2)" in text


def test_the_counting_threshold_is_the_one_most_counts_come_within_20_percent_at(loro) -> None:
    """The bar counts a tile right within 20 %: the counting threshold is chosen by that share
    over the regions (each once), the mean log count ratio only breaking ties."""
    grid = loro.THRESHOLDS
    # (F1, mean |log ratio|, share within 20 %) per threshold; region a favours 0.2, b 0.3.
    a = {t: (0.5, 0.1 if t == 0.3 else 0.4, 1.0 if t == 0.2 else 0.0) for t in grid}
    b = {t: (0.6 if t == 0.35 else 0.4, 0.1 if t == 0.3 else 0.4, 0.5 if t in (0.2, 0.3) else 0.0)
         for t in grid}
    assert loro.pooled_thresholds({"a": a, "b": b}) == (0.35, 0.2)
    tie = {t: (0.5, 0.1 if t == 0.3 else 0.4, 0.5) for t in grid}
    assert loro.pooled_thresholds({"a": tie}) == (0.15, 0.3)


def test_counts_are_made_by_a_threshold_and_a_factor_chosen_together(loro) -> None:
    """Where a region's detector finds about 3 of every 4 buildings at any threshold, the
    factor that brings its counts within 20 % is chosen with the threshold; where counting
    1:1 is as good, the factor stays 1."""
    # Each image: 8 buildings, 6 of them found at 0.6, and 6 false boxes at 0.12.
    under = ([[0.6] * 6 + [0.12] * 6] * 10, [8] * 10)
    t, k = loro.pooled_count({"a": [under, under]})
    assert t in [v for v in loro.THRESHOLDS if 0.12 < v <= 0.6]  # not the false ones
    assert k == 1.1  # the factor nearest 1 that brings 6 within 20 % of 8 (6.6 -> 7)
    exact = ([[0.6] * 8] * 10, [8] * 10)
    assert loro.pooled_count({"a": [exact]})[1] == 1.0
    # Regions weigh alike, whatever their number of images.
    big = ([[0.6] * 8] * 100, [8] * 100)
    assert loro.pooled_count({"a": [big], "b": [under]})[1] > 1.0


def test_the_presence_threshold_is_the_one_most_presence_answers_are_right_at(loro) -> None:
    """Regions with empty tiles choose it (a region whose tiles all hold buildings is right at
    every low threshold); a tie keeps the counting threshold, else goes to the lowest."""
    grid = loro.THRESHOLDS
    full = {t: (0.5, 0.1, 0.5, 1.0 if t <= 0.3 else 0.8) for t in grid}
    empty = {t: (0.5, 0.1, 0.5, 0.9 if t in (0.25, 0.3) else 0.7) for t in grid}
    assert loro.pooled_presence({"full": full, "empty": empty}) == 0.25
    assert loro.pooled_presence({"full": full, "empty": empty}, counting=0.15) == 0.25
    # Nothing to choose on: the counting threshold stays; without one, the lowest.
    assert loro.pooled_presence({"full": full}, counting=0.15) == 0.15
    assert loro.pooled_presence({"full": full}) == grid[0]


def test_presence_takes_its_own_threshold_where_one_was_chosen() -> None:
    from rsvlm.perception import DetectorConfig

    config = DetectorConfig(labels=["building", "aircraft"], threshold=0.3, count_threshold=0.15,
                            presence_threshold=0.25, class_thresholds={"aircraft": [0.35, 0.4]})
    assert config.cut("building", "presence") == 0.25
    assert config.cut("building", "count") == config.cut("building", "rural_urban") == 0.15
    assert config.cut("building", "find_all") == 0.3
    assert config.cut("aircraft", "presence") == 0.4  # a class's own thresholds stay its own
    assert DetectorConfig(count_threshold=0.15).cut("building", "presence") == 0.15


def test_folds_read_with_their_refiners_carry_them(loro, tmp_path: Path, monkeypatch) -> None:
    from rsvlm.perception import detector_refiner
    from rsvlm.refine import BoxRefiner

    out = tmp_path / "run"
    loro.build_cache(tmp_path, out, ["aa", "bb"], 1, 3, 3, seed=0)
    for held in ("aa", "bb"):
        loro.run_fold(out, held, ["aa", "bb"], epochs=1, seed=0, dim=8, reduce=None, convs=1)
    # A head of one epoch finds little: a box on the first building of every tile instead.
    monkeypatch.setattr(loro, "predict", lambda head, features, threshold: [
        [(50 / 600, 60 / 600, 150 / 600, 140 / 600, 0.8)] for _ in features])
    plain = {h: loro._held_out_predictions(out, h) for h in ("aa", "bb")}
    # A refiner that moves every box: half a box right (deltas are in units of 0.1 a side).
    refiner = BoxRefiner(32, 8)
    torch.nn.init.zeros_(refiner.out[-1].weight)
    with torch.no_grad():
        refiner.out[-1].bias.copy_(torch.tensor([5.0, 0, 0, 0, 0]))
    (tmp_path / "refiners").mkdir()
    torch.save({"config": {"size": 32, "width": 8}, "state": refiner.state_dict()},
               tmp_path / "refiners" / "aa.pt")
    loro.REFINERS, loro.DATA = [tmp_path / "refiners"], tmp_path
    moved = loro._held_out_predictions(out, "aa")
    assert loro._held_out_predictions(out, "bb") == plain["bb"]  # no refiner of its own
    pairs = [(p, m) for ps, ms in zip(plain["aa"], moved, strict=True)
             for p, m in zip(ps, ms, strict=True)]
    assert pairs and all(m[0] > p[0] + 0.05 for p, m in pairs)
    loro.cross_thresholds(out)
    report = __import__("json").loads((out / "folds" / "aa.json").read_text())
    assert report["refined_by"][0].endswith("aa.pt")
    head, config = loro._fold_head(out, "aa")
    assert config.refiner["labels"] == ["building"]
    assert detector_refiner(out / "folds" / "aa", config) is not None
    assert loro._fold_head(out, "bb")[1].refiner is None


def test_the_chat_path_reports_of_the_folds_become_the_cards_table(loro, tmp_path: Path) -> None:
    import json

    (tmp_path / "kampala_ug.vqa.json").write_text(json.dumps({
        "n": 24, "per_type": {"presence": 1.0, "rural_urban": 0.5, "area": 0.25},
        "counting": {"within_20pct": 1 / 6, "exact": 0.0, "mape": 0.366}}))
    (tmp_path / "kampala_ug.findall.json").write_text(json.dumps(
        {"f1": 0.5, "precision": 0.6, "recall": 0.4}))
    (tmp_path / "rio.vqa.json").write_text(json.dumps({
        "n": 52, "per_type": {"presence": 0.9}, "counting": {}}))
    rows = loro.fold_chat_table(tmp_path).strip().splitlines()
    assert rows[2] == ("| kampala_ug | 24 | 1.000 | 0.167 (0.000; 0.366) | 0.500 | 0.250 | "
                       "0.500 (0.600 / 0.400) |")
    assert rows[3].startswith("| rio | 52 | 0.900 | – (–; –) |") and rows[3].endswith("| – |")
    # The card says how the reports read the detector's tower, when they all say the same.
    assert loro._tower_words(tmp_path) == ""  # these reports do not say
    for p in tmp_path.glob("*.json"):
        report = json.loads(p.read_text())
        p.write_text(json.dumps({**report, "engine": {"decode": "onnx",
                                                      "detector_tower": "onnx-int8"}}))
    assert loro._tower_words(tmp_path).startswith(
        " (the detector's tower read in int8 through ONNX Runtime, as the engine reads it by "
        "default;")
    p.write_text(json.dumps({**report, "engine": {"detector_tower": "torch"}}))
    assert loro._tower_words(tmp_path) == ""  # they disagree


def test_a_run_reads_the_cached_levels_it_names_and_ships_a_detector_that_runs_those(
        loro, tmp_path: Path) -> None:
    out = tmp_path / "run"
    loro.build_cache(tmp_path, out, ["aa", "bb"], 1, 3, 3, seed=0)
    full = loro._load(out, "aa", "train")["features"]
    loro.keep_levels(out, [7, 11])
    part = loro._load(out, "aa", "train")["features"]
    assert part.shape[1] == 2
    assert torch.equal(part[:, 0], full[:, 0]) and torch.equal(part[:, 1], full[:, 2])
    for held in ("aa", "bb"):
        report = loro.run_fold(out, held, ["aa", "bb"], epochs=1, seed=0, dim=8, reduce=None,
                               convs=1)
        assert report["levels"] == [7, 11]
        assert loro._fold_head(out, held)[1].layers == [7, 11]
    spec = importlib.util.spec_from_file_location("ship_detector",
                                                  ROOT / "scripts" / "ship_detector.py")
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    assert ship.main(["--loro", str(out), "--parts", str(tmp_path / "parts"),
                      "--refiner-epochs", "0"]) == 0
    from rsvlm.perception import load_detector

    head, config = load_detector(tmp_path / "parts")
    assert config.layers == [7, 11] and head.proj[0].in_features == 2 * config.hidden
    # The card's examples read the fold's levels from the cache too.
    spec = importlib.util.spec_from_file_location("loro_examples",
                                                  ROOT / "scripts" / "loro_examples.py")
    examples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(examples)
    lines = examples.region_examples(out, "aa", loro.load_sets(tmp_path, ["aa"])["aa"],
                                     tmp_path / "examples", "examples")
    assert lines[0].startswith("### aa (fold trained on bb)")
    # ... and so do the zoomed reads: the crops go through a tower of the heads' levels.
    spec = importlib.util.spec_from_file_location("loro_zoom", ROOT / "scripts" / "loro_zoom.py")
    zoom = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoom)
    towers = []

    class Tower:
        def __init__(self, size, layers) -> None:
            towers.append(list(layers))

        def __call__(self, crops):
            return torch.zeros(len(crops), len(towers[-1]), 1024, 8)

    zoom.FrozenTower, zoom.load_sets = Tower, loro.load_sets
    assert zoom.main(["--run", str(out), "--regions", "aa", "--data", str(tmp_path)]) == 0
    assert towers == [[7, 11]]
    # A run reads one set of levels, and a cache holds the levels it was built with.
    with pytest.raises(SystemExit, match="read the levels"):
        loro.keep_levels(out, [7, 9])
    with pytest.raises(SystemExit, match="levels \\[7, 9, 11\\], not \\[7, 9, 11, 12\\]"):
        loro.build_cache(tmp_path, out, ["aa"], 1, 5, 5, seed=0, layers=[7, 9, 11, 12])
    other = tmp_path / "other"  # a cache of other levels is topped up with those levels
    loro.build_cache(tmp_path, other, ["aa"], 1, 3, 3, seed=0, layers=[8, 10, 12])
    loro.build_cache(tmp_path, other, ["aa"], 1, 5, 5, seed=0)
    assert loro.cached_layers(other, "aa") == [8, 10, 12]
    (out / "levels.json").write_text('{"levels": [12]}')
    with pytest.raises(SystemExit, match="not \\[12\\]"):
        loro._load(out, "aa", "train")
