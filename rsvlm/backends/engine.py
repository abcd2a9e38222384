"""`ChatEngine` for pretrained families: the same seams (``session``, ``info``, ``device``) the
CLI, the app and `rsvlm.scan` use, over `rsvlm.backends.session.PretrainedSession`.

``ChatEngine(loaded)`` returns one of these when ``loaded`` is a pretrained family's model
(`rsvlm.backends.loader.load_pretrained`), so callers need not know which kind runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from rsvlm.backends.session import PretrainedSession
from rsvlm.decoding import DecodeStrategy, choose
from rsvlm.engine import ChatEngine, SessionCaches


class PretrainedEngine(ChatEngine):
    """Answers questions about chips with a pretrained vision-language model.

    Args:
        loaded: a `rsvlm.backends.loader.PretrainedModel`.
        semantic_context: put the retrieved descriptions and the chip's OSM features into the
            prompt (False: the ablation without them; they are still retrieved and shown).
        osm: ``osm(chip) -> list[str]``, short descriptions of the chip's OSM features.
        retriever: ``retriever.retrieve_image(image) -> list[{"text", "score"}]``; default the
            one loaded with the model (`rsvlm.backends.retriever.EmbeddedRetriever`), if any.
    """

    def __init__(self, loaded: Any, *, max_cached_sessions: int = 8, max_new_tokens: int = 256,
                 generation: dict[str, Any] | None = None, decode_backend: str | None = "auto",
                 semantic_context: bool = True,
                 osm: Callable[[Any], list[str]] | None = None, retriever: Any = None) -> None:
        self.model = loaded.model
        self.processor = loaded.processor
        self.family = loaded.family
        self.database = None
        self.retriever = retriever if retriever is not None else getattr(loaded, "retriever", None)
        self.osm = osm
        self.semantic_context = semantic_context
        self.max_new_tokens = max_new_tokens
        tokenizer = self.processor.tokenizer
        self.generation = {"do_sample": False,
                           "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id,
                           **(generation or {})}
        self.use_retrieval = self.retriever is not None
        self.use_box_head = False
        # One generation at a time on the shared model (chat turns, scans).
        self.generation_lock = threading.Lock()
        # Sessions that keep their KV cache (least recently used ones are dropped: GPU memory).
        self.caches = SessionCaches(max_cached_sessions)
        # Another family's model decodes in PyTorch (rsvlm.decoding's dispatchers say why).
        self.decoder: DecodeStrategy = choose(self.model, decode_backend)
        self.info: dict[str, Any] = dict(getattr(loaded, "info", {}) or {})
        self.info["decode"] = self.decoder.name
        self.info["semantic_context"] = semantic_context

    @property
    def dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def session(self, chip: Any) -> PretrainedSession:
        return PretrainedSession(self, chip)

    def answer_chips(self, chips: list[Any], question: str, *, max_new_tokens: int = 256
                     ) -> list[str]:
        """One answer per chip (canonical boxes), for `rsvlm.scan`: a fresh session each, one
        after the other (chips of a scan differ in size at the borders, and a family's image
        tokens with them, so they are not padded into one batch)."""
        answers = []
        for chip in chips:
            session = self.session(chip)
            for _ in session.ask(question, max_new_tokens=max_new_tokens):
                pass
            answers.append(session.last.text)
        return answers

    def retrieve_for_image(self, image: Any) -> list[dict[str, Any]]:
        if self.retriever is None:
            return []
        return self.retriever.retrieve_image(image)

    def osm_for_chip(self, chip: Any) -> list[str]:
        if self.osm is None:
            return []
        try:
            return [str(t) for t in self.osm(chip) or []]
        except Exception:  # the answer matters more than its context
            import logging

            logging.getLogger(__name__).exception("the OSM context of the chip failed")
            return []

    def raise_generation_error(self, error: BaseException) -> None:
        from rsvlm.loading import is_cuda_oom

        if is_cuda_oom(error):
            torch.cuda.empty_cache()
            raise RuntimeError(
                "The GPU ran out of memory while answering: ask for fewer new tokens, close other "
                "GPU programs, or run a smaller model (see `rsvlm which`).") from error
        raise RuntimeError(f"Generation failed: {error}") from error
