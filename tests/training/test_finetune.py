"""`rsvlm-train finetune` end to end on a tiny model: data, box head then the rest, a final/
whose trained.json describes every tensor it holds (it loads), the shipped-vs-tuned table,
and a second call that resumes instead of redoing."""

import json
from pathlib import Path

import pytest

from training.finetune import FinetuneConfig, finetune

HEAD = {"box_head_dim": 16, "box_head_layers": 1, "box_head_heads": 2,
        "box_head_threshold": 0.3}


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_answers(model: str | None):
    from rsvlm.engine import ChatEngine
    from rsvlm.loading import LoadedModel, apply_trained_parts
    from rsvlm.testing import tiny_model, tiny_processor

    if model is None:  # "shipped": the untrained tiny model
        net = tiny_model(**HEAD)
    else:
        arch = json.loads((Path(model) / "trained.json").read_text())["architecture"]
        net = apply_trained_parts(tiny_model(**arch), Path(model))
    engine = ChatEngine(LoadedModel(net.eval(), tiny_processor(net.config)), max_new_tokens=4)

    def answer(chip, question: str) -> str:
        return "".join(engine.session(chip).ask(question))

    return answer


def test_finetune_leaves_a_final_that_loads_and_a_comparison(small_region: Path,
                                                            tmp_path: Path) -> None:
    cfg = FinetuneConfig(region=str(small_region), out=str(tmp_path / "run"), model="tiny",
                         chip_size=128, augment=1, box_epochs=1, instruct_epochs=0.05,
                         batch_size=2, max_length=200, eval_limit=3, model_overrides=HEAD)
    messages: list[str] = []
    stopped = finetune(cfg, progress=False, max_steps=1, answer_for=_tiny_answers,
                       say=messages.append)
    assert "stopped" in stopped and not (tmp_path / "run" / "final").exists()
    result = finetune(cfg, progress=False, answer_for=_tiny_answers, say=messages.append)
    final = Path(result["final"])
    manifest = json.loads((final / "trained.json").read_text())
    assert {k: manifest["architecture"][k] for k in HEAD} == HEAD
    assert "box_head" in manifest["parts"]
    _tiny_answers(str(final))  # loads strictly: every tensor has its place
    table = (tmp_path / "run" / "compare.md").read_text()
    assert "| shipped | tuned |" in table and "grounding acc@0.5" in table
    reports = sorted(p.name for p in (tmp_path / "run" / "eval").glob("*.json"))
    assert "shipped.vqa.json" in reports and "tuned.vqa.json" in reports
    assert any(m.startswith("[5/5]") for m in messages)
    # Run again: every step is found done, nothing is recomputed.
    before = {p: p.stat().st_mtime for p in (tmp_path / "run" / "eval").glob("*.json")}
    finetune(cfg, progress=False, answer_for=_tiny_answers, say=messages.append)
    assert before == {p: p.stat().st_mtime for p in (tmp_path / "run" / "eval").glob("*.json")}
