"""Register the RSVLM classes with the transformers Auto classes.

Importing `rsvlm.configuration`, `rsvlm.modeling` and `rsvlm.processing` registers each class
(`AutoConfig`; `AutoModelForImageTextToText` and `AutoModel`; `AutoProcessor`); `register()`
imports all three so that ``AutoModelForImageTextToText.from_pretrained(dir)`` and
``AutoProcessor.from_pretrained(dir)`` work on a saved RSVLM checkpoint.
"""

from __future__ import annotations


def register() -> None:
    """Import the RSVLM modules, which register themselves (idempotent)."""
    import rsvlm.configuration  # noqa: F401
    import rsvlm.modeling  # noqa: F401
    import rsvlm.processing  # noqa: F401


__all__ = ["register"]
