"""Chat sessions about one chip: retrieval, streamed answers, grounded boxes, prefix-cache reuse.

A `ChatSession` belongs to one chip. Its first question runs the vision tower, the retriever and
the connector once and keeps the language model's KV cache; follow-up questions feed only the new
tokens (the end of the previous turn, the new user message and the generation prompt), so the
image and semantic tokens are never recomputed. The semantic prompter conditions its aggregation
tokens on the *first* question of a session; follow-ups see those same image tokens, as a
multi-turn LLaVA conversation sees one image encoding.

When the model has a box head (`rsvlm.box_head`), the boxes of a finished answer are placed by
it: the language model decides that there are boxes, how many (one, or several) and what they
are called, the head where they are. `Answer.text` and the conversation hold the placed boxes;
the streamed pieces are the LM's own text.

The model is shared by every session. Its expert routing state lives on the modules, so one
generation runs at a time (a lock); the app's queue decides who waits.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteriaList,
)

from rsvlm import prompting
from rsvlm.answer import Answer, AnswerBox, OnChip, ground
from rsvlm.box_head import select_boxes
from rsvlm.boxes import SCALE, format_region_box, parse_boxes, replace_boxes
from rsvlm.decoding import DecodeStrategy, choose
from rsvlm.streaming import CancelOnEvent, TimedStreamer

logger = logging.getLogger(__name__)

# "Find all buildings", "locate every pool", "each ...": a question for every instance, whatever
# count the language model wrote ("the largest of all" is still one object).
_ASKS_FOR_EVERY = re.compile(r"(?<!\bof )\b(?:all|every|each)\b", re.IGNORECASE)

DETECTOR_TOWERS = ("torch", "onnx", "onnx-int8")
# Where ONNX Runtime decodes, it reads the detector's tower too: most of a detector answer's
# time. In int8: 1.7 times as fast as float32 on 2 cores, with the leave-one-region-out folds'
# chat-path answers as good (docs/benchmarks.md, "The detector's tower in int8").
DETECTOR_TOWER = "onnx-int8"


def detector_tower_for(mode: str | None, decoder: str) -> str:
    """Who reads the detector's tower (`ChatEngine`'s ``detector_tower``): ``auto`` (or None)
    -> ``$RSVLM_DETECTOR_TOWER`` if set, else `DETECTOR_TOWER` where ``decoder`` (the decode
    strategy's name) is ONNX Runtime's and PyTorch where it is not; validates the name."""
    chosen = (mode or "auto").lower()
    if chosen == "auto":
        chosen = os.environ.get("RSVLM_DETECTOR_TOWER", "").lower() or (
            DETECTOR_TOWER if decoder.startswith("onnx") else "torch")
    if chosen not in DETECTOR_TOWERS:
        raise ValueError(f"Unknown detector tower {chosen!r}; choose from auto, "
                         f"{', '.join(DETECTOR_TOWERS)}.")
    return chosen


class ChatEngine:
    """Answers questions about chips with one loaded model (see `rsvlm.loading.load`).

    Args:
        loaded: a `LoadedModel` (``.model``, ``.processor``, ``.database``, ``.info``).
        max_cached_sessions: sessions that keep their KV cache; older ones are evicted (LRU) and
            recompute their prefix on the next question, so memory stays bounded.
        generation: defaults for ``generate()`` (greedy by default).
        decode_backend: ``auto`` (``$RSVLM_DECODE``, else ``onnx`` where ONNX Runtime can run
            this model, i.e. fp32 on the CPU, else PyTorch), ``torch``, ``onnx`` or ``onnx-int8``:
            who runs the decode steps and follow-up prompts. The engine picks a
            `rsvlm.decoding.DecodeStrategy` for it once and hooks it around every ``generate()``.
        semantic_context: False switches the retrieved descriptions off (the ablation).
        detector_tower: who reads the detector's tower levels: ``auto``
            (``$RSVLM_DETECTOR_TOWER``, else `DETECTOR_TOWER` where ONNX Runtime decodes, else
            PyTorch), ``torch``, ``onnx`` (float32) or ``onnx-int8`` (`rsvlm.onnx_tower`).

    A pretrained family's model (`rsvlm.backends.loader.load_pretrained`) gets a
    `rsvlm.backends.engine.PretrainedEngine` instead: same seams, that family's prompts and boxes.
    """

    def __new__(cls, loaded: Any = None, *args: Any, **kwargs: Any) -> ChatEngine:
        if cls is ChatEngine and getattr(loaded, "family", None) is not None:
            from rsvlm.backends.engine import PretrainedEngine

            return super().__new__(PretrainedEngine)
        return super().__new__(cls)

    def __init__(
        self,
        loaded: Any,
        *,
        max_cached_sessions: int = 8,
        max_new_tokens: int = 256,
        generation: dict[str, Any] | None = None,
        decode_backend: str | None = "auto",
        semantic_context: bool = True,
        osm: Any = None,
        detector_tower: str = "auto",
    ) -> None:
        self.model = loaded.model
        self.processor = loaded.processor
        self.database = getattr(loaded, "database", None)
        self.info: dict[str, Any] = dict(getattr(loaded, "info", {}) or {})
        self.max_new_tokens = max_new_tokens
        # The image placeholder's output row is untrained (added by the embedding resize): never emit it.
        self.generation = {
            "do_sample": False,
            "repetition_penalty": 1.05,
            "suppress_tokens": [self.processor.image_token_id],
            **(generation or {}),
        }
        self.use_retrieval = (semantic_context and self.database is not None
                              and len(self.database) > 0)
        # Boxes in answers are placed by the model's box head when it has one (`rsvlm.box_head`).
        self.use_box_head = getattr(self.model, "box_head", None) is not None
        # Object questions (presence, counts, find all) answered from the trained detector's
        # detections when the parts have one (`rsvlm.perception`).
        self.perception = getattr(loaded, "perception", None)
        # Scene categories from a classifier of the frozen features (`rsvlm.scene`).
        self.scene = getattr(loaded, "scene", None)
        # A yes/no or either/or question answered with one of its words
        # (`prompting.answer_options`, `ChatSession._chosen`).
        self.answer_forms = bool(getattr(loaded, "answer_forms", True))
        # The model is shared and its expert routing state lives on its modules: one
        # generation at a time (chat turns, scan batches).
        self.generation_lock = threading.Lock()
        self.caches = SessionCaches(max_cached_sessions)
        self.decoder: DecodeStrategy = choose(self.model, decode_backend)
        self.info["decode"] = self.decoder.name
        # Where ONNX Runtime decodes, it reads the detector's tower too: most of a detector
        # answer's time (`rsvlm.onnx_tower`). A tower too small to gain (a test's) stays.
        self._detector_tower = detector_tower_for(detector_tower, self.decoder.name)
        if self.perception is not None:
            self.use_detector(self.perception)

    def use_detector(self, perception: Any) -> None:
        """Answer object questions with ``perception`` (a `rsvlm.perception.Perception`, e.g.
        a leave-one-region-out fold's), its tower read as this engine reads its own
        (``detector_tower``). A tower too small to gain (a test's) stays on PyTorch."""
        self.perception = perception
        tower = self._detector_tower
        big = sum(p.numel() for p in perception.vision.parameters()) > 5_000_000
        if tower != "torch" and big and perception.use_onnx(
                quantize="int8" if tower == "onnx-int8" else None):
            self.info["detector_tower"] = "onnx-int8" if perception.onnx.quantize else "onnx"
        else:
            self.info["detector_tower"] = "torch"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate_kwargs(self, prompt_length: int) -> dict[str, Any]:
        """`generation` for a ``generate()`` call on prompts of ``prompt_length`` tokens, with
        ``suppress_tokens`` and ``min_new_tokens`` done by `_SuppressTokens`."""
        kwargs = dict(self.generation)
        always = [int(t) for t in kwargs.pop("suppress_tokens", None) or []]
        min_new = int(kwargs.pop("min_new_tokens", None) or 0)
        if always or min_new:
            eos = sorted(_eos_ids(self)) if min_new else []
            processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
            processors.append(
                _SuppressTokens(always, eos, prompt_length + min_new, device=self.device)
            )
            kwargs["logits_processor"] = processors
        return kwargs

    def session(self, chip: Any) -> ChatSession:
        """A new conversation about ``chip`` (a `tiles.Chip`, or anything with ``to_image()``)."""
        return ChatSession(self, chip)

    # ------------------------------------------------------------------ retrieval
    def retrieve(self, pixel_values: torch.Tensor, k: int | None = None) -> list[dict[str, Any]]:
        """Top-k semantic-database descriptions for one image (empty when retrieval is off)."""
        k = self.model.config.retrieval_top_k if k is None else k
        if not self.use_retrieval or k <= 0 or self.model.retrieval_projection is None:
            return []
        with torch.inference_mode():
            vec = self.model.embed_image_for_retrieval(pixel_values.to(self.device, self.model.dtype))
        hits = self.database.search(vec.float().cpu().numpy(), k)[0]
        return [{"text": h.text, "score": round(float(h.score), 4), **(h.metadata or {})} for h in hits]


class SessionCaches:
    """Which sessions keep their KV cache: the ``limit`` most recently used (LRU). A session
    pushed out drops its cache and recomputes its prefix on its next question."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._sessions: OrderedDict[int, weakref.ref[ChatSession]] = OrderedDict()

    def touch(self, session: ChatSession) -> None:
        """``session`` has just used its cache: keep it; evict the least recently used."""
        key = id(session)
        self._sessions.pop(key, None)
        self._sessions[key] = weakref.ref(session)
        while len(self._sessions) > self.limit:
            _, ref = self._sessions.popitem(last=False)
            old = ref()
            if old is not None:
                old.drop_cache()

    def forget(self, session: ChatSession) -> None:
        """``session`` holds no cache any more."""
        self._sessions.pop(id(session), None)

    def __len__(self) -> int:
        return len(self._sessions)


# The scene classifier learnt AID's scenes, 600 px at 0.5-8 m a pixel: 300 m to 4.8 km across.
# A chip less than this across is not a scene to it (the 77 m Kampala demo chip came out
# "resort" at 0.99, the 230 m demo raster "school" at 0.93); asked what kind of area it shows,
# the detector's reading answers instead.
SCENE_MIN_SIDE_M = 300.0


def below_scene_scale(ground_m2: float | None) -> bool:
    """Whether an area of ``ground_m2`` (None: unknown, a plain photo) is smaller than any scene
    the classifier learnt (`SCENE_MIN_SIDE_M` across)."""
    return bool(ground_m2) and ground_m2 ** 0.5 < SCENE_MIN_SIDE_M


class ChatSession(OnChip):
    """A multi-turn conversation about one chip. Use `ask`, then read `last`."""

    def __init__(self, engine: ChatEngine, chip: Any) -> None:
        super().__init__(chip)
        self.engine = engine
        self.turns: list[tuple[str, str]] = []  # (user text incl. region prefix, answer)
        self.retrieved: list[dict[str, Any]] | None = None
        self.last: Answer | None = None
        self.detections: list[Any] | None = None  # the detector's, computed on first need
        self._adopted: dict[str, list[Any]] = {}  # a label's detections read elsewhere
        self._pixels: torch.Tensor | None = None  # the image processor's output, made once
        self._ids: torch.Tensor | None = None  # every token the cache has seen (+ the last one)
        self._cache: DynamicCache | None = None
        self._ended_with_eos = False
        self._cancel = threading.Event()

    # ------------------------------------------------------------------ public
    def cancel(self) -> None:
        """Stop the running generation after its current token."""
        self._cancel.set()

    def adopt_detections(self, label: str, detections: list[Any]) -> None:
        """``label``'s detections as read elsewhere (the app's scan of the chip's area at native
        resolution, merged across tiles; boxes in 0-1 of this chip) stand for the session's
        own from now on: a later description's count, presence or the area they cover say what
        that read found, not what the chip's one downsampled look finds."""
        with self.engine.generation_lock:
            self._adopted[label] = list(detections)
            if self.detections is not None:
                self.detections = self._with_adopted(self.detections)

    def _with_adopted(self, detections: list[Any]) -> list[Any]:
        return [d for d in detections if d.label not in self._adopted] + [
            d for found in self._adopted.values() for d in found]

    def _detections(self, perception: Any) -> list[Any]:
        """The chip's detections (its own read once, adopted labels replaced). Called under
        the lock."""
        if self.detections is None:
            self.detections = self._with_adopted(perception.detect(self.image, self.gsd))
        return self.detections

    def reset(self) -> None:
        """Forget the conversation (keeps the chip and its retrieval)."""
        self.turns.clear()
        self.drop_cache()
        self._ids = None
        self.last = None

    def ask(
        self,
        question: str,
        region_box_px: tuple[float, float, float, float] | None = None,
        *,
        max_new_tokens: int | None = None,
    ) -> Iterator[str]:
        """Yield the answer as text deltas; afterwards `last` holds the full `Answer`."""
        question = (question or "").strip()
        if not question:
            raise ValueError("Ask a question (the text is empty).")
        engine = self.engine
        if region_box_px is None:  # "Describe the top left": that part, as if drawn
            region_box_px = self._described_part(question)
        region_text = None
        if region_box_px is not None:
            region_text = format_region_box(region_box_px, self.chip_width, self.chip_height)
        user_text = prompting.user_turn(question, image_token=None, region_box_text=region_text)
        perceived = (self._classified(question) if region_box_px is None else None
                     ) or self._perceived(question, region_box_px)
        if perceived is not None:
            self.last = perceived
            self.turns.append((user_text, perceived.text))
            self.drop_cache()  # the next turn encodes this one afresh
            yield perceived.text
            return
        choices = prompting.answer_options(question) if engine.answer_forms else None
        chosen = self._chosen(user_text, question, choices) if choices else None
        if chosen is not None:
            self.last = chosen
            self.turns.append((user_text, chosen.text))
            yield chosen.text
            return
        with engine.generation_lock:
            self._cancel.clear()
            claimed = self._claimed_labels(question)
            # The detector reads first: its opening is the first thing the reader sees.
            opening = self._scene_opening(region_box_px) if claimed else None
            t0 = time.perf_counter()
            kwargs, prompt_text, n_uncached = self._inputs_for(user_text, question)
            streamer = TimedStreamer(engine.processor.tokenizer)
            pieces: list[str] = []
            stream = self._stream(kwargs, streamer, max_new_tokens)
            if claimed:  # the detector says how many and where; the LM's guesses go
                from rsvlm.perception import grounded_description

                stream = grounded_description(stream, claimed, opening)
            for piece in stream:
                pieces.append(piece)
                yield piece
            text = "".join(pieces).strip()
            noted = self._detections_note(question, region_box_px)
            if noted:
                sep = " " if text else ""  # the model's every sentence may have been left out
                yield sep + noted
                text = f"{text}{sep}{noted}"
                self.drop_cache()  # the cache holds the LM's words only
            t_end = time.perf_counter()
            self._placed_scores = None
            placed = self._place_boxes(text, question)
            scores = self._placed_scores if placed != text else None
            if placed != text:
                # The cache holds the coordinates the LM wrote; the conversation now holds the
                # head's, so the next turn encodes it afresh.
                text = placed
                self.drop_cache()
            self.turns.append((user_text, text))
            first = streamer.first_token_at
            self.last = Answer(
                text=text,
                boxes=self.ground(text, scores),
                retrieved=list(self.retrieved or []),
                timing={
                    "first_token_s": round((first or t_end) - t0, 4),
                    "total_s": round(t_end - t0, 4),
                    "new_tokens": streamer.n_new,
                    "prefill_tokens": n_uncached,
                },
                prompt=prompt_text,
            )

    def _stream(
        self, kwargs: dict[str, Any], streamer: TimedStreamer, max_new_tokens: int | None
    ) -> Iterator[str]:
        """Run ``generate()`` in a thread (the engine's decode strategy hooked) and yield its
        text; afterwards the session holds the extended KV cache. Errors come out here."""
        engine = self.engine
        result: dict[str, Any] = {}
        tokenizer = engine.processor.tokenizer

        def run() -> None:
            try:
                with torch.inference_mode(), engine.decoder.hooked(engine.model):
                    result["out"] = engine.model.generate(
                        **kwargs,
                        streamer=streamer,
                        max_new_tokens=max_new_tokens or engine.max_new_tokens,
                        stopping_criteria=StoppingCriteriaList([CancelOnEvent(self._cancel)]),
                        return_dict_in_generate=True,
                        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                        **engine.generate_kwargs(kwargs["input_ids"].shape[1]),
                    )
            except BaseException as exc:  # surfaced in the caller's thread below
                result["error"] = exc
                streamer.end()

        thread = threading.Thread(target=run, name="rsvlm-generate", daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:
            if thread.is_alive():  # the consumer went away: stop generating
                self._cancel.set()
            thread.join()
        if "error" in result:
            self.drop_cache()  # a half-extended cache must not be reused
            raise _generation_error(result["error"])
        out = result["out"]
        self._ids = out.sequences
        self._cache = out.past_key_values
        self._ended_with_eos = bool(out.sequences.shape[1]) and int(
            out.sequences[0, -1]) in _eos_ids(engine)
        engine.caches.touch(self)

    def _described_part(self, question: str) -> tuple[float, float, float, float] | None:
        """The pixels of the part of the image a description names ("Describe the top left of
        the image": its top-left quarter), or None."""
        from rsvlm.perception import asked_place, asks_description, place_box

        place = asked_place(question) if asks_description(question) else None
        return place_box(place[0], (self.chip_width, self.chip_height)) if place else None

    def _chosen(self, user_text: str, question: str, choices: list[str]) -> Answer | None:
        """The likelier of a question's answer words (`prompting.answer_options`: yes or no, or
        the two it offers), each scored whole by the model after the prompt (the sum of its
        tokens' log-probabilities, lower case or capitalised), as the answer; None when the
        tokenizer cannot spell one.
        A 135M model asked "Is there a swimming pool?" otherwise wrote "over 100 m²", and "Is
        the area dense or sparse?" "Spreading over 100 m²."; constraining its first token instead
        would favour a word spelt in one token over one spelt in two, whatever it means."""
        import copy

        engine = self.engine
        tokenizer = engine.processor.tokenizer
        spelt: dict[str, list[list[int]]] = {}
        for word in choices:
            forms = [tokenizer.encode(f, add_special_tokens=False)
                     for f in dict.fromkeys((word, word.capitalize()))]
            spelt[word] = [ids for ids in forms if ids and tokenizer.decode(ids).strip().lower()
                           == word]
            if not spelt[word]:
                return None
        with engine.generation_lock:
            t0 = time.perf_counter()
            # Asked as the training data asks for one word ("Answer with a single word."), so
            # that a bare word is the answer the model expects to give, not the start of a
            # sentence ("A residential area.").
            kwargs, prompt_text, n_uncached = self._inputs_for(
                prompting.one_word(user_text), prompting.one_word(question))
            cache = kwargs["past_key_values"]
            ids = kwargs["input_ids"][:, cache.get_seq_length():]
            with torch.inference_mode():
                out = engine.model(**{**kwargs, "input_ids": ids}, use_cache=True,
                                   logits_to_keep=1)
                first = out.logits[0, -1].float().log_softmax(-1)
                scores: dict[str, float] = {}
                for word, forms in spelt.items():
                    best = -math.inf
                    for form in forms:
                        score = float(first[form[0]])
                        if len(form) > 1:  # the rest of the word, after its first token
                            rest = torch.tensor([form], device=engine.device)
                            more = engine.model(input_ids=rest[:, :-1],
                                                past_key_values=copy.deepcopy(out.past_key_values),
                                                use_cache=True)
                            steps = more.logits[0].float().log_softmax(-1)
                            score += float(steps.gather(1, rest[0, 1:, None]).sum())
                        best = max(best, score)
                    scores[word] = best
            self.drop_cache()  # the cache holds the prompt only: the next turn encodes afresh
        word = max(scores, key=scores.get)
        took = round(time.perf_counter() - t0, 4)
        return Answer(text=word, boxes=[], retrieved=list(self.retrieved or []),
                      timing={"first_token_s": took, "total_s": took, "new_tokens": 1,
                              "prefill_tokens": n_uncached},
                      prompt=f"{prompt_text}\n(the likelier of the words offered, as the model "
                             "scores them: " + ", ".join(f"{w} {v:.2f}" for w, v in scores.items())
                             + ")")

    def _classified(self, question: str) -> Answer | None:
        """The scene classifier's answer to "the best category from: ..." (the category, among
        those offered), or to an open "what kind of area is this?" (a sentence: its likeliest
        of all its categories and the runner-up); None when it has no classifier, or the
        question offers categories it does not know or asks something else."""
        from rsvlm.scene import asked_choices, asks_scene

        reader = self.engine.scene
        if reader is None:
            return None
        choices = asked_choices(question)
        pair = prompting.answer_options(question)
        if choices is None and pair not in (None, ["yes", "no"]) and reader.knows(pair):
            choices = pair  # "Is this a farmland or a forest?": two of its categories
        offered = choices is not None
        if not offered and asks_scene(question):
            if below_scene_scale(getattr(self.chip, "ground_area_m2", None)):
                # Smaller than any scene the classifier learnt: what the detector finds.
                return self._scene_from_detections()
            choices = reader.classes
        if not choices or not reader.knows(choices):
            return None
        t0 = time.perf_counter()
        with self.engine.generation_lock:
            pixels = self._pixel_values()
            if self.retrieved is None:  # the semantics panel shows them for every answer
                self.retrieved = self.engine.retrieve(pixels)
            ranked = reader.rank(pixels, choices)
        (best, prob), took = ranked[0], round(time.perf_counter() - t0, 4)
        text = best
        if not offered:
            from rsvlm.scene import scene_noun

            text = f"It looks like {scene_noun(best)} (probability {prob:.2f})"
            if len(ranked) > 1:
                text += f"; next: {scene_noun(ranked[1][0])} ({ranked[1][1]:.2f})"
            text += "."
        where = "offered" if offered else "it knows"
        return Answer(text=text, boxes=[], retrieved=list(self.retrieved or []),
                      timing={"first_token_s": took, "total_s": took, "new_tokens": 0,
                              "prefill_tokens": 0, "scene": 1.0},
                      prompt=f"(answered by the scene classifier: {best}, probability "
                             f"{prob:.2f} among the {len(choices)} categories {where})")

    def _detect(self, perception: Any) -> None:
        """The chip's detections, once per session, and its retrieval (the semantics panel
        shows them for every answer, the LM's or not)."""
        with self.engine.generation_lock:
            self._detections(perception)
            if self.retrieved is None:
                self.retrieved = self.engine.retrieve(self._pixel_values())

    def _scene_from_detections(self) -> Answer | None:
        """What kind of area a chip finer than the scene classifier's imagery shows, from the
        detector: rural or urban by the training data's rule and what it finds; None (the
        language model answers) without a detector."""
        from rsvlm.perception import detections_sentence, plural, scene_of_detections

        perception = self.engine.perception
        if perception is None:
            return None
        t0 = time.perf_counter()
        self._detect(perception)
        selected = perception.select(self.detections, "count")
        label = perception.config.answered[0]
        kind = scene_of_detections(selected, label, getattr(self.chip, "ground_area_m2", None))
        found = detections_sentence(selected, perception.config.answered)
        text = f"A{'n' if kind == 'urban' else ''} {kind} area, by its {plural(label)}. {found}"
        took = round(time.perf_counter() - t0, 4)
        return Answer(text=text, boxes=[], retrieved=list(self.retrieved or []),
                      timing={"first_token_s": took, "total_s": took, "new_tokens": 0,
                              "prefill_tokens": 0, "detector": 1.0},
                      prompt="(answered by the detector: the chip is smaller than the "
                             f"{SCENE_MIN_SIDE_M:.0f} m the scene classifier's scenes span)")

    def _perceived(self, question: str,
                   region_box_px: tuple[float, float, float, float] | None) -> Answer | None:
        """The detector's answer to an object question, or None (the LM answers)."""
        from rsvlm.perception import (
            PLACED_KINDS,
            asked_place,
            asked_size,
            detections_summary,
            object_question,
            of_size,
            perception_reply,
            place_box,
            plural,
            size_words,
        )

        perception = self.engine.perception
        asked = object_question(question, perception.config.answered) if perception else None
        if asked is None:
            return None
        t0 = time.perf_counter()
        self._detect(perception)
        kind, label = asked
        # "How big is the largest building?" picks its building as "Where is ..." does.
        selected = perception.select(self.detections, "refer" if kind == "measure" else kind,
                                     question)
        # The geodesic area only where the answer uses it (per hectare, m² covered).
        ground_m2 = (getattr(self.chip, "ground_area_m2", None)
                     if kind in {"rural_urban", "area", "measure"} else None)
        size = (self.chip_width, self.chip_height)
        place = asked_place(question) if kind in PLACED_KINDS else None
        where = region_box_px
        if place is not None:  # "in the top left": that part of the image (or drawn box)
            where = place_box(place[0], size, region_box_px)
        sized = asked_size(question) if kind in PLACED_KINDS else None
        chip_m2 = getattr(self.chip, "ground_area_m2", None)
        if sized is not None and chip_m2:  # "larger than 200 m²": by the area each box suggests
            selected = of_size(selected, label, sized, chip_m2)
        notes = []
        if sized is not None:
            notes.append(f"{plural(label)}{size_words(sized)}, each estimated from its box"
                         if chip_m2 else
                         "of every size: this image has no ground resolution to measure them by")
        if place is not None:
            notes.append(f"in the {place[1]} of the "
                         f"{'drawn box' if region_box_px is not None else 'image'}")
        text, stated = perception_reply(
            kind, label, selected, size, where, ground_m2, question,
            sure_from=perception.config.cut(label, "find_all"),
            count_of=lambda n: perception.config.count_of(label, n))
        if notes:
            text = f"{text} ({'; '.join(notes)})"
        took = round(time.perf_counter() - t0, 4)
        boxed = kind in {"find_all", "refer", "measure"}
        return Answer(text=text, boxes=self.ground(text, [d.score for d in stated] if boxed else None),
                      retrieved=list(self.retrieved or []),
                      timing={"first_token_s": took, "total_s": took, "new_tokens": 0,
                              "prefill_tokens": 0, "detector": 1.0},
                      # The raw-answer panel shows what the answer was made from.
                      prompt=f"(answered by the detector: {kind} of {label}) "
                             f"{detections_summary(selected, perception.config.answered)}"
                             f"{_count_note(perception.config, kind, label)}")

    def _claimed_labels(self, question: str) -> list[str]:
        """The classes a description's detector sentence speaks for (`_detections_note`):
        the language model's own sentences about them are left out of the answer."""
        from rsvlm.perception import asks_description

        perception = self.engine.perception
        if perception is None or not asks_description(question):
            return []
        return list(perception.config.answered)

    def _scene_opening(self, region_box_px: tuple[float, float, float, float] | None
                       ) -> str | None:
        """A description's first sentence where the chip is smaller than the scene
        classifier's scenes and the detector finds buildings: how built-up they make it
        (`rsvlm.perception.scene_words`, the training captions' words), in place of the
        language model's scene, which repeats the retrieved neighbour's ("An aerial image of
        an airport." over a suburb). None: the model's stays. Called under the lock."""
        from rsvlm.perception import scene_words

        perception = self.engine.perception
        ground = getattr(self.chip, "ground_area_m2", None)
        if (perception is None or region_box_px is not None or not below_scene_scale(ground)
                or "building" not in perception.config.answered):
            return None
        found = [d for d in perception.select(self._detections(perception), "count")
                 if d.label == "building"]
        return f"This overhead image shows {scene_words(found, 'building', ground)}." if found else None

    def _detections_note(self, question: str,
                         region_box_px: tuple[float, float, float, float] | None) -> str | None:
        """For a description of the image (or of the drawn region): what the detector found
        there, said after the language model's words (counts at the counting threshold).
        Called under the lock."""
        from rsvlm.perception import (
            answered_detections,
            asks_description,
            detections_sentence,
            sizes_sentence,
        )

        perception = self.engine.perception
        if perception is None or not asks_description(question):
            return None
        size = (self.chip_width, self.chip_height)
        labels = perception.config.answered
        found = [d for label in labels for d in answered_detections(
            label, perception.select(self._detections(perception), "count"), size,
            region_box_px)]
        said = detections_sentence(found, labels, where=region_box_px is None)
        # Sizes of the first class (buildings) over the whole image, where its ground is known.
        sizes = (sizes_sentence(found, labels[0], getattr(self.chip, "ground_area_m2", None))
                 if region_box_px is None and labels else None)
        return f"{said} {sizes}" if sizes else said

    def ground(self, text: str, scores: list[float] | None = None) -> list[AnswerBox]:
        """Boxes in ``text`` on this session's chip (`rsvlm.answer.ground`); ``scores[i]`` is
        the box head's confidence of the i-th box of ``text`` when it placed them."""
        return ground(text, self.chip, (self.chip_width, self.chip_height), scores=scores)

    def _place_boxes(self, text: str, question: str) -> str:
        """The LM's boxes replaced by the box head's: one box when the LM wrote one for a
        referring question, else every object the head finds, under the LM's first label. A
        question that asks for every instance gets all the head finds even when the LM wrote one
        box: a small LM undercounts, and the head's scores say how many there are. The head's score
        of each placed box is left in ``_placed_scores`` (the answer's boxes carry them)."""
        engine = self.engine
        if not engine.use_box_head:
            return text
        size = (self.chip_width, self.chip_height)
        written = parse_boxes(text, image_size=size)
        if not written:
            return text
        model = engine.model
        try:
            ids, mask = engine.processor.encode_queries([question])
            pixels = self._pixel_values()
            with torch.inference_mode():
                logits, boxes = model.predict_boxes(pixels.to(engine.device, model.dtype),
                                                    ids.to(engine.device), mask.to(engine.device))
        except Exception:  # the answer is already there: keep the LM's boxes rather than lose it
            logger.exception("the box head failed; keeping the boxes the language model wrote")
            return text
        single = len(written) == 1 and not _ASKS_FOR_EVERY.search(question)
        found = select_boxes(logits[0], boxes[0], single=single,
                             threshold=model.config.box_head_threshold)
        label = next((b.label for b in written if b.label), None)
        self._placed_scores = [float(score) for score, _ in found]
        return replace_boxes(text, [(label, [v * SCALE for v in box]) for _, box in found],
                             image_size=size).strip()

    def _pixel_values(self) -> torch.Tensor:
        if self._pixels is None:
            processor = self.engine.processor
            self._pixels = processor.image_processor([self.image], return_tensors="pt")[
                "pixel_values"]
        return self._pixels

    # ------------------------------------------------------------------ internals
    def drop_cache(self) -> None:
        """Free this session's KV cache; its next question recomputes the conversation."""
        self._cache = None
        self.engine.caches.forget(self)

    def _inputs_for(self, user_text: str, question: str) -> tuple[dict[str, Any], str, int]:
        """Generation inputs for the next turn, the prompt as text, and the uncached length."""
        engine = self.engine
        processor = engine.processor
        device = engine.device
        turns = [*self.turns, (user_text, None)]
        messages = prompting.build_messages(turns, image_token=processor.image_token)
        if self._cache is not None and self._ids is not None and self.turns:
            # Follow-up: feed only what comes after the tokens already in the cache.
            last_user, last_answer = self.turns[-1]
            before = prompting.build_messages(
                [*self.turns[:-1], (last_user, None)], image_token=processor.image_token
            )  # the conversation up to, not including, the last answer
            delta = prompting.continuation(
                processor,
                before,
                last_answer,
                user_text,
                ended_with_eos=self._ended_with_eos,
            )
            delta_ids = processor.tokenizer(delta, add_special_tokens=False, return_tensors="pt")
            input_ids = torch.cat([self._ids, delta_ids["input_ids"].to(self._ids.device)], dim=1)
            kwargs = {
                "input_ids": input_ids.to(device),
                "attention_mask": torch.ones_like(input_ids).to(device),
                "past_key_values": self._cache,
            }
            prompt_text = prompting.render(processor, messages, add_generation_prompt=True)
            return kwargs, prompt_text, int(input_ids.shape[1] - self._cache.get_seq_length())

        # First turn, or a follow-up whose cache was evicted: encode the whole conversation.
        if self.retrieved is None:
            self.retrieved = engine.retrieve(self._pixel_values())
        first_question = question if not self.turns else self._first_query
        self._first_query = first_question
        prompt_text = prompting.render(processor, messages, add_generation_prompt=True)
        inputs = processor(
            text=prompt_text,
            images=[self.image],
            semantic_texts=[[r["text"] for r in self.retrieved]],
            queries=[first_question],
        )
        kwargs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(engine.model.dtype)
        kwargs["past_key_values"] = DynamicCache(config=engine.model.config.text_config)
        return kwargs, prompt_text, int(inputs["input_ids"].shape[1])

    _first_query: str = ""
    _placed_scores: list[float] | None = None


class _SuppressTokens(LogitsProcessor):
    """Never emit ``always``; no ``eos`` before the sequence reaches ``eos_from`` tokens.

    What ``suppress_tokens`` and ``min_new_tokens`` ask of `generate()`, without their cost:
    transformers' processors run `torch.isin` over the whole vocabulary at every token (about
    1 ms each on two CPU cores, several percent of a decode step)."""

    def __init__(
        self, always: list[int], eos: list[int], eos_from: int, device: Any = "cpu"
    ) -> None:
        self.always = torch.tensor(always, dtype=torch.long, device=device)
        self.both = torch.tensor(sorted({*always, *eos}), dtype=torch.long, device=device)
        self.eos_from = eos_from

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ids = self.both if input_ids.shape[1] < self.eos_from else self.always
        if not len(ids):
            return scores
        return scores.index_fill(1, ids, float("-inf"))


def _count_note(config: Any, kind: str, label: str) -> str:
    """For the raw-answer panel: how a count was made from the detections, where it is more
    than their number (`DetectorConfig.count_of`)."""
    if kind not in {"count", "compare"} or not config.scales_counts(label):
        return ""
    return (f" Counted as the detections in the asked part x {config.count_factor:g}, rounded: "
            "on regions it never saw the detector finds fewer than there are.")


def _generation_error(error: BaseException) -> RuntimeError:
    """What the user reads when ``generate()`` failed."""
    from rsvlm.loading import is_cuda_oom

    if is_cuda_oom(error):
        torch.cuda.empty_cache()
        message = ("The GPU ran out of memory while answering: ask for fewer new tokens, close "
                   "other GPU programs, or run the smaller model (--model embedded).")
    else:
        message = f"Generation failed: {error}"
    exc = RuntimeError(message)
    exc.__cause__ = error
    return exc


def _eos_ids(engine: ChatEngine) -> set[int]:
    ids = engine.model.generation_config.eos_token_id
    if ids is None:
        ids = engine.processor.tokenizer.eos_token_id
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, list | tuple) else {int(ids)}
