"""Tiny random RSVLM models, tokenizers and processors for tests (no downloads, CPU, < 1 s).

Shared by the tests of `rsvlm`, `training` and `app`:

    >>> from rsvlm.testing import tiny_model, tiny_processor
    >>> processor = tiny_processor()
    >>> model = tiny_model(connector_type="mlp", image_token_id=processor.image_token_id)
"""

from __future__ import annotations

from typing import Any

WORDS = [
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "at",
    "and",
    "or",
    "is",
    "are",
    "what",
    "how",
    "many",
    "where",
    "which",
    "there",
    "this",
    "that",
    "image",
    "scene",
    "area",
    "building",
    "buildings",
    "road",
    "roads",
    "river",
    "water",
    "tree",
    "trees",
    "field",
    "fields",
    "farmland",
    "forest",
    "residential",
    "industrial",
    "commercial",
    "urban",
    "rural",
    "village",
    "city",
    "house",
    "houses",
    "car",
    "cars",
    "parking",
    "lot",
    "airport",
    "runway",
    "harbor",
    "ship",
    "ships",
    "bridge",
    "park",
    "green",
    "dense",
    "sparse",
    "large",
    "small",
    "left",
    "right",
    "top",
    "bottom",
    "center",
    "near",
    "one",
    "two",
    "three",
    "four",
    "five",
    "yes",
    "no",
    "count",
    "describe",
    "answer",
    "question",
    "user",
    "assistant",
    "system",
    "you",
    "see",
    "box",
    "ref",
    ",",
    ".",
    "?",
    ":",
    "!",
    "(",
    ")",
    "[",
    "]",
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    "10",
    "100",
    "1000",
]  # noqa: SIM905 (a word list reads better as text)
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")
# The tokenizer's vocabulary; the image token is added right after it.
TINY_IMAGE_TOKEN_ID = len(SPECIAL) + len(WORDS)
TINY_VOCAB_SIZE = TINY_IMAGE_TOKEN_ID + 1
CHAT_TEMPLATE = (
    "{% for message in messages %}<s> {{ message['role'] }} : {{ message['content'] }} </s> "
    "{% endfor %}{% if add_generation_prompt %}<s> assistant : {% endif %}"
)

TINY_VISION = {
    "dinov2": dict(
        model_type="dinov2",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=28,
        patch_size=14,
    ),
    "siglip": dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=28,
        patch_size=14,
    ),
    "clip": dict(
        model_type="clip_vision_model",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=28,
        patch_size=14,
    ),
}


# bitsandbytes (0.50) runs 4-bit linears on a CPU with AVX512-BF16 through weights repacked in
# blocks of 64 input features, so a language model that gets quantized needs widths of 64 or more.
QUANTIZABLE_TEXT_WIDTHS = {"hidden_size": 64, "intermediate_size": 128}


def tiny_text_config(
    model_type: str = "llama",
    vocab_size: int = TINY_VOCAB_SIZE,
    hidden_size: int = 32,
    intermediate_size: int = 64,
) -> dict[str, Any]:
    return dict(
        model_type=model_type,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_tokenizer():
    """A word-level fast tokenizer over `WORDS` with a chat template (ids 0-3 are special)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIAL, *WORDS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_image_processor(vision: str = "dinov2", size: int = 28):
    import transformers

    if vision == "dinov2":
        return transformers.BitImageProcessorPil(
            size={"shortest_edge": size},
            crop_size={"height": size, "width": size},
            do_convert_rgb=True,
        )
    if vision == "siglip":
        return transformers.SiglipImageProcessorPil(size={"height": size, "width": size})
    if vision == "clip":
        return transformers.CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    raise ValueError(f"No tiny image processor for {vision!r}.")


def tiny_config(
    vision: str = "dinov2",
    text: str = "llama",
    vocab_size: int = TINY_VOCAB_SIZE,
    **overrides: Any,
):
    """An `RSVLMConfig` with hidden size 32 and two layers everywhere (two vision levels),
    matching `tiny_tokenizer()` (its image token id is `TINY_IMAGE_TOKEN_ID`)."""
    from rsvlm.configuration import RSVLMConfig

    kwargs: dict[str, Any] = dict(
        vision_config=dict(TINY_VISION[vision]),
        text_config=tiny_text_config(text, vocab_size),
        vision_feature_layers=[1, 2],
        connector_type="semantic_prompter",
        connector_num_heads=4,
        perceiver_queries_per_level=[4, 2],
        prompter_num_tokens=3,
        experts_enabled=True,
        experts_every_k_layers=1,
        experts_rank=4,
        retrieval_embed_dim=16,
        max_semantic_tokens=24,
        image_token_id=TINY_IMAGE_TOKEN_ID,
    )
    kwargs.update(overrides)
    return RSVLMConfig(**kwargs)


def tiny_processor(config=None, vision: str = "dinov2"):
    """Processor for `config` (default: `tiny_config()` with the tokenizer's image token id)."""
    from rsvlm.processing import RSVLMProcessor

    tokenizer = tiny_tokenizer()
    if config is None:
        config = tiny_config(vision=vision)
    processor = RSVLMProcessor(
        tiny_image_processor(vision),
        tokenizer,
        num_image_tokens=config.num_image_tokens,
        image_token=config.image_token,
        max_semantic_tokens=config.max_semantic_tokens,
    )
    return processor


def tiny_model(seed: int = 0, **config_overrides: Any):
    """A random `RSVLMForConditionalGeneration` in eval mode; experts get random (non-zero)
    expansion weights so that they change the output."""
    import torch

    from rsvlm.modeling import RSVLMForConditionalGeneration

    torch.manual_seed(seed)
    model = RSVLMForConditionalGeneration(tiny_config(**config_overrides))
    with torch.no_grad():
        for wrapper in model.semantic_experts():
            for expert in wrapper.experts:
                expert.expand.weight.normal_(0.0, 0.2)
    return model.eval()


__all__ = [
    "CHAT_TEMPLATE",
    "QUANTIZABLE_TEXT_WIDTHS",
    "TINY_IMAGE_TOKEN_ID",
    "TINY_VOCAB_SIZE",
    "TINY_VISION",
    "tiny_config",
    "tiny_image_processor",
    "tiny_model",
    "tiny_processor",
    "tiny_text_config",
    "tiny_tokenizer",
]


def main(argv: list[str] | None = None) -> int:
    """``python -m rsvlm.testing tiny-checkpoint --family F --out DIR``."""
    import argparse

    from rsvlm.backends.tiny import FAMILIES, write_tiny_checkpoint

    parser = argparse.ArgumentParser(prog="python -m rsvlm.testing")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny-checkpoint", help="a tiny random checkpoint in a family's hub layout")
    tiny.add_argument("--family", required=True, choices=FAMILIES)
    tiny.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    print(write_tiny_checkpoint(args.family, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ----------------------------------------------------------------------------------------------
# Answerer factories for scan tests (picklable: Ray actors build them in their own process)
# ----------------------------------------------------------------------------------------------


class ObjectsAnswerer:
    """A perfect detector: every object's part inside the chip, in the canonical box grammar.

    ``objects`` maps ``"label#id"`` to ``(minx, miny, maxx, maxy)`` in ``crs``. Each call of the
    answer function is appended to ``calls_file`` (one line per chip: the chip's bounds), when
    given, so a test can count how often a window was read across processes.
    ``seconds_per_chip`` stands in for a model's time: with an instant answerer one actor can
    drain the whole queue before another is handed a batch.
    """

    def __init__(
        self,
        objects: dict[str, tuple[float, float, float, float]],
        crs: str,
        calls_file: str | None = None,
        seconds_per_chip: float = 0.0,
    ) -> None:
        self.objects, self.crs, self.calls_file = dict(objects), crs, calls_file
        self.seconds_per_chip = seconds_per_chip

    def __repr__(self) -> str:
        return f"ObjectsAnswerer({sorted(self.objects.items())!r}, {self.crs!r})"

    def __call__(self):
        import time

        from shapely.geometry import box

        from tiles.geometry import transform_geometry

        def answer(chips, question):
            time.sleep(self.seconds_per_chip * len(chips))
            texts = []
            for chip in chips:
                parts = []
                for label, bounds in self.objects.items():
                    geom = transform_geometry(box(*bounds), self.crs, chip.crs)
                    x1, y1, x2, y2 = chip.geometry_to_pixels(geom, crs=chip.crs).bounds
                    x1, y1 = max(0.0, x1), max(0.0, y1)
                    x2, y2 = min(chip.width, x2), min(chip.height, y2)
                    if x2 - x1 < 1 or y2 - y1 < 1:
                        continue
                    n = [round(v) for v in chip.px_to_norm((x1, y1, x2, y2))]
                    name = label.split("#")[0]
                    parts.append(f"<ref>{name}</ref><box>[{n[0]},{n[1]},{n[2]},{n[3]}]</box>")
                texts.append(" ".join(parts) or "nothing here")
            if self.calls_file:
                with open(self.calls_file, "a", encoding="utf-8") as fh:
                    fh.writelines(f"{chip.source} {chip.bounds}\n" for chip in chips)
            return texts

        return answer


class TinyModelAnswerer:
    """The tiny random model of `tiny_model` behind `rsvlm.scan.engine_answer_fn`.

    ``answers_file``: each answer is appended there (``source bounds -> text``), so a test can
    compare what two engines' models said, not only the boxes.
    """

    def __init__(self, max_new_tokens: int = 5, seed: int = 0, answers_file: str | None = None):
        self.max_new_tokens, self.seed, self.answers_file = max_new_tokens, seed, answers_file

    def __repr__(self) -> str:
        return f"TinyModelAnswerer({self.max_new_tokens}, {self.seed})"

    def __call__(self):
        from rsvlm.engine import ChatEngine
        from rsvlm.scan import engine_answer_fn

        model = tiny_model(
            seed=self.seed, connector_type="semantic_prompter", image_token_id=TINY_IMAGE_TOKEN_ID
        )

        class Loaded:
            processor = tiny_processor(model.config)
            database = None
            info = {"preset": "tiny"}

        Loaded.model = model
        engine = ChatEngine(
            Loaded(), max_new_tokens=self.max_new_tokens, generation={"repetition_penalty": 1.0}
        )
        answer = engine_answer_fn(engine, max_new_tokens=self.max_new_tokens)
        if not self.answers_file:
            return answer

        def logged(chips, question):
            texts = answer(chips, question)
            with open(self.answers_file, "a", encoding="utf-8") as fh:
                fh.writelines(
                    f"{c.source} {[round(v, 3) for v in c.bounds]} -> {t!r}\n"
                    for c, t in zip(chips, texts, strict=True)
                )
            return texts

        return logged


class KillOnce:
    """Wraps an answerer factory; the first process to answer its ``after``-th batch is killed.

    SIGKILL, as the kernel's OOM killer or a lost node would: no exception, no clean-up. The
    marker file makes it happen once per test, whichever actor (or restarted actor) gets there.
    """

    def __init__(self, inner: Any, marker: str, after: int = 2) -> None:
        self.inner, self.marker, self.after = inner, marker, after

    def __repr__(self) -> str:
        return repr(self.inner)  # the run is the same scan as without the kill

    def __call__(self):
        import os
        import signal

        answer = self.inner()
        calls = [0]

        def killing(chips, question):
            calls[0] += 1
            if calls[0] >= self.after:
                try:
                    fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    pass
                else:
                    os.close(fd)
                    os.kill(os.getpid(), signal.SIGKILL)
            return answer(chips, question)

        return killing

