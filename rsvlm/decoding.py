"""Who runs the decode steps: a strategy the chat engine picks once and hooks around ``generate()``.

The model's ``forward`` only models. How its decode steps run is a `DecodeStrategy` chosen when
the engine is built and installed for the length of one ``generate()`` call by
``strategy.hooked(model)`` (a context manager, as peft's forward-hook context managers are):

- `TorchDecode` (``torch``): nothing is hooked; PyTorch runs every step. Works for any model,
  of any family, on any device.
- `rsvlm.onnx_decode.OnnxDecode` (``onnx``, ``onnx-int8``): plain text continuations of the KV
  cache run in an ONNX Runtime graph of the decoder (the CPU fast path).

`choose` walks `DISPATCHERS` in order, as peft's LoRA dispatchers do: each takes
``(model, mode, explicit)`` and returns a strategy, or None when it does not handle ``mode`` or
cannot run this model. A new decoding path (another runtime, another model family's fast path)
is one more dispatcher placed before `dispatch_torch`, which always answers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

MODES = ("torch", "onnx", "onnx-int8")


@runtime_checkable
class DecodeStrategy(Protocol):
    """How the decode steps of one model run."""

    #: what the engine reports as ``info["decode"]``
    name: str

    def hooked(self, model: Any) -> AbstractContextManager[None]:
        """A context manager that routes ``model``'s decode steps while it is open."""
        ...


class TorchDecode:
    """PyTorch runs every step: nothing to hook."""

    name = "torch"

    def hooked(self, model: Any) -> AbstractContextManager[None]:
        return contextlib.nullcontext()


def resolve_mode(mode: str | None) -> str:
    """``auto`` (or None) -> ``$RSVLM_DECODE`` if set, else ``onnx``; validates the name."""
    chosen = (mode or "auto").lower()
    if chosen == "auto":
        chosen = os.environ.get("RSVLM_DECODE", "onnx").lower()
    if chosen not in MODES:
        raise ValueError(
            f"Unknown decode backend {chosen!r}; choose from auto, {', '.join(MODES)}."
        )
    return chosen


def dispatch_onnx(model: Any, mode: str, explicit: bool) -> DecodeStrategy | None:
    from rsvlm.onnx_decode import dispatch

    return dispatch(model, mode, explicit)


def dispatch_torch(model: Any, mode: str, explicit: bool) -> DecodeStrategy | None:
    return TorchDecode()


Dispatcher = Callable[[Any, str, bool], "DecodeStrategy | None"]
#: Tried in order; the first strategy returned wins (the last one always answers).
DISPATCHERS: list[Dispatcher] = [dispatch_onnx, dispatch_torch]


def choose(model: Any, mode: str | None = "auto") -> DecodeStrategy:
    """The decode strategy for ``model`` and ``mode`` (``auto``, ``torch``, ``onnx``,
    ``onnx-int8``). ``auto`` falls back to PyTorch with a log line where a faster path cannot run
    this model; a named mode that cannot run raises `RuntimeError`."""
    chosen = resolve_mode(mode)
    explicit = mode not in (None, "auto")
    for dispatcher in DISPATCHERS:
        strategy = dispatcher(model, chosen, explicit)
        if strategy is not None:
            return strategy
    raise RuntimeError(f"No decode strategy handles {chosen!r}.")


__all__ = [
    "DISPATCHERS",
    "MODES",
    "DecodeStrategy",
    "TorchDecode",
    "choose",
    "dispatch_onnx",
    "dispatch_torch",
    "resolve_mode",
]
