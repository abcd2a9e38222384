"""Chat sessions of a pretrained family: streamed answers, canonical boxes, semantic context.

The same contract as `rsvlm.engine.ChatSession` (``ask`` yields text deltas, then ``last`` holds
the `rsvlm.engine.Answer`), for any `rsvlm.backends.base.Family`. The first question of a
session retrieves the chip's descriptions and OSM features once; with semantic context on they
enter the first user turn as text. Follow-ups of a family that allows it reuse the KV cache: the
whole conversation is tokenised again (cheap), the part that matches the tokens already in the
cache is skipped, so the image is encoded once per session.

Answers keep the family's own text in the conversation (what the model wrote is what it sees
next turn); `Answer.text` has its boxes rewritten in the canonical grammar, and `Answer.boxes`
holds them in chip pixels and EPSG:4326 (`rsvlm.answer.ground` of that text).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from transformers import StoppingCriteriaList

from rsvlm.answer import OnChip
from rsvlm.backends import conventions
from rsvlm.backends.base import context_text
from rsvlm.boxes import pixels_to_norm
from rsvlm.streaming import CancelOnEvent, TimedStreamer

logger = logging.getLogger(__name__)


class PretrainedSession(OnChip):
    """A conversation about one chip with a pretrained family (see module docstring)."""

    def __init__(self, engine: Any, chip: Any) -> None:
        super().__init__(chip)
        self.engine = engine
        self.family = engine.family
        self.turns: list[tuple[str, str]] = []  # (user text as sent, the model's own answer)
        self.retrieved: list[dict[str, Any]] | None = None
        self.osm: list[str] | None = None
        self.last: Any = None
        self._ids: torch.Tensor | None = None
        self._cache: Any = None
        self._state: Any = None
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    def reset(self) -> None:
        self.turns.clear()
        self.drop_cache()
        self.last = None

    def drop_cache(self) -> None:
        """Forget the KV cache (the next question encodes the conversation afresh)."""
        self._ids, self._cache, self._state = None, None, None
        self.engine.caches.forget(self)

    # ------------------------------------------------------------------ semantics
    def context(self) -> str:
        """The semantic context block of this chip (retrieval + OSM; empty when switched off)."""
        engine = self.engine
        if self.retrieved is None:
            self.retrieved = engine.retrieve_for_image(self.image)
        if self.osm is None:
            self.osm = engine.osm_for_chip(self.chip)
        if not engine.semantic_context:
            return ""
        return context_text([r["text"] for r in self.retrieved], self.osm)

    # ------------------------------------------------------------------ asking
    def ask(self, question: str, region_box_px: tuple[float, float, float, float] | None = None,
            *, max_new_tokens: int | None = None) -> Iterator[str]:
        """Yield the answer as text deltas; afterwards `last` holds the full `Answer`."""
        question = (question or "").strip()
        if not question:
            raise ValueError("Ask a question (the text is empty).")
        engine, family = self.engine, self.family
        processor = engine.processor
        size = (self.chip_width, self.chip_height)
        region = None
        if region_box_px is not None:
            region = family.region_text(processor, pixels_to_norm(region_box_px, *size), size)
        user = family.user_text(question, region)
        with engine.generation_lock:
            self._cancel.clear()
            t0 = time.perf_counter()
            context = self.context()
            history = self.turns if family.conversational else []
            encoded = family.encode(processor, self.image, [*history, (user, None)], context)
            kwargs, n_uncached = self._generation_inputs(encoded.inputs)
            streamer = TimedStreamer(processor.tokenizer,
                                      skip_special_tokens=not family.stream_special_tokens)
            result: dict[str, Any] = {}

            def run() -> None:
                try:
                    with torch.inference_mode(), engine.decoder.hooked(engine.model):
                        result["out"] = engine.model.generate(
                            **kwargs, streamer=streamer,
                            max_new_tokens=max_new_tokens or engine.max_new_tokens,
                            stopping_criteria=StoppingCriteriaList([CancelOnEvent(self._cancel)]),
                            return_dict_in_generate=True, **engine.generation)
                except BaseException as exc:  # surfaced in the caller's thread below
                    result["error"] = exc
                    streamer.end()

            thread = threading.Thread(target=run, name="rsvlm-generate", daemon=True)
            thread.start()
            pieces: list[str] = []
            try:
                for piece in streamer:
                    piece = family.strip_specials(piece)
                    if piece:
                        pieces.append(piece)
                        yield piece
            finally:
                if thread.is_alive():
                    self._cancel.set()
                thread.join()
            if "error" in result:
                self.drop_cache()
                engine.raise_generation_error(result["error"])
            t_end = time.perf_counter()
            self._remember(result["out"], encoded)
            raw = self._decode(result["out"], kwargs["input_ids"].shape[1])
            self.turns.append((user, raw))
            self.last = self._answer(raw, encoded, streamer, t0, t_end, n_uncached)

    def _decode(self, out: Any, prompt_len: int) -> str:
        tokenizer = self.engine.processor.tokenizer
        # An encoder-decoder's sequences are the answer alone; a decoder's start with the prompt.
        encoder_decoder = getattr(self.engine.model.config, "is_encoder_decoder", False)
        new = out.sequences[0] if encoder_decoder else out.sequences[0, prompt_len:]
        text = tokenizer.decode(new, skip_special_tokens=not self.family.stream_special_tokens)
        return self.family.clean(text)

    def _answer(self, raw: str, encoded: Any, streamer: TimedStreamer, t0: float, t_end: float,
                n_uncached: int) -> Any:
        from rsvlm.answer import Answer, ground

        size = (self.chip_width, self.chip_height)
        parsed = self.family.boxes(raw, encoded.frame, size)
        if not parsed and any(ch in raw for ch in ("bbox", "<loc_", "{<")):
            logger.warning("the %s answer mentions boxes that do not parse; kept as text: %.200s",
                           self.family.name, raw)
        text = conventions.to_canonical_text(raw, parsed)
        first = streamer.first_token_at
        return Answer(
            text=text,
            boxes=ground(text, self.chip, size),
            retrieved=list(self.retrieved or []),
            timing={"first_token_s": round((first or t_end) - t0, 4),
                    "total_s": round(t_end - t0, 4), "new_tokens": streamer.n_new,
                    "prefill_tokens": n_uncached},
            prompt=encoded.prompt,
        )

    # ------------------------------------------------------------------ cache reuse
    def _generation_inputs(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """``generate`` inputs: the whole prompt, or (a follow-up whose tokens extend what the
        cache holds) only the new tokens after the cache, without the image."""
        engine, device = self.engine, self.engine.device
        ids = inputs["input_ids"]
        reuse = self.family.reuses_cache and self._cache is not None and self._ids is not None
        if reuse:
            cached = self._ids[0, : min(self._ids.shape[1], ids.shape[1] - 1)]
            same = (ids[0, : cached.shape[0]].to(cached.device) == cached).long()
            common = min(int(same.cumprod(0).sum()), self._cache.get_seq_length())
            if common >= self._prompt_len:  # the image and first prompt are in the cache
                extra = self._cache.get_seq_length() - common
                if extra:
                    self._cache.crop(-extra)  # transformers 5: a negative count of tokens to drop
                self.family.restore_state(engine.model, self._state)
                return ({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                         "past_key_values": self._cache}, int(ids.shape[1] - common))
        self.drop_cache()
        kwargs = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in inputs.items()}
        if "pixel_values" in kwargs and kwargs["pixel_values"].is_floating_point():
            kwargs["pixel_values"] = kwargs["pixel_values"].to(engine.dtype)
        self._prompt_len = int(ids.shape[1])
        return kwargs, int(ids.shape[1])

    _prompt_len: int = 0

    def _remember(self, out: Any, encoded: Any) -> None:
        if not self.family.reuses_cache:
            return
        self._ids = out.sequences
        self._cache = out.past_key_values
        self._state = self.family.save_state(self.engine.model)
        self.engine.caches.touch(self)  # may drop the least recently used session's cache
