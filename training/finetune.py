"""`rsvlm-train finetune`: one command from an analyst's region to a model that loads.

Steps, each skipped when its output exists (run the command again to resume):

1. **data**: `build-data` of the region (spatial-block held-back split, rotated/mirrored views
   of the training chips for the box head);
2. **fit**: from the shipped parts (`init: trained`), first the perception head (the box head
   on the region's boxes), then the rest (connector, LoRA, experts) on every task of the
   region; `fit --resume auto` continues an interrupted run;
3. **detector**: the shipped detector (`rsvlm.perception`) continued on the region's training
   chips (`training.region_detector`);
4. **final**: the fit's parts plus the shipped semantic database with the region's own
   descriptions added (a region alone would leave the retriever nothing else to find) and the
   tuned detector;
5. **compare**: the shipped and the tuned model on the region's held-back split, side by side
   (VQA per type, referring grounding, find-all), in ``compare.md`` and ``compare.json``.

The `final/` folder is what ``rsvlm ask --model RUN/final`` and the app's ``--model`` load.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COMPARE_TASKS = ("vqa", "grounding", "findall")


@dataclass
class FinetuneConfig:
    region: str
    out: str
    model: str = "embedded"  # a preset with shipped parts, or "tiny" (tests)
    chip_size: int | None = None
    val_fraction: float = 0.2
    # Split blocks of 2 x 2 chips: a 2048 px region at 512 px chips is one block of 4 x 4
    # (build-data's default), which leaves nothing to hold back.
    block_chips: int = 2
    augment: int = 3  # rotated/mirrored views of the training chips
    seed: int = 0
    box_epochs: float = 6.0
    instruct_epochs: float = 1.0
    batch_size: int = 4
    max_length: int = 512
    eval_limit: int | None = None  # questions per task in the comparison (None: all)
    detector_epochs: int = 6  # 0: keep the shipped detector
    model_overrides: dict[str, Any] | None = None  # tiny runs only


def _say(progress: Callable[[str], None] | None, msg: str) -> None:
    (progress or (lambda m: log.info("%s", m)))(msg)


def build_region_data(cfg: FinetuneConfig, progress: bool) -> Path:
    from training.build import BuildConfig, build_dataset

    data = Path(cfg.out) / "data"
    if (data / "dataset_card.json").is_file():
        return data
    spec = region_spec(cfg)
    tmp = data.with_name("data.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    build_dataset(tmp, [spec], [], BuildConfig(seed=cfg.seed, augment=cfg.augment),
                  progress=progress)
    tmp.replace(data)
    return data


def fit_config(cfg: FinetuneConfig, data: Path) -> Any:
    from training.fit_config import FitConfig, StageConfig

    tiny = cfg.model == "tiny"
    return FitConfig(
        data=str(data), output_dir=str(Path(cfg.out) / "fit"), model=cfg.model,
        init="base" if tiny else "trained",
        model_overrides=dict(cfg.model_overrides or {}) if tiny else {},
        seed=cfg.seed, batch_size=cfg.batch_size, max_length=cfg.max_length,
        save_every=25, log_every=5, database=False, device="cpu" if tiny else None,
        stages=[
            # The box head's batch: it reads cached features only, so a large one is cheap.
            StageConfig("boxes", kind="boxes", train=["box_head"], epochs=cfg.box_epochs,
                        lr=3e-4, warmup_ratio=0.1, batch_size=32),
            StageConfig("instruct", train=["connector", "lora", "experts"],
                        epochs=cfg.instruct_epochs, lr=1e-4, augmented=False,
                        semantic="none" if tiny else "retrieved"),
        ],
    )


def merged_database(shipped: Path | None, data: Path, encoder: Any) -> Any:
    """The shipped database plus the region's training-split descriptions."""
    import numpy as np

    from rsvlm.retrieval import SemanticDatabase, _encode
    from training.dataset_files import database_rows

    texts, meta = database_rows(data)
    base = (SemanticDatabase.from_pretrained(shipped)
            if shipped is not None and shipped.is_dir() else None)
    if base is None:
        return SemanticDatabase.from_texts(texts, meta, encoder) if texts else None
    if not texts:
        return base
    vectors = _encode(encoder, texts)
    return SemanticDatabase(base.texts + texts, np.vstack([base.embeddings, vectors]),
                            base.metadata + meta, encoder_name=base.encoder_name)


def _shipped_parts(model: str) -> Path | None:
    from rsvlm.presets import PresetError, load_preset

    try:
        return load_preset(model).trained_weights_dir
    except PresetError:
        return None


def region_spec(cfg: FinetuneConfig) -> Any:
    """The region as build-data split it (same chips, same held-back blocks)."""
    from training.region import load_region

    return load_region(cfg.region, chip_size=cfg.chip_size, val_fraction=cfg.val_fraction,
                       block_chips=cfg.block_chips)


def make_final(cfg: FinetuneConfig, fit_final: Path, data: Path,
               detector: Path | None = None) -> Path:
    from rsvlm.loading import SEMANTIC_DB_DIR, TRAINED_JSON

    final = Path(cfg.out) / "final"
    if (final / TRAINED_JSON).is_file():
        return final
    tmp = final.with_name("final.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(fit_final, tmp)
    shipped = _shipped_parts(cfg.model)
    from rsvlm.perception import DETECTOR_DIR

    if detector is not None:
        shutil.copytree(detector, tmp / DETECTOR_DIR)
    elif shipped is not None and (shipped / DETECTOR_DIR).is_dir():
        # The shipped detector (trained on every labelled region, scored leave-one-region-out)
        # answers the object questions of the tuned model too.
        shutil.copytree(shipped / DETECTOR_DIR, tmp / DETECTOR_DIR)
    if cfg.model != "tiny":
        from training.fit_config import FitConfig
        from training.stage_data import text_encoder

        encoder = text_encoder(FitConfig(data=str(data), output_dir=str(tmp)))
        db = merged_database(shipped / SEMANTIC_DB_DIR if shipped else None, data, encoder)
        if db is not None:
            db.save_pretrained(tmp / SEMANTIC_DB_DIR)
            manifest = json.loads((tmp / TRAINED_JSON).read_text())
            manifest["semantic_db"] = {"texts": len(db), "regions": sorted(
                {str(m.get("region")) for m in db.metadata if m.get("region")})}
            (tmp / TRAINED_JSON).write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.replace(final)
    return final


def compare(cfg: FinetuneConfig, data: Path, final: Path,
            answer_for: Callable[[str | None], Any], progress: bool) -> dict[str, Any]:
    """Scores of the shipped (`answer_for(None)`) and the tuned (`answer_for(final)`) model on
    the held-back split; each report is kept, so a resumed run scores only what is missing."""
    from training.evaluate import eval_dataset_split, split_records

    folder = Path(cfg.out) / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    reports: dict[str, dict[str, Any]] = {}
    for which, model in (("shipped", None), ("tuned", str(final))):
        answer = None
        for task in COMPARE_TASKS:
            path = folder / f"{which}.{task}.json"
            if path.is_file():
                reports[f"{which}.{task}"] = json.loads(path.read_text())
                continue
            rows = split_records(data, "val", "vqa" if task == "vqa" else "grounding")
            if task == "findall":
                rows = [r for r in rows if r["meta"].get("type") == "find_all"]
            if not rows:
                log.warning("the held-back split has no %s questions", task)
                continue
            answer = answer or answer_for(model)
            report = eval_dataset_split(task, data, answer, seed=cfg.seed,
                                        limit=cfg.eval_limit, progress=progress)
            path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
            reports[f"{which}.{task}"] = report
    table = comparison_table(reports)
    (Path(cfg.out) / "compare.md").write_text(table)
    (Path(cfg.out) / "compare.json").write_text(json.dumps(
        {k: {m: v.get(m) for m in ("n", "accuracy", "per_type", "counting", "acc@0.5",
                                   "precision", "recall", "f1")} for k, v in reports.items()},
        indent=2) + "\n")
    return reports


def comparison_table(reports: dict[str, dict[str, Any]]) -> str:
    def cell(which: str, task: str, get: Callable[[dict], Any]) -> str:
        r = reports.get(f"{which}.{task}")
        v = get(r) if r else None
        return "–" if v is None else f"{v:.3f}"

    rows = [("VQA accuracy", "vqa", lambda r: r["accuracy"])]
    types = sorted({t for k, r in reports.items() if k.endswith(".vqa") for t in r["per_type"]})
    rows += [(f"VQA {t}", "vqa", lambda r, t=t: r["per_type"].get(t)) for t in types]
    rows += [("counting within 20 %", "vqa", lambda r: r["counting"]["within_20pct"]),
             ("grounding acc@0.5", "grounding", lambda r: r["acc@0.5"]),
             ("find-all F1", "findall", lambda r: r["f1"]),
             ("find-all precision", "findall", lambda r: r["precision"]),
             ("find-all recall", "findall", lambda r: r["recall"])]
    lines = ["| held-back split | shipped | tuned |", "|---|---|---|"]
    lines += [f"| {name} | {cell('shipped', t, g)} | {cell('tuned', t, g)} |"
              for name, t, g in rows]
    return "\n".join(lines) + "\n"


def engine_answers(model: str | None) -> Any:
    """The chat path's answers (`training.evaluate.engine_answer_fn`); None: the shipped one."""
    from training.evaluate import engine_answer_fn

    return engine_answer_fn(model)


def tune_region_detector(cfg: FinetuneConfig) -> Path | None:
    """`training.region_detector.tune_detector` when the shipped parts hold a detector."""
    from training.region_detector import tune_detector

    shipped = _shipped_parts(cfg.model)
    if shipped is None or cfg.detector_epochs <= 0:
        return None
    return tune_detector(region_spec(cfg), shipped, Path(cfg.out) / "detector",
                         preset=cfg.model, epochs=cfg.detector_epochs, seed=cfg.seed)


def finetune(cfg: FinetuneConfig, *, progress: bool = True, max_steps: int | None = None,
             answer_for: Callable[[str | None], Any] = engine_answers,
             say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) every step; returns where things are and the comparison."""
    from training.fit import fit

    t0 = time.perf_counter()
    _say(say, f"[1/5] building the region's data in {cfg.out}/data ...")
    data = build_region_data(cfg, progress)
    _say(say, "[2/5] training: the box head, then connector + LoRA + experts ...")
    fit_cfg = fit_config(cfg, data)
    summary = fit(fit_cfg, resume="auto", max_steps=max_steps, progress=progress)
    if summary.get("resumable"):
        _say(say, f"stopped at step {max_steps}: run the same command again to continue")
        return {"out": cfg.out, "stopped": summary["stopped"]}
    _say(say, "[3/5] the detector on the region's training chips ...")
    detector = tune_region_detector(cfg)
    _say(say, "[4/5] writing final/ (parts, detector, semantic database with the region's "
              "texts) ...")
    final = make_final(cfg, Path(summary["final"]), data, detector)
    _say(say, "[5/5] scoring the shipped and the tuned model on the held-back split ...")
    reports = compare(cfg, data, final, answer_for, progress)
    _say(say, f"done in {time.perf_counter() - t0:.0f} s; load it with "
              f"`rsvlm ask --model {final} IMAGE QUESTION`")
    return {"out": cfg.out, "final": str(final), "data": str(data),
            "compare": str(Path(cfg.out) / "compare.md"), "reports": sorted(reports)}
