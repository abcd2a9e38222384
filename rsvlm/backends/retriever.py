"""The embedded model's retriever serving other backends: image -> top-k descriptions.

The embedded `rsvlm` model carries a retrieval projection trained against its semantic database
(`rsvlm.retrieval`). A pretrained family has neither, so it borrows them: the chip is embedded by
the embedded model's vision tower and projection and the database's top-k texts become the
prompt's context (`rsvlm.backends.session`).
"""

from __future__ import annotations

from typing import Any


class EmbeddedRetriever:
    """Wraps a loaded `rsvlm` model with a semantic database (``rsvlm.loading.load("embedded")``)."""

    def __init__(self, loaded: Any, k: int | None = None) -> None:
        from rsvlm.engine import ChatEngine

        if loaded.database is None or not len(loaded.database):
            raise ValueError("the retriever's model has no semantic database")
        self.engine = ChatEngine(loaded, decode_backend="torch")
        self.k = k

    def retrieve_image(self, image: Any) -> list[dict[str, Any]]:
        processor = self.engine.processor
        pixels = processor.image_processor([image.convert("RGB")], return_tensors="pt")["pixel_values"]
        return self.engine.retrieve(pixels, self.k)

    @classmethod
    def embedded(cls, device: str = "cpu") -> EmbeddedRetriever:
        from rsvlm.loading import load

        return cls(load("embedded", device=device))
