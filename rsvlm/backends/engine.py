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

from rsvlm.backends.base import context_text
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
        """One answer per chip (canonical boxes), for `rsvlm.scan`: chips of one size share a
        padded ``generate`` call (a family's image tokens follow the chip size)."""
        answers: list[str | None] = [None] * len(chips)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, chip in enumerate(chips):
            by_size.setdefault((int(chip.width), int(chip.height)), []).append(i)
        for indices in by_size.values():
            texts = self._answer_batch([chips[i] for i in indices], question, max_new_tokens)
            for i, text in zip(indices, texts, strict=True):
                answers[i] = text
        return [a or "" for a in answers]

    def _answer_batch(self, chips: list[Any], question: str, max_new_tokens: int) -> list[str]:
        from rsvlm.backends.conventions import to_canonical_text

        family, processor = self.family, self.processor
        images = [c.to_image().convert("RGB") if hasattr(c, "to_image") else c for c in chips]
        contexts = [""] * len(chips)
        if self.semantic_context:
            contexts = [context_text([r["text"] for r in self.retrieve_for_image(image)],
                                     self.osm_for_chip(chip))
                        for chip, image in zip(chips, images, strict=True)]
        inputs, _, frames = family.encode_batch(processor, images, family.user_text(question, None),
                                                contexts)
        kwargs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        if "pixel_values" in kwargs and kwargs["pixel_values"].is_floating_point():
            kwargs["pixel_values"] = kwargs["pixel_values"].to(self.dtype)
        try:
            with self.generation_lock, torch.inference_mode(), self.decoder.hooked(self.model):
                out = self.model.generate(**kwargs, max_new_tokens=max_new_tokens,
                                          **self.generation)
        except Exception as exc:
            self.raise_generation_error(exc)
        if not getattr(self.model.config, "is_encoder_decoder", False):
            out = out[:, kwargs["input_ids"].shape[1]:]
        skip = not family.stream_special_tokens
        answers = []
        for row, chip, frame in zip(out, chips, frames, strict=True):
            raw = family.clean(processor.tokenizer.decode(row, skip_special_tokens=skip))
            size = (int(chip.width), int(chip.height))
            answers.append(to_canonical_text(raw, family.boxes(raw, frame, size)))
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
