"""The trained embedded parts in assets/ fit the code that loads them (no weights needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from rsvlm.loading import ADAPTER_DIR, SEMANTIC_DB_DIR, TRAINED_JSON, TRAINED_TENSORS
from rsvlm.presets import load_preset

SHIPPED = Path(__file__).resolve().parents[2] / "assets" / "models" / "embedded"


@pytest.fixture(scope="module")
def manifest() -> dict:
    assert (SHIPPED / TRAINED_JSON).is_file(), "the embedded model's trained parts are missing"
    return json.loads((SHIPPED / TRAINED_JSON).read_text())


def test_every_shipped_tensor_lands_in_the_preset_model(manifest: dict) -> None:
    from rsvlm.modeling import RSVLMForConditionalGeneration

    preset = load_preset(manifest["base_preset"])
    assert preset.trained_weights_dir == SHIPPED
    config = preset.to_config(**manifest["architecture"])
    with torch.device("meta"):  # shapes only: no 135M-parameter allocation
        model = RSVLMForConditionalGeneration(config)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(SHIPPED / TRAINED_TENSORS), "pt") as f:
        shipped = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert shipped and all(own.get(k) == s for k, s in shipped.items())
    trained_prefixes = ("connector.", "retrieval_projection.", "box_head.")
    expected = {k for k in own if k.startswith(trained_prefixes) or ".experts." in k
                or ".router." in k}
    assert expected == set(shipped), "a trained part is missing from (or extra in) the file"


def test_adapter_database_and_card_ship_with_it(manifest: dict) -> None:
    adapter = json.loads((SHIPPED / ADAPTER_DIR / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"
    assert (SHIPPED / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    from rsvlm.retrieval import SemanticDatabase

    db = SemanticDatabase.from_pretrained(SHIPPED / SEMANTIC_DB_DIR)
    assert len(db) == manifest["semantic_db"]["texts"] > 100
    # Only OSM-derived (ODbL) descriptions and our own class sentences may ship, attributed.
    assert {m.get("region") for m in db.metadata} <= {
        "kampala_ug", "zanzibar_tz", "banepa_np", "catanduanes_ph", "labelmaker_portugal_z17",
        "aid_150px"}
    assert not any("image" in m for m in db.metadata)  # no paths into research-only data
    assert "ODbL" in (SHIPPED / SEMANTIC_DB_DIR / "ATTRIBUTION.md").read_text()
    card = (SHIPPED / "MODEL_CARD.md").read_text()
    assert "## Numbers on the held-back split" in card and "## Example answers" in card
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size < 60e6, f"the shipped model is {size / 1e6:.0f} MB"


def test_the_shipped_detector_loads_and_its_card_section_is_there() -> None:
    """The dense detector (`rsvlm.perception`) is scored leave-one-region-out in the card."""
    from safetensors.torch import load_file

    from rsvlm.perception import CONFIG_NAME, DETECTOR_DIR, WEIGHTS_NAME, DetectorConfig

    folder = SHIPPED / DETECTOR_DIR
    config = DetectorConfig(**json.loads((folder / CONFIG_NAME).read_text()))
    head = config.build()
    head.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))  # strict: every tensor fits
    assert config.labels == ["building", "tree", "aircraft"] and 0 < config.threshold < 1
    assert set(config.class_thresholds) == {"tree", "aircraft"}
    # Tree crowns do not transfer between forests: learnt, not answered (the model card).
    assert config.answered == ["building", "aircraft"]
    card = (SHIPPED / "MODEL_CARD.md").read_text()
    assert "## Leave-one-region-out" in card
    for region in config.notes["loro_f1"]:
        assert f"| {region} |" in card
    for held in ("aircraft_a", "aircraft_b", "trees_osbs", "trees_soap"):  # the other classes
        assert f"| {held} |" in card
