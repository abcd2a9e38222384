import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from training.build import BuildConfig, RegionBuilder, build_dataset
from training.cli import main
from training.region import load_region

KAMPALA = Path(__file__).resolve().parents[2] / "assets" / "demo" / "kampala"

BOX = re.compile(r"<ref>([^<]*)</ref><box>\[(\d+),(\d+),(\d+),(\d+)\]</box>")


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def built(small_region: Path, image_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    spec = load_region(small_region, chip_size=128, val_fraction=0.25, block_chips=2)
    out = tmp_path_factory.mktemp("ds")
    build_dataset(out, [spec], [image_folder], BuildConfig(seed=5), progress=False)
    return spec, out


def test_two_builds_are_byte_identical_and_seed_matters(built, image_folder, tmp_path) -> None:
    spec, out = built
    again = tmp_path / "again"
    build_dataset(again, [spec], [image_folder], BuildConfig(seed=5), progress=False)
    assert _digests(out) == _digests(again)
    other = tmp_path / "other"
    build_dataset(other, [spec], [image_folder], BuildConfig(seed=6), progress=False)
    assert (other / "train.jsonl").read_bytes() != (out / "train.jsonl").read_bytes()


def test_llava_records_and_images(built) -> None:
    _, out = built
    train, val = _rows(out / "train.jsonl"), _rows(out / "val.jsonl")
    assert train and val
    ids = [r["id"] for r in train + val]
    assert len(ids) == len(set(ids))
    tasks = {r["task"] for r in train}
    assert tasks == {"caption", "vqa", "grounding", "region", "classification"}
    for r in train + val:
        assert set(r) == {"id", "image", "conversations", "task", "meta"}
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"]
        assert (out / r["image"]).is_file()
    # chips of one spatial block never end up in both splits
    train_chips = {r["image"] for r in train if r["task"] != "classification"}
    val_chips = {r["image"] for r in val if r["task"] != "classification"}
    assert train_chips and val_chips and not train_chips & val_chips
    card = json.loads((out / "dataset_card.json").read_text())
    assert card["splits"]["train"]["samples"] == len(train)
    assert card["splits"]["train"]["tasks"]["classification"] == sum(
        r["task"] == "classification" for r in train)
    assert (out / "dataset_card.md").read_text().startswith("# Dataset card")
    texts = _rows(out / "texts.jsonl")
    assert {t["level"] for t in texts} == {"scene", "object"}


def test_image_folders_get_scene_captions_and_database_texts(built) -> None:
    """Each classification image also gets a caption naming its class (for the alignment
    stage) in the same split, and a scene text for the semantic database."""
    _, out = built
    rows = _rows(out / "train.jsonl") + _rows(out / "val.jsonl")
    cls = {r["image"]: r for r in rows if r["task"] == "classification"}
    caps = {r["image"]: r for r in rows if r["task"] == "caption" and r["meta"].get("dataset")}
    assert set(caps) == set(cls) and len(cls) == 12
    for image, r in caps.items():
        assert r["meta"]["cls"] in r["conversations"][1]["value"]
        assert r["meta"]["split"] == cls[image]["meta"]["split"]
    texts = [t for t in _rows(out / "texts.jsonl") if t.get("cls")]
    assert {t["image"] for t in texts} == set(cls)
    assert all(t["cls"] in t["text"] and t["level"] == "scene" for t in texts)


def test_answers_are_balanced_and_boxes_match_meta(built) -> None:
    _, out = built
    rows = _rows(out / "train.jsonl")
    presence = [r["conversations"][1]["value"] for r in rows if r["meta"].get("type") == "presence"]
    assert presence.count("yes") == presence.count("no") > 0
    from rsvlm.boxes import parse_boxes

    n = 0
    for r in rows:
        if r["task"] != "grounding":
            continue
        answer = r["conversations"][1]["value"]
        parsed = parse_boxes(answer)
        assert len(parsed) == len(r["meta"]["boxes_px"])
        for pb, box in zip(parsed, r["meta"]["boxes_px"], strict=True):
            assert np.allclose(pb.to_pixels(128, 128), box, atol=0.2)
            n += 1
    assert n > 10


def _write_known_region(root: Path) -> None:
    """One 256 px chip at 0.5 m: three buildings of known size and a parking lot."""
    import rasterio
    from rasterio.transform import from_origin

    root.mkdir()
    with rasterio.open(root / "img.tif", "w", driver="GTiff", width=256, height=256, count=3,
                       dtype="uint8", crs="EPSG:32636",
                       transform=from_origin(1000, 2000, 0.5, 0.5)) as ds:
        ds.write(np.full((3, 256, 256), 120, np.uint8))

    def rect(x1, y1, x2, y2):  # pixel box -> metric ring
        xs, ys = [1000 + x * 0.5 for x in (x1, x2)], [2000 - y * 0.5 for y in (y1, y2)]
        return [[[xs[0], ys[0]], [xs[1], ys[0]], [xs[1], ys[1]], [xs[0], ys[1]], [xs[0], ys[0]]]]

    feats = [
        ({"building": "yes", "osm_id": 1}, rect(10, 10, 50, 40)),  # 40x30 px = 300 m2, top left
        ({"building": "yes", "osm_id": 2}, rect(200, 20, 220, 40)),  # 20x20 px = 100 m2
        ({"building": "yes", "osm_id": 3}, rect(100, 200, 112, 212)),  # 12x12 px = 36 m2
        ({"amenity": "parking", "osm_id": 4}, rect(150, 150, 250, 250)),  # 2500 m2
    ]
    (root / "osm.geojson").write_text(json.dumps({
        "type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": "EPSG:32636"}},
        "features": [{"type": "Feature", "properties": p,
                      "geometry": {"type": "Polygon", "coordinates": c}} for p, c in feats]}))


def test_generated_facts_match_a_known_scene(tmp_path: Path) -> None:
    root = tmp_path / "known"
    _write_known_region(root)
    spec = load_region(root, chip_size=256, val_fraction=0.0)
    builder = RegionBuilder(spec, BuildConfig(seed=0, vqa_per_type=3, max_refs=20))
    (rec,) = builder.contexts()
    ctx = rec.ctx
    assert ctx.gsd == pytest.approx(0.5, rel=0.01)
    samples = builder.samples_for(ctx)
    by_q = {(s.task, s.meta.get("type")): [] for s in samples}
    for s in samples:
        by_q[(s.task, s.meta.get("type"))].append(s)
    counts = {s.meta["cls"]: s.answer for s in by_q[("vqa", "counting")]}
    assert counts.get("building", "3") == "3"
    refs = {s.meta["expression"]: s for s in by_q[("grounding", "refer")]}
    largest = refs["the largest building"]
    assert largest.meta["boxes_px"] == [[10.0, 10.0, 50.0, 40.0]]
    assert BOX.search(largest.answer).groups() == ("building", "39", "39", "195", "156")
    assert refs["the smallest building"].meta["boxes_px"] == [[100.0, 200.0, 112.0, 212.0]]
    assert refs["the parking lot"].meta["boxes_px"] == [[150.0, 150.0, 250.0, 250.0]]
    find_all = [s for s in by_q[("grounding", "find_all")] if s.meta["cls"] == "building"][0]
    assert len(BOX.findall(find_all.answer)) == 3
    area = [s for s in by_q[("vqa", "area")]]
    assert area and area[0].answer in {"between 100 m² and 1000 m²", "more than 1000 m²"}
    caption = [s for s in samples if s.task == "caption"][0].answer
    assert "three buildings" in caption.lower() and "parking lot" in caption


def test_cli_build_data_and_errors(small_region: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    rc = main(["build-data", "--region", str(small_region), "--out", str(out), "--chip-size",
               "256", "--tasks", "caption,vqa", "--quiet"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["train"]["tasks"]) <= {"caption", "vqa"}
    assert main(["build-data", "--region", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "region not found" in capsys.readouterr().err
    assert main(["build-data", "--region", str(small_region), "--out", str(out),
                 "--tasks", "poems"]) == 2


def test_kampala_demo_region_builds(tmp_path: Path) -> None:
    spec = load_region(KAMPALA, chip_size=512, val_fraction=0.0)
    builder = RegionBuilder(spec, BuildConfig(seed=0))
    records = builder.contexts()
    assert len(records) == 6  # 1536 x 1024 px in 512 px chips
    n_buildings = sum(len(r.ctx.of_class("building")) for r in records)
    assert 90 <= n_buildings <= 140  # 108 footprints, a few cut by chip borders
    chips = list(builder.chips())
    assert len(chips) == 6 and chips[0][1].pixels.shape == (512, 512, 3)


def test_inputs_with_one_name_are_refused(small_region: Path, tmp_path: Path) -> None:
    spec = load_region(small_region, chip_size=256)
    with pytest.raises(ValueError, match="share the name"):
        build_dataset(tmp_path / "x", [spec, spec], [], BuildConfig(), progress=False)


def test_caption_rewrite_hook(small_region: Path) -> None:
    from training.rewrite import keeps_numbers

    spec = load_region(small_region, chip_size=256, val_fraction=0.0)
    seen: list[dict] = []

    def rewrite(caption: str, facts: dict) -> str:
        seen.append(facts)
        return "" if facts["chip_id"].endswith("0000") else f"Seen from above: {caption}"

    builder = RegionBuilder(spec, BuildConfig(tasks=("caption",), rewrite=rewrite))
    samples = [s for r in builder.contexts() for s in builder.samples_for(r.ctx)]
    assert seen and len(seen) == len(samples)
    assert all(s.answer.startswith("Seen from above: ") == s.meta["rewritten"] for s in samples)
    assert any(not s.meta["rewritten"] for s in samples)  # empty rewrites keep the template
    assert keeps_numbers("Three buildings, 120 m² and 4 roads.", "4 roads; 120 m² of roofs")
    assert not keeps_numbers("It covers 120 m².", "It covers about 100 m².")


def test_cli_build_data_bbox_takes_negative_coordinates(tmp_path: Path, capsys) -> None:
    """A region west of Greenwich (UTM 10N, San Francisco) limited with `--bbox -122...`."""
    from tiles.geometry import LONLAT, transform_bounds
    from training.synthetic import make_region

    region = tmp_path / "sf"
    make_region(region, 512, 512, n_buildings=20, n_roads=1, n_parking=1, n_trees=5, seed=3,
                crs="EPSG:32610", origin=(550000.0, 4180000.0))
    w, s, e, n = transform_bounds((550010.0, 4180000.0 - 66.8, 550066.8, 4179990.0),
                                  "EPSG:32610", LONLAT)  # inside the north-west chip
    assert w < 0
    base = ["build-data", "--region", str(region), "--chip-size", "256", "--tasks", "caption",
            "--quiet", "--val-fraction", "0"]
    assert main([*base, "--out", str(tmp_path / "all")]) == 0
    every = json.loads(capsys.readouterr().out)
    assert main([*base, "--out", str(tmp_path / "west"), "--bbox", f"{w},{s},{e},{n}"]) == 0
    west = json.loads(capsys.readouterr().out)
    assert 0 < west["train"]["samples"] < every["train"]["samples"]
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage and the reason
        main([*base, "--out", str(tmp_path / "bad"), "--bbox", "-122.5,37.9,-122.6,38"])
    assert exit_info.value.code == 2 and "W < E" in capsys.readouterr().err


def test_scene_captions_name_a_class_as_a_sentence_would() -> None:
    """A class named by an adjective, a mass noun or a plural gets a noun and the right
    article: a language model trained on "This remote sensing image shows a center." said just
    that of a housing estate."""
    import random

    from rsvlm.scene import scene_noun
    from training.classification import class_words, scene_caption

    assert scene_noun(class_words("DenseResidential")) == "a dense residential area"
    assert scene_noun(class_words("Industrial")) == "an industrial area"
    assert scene_noun(class_words("Center")) == "a town center"
    assert scene_noun(class_words("StorageTanks")) == "storage tanks"
    assert scene_noun(class_words("BareLand")) == "bare land"
    assert scene_noun(class_words("Airport")) == "an airport"
    rng = random.Random(0)
    for label in ("sparse residential", "farmland", "airport", "center"):
        for _ in range(10):
            caption = scene_caption(label, rng)
            assert label in caption and caption.endswith(".")
            assert f"of a {label}." not in caption.replace("a town center", "")
            assert " a farmland" not in caption and " an storage" not in caption
