"""LoRA / QLoRA adapters on tiny pretrained backends from build-data-style conversations, and
their canonical -> family box conversion."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rsvlm.backends.conventions import canonical_to_family

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ANSWER = "Two buildings: <ref>building</ref><box>[250,250,500,500]</box><box>[0,0,100,200]</box>"


def test_canonical_boxes_in_each_family_format() -> None:
    # Qwen2.5-VL: pixels of the resized 588 x 364 image; one JSON list for consecutive boxes
    qwen25 = canonical_to_family(ANSWER, "qwen2_5_vl", resized=(588, 364))
    records = json.loads(qwen25.split("```json\n")[1].split("\n```")[0])
    assert records == [{"bbox_2d": [147, 91, 294, 182], "label": "building"},
                       {"bbox_2d": [0, 0, 59, 73], "label": "building"}]
    assert '"bbox_2d": [250, 250, 500, 500]' in canonical_to_family(ANSWER, "qwen3_vl")
    assert canonical_to_family(ANSWER, "florence2").endswith(
        "building<loc_250><loc_250><loc_500><loc_500>building<loc_0><loc_0><loc_100><loc_200>")
    assert "{<25><25><50><50>|<0>}" in canonical_to_family(ANSWER, "llava")
    assert canonical_to_family("no boxes", "qwen3_vl") == "no boxes"


def _dataset(folder: Path) -> Path:
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(
            folder / "images" / f"{i}.png")
        question = ("In the region <box>[100,100,600,600]</box>: what is here?" if i == 2
                    else "Find all buildings.")
        rows.append({"id": str(i), "image": f"images/{i}.png", "task": "grounding", "meta": {},
                     "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                       {"from": "gpt", "value": ANSWER}]})
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return folder


@pytest.mark.parametrize(("family", "qlora"), [("qwen2_5_vl", False), ("florence2", False),
                                              ("qwen3_vl", True)])
def test_adapter_trains_and_loads_with_the_base(tmp_path: Path, family: str, qlora: bool) -> None:
    from rsvlm.backends.tiny import write_tiny_checkpoint
    from rsvlm.engine import ChatEngine
    from rsvlm.loading import load
    from training.cli import main

    base = write_tiny_checkpoint(family, tmp_path / "base")
    data = _dataset(tmp_path / "data")
    args = ["fit", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "adapter"),
            "--max-steps", "3", "--grad-accum", "1", "--lr", "5e-3", "--device", "cpu"]
    assert main(args + (["--qlora"] if qlora else [])) == 0
    summary = json.loads((tmp_path / "adapter" / "rsvlm_adapter.json").read_text())
    assert summary["steps"] == 3 and summary["family"] == family
    assert np.isfinite(summary["first_loss"]) and np.isfinite(summary["last_loss"])
    plain = load(str(base), device="cpu")
    adapted = load(str(base), device="cpu", adapter=str(tmp_path / "adapter"))
    assert adapted.info["adapter"]
    before = dict(plain.model.named_parameters())
    changed = [n for n, p in adapted.model.named_parameters()
               if ".language_model." in n and not torch.equal(p, before[n])]
    assert changed  # the merged adapter moved the language model's projections
    session = ChatEngine(adapted, max_new_tokens=4).session(Image.open(data / "images" / "0.png"))
    list(session.ask("find all buildings"))
    assert session.last is not None
