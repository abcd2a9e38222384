"""Dihedral augmentation: pixels and objects move together; validation stays untouched."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import shapely

from training.augment import augment_choices, dihedral_context, dihedral_pixels
from training.build import BuildConfig, build_dataset
from training.region import ChipContext, ChipObject, load_region

BOX = re.compile(r"<box>\[(\d+),(\d+),(\d+),(\d+)\]</box>")


def _obj(x1: float, y1: float, x2: float, y2: float) -> ChipObject:
    return ChipObject(cls="building", plural="buildings", detail="", attributes=[], tags={},
                      kind="area", geom=shapely.box(x1, y1, x2, y2), box=(x1, y1, x2, y2),
                      area_m2=(x2 - x1) * (y2 - y1), length_m=0.0, visible=1.0)


@pytest.mark.parametrize("k", range(1, 8))
def test_pixels_and_boxes_move_together(k: int) -> None:
    size = 64
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[5:15, 40:60] = 255  # a bright 20 x 10 px roof: x 40-60, y 5-15
    ctx = ChipContext("c", size, size, 0.5, [_obj(40, 5, 60, 15)])
    moved = dihedral_context(ctx, k)
    out = dihedral_pixels(pixels, k)
    ys, xs = np.nonzero(out[..., 0])
    x1, y1, x2, y2 = moved.objects[0].box
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)
    assert moved.objects[0].geom.bounds == (x1, y1, x2, y2)
    assert moved.chip_id == f"c_d{k}" and moved.meta["origin_chip"] == "c"
    assert ctx.objects[0].box == (40, 5, 60, 15)  # the original is not touched


def test_all_eight_views_differ_and_choices_are_seeded() -> None:
    pixels = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    views = [pixels] + [dihedral_pixels(pixels, k) for k in range(1, 8)]
    assert len({v.tobytes() for v in views}) == 8
    assert augment_choices(3, 0, "r", "a") == augment_choices(3, 0, "r", "a")
    assert len(augment_choices(3, 0, "r", "a")) == 3
    assert augment_choices(7, 0, "r", "a") == list(range(1, 8))
    with pytest.raises(ValueError, match="0-7"):
        augment_choices(8, 0, "r", "a")
    with pytest.raises(ValueError, match="square"):
        dihedral_context(ChipContext("c", 64, 32, 0.5, []), 1)


def test_augmented_build_keeps_validation_and_texts(small_region: Path, tmp_path: Path) -> None:
    spec = load_region(small_region, chip_size=128, val_fraction=0.25, block_chips=2)
    plain, aug = tmp_path / "plain", tmp_path / "aug"
    build_dataset(plain, [spec], [], BuildConfig(seed=5), progress=False)
    build_dataset(aug, [spec], [], BuildConfig(seed=5, augment=2), progress=False)
    for name in ("val.jsonl", "texts.jsonl"):
        assert (aug / name).read_bytes() == (plain / name).read_bytes(), name
    chips = [json.loads(x) for x in (aug / "chips.jsonl").read_text().splitlines()]
    views = [c for c in chips if c.get("origin")]
    n_train = sum(1 for c in chips if not c.get("origin") and c["split"] == "train")
    assert len(views) == 2 * n_train and all(c["split"] == "train" for c in views)
    assert json.loads((aug / "dataset_card.json").read_text())["augmented_chips"] == len(views)
    # A view's boxes are its origin's boxes moved by the view's transform.
    rows = [json.loads(x) for x in (aug / "train.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in rows}
    checked = 0
    for c in views:
        k = int(c["id"].rsplit("_d", 1)[1])
        for r in rows:
            if r["image"] != c["image"] or r["task"] != "grounding" or \
                    r["meta"].get("type") != "find_all":
                continue
            origin = by_id.get(r["id"].replace(f"_d{k}/", "/"))
            if origin is None or origin["conversations"][0] != r["conversations"][0]:
                continue
            size = 128
            mask = np.zeros((size, size), np.uint8)
            for b in BOX.findall(origin["conversations"][1]["value"]):
                x1, y1, x2, y2 = (round(int(v) * size / 1000) for v in b)
                mask[y1:y2, x1:x2] = 1
            moved = dihedral_pixels(mask[..., None], k)[..., 0]
            got = np.zeros_like(mask)
            for b in BOX.findall(r["conversations"][1]["value"]):
                x1, y1, x2, y2 = (round(int(v) * size / 1000) for v in b)
                got[y1:y2, x1:x2] = 1
            assert (got != moved).mean() < 0.02
            checked += 1
    assert checked, "no find-all question shared by a view and its origin"


def test_classification_images_get_views_with_their_class(small_region: Path,
                                                          image_folder: Path,
                                                          tmp_path: Path) -> None:
    from PIL import Image

    spec = load_region(small_region, chip_size=128, val_fraction=0.25, block_chips=2)
    plain, aug = tmp_path / "plain", tmp_path / "aug"
    cfg = dict(seed=5, tasks=("caption", "vqa"))
    build_dataset(plain, [spec], [image_folder], BuildConfig(**cfg), folder_val_fraction=0.25,
                  progress=False)
    build_dataset(aug, [spec], [image_folder], BuildConfig(**cfg, augment=2),
                  folder_val_fraction=0.25, progress=False)
    for name in ("val.jsonl", "texts.jsonl"):  # nothing held back, no database text added
        assert (aug / name).read_bytes() == (plain / name).read_bytes(), name
    rows = {r["image"]: r for r in map(json.loads, (aug / "train.jsonl").read_text().splitlines())
            if r["task"] == "classification"}
    plain_train = [r for r in map(json.loads, (plain / "train.jsonl").read_text().splitlines())
                   if r["task"] == "classification"]
    chips = [json.loads(x) for x in (aug / "chips.jsonl").read_text().splitlines()]
    views = [c for c in chips if c.get("origin") and c["image"] in rows]
    assert plain_train and len(views) == 2 * len(plain_train)
    for c in views:
        view, origin = rows[c["image"]], c["origin"]
        k = int(Path(c["image"]).stem.rsplit("_d", 1)[1])
        assert view["conversations"][1]["value"] == rows[origin]["conversations"][1]["value"]
        assert c["classes"] == [rows[origin]["meta"]["cls"]] and c["split"] == "train"
        with Image.open(aug / origin) as a, Image.open(aug / c["image"]) as b:
            assert np.array_equal(np.asarray(b), dihedral_pixels(np.asarray(a), k))
    card = json.loads((aug / "dataset_card.json").read_text())
    assert card["augmented_chips"] == sum(1 for c in chips if c.get("origin"))
