"""What the retriever finds for the held-back region chips of a `build-data` folder.

    python scripts/retrieval_domains.py --data runs/embedded_ds MODEL [MODEL ...]

A region chip's top hit should be an OSM-derived description of a similar chip (the semantic
database also holds the scene-class sentences of the classification folder, which suit AID
images, not a block of Kampala). Per model it prints, over the `val` chips of every region:
how many chips' top hit is a scene-class sentence, per region, and how many get a region
description with the chip's own rural/urban label. The language model reads these texts, so
the count moves its rural/urban answers.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def val_chips(data: Path) -> list[tuple[str, str, str | None]]:
    """(image, region, scene label of its description) of every validation region chip."""
    from training.dataset_files import read_chips, read_texts

    scene = {r["image"]: r["scene"] for r in read_texts(data)
             if r.get("level") == "scene" and r.get("scene")}
    chips = read_chips(data)
    return [(c["image"], c["region"], scene.get(c["image"])) for c in chips
            if c.get("split") == "val" and not c.get("origin")]


def score(model: str, data: Path) -> dict:
    from PIL import Image

    from rsvlm.engine import ChatEngine
    from rsvlm.loading import load

    engine = ChatEngine(load(model, device="cpu"), decode_backend="torch")
    if not engine.use_retrieval:
        raise SystemExit(f"{model} has no retriever and semantic database")
    chips = val_chips(data)
    class_sentence: Counter[str] = Counter()
    same_scene = 0
    for image, region, label in chips:
        with Image.open(data / image) as im:
            pixels = engine.processor.image_processor(im.convert("RGB"),
                                                      return_tensors="pt")["pixel_values"]
        top = engine.retrieve(pixels, 1)[0]
        if top.get("cls"):
            class_sentence[region] += 1
        elif label is not None and top.get("scene") == label:
            same_scene += 1
    return {"model": model, "val_region_chips": len(chips),
            "top_hit_class_sentence": sum(class_sentence.values()),
            "per_region": dict(sorted(class_sentence.items())),
            "top_hit_same_rural_urban": same_scene}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="presets or model folders")
    parser.add_argument("--data", type=Path, required=True, help="a build-data output folder")
    args = parser.parse_args()
    for model in args.models:
        print(json.dumps(score(model, args.data)), flush=True)


if __name__ == "__main__":
    main()
