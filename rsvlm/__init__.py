"""rsvlm: the remote-sensing vision-language model family.

Heavy modules (torch, transformers) load lazily on first attribute access, so ``import rsvlm``
stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "RSVLMConfig": "rsvlm.configuration",
    "RSVLMForConditionalGeneration": "rsvlm.modeling",
    "RSVLMProcessor": "rsvlm.processing",
    "register_auto_classes": "rsvlm.auto",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rsvlm' has no attribute {name!r}")
    attr = "register" if name == "register_auto_classes" else name
    return getattr(importlib.import_module(module), attr)


__all__ = sorted(_LAZY)
