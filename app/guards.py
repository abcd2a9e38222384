"""Checks between what a user sends and what the model sees: coverage of the chip by imagery,
bboxes that cannot apply, questions that are too long, messages that must not leak server paths,
and the one log line a rejected input gets.

Coverage rule: the chip is what the model is asked about, so it must mostly be imagery. A bbox
that contains the whole imagery is clipped to it (asking about "this area" around a small scene
means the scene); otherwise a chip covered less than `MIN_COVERAGE` by valid pixels is refused
with the imagery's bounds, and a chip with no valid pixel at all (all NaN / nodata) always is.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from tiles import ImageryError

if TYPE_CHECKING:
    from tiles import Chip, Source

log = logging.getLogger("app.rejected")

Bounds = tuple[float, float, float, float]
#: Fraction of the chip that must be valid imagery for a question to be answered.
MIN_COVERAGE = 0.25
MAX_QUESTION_CHARS = 2000
MAX_CLASS_CHARS = 60
_ABS_PATH = re.compile(r"(?<![\w.:/\\])(?:[A-Za-z]:)?[/\\](?:[^\s'\"<>:]+[/\\])+([^\s'\"<>/\\]+)")


class UserError(ValueError):
    """Bad input from the user; the message is shown as is."""


def reject(kind: str, reason: str) -> None:
    """The one log line for a rejected input: its kind and a short reason (no traceback, no
    echo of a long input)."""
    text = " ".join(str(reason).split())
    log.info("rejected %s: %s", kind, text[:160] + ("…" if len(text) > 160 else ""))


def public(message: str) -> str:
    """``message`` with every absolute server path reduced to its file name."""
    return _ABS_PATH.sub(lambda m: m.group(1), message)


def check_question(question: str | None, limit: int = MAX_QUESTION_CHARS) -> str:
    """The stripped question; `UserError` when empty or longer than ``limit`` (never cut
    silently: a cut question is a different question)."""
    text = (question or "").strip()
    if not text:
        raise UserError("The question is empty.")
    if len(text) > limit:
        raise UserError(f"The question is {len(text):,} characters long; the limit is "
                        f"{limit:,}. Shorten it and ask again.")
    return text


def check_class(cls: str | None) -> str:
    text = (cls or "buildings").strip() or "buildings"
    if len(text) > MAX_CLASS_CHARS:
        raise UserError(f"The class name is {len(text):,} characters long; the limit is "
                        f"{MAX_CLASS_CHARS}.")
    return text


def _fmt(bounds: Bounds | None) -> str:
    return "?" if bounds is None else ",".join(f"{v:.6f}" for v in bounds)


def _contains(outer: Bounds, inner: Bounds) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] \
        and outer[3] >= inner[3]


def coverage(chip: Chip) -> float:
    """Fraction of the chip's pixels that are valid imagery (1.0 without a mask)."""
    return 1.0 if chip.mask is None else float(chip.mask.mean())


def checked_chip(src: Source, bbox: Bounds | None, *, size: int,
                 min_coverage: float = MIN_COVERAGE) -> Chip:
    """A chip of ``bbox`` (lon/lat; None: the whole source) that is mostly imagery, with its
    coverage in ``chip.meta["coverage"]``; `UserError` with the reason otherwise."""
    where = src.bounds_lonlat
    if bbox is not None and not src.georeferenced:
        raise UserError(f"{src.name!r} has no georeference (no CRS), so a lon/lat bbox cannot be "
                        "placed on it; leave the bbox empty to ask about the whole picture.")
    if bbox is not None and where is not None and _contains(bbox, where):
        bbox = where  # the bbox holds the whole scene: ask about the scene
    try:
        chip = src.chip(bbox, crs="EPSG:4326", size=size)
    except ImageryError as exc:
        if bbox is not None and "overlap" in str(exc):
            raise UserError(f"The bbox {_fmt(bbox)} does not overlap the imagery "
                            f"{src.name!r}, which covers W,S,E,N = {_fmt(where)}.") from exc
        raise UserError(public(str(exc))) from exc
    frac = coverage(chip)
    chip.meta["coverage"] = round(frac, 4)
    if frac == 0.0:
        raise UserError(f"{src.name!r} has no valid pixels in the requested area (every pixel "
                        "is no-data or NaN): there is nothing to look at.")
    if frac < min_coverage:
        raise UserError(f"The imagery covers only {frac:.1%} of the requested area (at least "
                        f"{min_coverage:.0%} is needed for a meaningful answer). {src.name!r} "
                        f"covers W,S,E,N = {_fmt(where)}; ask about an area inside it.")
    return chip


def chip_summary(chip: Chip) -> dict[str, Any]:
    """What the API returns about the chip next to the detections."""
    bounds = chip.bounds_lonlat
    return {"coverage": chip.meta.get("coverage", 1.0),
            "bounds_lonlat": None if bounds is None else [round(v, 7) for v in bounds],
            "size_px": [chip.width, chip.height]}


#: Gradio functions that turn request data into handler inputs: an exception raised under one
#: of them is a rejected input (a FileData path outside the uploads, a URL that fails the SSRF
#: check, a wrong number of inputs), not a fault of the app.
_GRADIO_INPUT_STAGE = {"preprocess_data", "validate_inputs", "async_move_files_to_cache"}


class _OneLineRejections:
    """Stands in for the `traceback` module inside `gradio.queueing`: inputs Gradio rejects
    before a handler runs get one `reject` line; every other exception keeps its traceback."""

    def __init__(self, module: Any) -> None:
        self._tb = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tb, name)

    def print_exc(self, *args: Any, **kwargs: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        frames = self._tb.extract_tb(exc.__traceback__) if exc is not None else []
        if any(f.name in _GRADIO_INPUT_STAGE for f in frames):
            reject("input", f"{type(exc).__name__}: {public(str(exc))}")
        else:
            self._tb.print_exc(*args, **kwargs)


def quiet_gradio_input_errors() -> None:
    """Make Gradio log its own input rejections as one line (see `_OneLineRejections`)."""
    import traceback

    import gradio.queueing as queueing

    if not isinstance(queueing.traceback, _OneLineRejections):
        queueing.traceback = _OneLineRejections(traceback)  # type: ignore[assignment]
