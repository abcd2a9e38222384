"""The scene classifier (`rsvlm.scene`): which questions it answers, its weights' round trip, and
the chat path answering a category question from it, among the offered categories only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from rsvlm.scene import (
    SceneClassifier,
    SceneConfig,
    SceneReader,
    asked_choices,
    asks_scene,
    load_scene,
    save_scene,
)
from training.classification import classification_prompt


@pytest.mark.parametrize("question, choices", [
    (classification_prompt(["airport", "bare land", "farmland"]),
     ["airport", "bare land", "farmland"]),
    ("Which class fits best? Choose from: forest or desert.", ["forest", "desert"]),
    ("Choose the category from: beach", None),  # one category is no choice
    ("How many buildings are there?", None),
    ("Describe this image from above.", None),
])
def test_the_categories_a_question_offers(question, choices) -> None:
    assert asked_choices(question) == choices


def _reader(tmp_path: Path, favour: str) -> tuple[SceneReader, object]:
    from rsvlm.testing import tiny_image_processor, tiny_model

    model = tiny_model()
    hidden = model.config.vision_config.hidden_size
    config = SceneConfig(classes=["airport", "desert", "forest"], layers=[1, 2], hidden=hidden)
    clf = SceneClassifier(config)
    with torch.no_grad():
        clf.linear.weight.zero_()
        clf.linear.bias.copy_(torch.tensor([0.0, 0.0, 0.0]))
        clf.linear.bias[config.classes.index(favour)] = 5.0
        clf.mean.fill_(0.5)
    save_scene(clf, tmp_path)
    loaded = load_scene(tmp_path)
    assert torch.equal(loaded.mean, clf.mean) and loaded.config.classes == config.classes
    return SceneReader(loaded, model.vision_tower.model, tiny_image_processor()), model


def test_the_chat_path_answers_offered_categories_from_the_classifier(tmp_path: Path) -> None:
    from rsvlm.engine import ChatEngine
    from rsvlm.loading import LoadedModel
    from rsvlm.testing import tiny_processor
    from training.evaluate import ablate

    reader, model = _reader(tmp_path, favour="forest")
    assert SceneReader.load(tmp_path / "nothing", model.vision_tower.model, None) is None
    loaded = LoadedModel(model, tiny_processor(model.config), scene=reader)
    engine = ChatEngine(loaded, max_new_tokens=4, decode_backend="torch")
    image = Image.new("RGB", (64, 64), (40, 90, 40))
    session = engine.session(image)
    assert "".join(session.ask(classification_prompt(["airport", "desert", "forest"]))) == "forest"
    assert session.last.timing["scene"] == 1.0 and "scene classifier" in session.last.prompt
    # Among the offered categories only: without "forest", the likeliest of the others.
    assert "".join(session.ask("Choose the best category from: airport, desert.")) in {
        "airport", "desert"}
    # Two of its categories offered either/or: the classifier's too.
    assert "".join(session.ask("Is this a desert or a forest?")) == "forest"
    assert session.last.timing["scene"] == 1.0
    # A category it does not know, or no categories at all: the language model answers.
    other = engine.session(image)
    list(other.ask(classification_prompt(["airport", "harbour"])))
    assert "scene" not in other.last.timing
    list(other.ask("What is in this image?"))
    assert "scene" not in other.last.timing
    # An open question about the kind of scene: the likeliest of all it knows, and the next.
    said = "".join(session.ask("Classify the scene: what kind of area is this?"))
    assert said.startswith("It looks like a forest (probability ") and "; next: " in said
    assert "among the 3 categories it knows" in session.last.prompt
    # A drawn region is the language model's (the classifier reads the whole chip).
    list(other.ask(classification_prompt(["airport", "forest"]), region_box_px=(0, 0, 8, 8)))
    assert "scene" not in other.last.timing
    ablate(loaded, {"scene"})
    assert loaded.scene is None
    with pytest.raises(ValueError, match="no scene classifier"):
        ablate(loaded, {"scene"})


@pytest.mark.parametrize("question, asks", [
    ("Classify the scene: what kind of area is this?", True),
    ("What type of land use is shown?", True),
    ("Which kind of place is this?", True),
    ("What is the scene category?", True),
    ("What is the land use here?", True),
    ("What's the main land use?", True),
    ("What is this area used for?", True),
    (classification_prompt(["airport", "farmland"]), False),  # offered: the categories decide
    ("How many buildings are there?", False),
    ("What kind of roof does the largest building have?", False),
])
def test_open_scene_questions(question, asks) -> None:
    assert asks_scene(question) is asks
