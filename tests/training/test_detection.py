"""The dense detector's targets, decoding, loss and training on cached features, and the
labelled sets' box geometry (crops, quarter turns, mirrors, masks)."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rsvlm.detector import (
    DenseDetector,
    Detection,
    DetectorEnsemble,
    box_edges,
    decode,
    detection_loss,
    detection_targets,
    edges_to_box,
    suppress,
)
from rsvlm.perception import DetectorConfig, load_detector, save_detector
from training.detection import (
    _rot90_boxes,
    augment_view,
    score_detections,
    score_large,
    train_detector,
    train_heads,
)
from training.labelled import LabelledImage, crop_boxes, cut_boxes, cut_tiles, mask_boxes, tiles


def test_targets_decode_back_to_the_boxes() -> None:
    boxes = torch.tensor([[0.10, 0.20, 0.30, 0.35], [0.55, 0.60, 0.90, 0.95]])
    heat, target, weight = detection_targets([boxes], [torch.zeros(2, dtype=torch.long)], 16, 1)
    # Every patch whose centre is inside a box learns it: 3 x 3 and 5 x 5 patches.
    assert (weight > 0).sum() == 3 * 3 + 5 * 5 and heat.max() == 1.0
    centre = torch.arange(16) + 0.5
    cx, cy = centre.view(1, 16).expand(16, 16), centre.view(16, 1).expand(16, 16)
    dist = torch.stack([cx - target[0, 0], cy - target[0, 1], target[0, 2] - cx,
                        target[0, 3] - cy]).clamp(min=1e-3)
    logits = torch.logit(heat.clamp(1e-4, 1 - 1e-4))
    (dets,) = decode(logits, dist.log().unsqueeze(0), ["building"], threshold=0.99)
    got = sorted(d.box for d in dets)
    assert len(got) == 2
    assert np.allclose(got, boxes.tolist(), atol=1e-3)
    assert all(d.label == "building" for d in dets)


def test_centre_sampling_makes_the_cells_near_a_large_objects_centre_centres_too() -> None:
    # A roof of 6 x 6 cells and a shed smaller than a cell, on a 16-cell map.
    boxes = torch.tensor([[0.25, 0.25, 0.625, 0.625], [0.80, 0.80, 0.84, 0.84]])
    classes = [torch.zeros(2, dtype=torch.long)]
    one, _, _ = detection_targets([boxes], classes, 16, 1)
    near, _, weight = detection_targets([boxes], classes, 16, 1, centre_radius=1)
    assert (one == 1.0).sum() == 2
    # the roof: its centre cell and the 8 around it; the shed: its own cell only
    assert (near == 1.0).sum() == 9 + 1
    assert (near[0, 0, 6:9, 6:9] == 1.0).all() and near[0, 0, 13, 13] == 1.0
    assert (near >= one).all() and torch.equal(weight, detection_targets([boxes], classes, 16,
                                                                         1)[2])


def test_loss_prefers_the_right_heatmap() -> None:
    boxes = [torch.tensor([[0.1, 0.1, 0.3, 0.3]])]
    heat, target, weight = detection_targets(boxes, [torch.zeros(1, dtype=torch.long)], 8, 1)
    good = torch.logit(heat.clamp(1e-3, 1 - 1e-3))
    box = torch.zeros(1, 4, 8, 8)  # every patch: a box of 2 x 2 patches around its centre
    assert detection_loss(good, box, heat, target, weight) < detection_loss(
        -good, box, heat, target, weight)
    # ... and boxes of the object's size, at the patches inside it, beat the wrong size.
    assert detection_loss(good, box + np.log(0.8), heat, target, weight) < detection_loss(
        good, box + np.log(3.0), heat, target, weight)


def test_overlapping_boxes_of_a_class_are_suppressed() -> None:
    roof = Detection("building", 0.9, (0.1, 0.1, 0.5, 0.5))
    half = Detection("building", 0.6, (0.1, 0.1, 0.3, 0.5))  # IoU 0.5 with the roof, inside it
    part = Detection("building", 0.5, (0.3, 0.3, 0.45, 0.45))  # IoU 0.14, all inside
    near = Detection("building", 0.8, (0.45, 0.1, 0.8, 0.5))  # touches the roof: kept
    tree = Detection("tree", 0.4, (0.1, 0.1, 0.5, 0.5))  # another class: kept
    kept = suppress([part, half, roof, tree, near])
    assert kept == [roof, near, tree]


def test_the_head_learns_boxes_from_features() -> None:
    """Features that mark object patches: the trained head finds those objects."""
    g, hidden, rng = 8, 16, np.random.default_rng(0)
    feats, boxes = [], []
    for _ in range(24):
        f = torch.randn(2, g * g, hidden) * 0.1
        n = rng.integers(0, 4)
        bx = []
        for _ in range(n):
            r, c = rng.integers(0, g, size=2)
            f[:, r * g + c, 0] += 3.0
            bx.append([(c + 0.1) / g, (r + 0.1) / g, (c + 0.9) / g, (r + 0.9) / g])
        feats.append(f)
        boxes.append(torch.tensor(bx, dtype=torch.float32).reshape(-1, 4))
    x = torch.stack(feats)
    head = train_detector(x, boxes, hidden=hidden, levels=2, epochs=25, batch_size=8,
                          lr=1e-2, dim=16)
    assert isinstance(head, DenseDetector)
    from training.detection import predict

    preds = predict(head, x, 0.3)
    report = score_detections(preds, boxes, [(112, 112)] * len(boxes), 0.3)
    assert report["f1"] > 0.8 and report["presence"] > 0.9, report


def test_maps_finer_than_the_patches_find_objects_in_neighbouring_patches() -> None:
    """Pairs of objects side by side, their centres in neighbouring patches: on the patch grid
    the two peaks are neighbours and one of them goes (3 x 3 local maxima), on maps twice as
    fine they are two cells apart and both stay."""
    g, hidden, rng = 8, 16, np.random.default_rng(0)
    feats, boxes = [], []
    for _ in range(32):
        f = torch.randn(1, g * g, hidden) * 0.1
        bx = []
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, g), rng.integers(0, g - 1)
            f[:, r * g + c, 0] += 3.0
            f[:, r * g + c + 1, 0] += 3.0
            bx += [[(c + 0.1) / g, (r + 0.1) / g, (c + 0.9) / g, (r + 0.9) / g],
                   [(c + 1.1) / g, (r + 0.1) / g, (c + 1.9) / g, (r + 0.9) / g]]
        feats.append(f)
        boxes.append(torch.tensor(bx, dtype=torch.float32).reshape(-1, 4))
    x = torch.stack(feats)
    from training.detection import predict

    recall = {}
    for up in (1, 2):
        head = train_detector(x, boxes, hidden=hidden, levels=1, epochs=30, batch_size=8,
                              lr=1e-2, dim=16, upsample=up)
        assert head([x[:1, 0].float()])[0].shape[-1] == g * up
        report = score_detections(predict(head, x, 0.3), boxes, [(112, 112)] * len(boxes), 0.3)
        recall[up] = report["recall"]
    assert recall[1] <= 0.55 and recall[2] >= 0.75, recall


def test_large_objects_score_without_the_small_ones() -> None:
    # 100 x 100 px image, objects of 400 px and more count: two large footprints, two small.
    truth = torch.tensor([[0.0, 0.0, 0.3, 0.3], [0.5, 0.5, 0.8, 0.8],
                          [0.0, 0.9, 0.1, 1.0], [0.9, 0.0, 1.0, 0.1]])
    preds = [[(0.0, 0.0, 0.3, 0.3, 0.9),   # finds a large one
              (0.0, 0.9, 0.1, 1.0, 0.9),   # finds a small one: counts for nothing
              (0.4, 0.0, 0.45, 0.05, 0.9),  # a small false box: ignored
              (0.3, 0.6, 0.5, 0.9, 0.9),   # a large false box: wrong
              (0.5, 0.5, 0.8, 0.8, 0.2)]]  # under the threshold
    got = score_large(preds, [truth], [(100, 100)], 0.5, min_px=400)
    assert (got["tp"], got["predicted"], got["true"]) == (1, 2, 2)
    assert got["precision"] == 0.5 and got["recall"] == 0.5
    assert got["counting"]["within_20pct"] == 1.0  # 2 large boxes said, 2 large footprints
    everything = score_detections(preds, [truth], [(100, 100)], 0.5)
    assert (everything["tp"], everything["predicted"], everything["true"]) == (2, 4, 4)
    # A threshold of 0.1 keeps the last box too: both large footprints found, 3 large boxes.
    low = score_large(preds, [truth], [(100, 100)], 0.1, min_px=400)
    assert (low["tp"], low["predicted"], low["recall"]) == (2, 3, 1.0)
    assert low["counting"]["within_20pct"] == 0.0


def test_small_buildings_train_nothing_where_they_lie() -> None:
    from training.detection import box_areas, small_objects_mask

    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 0.53, 0.53]])
    assert box_areas(boxes).tolist() == pytest.approx([0.25, 0.0009], abs=1e-6)
    # per view (building, aircraft) as `known` gives it; the small roof of view 0 left out of
    # the building heatmap over its patch and the ring around it, nowhere else
    known = torch.tensor([[True, True], [True, False]])
    got = small_objects_mask(known, [boxes[1:], boxes[:0]], [0, 0], 2, 16)
    assert got.shape == (2, 2, 16, 16)
    assert not got[0, 0, 7:10, 7:10].any() and got[0, 0].sum() == 256 - 9
    assert got[0, 1].all() and got[1, 0].all() and not got[1, 1].any()
    assert small_objects_mask(None, [boxes[1:]], [0], 1, 16).sum() == 256 - 9


def test_a_head_trained_without_the_small_buildings_still_finds_the_large_ones() -> None:
    torch.manual_seed(0)
    n, grid, hidden = 24, 8, 16
    x = torch.randn(n, 1, grid * grid, hidden) * 0.1
    boxes = []
    for i in range(n):
        r, c = divmod(i % 16, 4)
        big = torch.tensor([[c / 4, r / 4, c / 4 + 0.25, r / 4 + 0.25]])
        x[i, 0, (2 * r) * grid + 2 * c, :4] += 3.0  # the big roof's centre patch
        small = torch.tensor([[0.9, 0.9, 0.92, 0.92]])
        boxes.append(torch.cat([big, small]))
    head = train_detector(x, boxes, hidden=hidden, levels=1, epochs=30, dim=16, lr=1e-2,
                          ignore_below=0.004)
    from training.detection import predict

    preds = predict(head, x, 0.3)
    report = score_detections(preds, [b[:1] for b in boxes], [(80, 80)] * n, 0.3)
    assert report["recall"] > 0.8, report


def test_quarter_turns_and_mirrors_move_boxes_with_the_pixels() -> None:
    img = np.zeros((40, 60, 3), np.uint8)
    img[5:15, 10:30] = 255
    item = LabelledImage("r", "x", img, np.array([[10, 5, 30, 15]], np.float32), ["building"])
    for k in range(4):
        rotated = np.rot90(img, k)
        (box,) = _rot90_boxes(item.boxes, 60, 40, k)
        assert np.allclose(box, mask_boxes(rotated[..., 0])[0]), k
    rng = random.Random(0)
    for i in range(20):  # augmented views: the box still frames the bright pixels
        v = augment_view(item, rng, 30, f"v{i}")
        if len(v.boxes):
            (x1, y1, x2, y2) = v.boxes[0]
            inside = v.image[int(y1) + 1:int(y2) - 1, int(x1) + 1:int(x2) - 1].mean()
            assert inside > 150, (i, v.boxes)


def test_panchromatic_and_hue_turned_views() -> None:
    img = np.zeros((64, 64, 3), np.uint8)
    img[..., 0] = 200  # a red field
    img[16:48, 16:48] = (40, 60, 220)  # a blue roof
    item = LabelledImage("r", "x", img, np.array([[16, 16, 48, 48]], np.float32), ["building"])
    rng = random.Random(0)
    views = [augment_view(item, rng, 64, f"v{i}", gray=1.0) for i in range(5)]
    for v in views:  # every view panchromatic: three equal bands
        assert np.array_equal(v.image[..., 0], v.image[..., 1])
        assert np.array_equal(v.image[..., 1], v.image[..., 2])
    plain = [augment_view(item, random.Random(i), 64, "p") for i in range(30)]
    turned = [augment_view(item, random.Random(i), 64, "t", hue=0.3) for i in range(30)]
    # the same crops and boxes; about half the views' colours move
    assert all(np.array_equal(p.boxes, t.boxes) for p, t in zip(plain, turned, strict=True))
    moved = sum(np.abs(p.image.astype(int) - t.image).mean() > 10
                for p, t in zip(plain, turned, strict=True))
    assert 5 <= moved <= 25, moved
    assert not any(np.array_equal(v.image[..., 0], v.image[..., 2]) for v in turned)


def test_crops_keep_mostly_visible_boxes_and_tiles_cover_the_image() -> None:
    boxes = np.array([[0, 0, 10, 10], [8, 8, 30, 30], [45, 45, 55, 55]], np.float32)
    got = crop_boxes(boxes, 5, 5, 40, 40)
    assert got.tolist() == [[3, 3, 25, 25]]  # a quarter visible: dropped; outside: dropped
    item = LabelledImage("r", "x", np.zeros((100, 250, 3), np.uint8), boxes, ["b"] * 3)
    names = [n for n, _, _ in tiles(item, 50)]
    assert len(names) == 10


def test_objects_cut_by_the_edge_are_kept_or_ignored_by_their_visible_share() -> None:
    boxes = np.array([[0, 0, 10, 10], [8, 8, 30, 30], [45, 45, 55, 55], [-6, 20, 4, 30]],
                     np.float32)
    kept, cut = cut_boxes(boxes, 5, 5, 40, 40)
    assert kept.tolist() == [[3, 3, 25, 25]]
    # a quarter of the first inside, a tenth of the last: neither kept nor background
    assert cut.tolist() == [[0, 0, 5, 5]]
    kept, cut = cut_boxes(boxes, 5, 5, 40, 40, min_visible=0.2)
    assert kept.tolist() == [[0, 0, 5, 5], [3, 3, 25, 25]] and cut.tolist() == []
    item = LabelledImage("r", "x", np.zeros((100, 250, 3), np.uint8), boxes, ["b"] * 4)
    assert [b.tolist() for _, _, b, _ in cut_tiles(item, 50)] == [
        b.tolist() for _, _, b in tiles(item, 50)]
    # the box over four tiles a quarter in each, the one off the left edge 40 % inside
    assert sum(len(c) for *_, c in cut_tiles(item, 50)) == 5


def test_a_view_cut_again_under_another_rule_is_the_same_view() -> None:
    img = np.zeros((120, 120, 3), np.uint8)
    boxes = np.array([[x, y, x + 18, y + 14] for x in range(0, 110, 25) for y in range(0, 110, 30)],
                     np.float32)
    img[10:20, 10:20] = 200
    item = LabelledImage("r", "x", img, boxes, ["building"] * len(boxes))
    half = [augment_view(item, random.Random(i), 60, "v") for i in range(20)]
    third = [augment_view(item, random.Random(i), 60, "v", min_visible=0.3) for i in range(20)]
    for a, b in zip(half, third, strict=True):
        assert np.array_equal(a.image, b.image)
        # the 0.3 rule keeps what 0.5 kept and some of what it ignored, nothing else
        assert len(b.boxes) + len(b.ignore) == len(a.boxes) + len(a.ignore)
        assert {tuple(r) for r in a.boxes.tolist()} <= {tuple(r) for r in b.boxes.tolist()}
    assert sum(len(v.ignore) for v in half) > sum(len(v.ignore) for v in third) > 0
    for v in half:  # ignored boxes turn and mirror with the view: inside it, touching an edge
        side = v.image.shape[0]
        for x1, y1, x2, y2 in v.ignore.tolist():
            assert 0 <= x1 < x2 <= side and 0 <= y1 < y2 <= side
            assert min(x1, y1) == 0 or max(x2, y2) == side


def test_objects_cut_by_the_edge_train_nothing_where_they_lie(monkeypatch) -> None:
    import training.detection as det

    feats = torch.randn(4, 1, 64, 8)
    boxes = [torch.tensor([[0.3, 0.3, 0.6, 0.6]])] * 4
    ignore = [torch.tensor([[0.0, 0.0, 0.2, 0.5]])] * 4
    calls = []
    original = det.detection_loss

    def spy(heat, box, th, tt, tm, mask=None, **kw):
        calls.append(mask)
        return original(heat, box, th, tt, tm, mask, **kw)

    monkeypatch.setattr(det, "detection_loss", spy)
    train_detector(feats, boxes, hidden=8, levels=1, epochs=1, batch_size=4, dim=8,
                   ignore=ignore)
    (mask,) = calls
    # 8 x 8 patches: the sliver's columns 0-1 and rows 0-4, and the ring around them
    assert not mask[:, 0, :6, :3].any() and mask[:, 0].sum() == 4 * (64 - 18)


@pytest.mark.parametrize("mask, n", [(np.zeros((8, 8)), 0), (np.eye(8) * 255, 0)])
def test_mask_boxes_drop_specks(mask, n) -> None:
    assert len(mask_boxes(mask, min_pixels=12)) == n


def test_a_head_trained_on_principal_components_takes_the_full_levels() -> None:
    from training.detection import compose_projection, principal_components, reduce_features

    x = torch.randn(6, 3, 16, 8).half()
    mean, comps = principal_components(x, 5, samples=96)
    reduced = reduce_features(x, mean, comps)
    assert reduced.shape == (6, 1, 16, 5)
    small = DenseDetector(5, 1, dim=8)
    full = compose_projection(small.eval(), mean, comps, hidden=8, levels=3)
    with torch.no_grad():
        h1, b1 = small([reduced[:, 0].float()])
        h2, b2 = full([x[:, j].float() for j in range(3)])
    assert torch.allclose(h1, h2, atol=1e-2) and torch.allclose(b1, b2, atol=1e-2)


def test_balanced_components_keep_a_narrow_level_that_raw_ones_drop() -> None:
    from training.detection import compose_projection, principal_components, reduce_features

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 2, 16, 4, generator=gen)
    x[:, 1] *= 50  # a level spreading 50 times as wide, as the tower's last block does
    x = x.half()
    only_first = torch.zeros(1, 2, 1, 4, dtype=torch.half)
    only_first[..., 0, :, :] = 1.0  # moves in the narrow level alone
    spans = {}
    for balance in (False, True):
        mean, comps = principal_components(x, 4, samples=1024, balance=balance)
        moved = reduce_features(only_first, mean, comps) - reduce_features(
            torch.zeros_like(only_first), mean, comps)
        spans[balance] = moved.float().norm().item()
        # the head on the components still reads the full levels exactly
        small = DenseDetector(4, 1, dim=8)
        full = compose_projection(small.eval(), mean, comps, hidden=4, levels=2)
        with torch.no_grad():
            h1, _ = small([reduce_features(x[:2], mean, comps)[:, 0].float()])
            h2, _ = full([x[:2, j].float() for j in range(2)])
        assert torch.allclose(h1, h2, atol=1e-2)
    assert spans[False] < 0.2 * spans[True]


def test_an_ensemble_reads_as_the_mean_of_its_heads() -> None:
    torch.manual_seed(0)
    heads = [DenseDetector(8, 2, dim=8).eval() for _ in range(3)]
    levels = [torch.randn(2, 36, 8), torch.randn(2, 36, 8)]
    with torch.inference_mode():
        heat, box = DetectorEnsemble(heads)(levels)
        outs = [h(levels) for h in heads]
    prob = torch.stack([o[0].sigmoid() for o in outs]).mean(0)
    edges = torch.stack([box_edges(o[1]) for o in outs]).mean(0)
    assert torch.allclose(heat.sigmoid(), prob, atol=1e-5)
    inside = (edges[:, :2] < 3.5).all(1) & (edges[:, 2:] > 3.5).all(1)  # the middle patch
    assert torch.allclose(box_edges(box)[:, :, 3, 3][inside[:, 3, 3]],
                          edges[:, :, 3, 3][inside[:, 3, 3]], atol=1e-4)


def test_box_edges_and_their_inverse_agree() -> None:
    box = torch.randn(2, 4, 6, 6) * 0.5
    assert torch.allclose(edges_to_box(box_edges(box)), box, atol=1e-4)


def test_an_ensemble_saves_loads_and_continues(tmp_path) -> None:
    config = DetectorConfig(hidden=8, layers=[1, 2], dim=8, heads=2)
    head = config.build()
    assert isinstance(head, DetectorEnsemble) and len(head.members) == 2
    save_detector(head, config, tmp_path)
    loaded, again = load_detector(tmp_path)
    assert again.heads == 2 and isinstance(loaded, DetectorEnsemble)
    levels = [torch.randn(1, 16, 8), torch.randn(1, 16, 8)]
    with torch.inference_mode():
        assert torch.equal(head.eval()(levels)[0], loaded(levels)[0])
    boxes = [torch.tensor([[0.2, 0.2, 0.6, 0.6]])]
    tuned = train_detector(torch.randn(1, 2, 16, 8), boxes, hidden=8, levels=2, epochs=2,
                           batch_size=1, init=loaded)
    assert isinstance(tuned, DetectorEnsemble)
    assert not torch.equal(tuned.members[0].heat.weight, loaded.members[0].heat.weight)


def test_heads_are_kept_as_they_finish_and_taken_back(tmp_path) -> None:
    x = torch.randn(4, 2, 16, 8)
    boxes = [torch.tensor([[0.1, 0.1, 0.5, 0.5]])] * 4
    kw = dict(hidden=8, levels=2, epochs=1, batch_size=2, dim=8)
    first = train_heads(x, boxes, heads=2, members=tmp_path, **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed0.safetensors",
                                                          "seed1.safetensors"]
    w = first.members[1].heat.weight
    assert not torch.equal(first.members[0].heat.weight, w)  # other seeds, other heads
    again = train_heads(x, boxes, heads=2, members=tmp_path, **{**kw, "epochs": 5})
    assert torch.equal(again.members[1].heat.weight, w)  # read back, not trained again


def test_a_heatmap_an_image_does_not_know_about_trains_nothing() -> None:
    """A set that labels only trees says nothing of its buildings: with ``known``, the
    building heatmap of such an image gets no gradient, the tree heatmap does."""
    boxes = [torch.tensor([[0.1, 0.1, 0.3, 0.3]])]
    heat, target, weight = detection_targets(boxes, [torch.ones(1, dtype=torch.long)], 8, 2)
    logits = torch.zeros(1, 2, 8, 8, requires_grad=True)
    box = torch.zeros(1, 4, 8, 8)
    detection_loss(logits, box, heat, target, weight,
                   known=torch.tensor([[False, True]])).backward()
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[0, 1].abs().sum() > 0
    logits.grad = None
    detection_loss(logits, box, heat, target, weight).backward()  # unmasked: both train
    assert logits.grad[0, 0].abs().sum() > 0


def test_a_head_learns_two_classes_from_sets_that_each_label_one() -> None:
    """Views of two kinds, each labelling its own class (a feature marks its objects) and
    knowing nothing of the other's: the head finds each class on the views of its kind."""
    from training.detection import predict

    g, hidden, rng = 8, 16, np.random.default_rng(1)
    feats, boxes, classes = [], [], []
    for i in range(48):
        cls = i % 2
        f = torch.randn(2, g * g, hidden) * 0.1
        bx = []
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, g, size=2)
            f[:, r * g + c, cls] += 3.0
            bx.append([(c + 0.1) / g, (r + 0.1) / g, (c + 0.9) / g, (r + 0.9) / g])
        feats.append(f)
        boxes.append(torch.tensor(bx, dtype=torch.float32))
        classes.append(cls)
    x = torch.stack(feats)
    known = torch.tensor([[c == 0, c == 1] for c in classes])
    head = train_detector(x, boxes, hidden=hidden, levels=2, epochs=25, batch_size=8, lr=1e-2,
                          dim=16, classes=2, view_classes=classes, known=known)
    assert head.heat.out_channels == 2
    for cls in (0, 1):
        mine = [i for i, c in enumerate(classes) if c == cls]
        preds = predict(head, x[mine], 0.3, cls=cls)
        report = score_detections(preds, [boxes[i] for i in mine], [(112, 112)] * len(mine), 0.3)
        assert report["f1"] > 0.8, (cls, report)


def test_inside_a_labelled_object_the_other_classes_learn_background() -> None:
    """``known`` per patch: an image that labels aircraft says nothing of its buildings, but
    inside an aircraft's box the building heatmap is known to be background (what
    `train_detector(object_negatives=True)` passes)."""
    boxes = [torch.tensor([[0.25, 0.25, 0.75, 0.75]])]
    heat, target, weight = detection_targets(boxes, [torch.ones(1, dtype=torch.long)], 8, 2)
    known = torch.tensor([[False, True]])[:, :, None, None] | (weight > 0)[:, None]
    logits = torch.zeros(1, 2, 8, 8, requires_grad=True)
    detection_loss(logits, torch.zeros(1, 4, 8, 8), heat, target, weight, known).backward()
    building = logits.grad[0, 0]
    assert (building[weight[0] > 0] > 0).all()  # pushed down where the aircraft is
    assert building[weight[0] == 0].abs().sum() == 0  # nothing said elsewhere


def test_an_iou_target_asks_a_centre_to_score_how_well_its_box_fits() -> None:
    """With ``iou_target`` a centre whose box overlaps its object by about half is best scored
    about a half, not 1 as CenterNet's target asks; a well-fitting box's centre scores high."""
    boxes = [torch.tensor([[0.25, 0.25, 0.5, 0.5]])]  # 2 x 2 patches of an 8 x 8 grid
    heat, target, weight = detection_targets(boxes, [torch.zeros(1, dtype=torch.long)], 8, 1)
    row = col = 3  # the centre patch (3.0 in patches, at the corner of four)
    assert heat[0, 0, row, col] == 1.0
    fits = edges_to_box(target)  # every patch inside the object predicts it exactly
    loose = edges_to_box(target + torch.tensor([-1.0, -1.0, 1.0, 1.0]).view(1, 4, 1, 1))

    def loss(box: torch.Tensor, p: float, iou_target: bool) -> float:
        logits = torch.full((1, 1, 8, 8), -6.0)
        logits[0, 0, row, col] = float(torch.logit(torch.tensor(p)))
        return float(detection_loss(logits, box, heat, target, weight, iou_target=iou_target))

    # a box of twice the object's side: IoU 0.25, so the centre is asked 0.3 (the floor)
    assert loss(loose, 0.3, True) < loss(loose, 0.95, True)
    assert loss(loose, 0.95, False) < loss(loose, 0.3, False)  # CenterNet asks 1 whatever the box
    assert loss(fits, 0.95, True) < loss(fits, 0.3, True)


def test_coarse_views_are_cut_wider_so_roofs_read_smaller() -> None:
    img = np.zeros((400, 400, 3), np.uint8)
    boxes = np.array([[x, y, x + 20, y + 20] for x in range(10, 390, 40) for y in range(10, 390, 40)],
                     np.float32)
    item = LabelledImage("r", "x", img, boxes, ["building"] * len(boxes))
    plain = [augment_view(item, random.Random(i), 100, "p") for i in range(20)]
    wide = [augment_view(item, random.Random(i), 100, "w", coarse=1.0) for i in range(20)]
    assert all(70 <= v.image.shape[0] <= 140 for v in plain)
    assert all(200 <= v.image.shape[0] <= 350 for v in wide)
    # a roof keeps its 20 px, so against the view's side it is 2-3.5 times smaller: more fit
    assert np.mean([len(v.boxes) for v in wide]) > 4 * np.mean([len(v.boxes) for v in plain])
    some = [augment_view(item, random.Random(i), 100, "s", coarse=0.3) for i in range(200)]
    assert 30 <= sum(v.image.shape[0] >= 200 for v in some) <= 90


@pytest.mark.parametrize("dilation, steps", [(1, [1, 1, 1]), (2, [1, 2, 4])])
def test_dilated_convolutions_keep_the_grid_and_round_trip_their_config(dilation, steps,
                                                                        tmp_path) -> None:
    from rsvlm.perception import DetectorConfig, load_detector, save_detector

    torch.manual_seed(0)
    head = DenseDetector(4, 1, dim=8, convs=3, dilation=dilation).eval()
    assert [m.dilation[0] for m in head.body if isinstance(m, torch.nn.Conv2d)] == steps
    heat, box = head([torch.randn(1, 32 * 32, 4)])
    assert heat.shape == (1, 1, 32, 32) and box.shape == (1, 4, 32, 32)
    save_detector(head, DetectorConfig(hidden=4, layers=[9], dim=8, convs=3,
                                       dilation=dilation), tmp_path)
    loaded, config = load_detector(tmp_path)
    assert config.dilation == dilation
    assert all(a.equal(b) for a, b in zip(loaded.state_dict().values(),
                                          head.state_dict().values(), strict=True))


def test_loveda_buildings_are_the_mask_components_of_its_building_id(tmp_path: Path) -> None:
    from PIL import Image

    from training.labelled import LOVEDA_BUILDING, load_sets

    folder = tmp_path / "labelled_more" / "mmseg_test_samples" / "pseudo_loveda_dataset"
    (folder / "img_dir").mkdir(parents=True)
    (folder / "ann_dir").mkdir()
    label = np.ones((64, 64), np.uint8)  # background
    label[4:10, 5:20] = LOVEDA_BUILDING
    label[30:50, 40:44] = LOVEDA_BUILDING
    label[55:60, :] = 3  # a road is not a building
    Image.fromarray(label, "L").save(folder / "ann_dir" / "0.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "img_dir" / "0.png")
    (item,) = load_sets(tmp_path, ["loveda"])["loveda"]
    assert item.region == "loveda" and item.gsd == 0.3 and item.image.shape == (64, 64, 3)
    assert sorted(item.boxes.tolist()) == [[5, 4, 20, 10], [40, 30, 44, 50]]
    assert item.labels == ["building", "building"]
    # Without the crops the set is skipped, and says so, as every other missing set is.
    assert "loveda" not in load_sets(tmp_path / "absent", ["loveda"])
