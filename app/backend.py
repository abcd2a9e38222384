"""The one seam between the app and a model: a `Backend` that opens chat sessions on a chip.

The UI never touches model code. It talks to a `Backend` (``info``, ``new_session(chip)``) whose
sessions stream answer text and then expose the grounded result as `Answer`. Three backends:

- `EngineBackend`: the real model (`rsvlm.loading.load` + `rsvlm.engine.ChatEngine`).
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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from tiles import Chip

log = logging.getLogger(__name__)


@dataclass
class AnswerBox:
    """One grounded object: chip pixels, and its polygon in EPSG:4326 when the chip has one."""

    label: str
    box_px: tuple[float, float, float, float]
    geometry: Any = None  # shapely geometry in EPSG:4326, or None in pixel space
    angle: float | None = None
    score: float | None = None  # the model's confidence in this box, when it has one


@dataclass
class Answer:
    text: str
    boxes: list[AnswerBox] = field(default_factory=list)
    retrieved: list[tuple[str, float]] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    prompt: str = ""


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


# --- grounding shared by the fake backend ------------------------------------------------------

_CANONICAL = re.compile(r"<ref>(?P<label>.*?)</ref>\s*<box>\[(?P<nums>[^\]]*)\]</box>", re.S)


def parse_answer_boxes(text: str, chip: Chip) -> list[AnswerBox]:
    """Boxes in ``text`` -> chip pixels -> EPSG:4326 polygons through the chip's transform.

    Uses `rsvlm.boxes.parse_boxes` (every grammar the model family knows) when importable; the
    fallback reads only the canonical ``<ref>label</ref><box>[x1,y1,x2,y2]</box>`` (0-1000).
    """
    out: list[AnswerBox] = []
    try:
        from rsvlm.boxes import parse_boxes
    except ImportError:  # rsvlm.boxes not there yet: canonical grammar only
        parse_boxes = None
    if parse_boxes is not None:
        for pb in parse_boxes(text, image_size=(chip.width, chip.height)):
            x1, y1, x2, y2 = (float(v) for v in pb.to_pixels(chip.width, chip.height)[:4])
            out.append(_box(chip, pb.label or "object", (x1, y1, x2, y2), pb.angle))
        return out
    for m in _CANONICAL.finditer(text):
        try:
            nums = [float(v) for v in m.group("nums").split(",")]
        except ValueError:
            continue
        if len(nums) not in (4, 5):
            continue
        x1, y1, x2, y2 = (nums[0] * chip.width / 1000, nums[1] * chip.height / 1000,
                          nums[2] * chip.width / 1000, nums[3] * chip.height / 1000)
        out.append(_box(chip, m.group("label").strip() or "object", (x1, y1, x2, y2),
                        nums[4] if len(nums) == 5 else None))
    return out


def _box(chip: Chip, label: str, box: tuple[float, float, float, float], angle: float | None
         ) -> AnswerBox:
    if angle:
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        geom = chip.obb_to_polygon(cx, cy, box[2] - box[0], box[3] - box[1], angle)
    else:
        geom = chip.box_to_polygon(box)
    return AnswerBox(label=label, box_px=box, geometry=geom, angle=angle)


# --- fake backend ------------------------------------------------------------------------------

#: Fixed boxes (0-1000 of the chip) the fake model "finds"; tests derive positions from these.
FAKE_BOXES: tuple[tuple[int, int, int, int], ...] = (
    (100, 120, 300, 330),
    (550, 500, 800, 760),
    (400, 50, 520, 200),
)
#: The fake model's confidence in each of `FAKE_BOXES` (so score filters have something to do).
FAKE_SCORES: tuple[float, ...] = (0.92, 0.81, 0.47)
FAKE_RETRIEVED: tuple[tuple[str, float], ...] = (
    ("Dense residential area with small buildings with metal roofs.", 0.71),
    ("Unpaved roads between closely spaced houses.", 0.64),
    ("A few trees and bare soil between buildings.", 0.52),
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
                  f"Retrieved: {' | '.join(t for t, _ in FAKE_RETRIEVED)}\n"
                  + "".join(f"USER: {q}\nASSISTANT: {a}\n" for q, a in self.turns[-4:])
                  + f"USER: {question}\nASSISTANT:")
        text = self._reply(question)
        for word in re.findall(r"\S+\s*", text):
            if self.delay_s:
                time.sleep(self.delay_s)
            yield word
        self.turns.append((question, text))
        del self.turns[:-8]  # bounded history
        boxes = parse_answer_boxes(text, self.chip)
        for box, score in zip(boxes, FAKE_SCORES, strict=False):
            box.score = score
        self.last = Answer(text=text, boxes=boxes,
                           retrieved=list(FAKE_RETRIEVED),
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

class EngineSession:
    """Adapts `rsvlm.engine.ChatSession` to `Session`: GeoJSON geometries -> shapely, retrieval
    hits -> (text, score) pairs."""

    def __init__(self, inner: Any, chip: Chip) -> None:
        self.inner = inner
        self.chip = chip
        self.last: Answer | None = None

    def ask(self, question: str, region_box_px: Sequence[float] | None = None) -> Iterator[str]:
        from shapely.geometry import shape
        from shapely.geometry.base import BaseGeometry

        box = None if region_box_px is None else tuple(float(v) for v in region_box_px)
        yield from self.inner.ask(question, region_box_px=box)
        a = self.inner.last
        boxes = []
        for b in a.boxes or []:
            geom = b.geometry
            if geom is not None and not isinstance(geom, BaseGeometry):
                geom = shape(geom)
            boxes.append(AnswerBox(label=str(b.label or "object"),
                                   box_px=tuple(float(v) for v in b.box_px[:4]),
                                   geometry=geom, angle=getattr(b, "angle", None),
                                   score=getattr(b, "score", None)))
        retrieved = []
        for hit in a.retrieved or []:
            if isinstance(hit, dict):
                retrieved.append((str(hit.get("text", "")), float(hit.get("score", 0.0))))
            else:
                retrieved.append((str(getattr(hit, "text", hit)), float(getattr(hit, "score", 0))))
        self.last = Answer(text=a.text, boxes=boxes, retrieved=retrieved,
                           timing=dict(a.timing or {}), prompt=str(a.prompt or ""))


class EngineBackend:
    """The real model through `rsvlm.engine.ChatEngine`."""

    def __init__(self, loaded: Any, decode: str | None = "auto") -> None:
        from rsvlm.engine import ChatEngine

        self.loaded = loaded
        # Bounded answers on CPU; the first start with new weights exports the CPU decoder.
        self.engine = ChatEngine(loaded, max_new_tokens=160, decode_backend=decode)

    @property
    def info(self) -> dict[str, Any]:
        return {**dict(self.loaded.info), "decode": self.engine.info.get("decode"),
                "state": "ready"}

    def new_session(self, chip: Chip) -> EngineSession:
        return EngineSession(self.engine.session(chip), chip)

    @classmethod
    def load(cls, model: str | None = None, *, device: str | None = None,
             quantize: bool | None = None,
             progress: Callable[[str], None] | None = None,
             decode: str | None = "auto") -> EngineBackend:
        from rsvlm.loading import load

        loaded = load(model, device=device, quantize=quantize, progress=progress)
        if progress is not None and loaded.info.get("device") == "cpu":
            progress("Preparing the decoder (the first start with new weights exports it "
                     "to ONNX Runtime, about 30 s) ...")
        return cls(loaded, decode=decode)


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
