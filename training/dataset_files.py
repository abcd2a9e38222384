"""Readers of a `build-data` folder, one per file format, and what training derives from them.

- ``train.jsonl`` / ``val.jsonl`` (LLaVA conversations): `read_split`, `question_of`;
- ``texts.jsonl`` (semantic-database descriptions): `read_texts`;
- ``chips.jsonl`` (chip metadata, rotated/mirrored views with their ``origin``): `read_chips`.

Everything else here (scene texts, database rows and positives, view origins, grounding boxes)
is computed from those rows, so a format change is made in one place.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

TEXTS = "texts.jsonl"
CHIPS = "chips.jsonl"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def read_split(data_dir: Path, split: str) -> list[dict[str, Any]]:
    """The records of a split (``train`` / ``val``); a missing file says how to make it."""
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build it with `rsvlm-train build-data`")
    return _jsonl(path)


def question_of(record: dict[str, Any]) -> str:
    """A split record's question: its first user turn without the image placeholder."""
    return record["conversations"][0]["value"].replace("<image>", "").strip()


def read_texts(data_dir: Path, split: str | None = None) -> list[dict[str, Any]]:
    """Rows of ``texts.jsonl`` (of one ``split`` when given; a row without one is ``train``);
    none when the folder has no descriptions."""
    path = Path(data_dir) / TEXTS
    rows = _jsonl(path) if path.is_file() else []
    return rows if split is None else [r for r in rows if r.get("split", "train") == split]


def read_chips(data_dir: Path) -> list[dict[str, Any]]:
    """Rows of ``chips.jsonl`` (none when the folder has no chip metadata)."""
    path = Path(data_dir) / CHIPS
    return _jsonl(path) if path.is_file() else []


# ------------------------------------------------------------------------------ derived


def scene_texts(data_dir: Path, split: str = "train") -> dict[str, tuple[str, str | None]]:
    """image -> (its scene description, its scene class or None) from texts.jsonl.

    The class (ImageFolder rows carry ``cls``) makes two images of one class positives of each
    other in the retrieval loss even when their sentences come from different templates."""
    out: dict[str, tuple[str, str | None]] = {}
    for r in read_texts(data_dir, split):
        if r.get("level") == "scene":
            group = f"{r.get('region')}:{r['cls']}" if r.get("cls") else None
            out.setdefault(r["image"], (r["text"], group))
    return out


def database_rows(data_dir: Path, regions: Collection[str] | None = None,
                  ) -> tuple[list[str], list[dict[str, Any]]]:
    """(texts, metadata) of a build-data folder's training-split descriptions (of ``regions``
    only, when given), each text once.

    Templated sentences repeat (a scene-class sentence per image of the class, "an open area
    without buildings" per empty chip): kept as separate rows they fill all top-k slots of a
    retrieval with one text. A text keeps its first row's metadata and ``sources``, the number of
    rows it stood for."""
    texts: list[str] = []
    meta: list[dict[str, Any]] = []
    first: dict[str, int] = {}
    for r in read_texts(data_dir, "train"):  # validation chips stay unseen, their texts too
        if regions is not None and r.get("region") not in regions:
            continue
        if r["text"] in first:
            meta[first[r["text"]]]["sources"] += 1
            continue
        first[r["text"]] = len(texts)
        texts.append(r["text"])
        meta.append({**{k: v for k, v in r.items() if k != "text"}, "sources": 1})
    return texts, meta


def database_positives(data_dir: Path, texts: list[str], scene: bool = False
                       ) -> dict[str, list[int]]:
    """image -> indices into ``texts`` (`database_rows`) that are right answers for it: every
    description written for the image, and every sentence of its scene class (ImageFolder
    images; another image's class sentence is as right as its own). With ``scene``, a region
    chip's also include the scene descriptions of its region's chips with its rural/urban
    label."""
    index = {t: i for i, t in enumerate(texts)}
    own: dict[str, set[int]] = {}
    by_class: dict[str, set[int]] = {}
    image_class: dict[str, str] = {}
    for r in read_texts(data_dir, "train"):
        if r["text"] not in index:
            continue
        i = index[r["text"]]
        own.setdefault(r["image"], set()).add(i)
        if r.get("cls"):
            group = f"{r.get('region')}:{r['cls']}"
        elif scene and r.get("level") == "scene" and r.get("scene"):
            group = f"{r.get('region')}:scene:{r['scene']}"
        else:
            continue
        by_class.setdefault(group, set()).add(i)
        image_class[r["image"]] = group
    return {img: sorted(ids | by_class.get(image_class.get(img, ""), set()))
            for img, ids in own.items()}


def class_views(data_dir: Path, scenes: dict[str, tuple[str, str | None]]) -> dict[str, str]:
    """Rotated/mirrored view -> its origin image (paths as in the dataset), for origins with a
    scene class: their class sentences describe every view, while a region chip's description
    names positions ("a building in the top right") that a view moves."""
    return {r["image"]: r["origin"] for r in read_chips(data_dir)
            if r.get("origin") and r["origin"] in scenes and scenes[r["origin"]][1] is not None}


def view_origins(data_dir: Path) -> dict[str, str]:
    """Absolute path of each rotated/mirrored training chip -> that of the chip it shows."""
    return {str((data_dir / r["image"]).resolve()): str((data_dir / r["origin"]).resolve())
            for r in read_chips(data_dir) if r.get("origin")}


def grounding_boxes(data_dir: Path, split: str = "train") -> list[tuple[str, str, list]]:
    """(image, question, boxes in pixels) of every grounding sample of a split: a referring
    expression's one box, or every box of a "find all" question."""
    out = []
    for r in read_split(data_dir, split):
        boxes = (r.get("meta") or {}).get("boxes_px")
        if r["task"] == "grounding" and boxes:
            out.append((r["image"], question_of(r), boxes))
    return out


__all__ = [
    "CHIPS",
    "TEXTS",
    "class_views",
    "database_positives",
    "database_rows",
    "grounding_boxes",
    "question_of",
    "read_chips",
    "read_split",
    "read_texts",
    "scene_texts",
    "view_origins",
]
