"""scripts/loro_tta.py: a tile read in its flips and transposes, each reading turned back into
the tile's frame."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rsvlm.detector import edges_to_box

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tta():
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("loro_tta", ROOT / "scripts" / "loro_tta.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["loro_tta"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_orientations_turn_back_into_the_image_frame(tta) -> None:
    # A map that knows one object (a peak and its box) is shown to a "head" in every
    # orientation: each reading, turned back, finds the object where it is in the image.
    g, box = 8, (4.2, 0.3, 6.9, 2.5)  # x1, y1, x2, y2 in patches; centre in row 1, col 5
    image = np.zeros((g, g), np.float32)
    image[1, 5] = 1.0

    class Oracle(torch.nn.Module):
        """Reads the peak off its input and says the box as that orientation sees it."""

        def forward(self, levels):
            heat = levels[0].view(-1, 1, g, g)
            out = torch.zeros(heat.shape[0], 4, g, g)
            for i, o in enumerate(oriented):
                x1, y1, x2, y2 = box
                if o.transpose:
                    x1, y1, x2, y2 = y1, x1, y2, x2
                if o.hflip:
                    x1, x2 = g - x2, g - x1
                if o.vflip:
                    y1, y2 = g - y2, g - y1
                row, col = (heat[i, 0] == 1).nonzero()[0].tolist()
                out[i, :, row, col] = torch.tensor([x1, y1, x2, y2])
            return torch.logit(heat.clamp(1e-4, 1 - 1e-4)), edges_to_box(out)

    oriented = tta.orientations(8)
    seen = torch.stack([torch.from_numpy(np.ascontiguousarray(o.apply(image))).flatten()
                        for o in oriented]).view(8, g * g, 1)
    (det,) = tta.read_oriented(Oracle(), [seen], oriented, ["building"], 0.5)
    assert np.allclose(np.array(det.box) * g, box, atol=1e-3)
    with pytest.raises(ValueError):
        tta.orientations(3)


def test_oriented_features_are_read_at_the_cache_s_levels_and_given_at_the_run_s(
        tta, tmp_path: Path, monkeypatch) -> None:
    # A run whose folds read levels 7 and 11 of a cache that holds 7, 9, 11 and 12: the tiles'
    # eight orientations go through a tower of the cache's levels (kept whole in the cache),
    # and the run gets its own two.
    import json

    run = tmp_path / "run"
    (run / "cache").mkdir(parents=True)
    torch.save({"layers": [7, 9, 11, 12]}, run / "cache" / "kampala_ug.pt")
    (run / "levels.json").write_text(json.dumps({"levels": [7, 11]}))
    built = []

    class Tower:
        def __init__(self, layers):
            built.append(list(layers))
            self.layers = list(layers)

        def __call__(self, images):  # (orientations, levels, patches, hidden): level i is i
            return torch.stack([torch.full((4, 2), float(v)) for v in self.layers]
                               ).expand(len(images), -1, -1, -1)

    class Item:
        gsd = 0.15

    monkeypatch.setattr(tta, "FrozenTower", Tower)
    monkeypatch.setattr(tta, "load_sets", lambda data, names: {"kampala_ug": [Item()]})
    monkeypatch.setattr(tta, "tiles", lambda item, size: [(0, np.zeros((8, 8, 3), np.uint8),
                                                           None)] * 3)
    feats = tta.oriented_features(run, "data", "kampala_ug", None)
    assert built == [[7, 9, 11, 12]]
    assert feats.shape == (3, 8, 2, 4, 2)
    assert feats[0, 0, :, 0, 0].tolist() == [7.0, 11.0]
    assert torch.load(run / "cache" / "kampala_ug.tta.pt").shape[2] == 4
    # Read again from the cache, without a tower.
    again = tta.oriented_features(run, "data", "kampala_ug", None)
    assert built == [[7, 9, 11, 12]] and torch.equal(again, feats)
