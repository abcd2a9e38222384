"""Tiny random checkpoints of the pretrained families, in their hub layout (tests, offline).

    python -m rsvlm.testing tiny-checkpoint --family qwen2_5_vl --out /tmp/tiny-qwen

writes ``config.json``, ``generation_config.json``, ``model.safetensors``, the processor's files
(``preprocessor_config.json``, tokenizer files, the chat template) as the hub repos hold them, so
the folder loads through exactly the path a hub id takes (`rsvlm.backends.loader`). The
tokenizer is a byte-level BPE trained on a few hundred words (any text encodes) with the
family's special tokens added; the chat templates are the families' own
(``rsvlm/backends/templates``; Florence-2 has task prompts instead). Language models are 64
wide so bitsandbytes can run them in 4-bit on a CPU (`rsvlm.testing.QUANTIZABLE_TEXT_WIDTHS`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).resolve().parent / "templates"
FAMILIES = ("qwen2_5_vl", "qwen3_vl", "florence2", "llava")

QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
                 "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
                 "<|video_pad|>"]


def _bpe(vocab_size: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary and merges learnt from `rsvlm.testing.WORDS` (deterministic)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from rsvlm.testing import WORDS

    corpus = [" ".join(WORDS), " ".join(reversed(WORDS)),
              'bbox_2d label json {"bbox_2d": [1, 2, 3, 4], "label": "building"}']
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) if not isinstance(m, str) else tuple(m.split(" "))
                            for m in model["merges"]]


def _text(hidden: int = 64, **extra: Any) -> dict[str, Any]:
    return dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, **extra)


def _qwen_tokenizer() -> Any:
    from transformers import Qwen2Tokenizer

    vocab, merges = _bpe()
    vocab = {"<|endoftext|>": 0, **{k: v + 1 for k, v in vocab.items()}}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, errors="replace")
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS})
    return tokenizer


def _qwen(out: Path, family: str) -> None:
    import torch
    from transformers import Qwen2VLImageProcessorPil

    tokenizer = _qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    qwen3 = family == "qwen3_vl"
    patch = 16 if qwen3 else 14
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=2, temporal_patch_size=2,
        min_pixels=(2 * patch) ** 2 * 4, max_pixels=(2 * patch) ** 2 * 64,
        **({"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if qwen3 else {}))
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"])
    rope = {"rope_type": "default", "rope_theta": 10000.0,
            "mrope_section": [2, 3, 3], **({"mrope_interleaved": True} if qwen3 else {})}
    text = _text(vocab_size=len(tokenizer), rope_parameters=rope, eos_token_id=ids["<|im_end|>"],
                 pad_token_id=0, bos_token_id=0, **({"head_dim": 16} if qwen3 else {}))
    if qwen3:
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                      out_hidden_size=64, patch_size=16, num_position_embeddings=64,
                      deepstack_visual_indexes=[1])
        config = Qwen3VLConfig(text_config=text, vision_config=vision, **common)
        cls = Qwen3VLForConditionalGeneration
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                      out_hidden_size=64, window_size=56, fullatt_block_indexes=[1], patch_size=14)
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
        cls = Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    model = cls(config)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = 0
    model.save_pretrained(str(out))
    image_processor.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    template = (TEMPLATES / f"{family}.jinja").read_text()
    (out / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2))
    _mark_processor(out, "Qwen3VLProcessor" if qwen3 else "Qwen2_5_VLProcessor")


def _mark_processor(out: Path, processor_class: str) -> None:
    """``processor_class`` in ``preprocessor_config.json``, as the hub repos have it."""
    path = out / "preprocessor_config.json"
    data = json.loads(path.read_text())
    data["processor_class"] = processor_class
    path.write_text(json.dumps(data, indent=2))


def _florence(out: Path) -> None:
    import torch
    from transformers import (
        AddedToken,
        AutoTokenizer,
        BartTokenizer,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )

    from rsvlm.backends.florence2 import ORIGINAL_ADDED_TOKENS

    vocab, merges = _bpe()
    specials = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    vocab = {**specials, **{k: v + 4 for k, v in vocab.items()}, "<mask>": len(vocab) + 4}
    tokenizer = BartTokenizer(vocab=vocab, merges=merges)
    tokenizer.add_special_tokens({"additional_special_tokens": list(ORIGINAL_ADDED_TOKENS)})
    tokenizer.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    tokenizer.save_pretrained(str(out))
    _name_image_token(out)  # as the converted hub repos declare it
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    image_processor = CLIPImageProcessorPil(size={"height": 64, "width": 64}, do_center_crop=False,
                                           crop_size={"height": 64, "width": 64})
    image_processor.image_seq_length = 65  # 8 x 8 tokens of the last stage + the pooled token
    text = dict(model_type="bart", vocab_size=len(tokenizer), d_model=64, encoder_layers=1,
                decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=256,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                forced_bos_token_id=0)
    vision = dict(embed_dim=[16, 32], depths=[1, 1], num_heads=[2, 2], num_groups=[2, 2],
                  patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                  patch_prenorm=[False, True], window_size=4, projection_dim=64,
                  max_position_embeddings=50)
    config = Florence2Config(text_config=text, vision_config=vision,
                             image_token_id=tokenizer.image_token_id)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(config)
    model.save_pretrained(str(out))
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)
    processor.save_pretrained(str(out))


def _name_image_token(out: Path) -> None:
    path = out / "tokenizer_config.json"
    data = json.loads(path.read_text())
    data["extra_special_tokens"] = {"image_token": "<image>"}
    path.write_text(json.dumps(data, indent=2))


def _llava(out: Path) -> None:
    import torch
    from transformers import (
        AddedToken,
        CLIPImageProcessorPil,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    from rsvlm.testing import tiny_tokenizer

    base = tiny_tokenizer()  # word-level; LLaVA-1.5's is SentencePiece (Llama), not offline here
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    tokenizer.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28},
                                           crop_size={"height": 28, "width": 28})
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14,
                           projection_dim=32),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), **_text(),
                         pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_id=image_token_id, vision_feature_layer=-2,
        vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.save_pretrained(str(out))
    template = (TEMPLATES / "llava.jinja").read_text()
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", chat_template=template,
                               image_token="<image>", num_additional_image_tokens=1)
    processor.save_pretrained(str(out))


def write_tiny_checkpoint(family: str, out: str | Path) -> Path:
    """Write a tiny random ``family`` checkpoint into ``out`` (created); returns ``out``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if family in ("qwen2_5_vl", "qwen3_vl"):
        _qwen(out, family)
    elif family == "florence2":
        _florence(out)
    else:
        _llava(out)
    return out
