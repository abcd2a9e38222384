"""Florence-2 (`Florence2ForConditionalGeneration`) and the Falcon remote-sensing fine-tunes.

Florence-2 is a task-prompted encoder-decoder, not a chat model: every question is one task.
The question picks the task the model card documents (`Florence2Processor`'s task tokens):

* a question that already is a task token (``<OD>``, ``<CAPTION_TO_PHRASE_GROUNDING>cars``)
  goes as it is;
* a drawn region -> ``<REGION_TO_DESCRIPTION>`` with the region's location tokens;
* find / locate / detect / count / where + an object phrase -> ``<CAPTION_TO_PHRASE_GROUNDING>``
  with the phrase (``<OD>`` when no phrase is left);
* anything else -> ``<MORE_DETAILED_CAPTION>``.

Falcon checkpoints follow natural-language instructions instead; questions become the task
prompts of Falcon's README ("Detect all stadium in the image.\nUse horizontal bounding boxes.",
"Count the number of ship.", "Classify the image.\nUse one or a few words.", "Describe the
<box><x1><y1><x2><y2></box> in this image."), other questions go as asked. Answers carry
location tokens (``<loc_N>`` for Florence-2, ``<N>`` for Falcon; 4 per box, 8 per oriented
quadrilateral), read by `rsvlm.backends.conventions.florence_boxes`.

Falcon is published in Florence-2's original remote-code layout. `convert_original` rewrites
such a folder into the transformers-native layout once (into the cache), with the key mapping
of transformers' own ``convert_florence2_original_pytorch_to_hf.py``, reading the weights and
config files directly: no remote code runs. The original processor adds tokens to the tokenizer
at run time (Florence-2's 1024 task and location tokens); a checkpoint whose embedding rows do
not match the tokenizer with those is refused rather than converted with wrong token ids.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from rsvlm.backends import conventions
from rsvlm.backends.base import Encoded, Family
from rsvlm.boxes import ParsedBox

logger = logging.getLogger(__name__)

CONVERSION_MARK = "rsvlm_conversion.json"

_TASK_TOKEN = re.compile(r"^\s*(<[A-Z_]+>)(.*)$", re.S)
_WHERE = re.compile(
    r"^\s*(?:please\s+)?(?:find|locate|detect|count|show|mark|ground|where\s+(?:is|are)|"
    r"how\s+many)\s+(?:me\s+)?(?:all\s+|every\s+|each\s+|the\s+|any\s+)*(?P<phrase>.*?)"
    r"(?:\s*(?:are\s+there|is\s+there|can\s+you\s+see|do\s+you\s+see))?"
    r"(?:\s+(?:in|on)\s+(?:the|this)\s+(?:image|picture|scene|chip|area))?\s*[?.!]*\s*$",
    re.I | re.S,
)
_DESCRIBE = re.compile(r"\b(?:describe|caption|what\s+(?:kind|type)|summar)", re.I)
_CLASSIFY = re.compile(r"\b(?:classif\w*|what\s+(?:kind|type|class)|which\s+(?:kind|type|class))",
                       re.I)
_COUNT = re.compile(r"^\s*(?:please\s+)?(?:count|how\s+many)\b", re.I)


def falcon_prompt(question: str, region_box: str | None) -> str:
    """Falcon's documented instruction for a question (its README's task prompts): detection,
    counting, classification and description of the image or of a region; other questions
    (VQA) go as asked."""
    q = question.strip()
    where = _WHERE.match(q)
    phrase = where.group("phrase").strip(" ?.!") if where else ""
    if region_box:
        if _CLASSIFY.search(q):
            return f"Classify the region of {region_box}.\nUse one or a few words."
        if _DESCRIBE.search(q) or not phrase:
            return f"Describe the {region_box} in this image."
        return f"{q} {region_box}"
    if phrase and _COUNT.match(q):
        return f"Count the number of {phrase}."
    if phrase:
        return f"Detect all {phrase} in the image.\nUse horizontal bounding boxes."
    if _CLASSIFY.search(q):
        return "Classify the image.\nUse one or a few words."
    if _DESCRIBE.search(q):
        return "Describe the image."
    return q


def florence_task(question: str, region_locs: str | None, *, instruction_following: bool
                  ) -> tuple[str, str]:
    """``(prompt for the processor, task token for post-processing)`` of a question."""
    q = question.strip()
    task = _TASK_TOKEN.match(q)
    if task:
        return q, task.group(1)
    if instruction_following:  # Falcon: natural-language instructions, as trained
        return falcon_prompt(q, region_locs), "<FALCON>"
    if region_locs:
        return f"<REGION_TO_DESCRIPTION>{region_locs}", "<REGION_TO_DESCRIPTION>"
    where = _WHERE.match(q)
    if where:
        phrase = where.group("phrase").strip(" ?.!")
        if phrase:
            return f"<CAPTION_TO_PHRASE_GROUNDING>{phrase}", "<CAPTION_TO_PHRASE_GROUNDING>"
        return "<OD>", "<OD>"
    if _DESCRIBE.search(q):
        return "<MORE_DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>"
    return "<MORE_DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>"


class Florence2(Family):
    name = "florence2"
    model_types = ("florence2",)
    model_class = "Florence2ForConditionalGeneration"
    conversational = False
    reuses_cache = False
    skip_modules = (r"(?:model\.)?vision_tower", r"(?:model\.)?multi_modal_projector", "lm_head")
    lora_target = r".*language_model.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"
    stream_special_tokens = True
    instruction_following = False  # True for Falcon checkpoints (set by the loader)

    def region_text(self, processor: Any, box_norm: tuple[float, ...],
                    image_size: tuple[int, int]) -> str:
        bins = [min(max(int(v * conventions.FLORENCE_BINS / 1000), 0), 999) for v in box_norm]
        if self.instruction_following:  # Falcon: <box><x1><y1><x2><y2></box>
            return "<box>" + "".join(f"<{b}>" for b in bins) + "</box>"
        return "".join(f"<loc_{b}>" for b in bins)

    def user_text(self, question: str, region: str | None) -> str:
        prompt, _ = florence_task(question, region, instruction_following=self.instruction_following)
        return prompt

    def encode(self, processor: Any, image: Any, turns: list[tuple[str, str | None]],
               context: str) -> Encoded:
        # One task per question: earlier turns and the text context are not part of Florence-2's
        # prompt format (its task prompts are fixed strings).
        prompt = turns[-1][0]
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
        task = _TASK_TOKEN.match(prompt)
        return Encoded(dict(inputs), prompt, {"task": task.group(1) if task else "<FALCON>"})

    def encode_batch(self, processor: Any, images: list[Any], user: str, contexts: list[str]
                     ) -> tuple[dict[str, Any], list[str], list[dict[str, Any]]]:
        inputs = processor(text=[user] * len(images), images=images, return_tensors="pt",
                           padding=True)
        return dict(inputs), [user] * len(images), [{} for _ in images]

    def strip_specials(self, text: str) -> str:
        for token in ("<s>", "</s>", "<pad>"):
            text = text.replace(token, "")
        return text

    def boxes(self, text: str, frame: dict[str, Any], chip_size: tuple[int, int]) -> list[ParsedBox]:
        return conventions.florence_boxes(self.clean(text), chip_size)


# ----------------------------------------------------------------------------------------------
# Original (remote-code) layout -> transformers layout
# ----------------------------------------------------------------------------------------------

# The tokens the original Florence-2 processor adds to the BART tokenizer at run time, in its
# order (their ids are what the checkpoint's embedding rows were trained on).
ORIGINAL_ADDED_TOKENS = (
    ["<od>", "</od>", "<ocr>", "</ocr>"]
    + [f"<loc_{i}>" for i in range(1000)]
    + ["<cap>", "</cap>", "<ncap>", "</ncap>", "<dcap>", "</dcap>", "<grounding>", "</grounding>",
       "<seg>", "</seg>", "<sep>", "<region_cap>", "</region_cap>", "<region_to_desciption>",
       "</region_to_desciption>", "<proposal>", "</proposal>", "<poly>", "</poly>", "<and>"]
)


def is_original_layout(config: dict[str, Any]) -> bool:
    """A Florence-2 ``config.json`` in the remote-code layout (DaViT ``dim_embed`` fields)."""
    vision = config.get("vision_config") or {}
    return config.get("model_type") == "florence2" and "dim_embed" in vision


def key_mapping(config: Any, original_keys: list[str]) -> dict[str, str]:
    """Original state-dict keys -> transformers keys (transformers' conversion script's table)."""
    mapping: dict[str, str] = {}
    convs = {"proj.weight": "conv.weight", "proj.bias": "conv.bias",
             "norm.weight": "norm.weight", "norm.bias": "norm.bias"}
    for stage in range(len(config.vision_config.embed_dim)):
        for old, new in convs.items():
            mapping[f"vision_tower.convs.{stage}.{old}"] = f"model.vision_tower.convs.{stage}.{new}"
        for block in range(config.vision_config.depths[stage]):
            for kind, attn in (("spatial_block", "window_attn"), ("channel_block", "channel_attn")):
                old_p = f"vision_tower.blocks.{stage}.{block}.{kind}"
                new_p = f"model.vision_tower.blocks.{stage}.{block}.{kind}"
                for part in ("weight", "bias"):
                    mapping[f"{old_p}.conv1.fn.dw.{part}"] = f"{new_p}.conv1.{part}"
                    mapping[f"{old_p}.conv2.fn.dw.{part}"] = f"{new_p}.conv2.{part}"
                    mapping[f"{old_p}.{attn}.norm.{part}"] = f"{new_p}.norm1.{part}"
                    mapping[f"{old_p}.{attn}.fn.qkv.{part}"] = f"{new_p}.{attn}.qkv.{part}"
                    mapping[f"{old_p}.{attn}.fn.proj.{part}"] = f"{new_p}.{attn}.proj.{part}"
                    mapping[f"{old_p}.ffn.norm.{part}"] = f"{new_p}.norm2.{part}"
                    mapping[f"{old_p}.ffn.fn.net.fc1.{part}"] = f"{new_p}.ffn.fc1.{part}"
                    mapping[f"{old_p}.ffn.fn.net.fc2.{part}"] = f"{new_p}.ffn.fc2.{part}"
    projector = "model.multi_modal_projector"
    mapping.update({
        "image_projection": f"{projector}.image_projection.weight",
        "image_proj_norm.weight": f"{projector}.image_proj_norm.weight",
        "image_proj_norm.bias": f"{projector}.image_proj_norm.bias",
        "image_pos_embed.row_embeddings.weight": f"{projector}.image_position_embed.row_embeddings.weight",
        "image_pos_embed.column_embeddings.weight":
            f"{projector}.image_position_embed.column_embeddings.weight",
        "visual_temporal_embed.pos_idx_to_embed": f"{projector}.visual_temporal_embed.pos_idx_to_embed",
        "language_model.lm_head.weight": "lm_head.weight",
    })
    for key in original_keys:
        if key.startswith("language_model.model") and "lm_head" not in key:
            mapping[key] = key.replace("language_model.model.", "model.language_model.")
    return mapping


def _read_state(folder: Path) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        state: dict[str, Any] = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"{folder} holds no weights (*.safetensors or pytorch_model.bin)")
    state = {}
    for f in bins:  # weights_only: a pickle never runs code here
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def convert_original(src: str | Path, out: str | Path, *, instruction_following: bool = True
                     ) -> Path:
    """Convert a Florence-2 / Falcon folder in the original layout into ``out`` (native layout).

    ``src`` is a local folder (``huggingface_hub.snapshot_download`` of the repo). Raises
    `ValueError` when ``src`` is not in the original layout or a weight does not land."""
    from transformers import AutoImageProcessor, Florence2Config, Florence2Processor

    src, out = Path(src), Path(out)
    original = json.loads((src / "config.json").read_text())
    if not is_original_layout(original):
        raise ValueError(f"{src} is not a Florence-2 checkpoint in the original layout")
    vision_config = _vision_config(original)
    tokenizer = _convert_tokenizer(src, out, int(original["text_config"].get("vocab_size", 0)))
    image_processor = AutoImageProcessor.from_pretrained(str(src))
    preprocessor = json.loads((src / "preprocessor_config.json").read_text())
    image_processor.image_seq_length = int(preprocessor.get("image_seq_length", 577))
    config = Florence2Config(text_config=dict(original["text_config"]), vision_config=vision_config,
                             image_token_id=tokenizer.image_token_id)
    model = _convert_weights(src, config)
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    processor = Florence2Processor(image_processor=image_processor, tokenizer=tokenizer,
                                   post_processor_config=None)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    (out / CONVERSION_MARK).write_text(json.dumps({"source": str(src), "layout": "florence2-original",
                                                   "instruction_following": instruction_following},
                                                  indent=2))
    logger.info("converted %s into %s", src, out)
    return out


def _vision_config(original: dict[str, Any]) -> Any:
    """The native vision config from the original one's DaViT fields."""
    from transformers import Florence2VisionConfig

    vision = dict(original["vision_config"])
    return Florence2VisionConfig(
        embed_dim=vision["dim_embed"], depths=vision["depths"], num_heads=vision["num_heads"],
        num_groups=vision["num_groups"], window_size=vision.get("window_size", 12),
        patch_size=vision["patch_size"], patch_stride=vision["patch_stride"],
        patch_padding=vision["patch_padding"], patch_prenorm=vision["patch_prenorm"],
        projection_dim=vision.get("projection_dim", original.get("projection_dim", 1024)),
        max_temporal_embeddings=vision["visual_temporal_embedding"]["max_temporal_embeddings"],
        max_position_embeddings=vision["image_pos_embed"]["max_pos_embeddings"],
    )


def _convert_tokenizer(src: Path, out: Path, rows: int) -> Any:
    """The tokenizer with Florence-2's added tokens and the image token, saved into ``out``
    and read back from there; ``rows`` is the checkpoint's embedding rows (0: unknown)."""
    from transformers import AddedToken, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    if len(tokenizer) < rows:  # Florence-2's processor adds its task/location tokens at run time
        tokenizer.add_special_tokens({"additional_special_tokens": list(ORIGINAL_ADDED_TOKENS)})
    if rows and len(tokenizer) != rows:
        # The ids of added tokens must be those the embedding rows were trained on; a fine-tune
        # whose remote processor adds other tokens cannot be converted blindly.
        raise ValueError(
            f"{src}: the tokenizer has {len(tokenizer)} tokens with Florence-2's added tokens, the "
            f"checkpoint {rows} embedding rows; its processor adds tokens this converter does not "
            "know (read its processing code and add them to its tokenizer files first)")
    tokenizer.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"  # the image token as the native repos name it
    tok_config = json.loads(config_path.read_text())
    tok_config["extra_special_tokens"] = {"image_token": "<image>"}
    config_path.write_text(json.dumps(tok_config, indent=2))
    return AutoTokenizer.from_pretrained(str(out))


def _convert_weights(src: Path, config: Any) -> Any:
    """The native model holding the original checkpoint's weights (renamed, tied)."""
    import torch
    from transformers import Florence2ForConditionalGeneration

    state = _read_state(src)
    mapping = key_mapping(config, list(state))
    missing = sorted(k for k in mapping if k not in state and not k.startswith("language_model.model"))
    if missing:
        raise ValueError(f"{src}: the original checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    converted = {}
    for old, new in mapping.items():
        tensor = state[old]
        converted[new] = tensor.t().contiguous() if old == "image_projection" else tensor
    with torch.device("meta"):
        model = Florence2ForConditionalGeneration(config)
    result = model.load_state_dict(converted, strict=False, assign=True)
    absent = [k for k in result.missing_keys if not k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    if absent or result.unexpected_keys:
        raise ValueError(f"{src}: conversion left weights unmatched: missing {absent[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")
    model.tie_weights()
    return model
