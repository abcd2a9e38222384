"""Scene-classification folders (ImageFolder layout) -> classification instructions.

`root/<ClassName>/<image>` becomes "Choose the best category from: a, b, c." -> "b". Class
folder names are turned into words ("BareLand" -> "bare land", "dense_residential" ->
"dense residential"), and the answer matcher in `training.metrics` maps free text back.

Each image also gets a scene caption ("An aerial image of a baseball field.") for the alignment
stage and a scene description for the semantic database: stage 1 then teaches the connector
the folder's scene vocabulary on short sequences, before the long multiple-choice prompts.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

from rsvlm.scene import scene_noun
from training.captions import CAPTION_PROMPTS
from training.samples import Sample

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


class DatasetError(ValueError):
    """A dataset folder cannot be used; the message is written for a user."""


def class_words(folder: str) -> str:
    """Folder name -> readable class name."""
    text = re.sub(r"[_\-]+", " ", folder)
    text = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", text)
    return re.sub(r"\s+", " ", text).strip().lower()


@dataclass(frozen=True)
class FolderItem:
    path: Path
    label: str  # readable class name
    folder: str


def scan_image_folder(root: str | Path) -> tuple[list[str], list[FolderItem]]:
    """Class names (sorted readable names) and items, in a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    classes: list[str] = []
    items: list[FolderItem] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            continue
        label = class_words(sub.name)
        classes.append(label)
        items.extend(FolderItem(f, label, sub.name) for f in files)
    if len(classes) < 2:
        raise DatasetError(f"{root} needs at least two class folders with images "
                           f"(ImageFolder layout: root/<class>/<image>), found {len(classes)}")
    return sorted(set(classes)), items


def classification_prompt(classes: list[str]) -> str:
    return (f"Choose the best category for this image from: {', '.join(classes)}. "
            "Answer with the category name only.")


def classification_sample(item: FolderItem, classes: list[str]) -> Sample:
    return Sample("classification", classification_prompt(classes), item.label,
                  {"cls": item.label, "source": item.path.name})


def split_of_item(item: FolderItem, seed: int, val_fraction: float) -> str:
    if val_fraction <= 0:
        return "train"
    digest = hashlib.sha256(f"{seed}:{item.folder}/{item.path.name}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


_SCENE_TEMPLATES = (
    "An aerial image of {scene}.",
    "This remote sensing image shows {scene}.",
    "A satellite view of {scene}.",
    "The scene is {scene}, seen from above.",
    "Overhead imagery of {scene}.",
)


def scene_caption(label: str, rng: random.Random) -> str:
    """One templated sentence naming the scene class."""
    return rng.choice(_SCENE_TEMPLATES).format(scene=scene_noun(label))


def scene_caption_sample(item: FolderItem, rng: random.Random) -> Sample:
    return Sample("caption", rng.choice(CAPTION_PROMPTS), scene_caption(item.label, rng),
                  {"cls": item.label, "source": item.path.name, "classes": [item.label]})
