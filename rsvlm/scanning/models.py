"""Answerer factories: picklable recipes that build the answer function inside a worker.

A Ray actor cannot receive a loaded model (gigabytes, CUDA handles); it receives a small
factory and calls it once in its constructor, so every actor holds exactly one model. The
local engine calls the same factory in-process. An answer function takes a list of `Chip`
and the question and returns one answer text per chip (`rsvlm.scan.AnswerFn`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

AnswerFn = Callable[[Sequence[Any], str], list[str]]


@dataclass(frozen=True)
class ModelAnswerer:
    """A model preset or directory (`rsvlm.loading.load`) answering batches of chips.

    ``device`` None lets `load` choose (CUDA when the process sees a GPU: a Ray actor with
    ``num_gpus=1`` sees exactly one). The other fields are `rsvlm ask`'s options for pretrained
    backends (``quantize`` None: 4-bit on CUDA as the preset says; ``context`` False: the
    ablation without retrieved/OSM text; ``osm``: a GeoJSON/GPKG path read in the worker).
    """

    model: str | None = None
    decode: str = "auto"
    max_new_tokens: int = 256
    device: str | None = None
    quantize: bool | None = None
    adapter: str | None = None
    allow_untrained: bool = False
    retriever: str | None = "embedded"
    context: bool = True
    osm: str | None = None

    def __call__(self) -> AnswerFn:
        from rsvlm import loading
        from rsvlm.engine import ChatEngine
        from rsvlm.scan import engine_answer_fn

        loaded = loading.load(
            self.model, device=self.device, quantize=self.quantize, adapter=self.adapter,
            allow_untrained=self.allow_untrained, retriever=self.retriever,
        )  # fmt: skip
        osm = None
        if self.osm:
            from rsvlm.backends.semantics import osm_context

            osm = osm_context(self.osm)
        engine = ChatEngine(
            loaded, max_new_tokens=self.max_new_tokens, decode_backend=self.decode,
            semantic_context=self.context, osm=osm,
        )  # fmt: skip
        return engine_answer_fn(engine, max_new_tokens=self.max_new_tokens)

    def describe(self) -> str:
        return f"model {self.model or 'default'} (decode {self.decode})"


#: Where the fake model "sees" an object in every chip (0-1000 of the chip).
FAKE_BOX = (400, 400, 600, 600)


@dataclass(frozen=True)
class FakeAnswerer:
    """Canned answers (one box in the middle of every chip): the pipeline without a model.

    ``delay_s`` per batch stands in for a model's time (to watch progress, or to kill a run).
    """

    label: str = "object"
    delay_s: float = field(default=0.0, repr=False)  # not part of what the scan is

    def __call__(self) -> AnswerFn:
        import time

        x1, y1, x2, y2 = FAKE_BOX
        text = f"<ref>{self.label}</ref><box>[{x1},{y1},{x2},{y2}]</box>"

        def answer(chips: Sequence[Any], question: str) -> list[str]:
            if self.delay_s > 0:
                time.sleep(self.delay_s)
            return [text for _ in chips]

        return answer

    def describe(self) -> str:
        return "fake model (one canned box per chip)"
