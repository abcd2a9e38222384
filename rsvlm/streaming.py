"""What every backend's sessions share around `generate()`: a streamer that records the
first-token time, and a stop that a cancelled answer sets."""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
from transformers import StoppingCriteria, TextIteratorStreamer


class TimedStreamer(TextIteratorStreamer):
    """A text streamer that also records when the first new token arrived and how many came."""

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True,
                 timeout: float | None = 600.0) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=skip_special_tokens,
                         timeout=timeout)
        self.first_token_at: float | None = None
        self.n_new = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.next_tokens_are_prompt:
            self.n_new += int(value.numel())
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
        super().put(value)


class CancelOnEvent(StoppingCriteria):
    """Stops generation once ``event`` is set (the consumer went away or pressed Stop)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)
