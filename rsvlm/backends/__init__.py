"""Pretrained vision-language backends behind one interface (see `rsvlm.backends.base.Family`).

    from rsvlm.backends import family_for, FAMILIES
    family_for("qwen2_5_vl")      # -> Qwen25VL()

Families: Qwen2.5-VL, Qwen3-VL, Florence-2 (incl. Falcon), LLaVA-1.5 (incl. converted GeoChat).
`rsvlm.backends.loader.load_pretrained` loads a hub id or folder of any of them; `ChatEngine`
answers with them as with the embedded model.
"""

from __future__ import annotations

from rsvlm.backends.base import Family, FamilyError
from rsvlm.backends.florence2 import Florence2
from rsvlm.backends.llava import Llava
from rsvlm.backends.qwen_vl import Qwen3VL, Qwen25VL

FAMILIES: dict[str, type[Family]] = {
    cls.name: cls for cls in (Qwen25VL, Qwen3VL, Florence2, Llava)
}


def family_for(model_type: str) -> Family:
    """The family of a ``config.json`` ``model_type``; `FamilyError` naming the supported ones."""
    for cls in FAMILIES.values():
        if model_type in cls.model_types:
            return cls()
    supported = ", ".join(t for cls in FAMILIES.values() for t in cls.model_types)
    raise FamilyError(
        f"model_type {model_type!r} is not a supported vision-language family (supported: "
        f"{supported}, and this project's own 'rsvlm' models)")


__all__ = ["FAMILIES", "Family", "FamilyError", "family_for"]
