"""LoRA (peft) and 4-bit NF4 (bitsandbytes, CPU) on tiny RSVLM models."""

from __future__ import annotations

import os

import pytest
import torch

from rsvlm.modeling import NON_QUANTIZED_MODULES, RSVLMForConditionalGeneration
from rsvlm.testing import (
    QUANTIZABLE_TEXT_WIDTHS,
    TINY_IMAGE_TOKEN_ID,
    tiny_model,
    tiny_text_config,
)
from training.model_setup import lora_target_modules, peft_modules_to_save, set_trainable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")


def _batch(config, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = config.num_image_tokens
    ids = torch.cat(
        [
            torch.tensor([[1, 20]]),
            torch.full((1, n), TINY_IMAGE_TOKEN_ID),
            torch.tensor([[30, 31, 32, 2]]),
        ],
        dim=1,
    )
    return {
        "input_ids": ids,
        "pixel_values": torch.randn(1, 3, 28, 28, generator=g),
        "labels": ids.masked_fill(ids == TINY_IMAGE_TOKEN_ID, -100),
        "semantic_input_ids": torch.randint(4, 100, (1, 5), generator=g),
        "query_input_ids": torch.randint(4, 100, (1, 3), generator=g),
    }


def _lora(model, r: int = 4, modules_to_save: list[str] | None = None):
    config = peft.LoraConfig(
        r=r,
        lora_alpha=8,
        target_modules=lora_target_modules(("q_proj", "v_proj", "gate_proj")),
        modules_to_save=modules_to_save,
    )
    return peft.get_peft_model(model, config)


@pytest.mark.parametrize(
    "connector", ["mlp", pytest.param("semantic_prompter", marks=pytest.mark.slow)]
)
def test_lora_with_experts_trains_saves_loads_and_merges(tmp_path, connector):
    model = tiny_model(connector_type=connector, vision="siglip")
    batch = _batch(model.config)
    peft_model = _lora(model, modules_to_save=peft_modules_to_save(model))
    # LoRA lands in the language model only (SigLIP also has q_proj/v_proj) and also wraps the
    # FFN linears that sit inside the experts' `base_layer`.
    lora_names = [
        n for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    ]
    assert lora_names and all(".language_model." in n for n in lora_names)
    assert any(".mlp.base_layer.gate_proj" in n for n in lora_names)
    out = peft_model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all(g is not None for n, g in grads.items() if "lora_A" in n or "lora_B" in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".connector." in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".experts." in n)
    assert not any(".vision_tower." in n for n in grads)  # frozen by peft
    # One optimiser step changes LoRA, connector and experts; all must travel with the adapter.
    torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5).step()
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        peft_model.eval()
        ref = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    base = tiny_model(connector_type=connector, vision="siglip")  # same seed: same base weights
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, ref, atol=1e-5)
        merged = reloaded.merge_and_unload()
        assert isinstance(merged, RSVLMForConditionalGeneration)
        assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
        assert len(merged.semantic_experts()) == 2  # merging LoRA keeps the experts
        assert torch.allclose(merged(**batch).logits, ref, atol=1e-4)
    out = merged.generate(
        **{k: v for k, v in batch.items() if k != "labels"}, max_new_tokens=3, do_sample=False
    )
    assert out.shape[1] == batch["input_ids"].shape[1] + 3 or out[0, -1].item() == 2


def _quantized(tmp_path, **overrides):
    from transformers import BitsAndBytesConfig

    text_config = tiny_text_config(**QUANTIZABLE_TEXT_WIDTHS)
    model = tiny_model(text_config=text_config, **overrides)
    model.save_pretrained(tmp_path)
    qconfig = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return model, RSVLMForConditionalGeneration.from_pretrained(
        tmp_path, quantization_config=qconfig
    )


def test_4bit_quantizes_only_the_language_model(tmp_path):
    model, qmodel = _quantized(tmp_path, connector_type="semantic_prompter")
    assert qmodel.config.quantization_config.llm_int8_skip_modules == NON_QUANTIZED_MODULES
    quantized = {n for n, m in qmodel.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized and all(n.startswith("language_model.model.layers.") for n in quantized)
    assert any(n.endswith("mlp.base_layer.up_proj") for n in quantized)
    for name, module in qmodel.named_modules():
        if (
            name.startswith(("vision_tower", "connector", "retrieval_projection"))
            or ".experts." in name
        ):
            assert not isinstance(module, bnb.nn.Linear4bit), name
    for wrapper in qmodel.semantic_experts():
        assert wrapper.experts[0].reduce.weight.dtype == torch.float32
    batch = _batch(model.config)
    with torch.no_grad():
        ref = model(**batch)
        out = qmodel(**batch)
    assert torch.isfinite(out.loss)
    # NF4 changes the LM a little, the unquantized vision side not at all.
    assert torch.equal(
        model.embed_image_for_retrieval(batch["pixel_values"]),
        qmodel.embed_image_for_retrieval(batch["pixel_values"]),
    )
    assert (out.logits - ref.logits).abs().max() < 1.0


def test_qlora_backward_on_4bit(tmp_path):
    _, qmodel = _quantized(tmp_path, connector_type="mlp")
    peft_model = _lora(qmodel)
    set_trainable(qmodel, connector=True, experts=True)
    batch = _batch(qmodel.config)
    out = peft_model(**batch)
    out.loss.backward()
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    expert_grads = [p.grad for n, p in peft_model.named_parameters() if ".experts." in n]
    assert expert_grads and all(g is not None for g in expert_grads)
    gen = peft_model.generate(
        **{k: v for k, v in batch.items() if k != "labels"}, max_new_tokens=2, do_sample=False
    )
    assert gen.shape[1] >= batch["input_ids"].shape[1] + 1


def test_from_parts_with_a_4bit_language_model(tmp_path):
    """Experts injected around an FFN whose linears are already bitsandbytes 4-bit."""
    from transformers import AutoModel, AutoModelForCausalLM, BitsAndBytesConfig

    from rsvlm.testing import tiny_config, tiny_tokenizer

    config = tiny_config(connector_type="mlp")
    AutoModelForCausalLM.from_config(config.text_config).save_pretrained(tmp_path)
    qconfig = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    lm = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=qconfig)
    vision = AutoModel.from_config(config.vision_config)
    model = RSVLMForConditionalGeneration.from_parts(
        vision, lm, config, tokenizer=tiny_tokenizer()
    ).eval()
    wrappers = model.semantic_experts()
    assert wrappers and isinstance(wrappers[0].base_layer.up_proj, bnb.nn.Linear4bit)
    assert wrappers[0].experts[0].reduce.weight.dtype == torch.float32
    batch = _batch(model.config)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert wrappers[0].experts[0].expand.weight.grad is not None
