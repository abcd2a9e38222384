#!/usr/bin/env python
"""Prefill tokens of a follow-up question with and without the session's KV cache, per family.

Tiny random checkpoints (`rsvlm.backends.tiny`) on the CPU: the counts show what the cache saves
(the image and the first turn are not fed again), and that the answer is the one a fresh prefill
gives. Numbers of tiny models: the image-token share of a real model's prompt is far larger.

    python scripts/backend_cache_reuse.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> None:
    from rsvlm.backends.tiny import write_tiny_checkpoint
    from rsvlm.engine import ChatEngine
    from rsvlm.loading import load

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8))
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("qwen2_5_vl", "qwen3_vl", "llava"):
            engine = ChatEngine(load(str(write_tiny_checkpoint(family, Path(tmp) / family)),
                                     device="cpu"), max_new_tokens=8)
            cached, fresh = engine.session(image), engine.session(image)
            for session in (cached, fresh):
                list(session.ask("find all buildings"))
            first = cached.last.timing["prefill_tokens"]
            fresh.drop_cache()
            for session in (cached, fresh):
                list(session.ask("how many are there?"))
            print(f"{family}: turn 1 prefill {first} tokens; follow-up from the cache "
                  f"{cached.last.timing['prefill_tokens']}, from a fresh prefill "
                  f"{fresh.last.timing['prefill_tokens']}; same answer: "
                  f"{cached.last.text == fresh.last.text}")


if __name__ == "__main__":
    main()
