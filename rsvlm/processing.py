"""RSVLMProcessor: chat messages / text with `<image>` + images + retrieved texts -> tensors.

It pairs the vision tower's image processor (a transformers 5 ``*ImageProcessorPil`` class, no
torchvision) with the LLM tokenizer, and:

* adds the image token to the tokenizer as a special token (if missing);
* expands every ``<image>`` into exactly ``num_image_tokens`` placeholder tokens (the model's
  ``config.num_image_tokens``; the semantic prompter's semantic-augmented tokens included);
* tokenizes the retrieved descriptions of each image (joined, cut to ``max_semantic_tokens``)
  into ``semantic_input_ids`` and the user query into ``query_input_ids`` (both without special
  tokens; the model embeds them with the LLM's token embeddings);
* builds prompts from chat messages with the tokenizer's chat template when it has one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import BatchFeature, ProcessorMixin

logger = logging.getLogger(__name__)

# Used when the tokenizer has no chat template (plain base models).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class RSVLMProcessor(ProcessorMixin):
    """Image processor + LLM tokenizer for `RSVLMForConditionalGeneration`.

    Args:
        image_processor: the vision tower's image processor (resizes to its input size).
        tokenizer: the LLM tokenizer.
        num_image_tokens: placeholders per image (``config.num_image_tokens``).
        image_token: the placeholder string (``config.image_token``).
        max_semantic_tokens: cut for the tokenized retrieved descriptions of one image.
        chat_template: overrides the tokenizer's template.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int = 1,
        image_token: str = "<image>",
        max_semantic_tokens: int = 256,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        if tokenizer is None or image_processor is None:
            raise ValueError("RSVLMProcessor needs both an image_processor and a tokenizer.")
        if num_image_tokens <= 0:
            raise ValueError(f"num_image_tokens must be positive, got {num_image_tokens}.")
        from rsvlm.modeling import add_image_token

        self.num_image_tokens = int(num_image_tokens)
        self.image_token = image_token
        self.max_semantic_tokens = int(max_semantic_tokens)
        self.image_token_id = add_image_token(tokenizer, image_token)
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_config(cls, config: Any, image_processor: Any, tokenizer: Any) -> RSVLMProcessor:
        """A processor whose placeholder count and token match `config` (an `RSVLMConfig`)."""
        processor = cls(
            image_processor,
            tokenizer,
            num_image_tokens=config.num_image_tokens,
            image_token=config.image_token,
            max_semantic_tokens=config.max_semantic_tokens,
        )
        if config.image_token_id is not None and config.image_token_id != processor.image_token_id:
            raise ValueError(
                f"The tokenizer maps {config.image_token!r} to {processor.image_token_id} but the "
                f"model config says {config.image_token_id}."
            )
        return processor

    # ------------------------------------------------------------------ prompts
    def build_prompt(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render chat messages to a prompt string (``<image>`` kept, expanded in `__call__`).

        Message content is a string (``"<image>\\nWhat is this?"``) or a list of parts
        ``{"type": "image"}`` / ``{"type": "text", "text": ...}``.
        """
        flat = []
        for message in messages:
            if "role" not in message or "content" not in message:
                raise ValueError(f"A chat message needs 'role' and 'content': {message!r}")
            content = message["content"]
            if not isinstance(content, str):
                parts = []
                for part in content:
                    if part.get("type") == "image":
                        parts.append(self.image_token)
                    elif part.get("type") == "text":
                        parts.append(str(part.get("text", "")))
                    else:
                        raise ValueError(f"Unknown message part {part!r}.")
                content = "\n".join(parts)
            flat.append({"role": message["role"], "content": content})
        template = self.chat_template or FALLBACK_CHAT_TEMPLATE
        return self.tokenizer.apply_chat_template(
            flat,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def expand_image_tokens(self, text: str) -> str:
        return text.replace(self.image_token, self.image_token * self.num_image_tokens)

    # ------------------------------------------------------------------ tensors
    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Any = None,
        *,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]] | None = None,
        semantic_texts: Sequence[str] | Sequence[Sequence[str]] | None = None,
        queries: str | Sequence[str | None] | None = None,
        add_generation_prompt: bool = True,
        padding: bool | str = True,
        padding_side: str | None = None,
        add_special_tokens: bool = False,
        return_tensors: str = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Return ``input_ids``, ``attention_mask``, and when given ``pixel_values``,
        ``semantic_input_ids``/``semantic_attention_mask``, ``query_input_ids``/
        ``query_attention_mask`` (one row per image).

        ``text`` may already contain a chat-formatted prompt; otherwise pass ``messages``
        (one conversation or a list of them). Special tokens are not added by default because
        chat templates write their own.
        """
        if return_tensors != "pt":
            raise ValueError("RSVLMProcessor returns PyTorch tensors only (return_tensors='pt').")
        if (text is None) == (messages is None):
            raise ValueError("Pass exactly one of `text` or `messages`.")
        if messages is not None:
            conversations = [messages] if messages and isinstance(messages[0], dict) else messages
            text = [
                self.build_prompt(conv, add_generation_prompt=add_generation_prompt)
                for conv in conversations
            ]
        texts = [text] if isinstance(text, str) else list(text)
        image_list = _as_list(images)
        n_placeholders = sum(t.count(self.image_token) for t in texts)
        if n_placeholders != len(image_list):
            raise ValueError(
                f"The prompt(s) contain {n_placeholders} {self.image_token!r} placeholder(s) but "
                f"{len(image_list)} image(s) were given."
            )
        expanded = [self.expand_image_tokens(t) for t in texts]
        tok_kwargs: dict[str, Any] = {"padding": padding, "add_special_tokens": add_special_tokens}
        if padding_side is not None:
            tok_kwargs["padding_side"] = padding_side
        encoded = self.tokenizer(expanded, return_tensors="pt", **tok_kwargs)
        data: dict[str, Any] = {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
        }
        if image_list:
            pixels = self.image_processor(image_list, return_tensors="pt", **kwargs)
            data.update(dict(pixels))
        if semantic_texts is not None:
            per_image = _per_image(semantic_texts, len(image_list), "semantic_texts")
            joined = ["\n".join(str(t) for t in texts_) for texts_ in per_image]
            ids, mask = self._encode_plain(joined, self.max_semantic_tokens)
            data["semantic_input_ids"], data["semantic_attention_mask"] = ids, mask
        if queries is not None:
            query_list = [queries] if isinstance(queries, str) else list(queries)
            if len(query_list) != len(image_list):
                raise ValueError(
                    f"Got {len(query_list)} queries for {len(image_list)} image(s); give one per image."
                )
            ids, mask = self._encode_plain([q or "" for q in query_list], None)
            data["query_input_ids"], data["query_attention_mask"] = ids, mask
        return BatchFeature(data=data, tensor_type=None)

    def encode_queries(self, texts: Sequence[str],
                       max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Questions as the box head and the prompter read them: ``(ids, mask)``, no special
        tokens, right-padded."""
        return self._encode_plain(list(texts), max_len)

    def _encode_plain(
        self, texts: list[str], max_len: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize without special tokens and right-pad by hand (empty strings give 0 tokens)."""
        rows = []
        for t in texts:
            ids = self.tokenizer(t, add_special_tokens=False)["input_ids"] if t else []
            ids = [i for i in ids if i != self.image_token_id]  # never smuggle placeholders in
            rows.append(ids[:max_len] if max_len is not None else ids)
        width = max((len(r) for r in rows), default=0)
        pad_id = self.tokenizer.pad_token_id
        pad_id = 0 if pad_id is None else pad_id
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, : len(r)] = 1
        return ids, mask

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return [
            "input_ids",
            "attention_mask",
            "pixel_values",
            "semantic_input_ids",
            "semantic_attention_mask",
            "query_input_ids",
            "query_attention_mask",
        ]


def _as_list(images: Any) -> list[Any]:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def _per_image(values: Sequence[Any], n_images: int, name: str) -> list[list[str]]:
    """Normalise ``["a", "b"]`` (one image) or ``[["a"], ["b", "c"]]`` to one list per image."""
    if len(values) == 0:
        return [[] for _ in range(n_images)]
    if all(isinstance(v, str) for v in values):
        values = [list(values)] if n_images == 1 else [[v] for v in values]
    out = [list(v) for v in values]
    if len(out) != n_images:
        raise ValueError(
            f"Got {len(out)} {name} lists for {n_images} image(s); give one per image."
        )
    return out


def _register() -> None:
    from transformers import AutoProcessor

    from rsvlm.configuration import RSVLMConfig

    AutoProcessor.register(RSVLMConfig, RSVLMProcessor, exist_ok=True)


_register()

__all__ = ["FALLBACK_CHAT_TEMPLATE", "RSVLMProcessor"]
