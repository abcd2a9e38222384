"""Scene classes from the frozen vision features, not from a retrieved neighbour's text.

Trained parts may hold a ``scene/`` folder (``scene.json`` + ``scene.safetensors``): a linear
classifier over the tower's pooled features (per layer of ``layers``: the mean patch token and
the first token, the linear probe's features, `training.probe.pooled_features`), standardised
as they were when it was fitted (`scripts/ship_scene.py`). A question that asks for the best of
listed categories ("Choose the best category for this image from: a, b, c.") whose categories
the classifier knows is answered by it, among the listed ones only; any other goes on to the
language model. Without retrieval the language model's answer collapses to the nearest training
text's words; the classifier's does not depend on retrieval at all.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

SCENE_DIR = "scene"
CONFIG_NAME = "scene.json"
WEIGHTS_NAME = "scene.safetensors"


# Scene classes (AID's, UC Merced's) whose names are adjectives, mass nouns or plurals, as a
# sentence names them: "an aerial image of a dense residential area", not "of a dense
# residential"; "of a town center", not "of a center" (a language model trained on the latter
# said "This remote sensing image shows a center." of a housing estate).
_SCENE_NOUNS = {
    "commercial": "a commercial area", "industrial": "an industrial area",
    "dense residential": "a dense residential area",
    "medium residential": "a medium residential area",
    "sparse residential": "a sparse residential area",
    "mobile home park": "a mobile home park", "center": "a town center",
    "square": "a town square", "parking": "a parking lot", "parking lot": "a parking lot",
    "bare land": "bare land", "farmland": "farmland", "agricultural": "agricultural land",
    "chaparral": "chaparral", "storage tanks": "storage tanks", "buildings": "buildings",
}


def scene_noun(label: str) -> str:
    """A scene class as a sentence names it, with its article: "a beach", "farmland"."""
    return _SCENE_NOUNS.get(label, f"{'an' if label[:1].lower() in 'aeio' else 'a'} {label}")


@dataclass
class SceneConfig:
    classes: list[str]
    layers: list[int] = field(default_factory=lambda: [7, 9, 11])
    hidden: int = 384
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def features(self) -> int:
        return len(self.layers) * 2 * self.hidden


class SceneClassifier(nn.Module):
    """Pooled levels (batch, features) -> class logits: standardise, then one linear layer."""

    def __init__(self, config: SceneConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.zeros(config.features))
        self.register_buffer("scale", torch.ones(config.features))
        self.linear = nn.Linear(config.features, len(config.classes))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear((pooled - self.mean) / self.scale)


def save_scene(model: SceneClassifier, folder: str | Path) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder) / SCENE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps(asdict(model.config), indent=2) + "\n")
    return folder


def load_scene(folder: str | Path) -> SceneClassifier | None:
    """The classifier `save_scene` wrote into ``folder`` (its ``scene/``), or None."""
    from safetensors.torch import load_file

    folder = Path(folder) / SCENE_DIR
    if not (folder / CONFIG_NAME).is_file():
        return None
    model = SceneClassifier(SceneConfig(**json.loads((folder / CONFIG_NAME).read_text())))
    model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    return model.eval()


def pool_levels(hidden_states: Any, layers: list[int]) -> torch.Tensor:
    """(batch, len(layers) * 2 * hidden): per layer of the tower's hidden states, the mean patch
    token and the first token. The classifier is fitted (`training.probe.pooled_features`) and
    read on exactly these."""
    feats = []
    for i in layers:
        h = hidden_states[i].float().cpu()
        feats += [h[:, 1:].mean(1), h[:, 0]]
    return torch.cat(feats, dim=-1)


_CHOICES = re.compile(r"(?:categor(?:y|ies)|class(?:es)?)\b[^:]*\bfrom\s*:\s*(.+?)(?:\.\s|\.?$)",
                      re.IGNORECASE | re.DOTALL)


def asked_choices(question: str) -> list[str] | None:
    """The categories a question offers ("... best category for this image from: a, b, c."),
    or None when it offers none."""
    found = _CHOICES.search(question or "")
    if not found:
        return None
    choices = [c.strip().strip(".").strip() for c in re.split(r",|\bor\b", found.group(1))]
    choices = [c for c in choices if c]
    return choices if len(choices) >= 2 else None


_ASKS_SCENE = re.compile(
    r"\b(?:what|which) (?:kind|type|sort|category|class) of (?:area|scene|place|land ?use|"
    r"landscape|site|image|region)\b|\bclassify (?:the|this) (?:scene|image|area|picture)\b|"
    r"\bscene (?:class|category|type)\b|\bwhat(?: is|'s) the (?:main |dominant |primary )?land ?use\b|"
    r"\bwhat (?:is|are) (?:this|the) (?:area|place|land|site|scene) used for\b", re.IGNORECASE)


def asks_scene(question: str) -> bool:
    """Whether ``question`` asks what kind of scene the image shows without offering categories
    ("Classify the scene: what kind of area is this?"): the classifier answers from all of its
    own."""
    return bool(_ASKS_SCENE.search(question or "")) and asked_choices(question) is None


class SceneReader:
    """A `SceneClassifier` on the model's own frozen vision tower and image processor."""

    def __init__(self, model: SceneClassifier, vision_model: Any, image_processor: Any) -> None:
        self.model = model.eval()
        self.vision = vision_model
        self.processor = image_processor

    @classmethod
    def load(cls, parts: str | Path, vision_model: Any, image_processor: Any
             ) -> SceneReader | None:
        model = load_scene(parts)
        return None if model is None else cls(model, vision_model, image_processor)

    def knows(self, choices: list[str]) -> bool:
        """Whether every offered category is one of the classifier's."""
        known = {c.lower() for c in self.model.config.classes}
        return all(c.lower() in known for c in choices)

    @torch.inference_mode()
    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        param = next(self.vision.parameters())
        hidden = self.vision(pixel_values=pixel_values.to(param.device, param.dtype),
                             output_hidden_states=True).hidden_states
        return pool_levels(hidden, self.model.config.layers)

    @property
    def classes(self) -> list[str]:
        return list(self.model.config.classes)

    @torch.inference_mode()
    def rank(self, pixel_values: torch.Tensor, choices: list[str]) -> list[tuple[str, float]]:
        """``choices`` (all known to the classifier) for one image, likeliest first, with their
        probabilities among them."""
        classes = [c.lower() for c in self.model.config.classes]
        idx = [classes.index(c.lower()) for c in choices]
        prob = self.model(self.pooled(pixel_values))[0, idx].softmax(-1)
        order = prob.argsort(descending=True).tolist()
        return [(choices[i], float(prob[i])) for i in order]

    def choose(self, pixel_values: torch.Tensor, choices: list[str]) -> tuple[str, float]:
        """The likeliest of ``choices`` (all known to the classifier) for one image, with its
        probability among them."""
        return self.rank(pixel_values, choices)[0]
