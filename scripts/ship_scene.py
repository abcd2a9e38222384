"""Fit the scene classifier (`rsvlm.scene`) on an ImageFolder's training split and write it into
trained parts (``PARTS/scene/``).

The split is `rsvlm-train build-data`'s own (`training.classification.split_of_item`, the same
seed and held-back fraction as the shipped model's dataset), so the classifier trains on the
images the rest of the model trained on and is scored on the ones it never saw. Each training
image is also read in its seven other flips and quarter turns (overhead imagery has no up;
`training.augment.dihedral_pixels`), as the retriever's training views were; the features are
the linear probe's (`training.probe.pooled_features`), the classifier scikit-learn's logistic
regression on them, standardised, copied into a torch module.

    python scripts/ship_scene.py --data ../shared/data/classification/aid_150px \\
        --parts assets/models/embedded --held-out runs/aid_val
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsvlm.scene import SceneClassifier, SceneConfig, save_scene  # noqa: E402
from training.augment import dihedral_pixels  # noqa: E402
from training.classification import scan_image_folder, split_of_item  # noqa: E402
from training.probe import _vision_from_model_arg, pooled_features  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/classification/aid_150px")
    ap.add_argument("--parts", default="assets/models/embedded")
    ap.add_argument("--seed", type=int, default=0, help="build-data's split seed")
    ap.add_argument("--val-fraction", type=float, default=0.15, help="build-data's")
    ap.add_argument("--views", type=int, default=8, help="views of each training image (1-8)")
    ap.add_argument("--held-out", default=None,
                    help="also link the held-back images here as an ImageFolder (for "
                         "`rsvlm-train eval --task classification --data`)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    classes, items = scan_image_folder(args.data)
    train = [it for it in items if split_of_item(it, args.seed, args.val_fraction) == "train"]
    held = [it for it in items if split_of_item(it, args.seed, args.val_fraction) == "val"]
    vision, processor, layers, _ = _vision_from_model_arg(None)

    def read(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    t0 = time.perf_counter()
    train_x, train_y = [], []
    for it in train:
        image = read(it.path)
        views = [image] + [dihedral_pixels(image, k) for k in range(1, args.views)]
        train_x.append(pooled_features([Image.fromarray(v) for v in views], vision, processor,
                                       layers))
        train_y += [it.label] * len(views)
    x = np.concatenate(train_x)
    held_x = pooled_features([Image.fromarray(read(it.path)) for it in held], vision, processor,
                             layers)
    features_s = time.perf_counter() - t0
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(max_iter=3000, C=0.5, random_state=args.seed)
    clf.fit(scaler.transform(x), train_y)
    accuracy = float((clf.predict(scaler.transform(held_x)) == np.array(
        [it.label for it in held])).mean())
    config = SceneConfig(classes=[str(c) for c in clf.classes_], layers=list(layers),
                         hidden=int(x.shape[1] // (2 * len(layers))),
                         notes={"data": Path(args.data).name, "split_seed": args.seed,
                                "val_fraction": args.val_fraction, "views": args.views,
                                "train_images": len(train), "held_out_images": len(held),
                                "held_out_accuracy": round(accuracy, 4)})
    model = SceneClassifier(config)
    with torch.no_grad():
        model.mean.copy_(torch.from_numpy(scaler.mean_).float())
        model.scale.copy_(torch.from_numpy(scaler.scale_).float())
        model.linear.weight.copy_(torch.from_numpy(clf.coef_).float())
        model.linear.bias.copy_(torch.from_numpy(clf.intercept_).float())
    folder = save_scene(model, args.parts)
    if args.held_out:
        root = Path(args.held_out)
        for it in held:
            link = root / it.folder / it.path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(Path(it.path).resolve())
    print(json.dumps({"scene": str(folder), "classes": len(classes), "train_images": len(train),
                      "train_views": len(train_y), "held_out": len(held),
                      "held_out_accuracy": round(accuracy, 4),
                      "features_s": round(features_s, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
