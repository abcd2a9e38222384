"""Detector variants measured with `scripts/loro.py`'s folds and not adopted, kept so that the
numbers in docs/benchmarks.md ("Leave-one-region-out perception, round 5") can be rerun. Each
runs the usual folds on an existing cache (``--cache``, a `loro.py --out` folder) with one
thing changed; loro.py's own options follow the variant's.

    # each image's features standardised over its patches (per level and channel)
    python scripts/loro_variants.py standardise --cache runs/loro_v -- \\
        --out runs/loro_nstd --convs 3 --train-files 3 --input-dropout 0.3 \\
        --folds banepa_np,catanduanes_ph,kampala_ug,zanzibar_tz
    # earlier tower layers as more levels: first cache them for the same views ... (a new run
    # caches every level it needs in one go instead: loro.py --cache-layers 3,5,7,9,11
    # --levels 7,9,11,5, the same features in one cache, recorded for ship_detector)
    python scripts/loro_variants.py cache-layers --cache runs/loro_v --layers 3,5 \\
        --to runs/loro_lv --train-files 3
    # ... then train on 7/9/11 + 5
    python scripts/loro_variants.py levels --cache runs/loro_v --extra runs/loro_lv --layers 5 \\
        -- --out runs/loro_l5 --convs 3 --train-files 3 --input-dropout 0.3 --folds ...
    # two runs' heads averaged as one ensemble, out-of-sample thresholds
    python scripts/loro_variants.py mix --cache runs/loro_do4 \\
        --members runs/loro_v/members,runs/loro_do4/members
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import loro  # noqa: E402

from training.labelled import DEMO_AREAS  # noqa: E402


def _linked(out_args: list[str], cache: Path) -> None:
    """The run folder named by ``--out`` reads ``cache``'s features (a link, not a copy)."""
    out = Path(out_args[out_args.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    link = out / "cache"
    if not link.exists():
        link.symlink_to((cache / "cache").resolve())


def standardise(loro_args: list[str], cache: Path) -> int:
    orig = loro._load

    def norm(f: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(f), 64):
            x = f[i:i + 64].float()
            x = (x - x.mean(2, keepdim=True)) / (x.std(2, keepdim=True) + 1e-3)
            out.append(x.half())
        return torch.cat(out) if out else f

    def _load(out: Path, name: str, part: str) -> dict:
        d = dict(orig(out, name, part))
        d["features"] = norm(d["features"])
        return d

    _linked(loro_args, cache)
    loro._load = _load
    return loro.main(loro_args)


def cache_layers(cache: Path, layers: list[int], to: Path, files: int, data: str) -> int:
    """The eval tiles and the first ``files`` training-view files of every region in ``cache``,
    regenerated from their seeds (checked against the cached names and boxes) and run through
    the tower's ``layers``."""
    from training.detection import FrozenTower, View, augment_view, cache_views
    from training.labelled import load_sets, tiles

    tower = FrozenTower(size=448, layers=layers)
    tower.model.encoder.layer = tower.model.encoder.layer[:max(layers)]  # later blocks unused
    names = [p.name.split(".")[0] for p in sorted((cache / "cache").glob("*.eval.pt"))]
    for name in names:
        items = load_sets(data, [name])[name]
        size = loro.eval_tile_size(items[0].gsd)
        target = to / "cache" / f"{name}.eval.pt"
        if not target.is_file():
            cache_views(tower, [View(n, im, b) for it in items for n, im, b in tiles(it, size)],
                        target)
        weights = [it.image.shape[0] * it.image.shape[1] for it in items]
        for k, (path, n) in enumerate(list(loro._chunk_sizes(cache, name).items())[:files]):
            target = to / "cache" / path.name
            if target.is_file():
                continue
            t0 = time.perf_counter()
            rng = random.Random(f"0:{name}" + (f":{k}" if k else ""))
            # The first file of an early cache named its views without the file number.
            views = [augment_view(rng.choices(items, weights)[0], rng, size,
                                  f"{name}_aug{k}_{i}" if k else f"{name}_aug{i}")
                     for i in range(n)]
            old = torch.load(path, weights_only=False, mmap=True)
            if old["names"] != [v.name for v in views]:
                raise SystemExit(f"{path}: the views cannot be regenerated (names differ)")
            for a, v in zip(old["boxes"], views, strict=True):
                scale = np.array([v.image.shape[1], v.image.shape[0]] * 2, np.float32)
                if len(a) and float((a - torch.from_numpy(v.boxes / scale)).abs().max()) > 1e-4:
                    raise SystemExit(f"{path}: the views cannot be regenerated (boxes differ)")
            cache_views(tower, views, target)
            print(name, path.name, n, f"{time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def levels(loro_args: list[str], cache: Path, extra: Path, layers: list[int],
           cached: list[int]) -> int:
    pick = [cached.index(layer) for layer in layers]
    orig_load, orig_save = loro._load, loro.save_detector

    def _load(out: Path, name: str, part: str) -> dict:
        d = dict(orig_load(out, name, part))
        more = torch.load(extra / "cache" / f"{name}.{part}.pt", weights_only=False, mmap=True)
        if more["names"] != d["names"]:
            raise SystemExit(f"{extra}: {name}.{part} holds other views than {cache}")
        d["features"] = torch.cat([d["features"], more["features"][:, pick]], dim=1)
        return d

    def save_detector(head, config, folder):  # noqa: ANN001, ANN202
        config.layers = [*config.layers, *layers]
        return orig_save(head, config, folder)

    _linked(loro_args, cache)
    loro._load, loro.save_detector = _load, save_detector
    return loro.main(loro_args)


def mix(cache: Path, member_dirs: list[Path]) -> int:
    """Each OAM fold read by the heads of every run in ``member_dirs`` averaged (heads of the
    cache run's fold architecture); thresholds from the other folds' held-out regions
    (`loro.pooled_thresholds`)."""
    from rsvlm.detector import DetectorEnsemble
    from training.detection import predict, train_heads

    folds = [h for h in DEMO_AREAS if (cache / "cache" / f"{h}.eval.pt").is_file()]
    preds, curves, heads = {}, {}, 0
    for held in folds:
        _, config = loro._fold_head(cache, held)
        members = []
        for d in member_dirs:
            n = len(list((d / held).glob("seed*.safetensors")))
            if not n:
                raise SystemExit(f"{d / held} holds no heads")
            # Every member is there already, so this only reads them.
            head = train_heads(None, [], heads=n, members=d / held, hidden=config.hidden,
                               levels=len(config.layers), dim=config.dim, convs=config.convs)
            members += list(head.members) if isinstance(head, DetectorEnsemble) else [head]
        heads = len(members)
        preds[held] = predict(DetectorEnsemble(members), loro._load(cache, held, "eval")[
            "features"], 0.1)
        curves[held] = loro._curves(cache, held, preds[held])
    f1s = []
    print("| held-out region | heads | F1 | thresholds |\n|---|---|---|---|")
    for held in folds:
        t, c = loro.pooled_thresholds({k: v for k, v in curves.items() if k != held})
        r = loro.score_fold(cache, held, None, t, c, preds[held])
        f1s.append(r["f1"])
        print(f"| {held} | {heads} | {r['f1']:.3f} | {t} / {c} |")
    print(f"| mean | | {sum(f1s) / len(f1s):.3f} | |")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    loro_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant", choices=["standardise", "cache-layers", "levels", "mix"])
    ap.add_argument("--cache", default="runs/loro_v", help="a loro.py --out folder")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--layers", default="5", help="tower layers, comma list")
    ap.add_argument("--cached-layers", default="3,5", help="what --extra holds")
    ap.add_argument("--to", default="runs/loro_lv", help="cache-layers: where")
    ap.add_argument("--extra", default="runs/loro_lv", help="levels: cache-layers' folder")
    ap.add_argument("--train-files", type=int, default=3)
    ap.add_argument("--members", default="", help="mix: comma list of RUN/members folders")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    cache = Path(args.cache)
    layers = [int(v) for v in args.layers.split(",")]
    if args.variant == "standardise":
        return standardise(loro_args, cache)
    if args.variant == "cache-layers":
        return cache_layers(cache, layers, Path(args.to), args.train_files, args.data)
    if args.variant == "levels":
        return levels(loro_args, cache, Path(args.extra), layers,
                      [int(v) for v in args.cached_layers.split(",")])
    return mix(cache, [Path(p) for p in args.members.split(",") if p])


if __name__ == "__main__":
    raise SystemExit(main())
