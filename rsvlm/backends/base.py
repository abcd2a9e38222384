"""The interface every pretrained vision-language family implements, and what they share.

A `Family` knows one kind of checkpoint on the hub (``config.json``'s ``model_type``): its
transformers class, how its processor is loaded, how a conversation about one image becomes
model inputs (its own chat template or task prompts, never one we invent), where its answer's
boxes are (its box convention, `rsvlm.backends.conventions`) and which modules stay out of
4-bit. The chat session (`rsvlm.backends.session`) drives any family through this interface.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsvlm.boxes import ParsedBox

logger = logging.getLogger(__name__)

# What reaches the prompt besides the question: retrieved descriptions and the chip's OSM
# features (seed 003's retrieval augmentation, as text). Kept short: every token is prefill.
CONTEXT_HEADER = "Context about this image (may be incomplete):"


class FamilyError(ValueError):
    """A checkpoint of a family this project cannot load; the message names the supported ones."""


@dataclass
class Encoded:
    """Model inputs for one turn, the prompt as text, and the frame the answer's boxes use."""

    inputs: dict[str, Any]
    prompt: str
    frame: dict[str, Any] = field(default_factory=dict)  # e.g. {"resized": (w, h)}


def context_text(retrieved: list[str], osm: list[str]) -> str:
    """The semantic context block of a prompt (empty when there is none)."""
    lines = [f"- {t}" for t in [*retrieved, *osm] if t and t.strip()]
    return f"{CONTEXT_HEADER}\n" + "\n".join(lines) if lines else ""


class Family:
    """One pretrained family. Subclasses set the class attributes and override the hooks."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    model_class: str = ""
    #: multi-turn: earlier turns are part of the prompt (False: every question stands alone)
    conversational: bool = True
    #: follow-up turns feed only new tokens after the previous turn's KV cache
    reuses_cache: bool = True
    #: modules kept in 16-bit when the rest is NF4 (bitsandbytes ``llm_int8_skip_modules``;
    #: transformers 5 matches them from the start of a module name, or as a suffix)
    skip_modules: tuple[str, ...] = ("lm_head",)
    #: LoRA target modules (peft regex over module names), the language model's projections
    lora_target: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    #: streamed text keeps special tokens (Florence-2's locations are special tokens)
    stream_special_tokens: bool = False

    # ------------------------------------------------------------------ loading
    def processor_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the processor (e.g. the pinned pixel budget)."""
        return {}

    def load_processor(self, location: str, *, revision: str | None = None) -> Any:
        """``AutoProcessor`` of ``location``; see `load_processor`."""
        return load_processor(location, revision=revision, **self.processor_kwargs())

    def transformers_class(self) -> Any:
        import transformers

        return getattr(transformers, self.model_class)

    def after_load(self, model: Any, processor: Any) -> None:
        """Fix-ups after loading (generation config and the like)."""

    # ------------------------------------------------------------------ prompting
    def messages(self, turns: list[tuple[str, str | None]], context: str) -> list[dict[str, Any]]:
        """Structured chat messages (the processor's chat template renders them): the image and
        the semantic context in the first user turn, earlier answers as assistant turns."""
        messages: list[dict[str, Any]] = []
        for i, (user, answer) in enumerate(turns):
            content: list[dict[str, Any]] = []
            if i == 0:
                content.append({"type": "image"})
                if context:
                    content.append({"type": "text", "text": context + "\n\n"})
            content.append({"type": "text", "text": user})
            messages.append({"role": "user", "content": content})
            if answer is not None:
                messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return messages

    def user_text(self, question: str, region: str | None) -> str:
        """The user's words as this family expects them (region box, grounding request)."""
        return f"In the region {region}: {question.strip()}" if region else question.strip()

    def region_text(self, processor: Any, box_norm: tuple[float, ...],
                    image_size: tuple[int, int]) -> str:
        """The analyst's drawn rectangle (0-1000 of the chip) in this family's box grammar."""
        from rsvlm.boxes import format_box

        return format_box(None, box_norm)

    def render(self, processor: Any, messages: list[dict[str, Any]]) -> str:
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, processor: Any, image: Any, turns: list[tuple[str, str | None]],
               context: str) -> Encoded:
        prompt = self.render(processor, self.messages(turns, context))
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
        return Encoded(dict(inputs), prompt, self.frame(processor, inputs, image))

    def encode_batch(self, processor: Any, images: list[Any], user: str, contexts: list[str]
                     ) -> tuple[dict[str, Any], list[str], list[dict[str, Any]]]:
        """One first-turn question about several images (a scan batch): inputs padded on the
        left (every row ends where generation starts), the prompts, one box frame per row."""
        prompts = [self.render(processor, self.messages([(user, None)], c)) for c in contexts]
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True,
                           padding_side="left")
        frames = [self.frame(processor, inputs, image, index=i) for i, image in enumerate(images)]
        return dict(inputs), prompts, frames

    def frame(self, processor: Any, inputs: Any, image: Any, index: int = 0) -> dict[str, Any]:
        """What the answer's boxes are relative to, for row ``index`` of ``inputs``."""
        return {}

    # ------------------------------------------------------------------ answers
    def boxes(self, text: str, frame: dict[str, Any], chip_size: tuple[int, int]) -> list[ParsedBox]:
        """The answer's boxes as canonical boxes of the chip (never raises)."""
        return []

    def strip_specials(self, text: str) -> str:
        """``text`` without the special tokens a stream that keeps them shows (a streamed piece:
        spacing stays)."""
        return text

    def clean(self, text: str) -> str:
        """The answer text for display."""
        return self.strip_specials(text).strip()

    # ------------------------------------------------------------------ state
    def save_state(self, model: Any) -> Any:
        """Per-conversation state the model keeps between generate calls (restored before a
        follow-up that reuses the cache): Qwen-VL's multimodal RoPE offsets."""
        return None

    def restore_state(self, model: Any, state: Any) -> None:
        pass


# ----------------------------------------------------------------------------------------------
# Processor loading
# ----------------------------------------------------------------------------------------------


def _no_video(cls: type) -> type:
    """``cls`` (a Qwen-VL processor) accepting ``video_processor=None``.

    transformers' Qwen-VL processors also load a video processor, which needs torchvision;
    this project runs without it (a CPU torchvision wheel is not on PyPI for every torch), and
    only still images are asked about."""

    class NoVideo(cls):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    NoVideo.__name__ = cls.__name__
    NoVideo.__qualname__ = cls.__qualname__
    return NoVideo


def _chat_template(location: str, revision: str | None) -> str | None:
    """The processor's chat template file of a folder or hub repo (jinja, or json)."""
    from transformers.utils import cached_file

    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            path = cached_file(location, name, revision=revision,
                               _raise_exceptions_for_missing_entries=False)
        except OSError:
            path = None
        if path:
            text = Path(path).read_text(encoding="utf-8")
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None


def load_processor(location: str, *, revision: str | None = None, **kwargs: Any) -> Any:
    """``AutoProcessor.from_pretrained(location)``, assembled from its parts when the stock path
    needs torchvision (Qwen-VL's video processor): tokenizer, image processor and chat template
    are read from the same files, only the video processor is left out."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(location, revision=revision, **kwargs)
    except (ImportError, AttributeError, ValueError) as exc:
        if "torchvision" not in str(exc).lower() and "video" not in str(exc).lower() \
                and "_extra_content" not in str(exc):
            raise
        logger.info("assembling the processor of %s without a video processor (%s)", location,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    import transformers
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(location, revision=revision)
    processor_class = _PROCESSOR_CLASSES.get(config.model_type)
    if processor_class is None:
        raise FamilyError(f"no processor known for model_type {config.model_type!r}")
    cls = _no_video(getattr(transformers, processor_class))
    tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
    image_processor = AutoImageProcessor.from_pretrained(location, revision=revision, **kwargs)
    template = _chat_template(location, revision) or getattr(tokenizer, "chat_template", None)
    return cls(image_processor, tokenizer, None, chat_template=template)


_PROCESSOR_CLASSES = {
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
}


__all__ = ["CONTEXT_HEADER", "Encoded", "Family", "FamilyError", "context_text", "load_processor"]
