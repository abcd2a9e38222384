"""The one seam between the app and a model: a `Backend` that opens chat sessions on a chip.

The UI never touches model code. It talks to a `Backend` (``info``, ``new_session(chip)``) whose
sessions stream answer text and then expose the grounded result as `rsvlm.answer.Answer` (the
one result type; its boxes carry shapely geometries in EPSG:4326). Three backends:

- `EngineBackend`: the real model (`rsvlm.loading.load` + `rsvlm.engine.ChatEngine`); its
  sessions are the engine's `ChatSession`s, unchanged.
- `FakeBackend`: deterministic canned answers in the canonical box grammar, so tests, the load
  script and ``rsvlm-app --fake-model`` exercise parse -> pixels -> chip transform -> map for real.
- `LoadingBackend`: loads another backend in a thread, so the page comes up at once and shows
  progress while weights are converted or loaded.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from rsvlm.answer import Answer, ground

if TYPE_CHECKING:
    from tiles import Chip

log = logging.getLogger(__name__)


@runtime_checkable
class Session(Protocol):
    last: Answer | None

    def ask(self, question: str, region_box_px: Sequence[float] | None = None) -> Iterator[str]:
        """Stream text deltas of the answer; afterwards ``last`` holds the full `Answer`."""
        ...


@runtime_checkable
class Backend(Protocol):
    @property
    def info(self) -> dict[str, Any]:
        """preset, device, precision, load_s, why (and ``state`` for `LoadingBackend`)."""
        ...

    def new_session(self, chip: Chip) -> Session: ...


class BackendNotReady(RuntimeError):
    """The model is still loading (or failed to load); the message says which."""


# --- fake backend ------------------------------------------------------------------------------

#: Fixed boxes (0-1000 of the chip) the fake model "finds"; tests derive positions from these.
FAKE_BOXES: tuple[tuple[int, int, int, int], ...] = (
    (100, 120, 300, 330),
    (550, 500, 800, 760),
    (400, 50, 520, 200),
)
#: The fake model's confidence in each of `FAKE_BOXES` (so score filters have something to do).
FAKE_SCORES: tuple[float, ...] = (0.92, 0.81, 0.47)
FAKE_RETRIEVED: tuple[dict[str, Any], ...] = (
    {"text": "Dense residential area with small buildings with metal roofs.", "score": 0.71},
    {"text": "Unpaved roads between closely spaced houses.", "score": 0.64},
    {"text": "A few trees and bare soil between buildings.", "score": 0.52},
)
_CLASS_WORDS = re.compile(r"(?:find|count|detect|locate|where are|how many)\s+(?:all\s+|the\s+)?"
                          r"(?P<cls>[\w\- ]+?)s?\b(?:\?|$| in | on )", re.I)


class FakeSession:
    """Deterministic answers; echoes the question so escaping of user text is exercised too."""

    def __init__(self, chip: Chip, delay_s: float = 0.0) -> None:
        self.chip = chip
        self.delay_s = delay_s
        self.turns: list[tuple[str, str]] = []
        self.last: Answer | None = None

    def _reply(self, question: str) -> str:
        q = question.lower()
        if any(w in q for w in ("find", "count", "detect", "locate", "where", "how many")):
            m = _CLASS_WORDS.search(question.strip())
            cls = (m.group("cls").strip() if m else "object") or "object"
            boxes = " ".join(f"<ref>{cls}</ref><box>[{x1},{y1},{x2},{y2}]</box>"
                             for x1, y1, x2, y2 in FAKE_BOXES)
            return f"I found {len(FAKE_BOXES)} {cls}(s): {boxes}"
        if "classif" in q or "what kind" in q:
            return "This scene is a dense residential area."
        if "describ" in q:
            return ("The image shows closely spaced small buildings with metal roofs, narrow "
                    "unpaved roads and a few trees.")
        return f"(fake model) You asked: {question}"

    def ask(self, question: str, region_box_px: Sequence[float] | None = None) -> Iterator[str]:
        t0 = time.perf_counter()
        region = "" if region_box_px is None else f" region={list(region_box_px)}"
        prompt = (f"<image> [{self.chip.width}x{self.chip.height} chip]{region}\n"
                  f"Retrieved: {' | '.join(r['text'] for r in FAKE_RETRIEVED)}\n"
                  + "".join(f"USER: {q}\nASSISTANT: {a}\n" for q, a in self.turns[-4:])
                  + f"USER: {question}\nASSISTANT:")
        text = self._reply(question)
        for word in re.findall(r"\S+\s*", text):
            if self.delay_s:
                time.sleep(self.delay_s)
            yield word
        self.turns.append((question, text))
        del self.turns[:-8]  # bounded history
        self.last = Answer(text=text, boxes=ground(text, self.chip, scores=FAKE_SCORES),
                           retrieved=[dict(r) for r in FAKE_RETRIEVED],
                           timing={"total_s": time.perf_counter() - t0}, prompt=prompt)


class FakeBackend:
    """A stand-in model for tests, demos without weights and load tests."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    @property
    def info(self) -> dict[str, Any]:
        return {"preset": "fake", "device": "cpu", "precision": "none", "load_s": 0.0,
                "why": "--fake-model: canned answers for testing the app, not a model",
                "state": "ready"}

    def new_session(self, chip: Chip) -> FakeSession:
        return FakeSession(chip, self.delay_s)


# --- the real engine ---------------------------------------------------------------------------

class EngineBackend:
    """The real model through `rsvlm.engine.ChatEngine`."""

    def __init__(self, loaded: Any, decode: str | None = "auto", *,
                 semantic_context: bool = True, osm: Callable[[Any], list[str]] | None = None
                 ) -> None:
        from rsvlm.engine import ChatEngine

        self.loaded = loaded
        # Bounded answers on CPU; the first start with new weights exports the CPU decoder.
        # ``osm(chip)``: OSM lines a pretrained model's prompt gets as context.
        self.engine = ChatEngine(loaded, max_new_tokens=160, decode_backend=decode,
                                 semantic_context=semantic_context, osm=osm)

    @property
    def info(self) -> dict[str, Any]:
        return {**dict(self.loaded.info), "decode": self.engine.info.get("decode"),
                **{k: self.engine.info[k] for k in ("detector_tower",) if k in self.engine.info},
                "state": "ready"}

    def new_session(self, chip: Chip) -> Session:
        return self.engine.session(chip)

    @classmethod
    def load(cls, model: str | None = None, *, device: str | None = None,
             quantize: bool | None = None,
             progress: Callable[[str], None] | None = None,
             decode: str | None = "auto", adapter: str | None = None,
             allow_untrained: bool = False, semantic_context: bool = True,
             osm: Callable[[Any], list[str]] | None = None) -> EngineBackend:
        from rsvlm.loading import load

        loaded = load(model, device=device, quantize=quantize, progress=progress,
                      adapter=adapter, allow_untrained=allow_untrained, retriever="embedded")
        if progress is not None and loaded.info.get("device") == "cpu" \
                and not loaded.info.get("pretrained"):
            progress("Preparing the decoder and the detector's tower (the first start with "
                     "new weights exports them to ONNX Runtime, about 45 s) ...")
        return cls(loaded, decode=decode, semantic_context=semantic_context, osm=osm)


class LoadingBackend:
    """Loads the real backend in a thread; until then sessions refuse with a clear message."""

    def __init__(self, factory: Callable[[Callable[[str], None]], Backend],
                 name: str = "model") -> None:
        """``factory(progress)`` builds the backend, calling ``progress(message)`` as it goes."""
        self.name = name
        self._factory = factory
        self._inner: Backend | None = None
        self._error: str | None = None
        self._t0 = time.perf_counter()
        self._progress = ""
        self._thread = threading.Thread(target=self._run, name="model-loader", daemon=True)
        self._thread.start()

    def _say(self, message: str) -> None:
        log.info("%s", message)
        self._progress = str(message)[:300]

    def _run(self) -> None:
        try:
            self._inner = self._factory(self._say)
            log.info("model ready: %s", self._inner.info)
        except Exception as exc:  # shown in the status panel; the app stays up
            log.exception("model failed to load")
            self._error = f"{type(exc).__name__}: {exc}"

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return self._inner is not None

    @property
    def info(self) -> dict[str, Any]:
        if self._inner is not None:
            return self._inner.info
        if self._error is not None:
            return {"preset": self.name, "state": "failed", "why": self._error}
        elapsed = time.perf_counter() - self._t0
        return {"preset": self.name, "state": "loading",
                "why": f"{elapsed:.0f} s. {self._progress}".strip()}

    def new_session(self, chip: Chip) -> Session:
        if self._inner is None:
            info = self.info
            raise BackendNotReady(f"The model is {info['state']}: {info['why']}")
        return self._inner.new_session(chip)
