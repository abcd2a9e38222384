"""Curriculum training (`rsvlm-train fit --config FILE`): the stage loop and its checkpoints.

Reads top to bottom: parse the config (`training.fit_config`); build the model
(`training.model_setup`); cache the frozen vision tower's features (`training.features`); run
the stages; export the trained parts in the layout `rsvlm.loading` reads (`trained.json`,
`trained.safetensors`, `adapter/`, `semantic_db/`).

Stages (LHRS-Bot's curriculum, seed 003's retriever; each kind is a `training.stage_kinds`
entry: what it reads, how it batches, what it minimises):

- `retrieval`: the retriever's image projection, InfoNCE against the frozen text encoder's
  embeddings of each chip's scene description (CLIP-style, learnable temperature). With
  `negatives: database` every text of the semantic database is a candidate, as at inference:
  the positives are the image's own descriptions and every sentence of its scene class;
- `lm` stages: next-token loss on answers. Stage 1 aligns the connector on captions; stage 2
  tunes connector + LoRA + semantic experts on every task; an optional stage 3 repeats that on
  the analyst's own data (`data:` per stage). `semantic: retrieved` feeds each image the top-k
  descriptions the trained retriever finds (never the image's own), as at inference;
- `boxes`: the box head on the grounding samples' boxes (`training.box_targets`).

Checkpoints (`accelerate` save_state/load_state: trainable weights, optimizer, scheduler, RNG)
are written every `save_every` optimizer steps and at the end of every epoch, with
`trainer_state.json` (stage, epoch, batches done) and the resolved config; `--resume latest`
continues mid-epoch with `skip_first_batches` over the same seeded order (`--resume auto`: the
same when a checkpoint exists, a fresh start otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from training.features import FeatureCache, cached_vision
from training.fit_config import FitConfig, StageConfig, load_config
from training.lm_data import EpochSampler
from training.model_setup import (
    base_model,
    build_model,
    configure_parts,
    load_parts,
    reinit_retrieval_projection,
    save_parts,
)
from training.stage_data import final_database
from training.stage_kinds import KINDS, stage_batches, stage_images, stage_loss

log = logging.getLogger(__name__)


@dataclass
class TrainerState:
    stage: int = 0
    epoch: int = 0
    batches_done: int = 0  # batches of the current epoch already consumed
    global_step: int = 0  # optimizer steps over all stages

    def save(self, folder: Path) -> None:
        (folder / "trainer_state.json").write_text(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def load(cls, folder: Path) -> TrainerState:
        return cls(**json.loads((folder / "trainer_state.json").read_text()))


def latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    complete = [p for p in ckpts if (p / "trainer_state.json").is_file()]
    return complete[-1] if complete else None


class _Stop(Exception):
    """max_steps reached (a checkpoint was written)."""


def fit(cfg: FitConfig, *, resume: str | None = None, max_steps: int | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Run the curriculum; returns a summary (also written to output_dir/summary.json)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("training").addHandler(handler)
    try:
        return _fit(cfg, out, resume, max_steps, progress)
    finally:
        logging.getLogger("training").removeHandler(handler)
        handler.close()


def _resume_point(out: Path, resume: str | None) -> tuple[TrainerState, Path | None]:
    if resume == "auto":  # scripts: continue a run if it has a checkpoint, else start it
        resume = "latest" if latest_checkpoint(out) is not None else None
    if not resume:
        return TrainerState(), None
    ckpt = latest_checkpoint(out) if resume == "latest" else Path(resume)
    if ckpt is None or not (ckpt / "trainer_state.json").is_file():
        raise FileNotFoundError(f"no checkpoint to resume from ({resume!r} in {out})")
    state = TrainerState.load(ckpt)
    log.info("resuming from %s: %s", ckpt, state)
    return state, ckpt


def _feature_cache(cfg: FitConfig, out: Path, model: Any, processor: Any,
                   progress: bool) -> FeatureCache | None:
    """Vision features of every image any stage will read, computed once."""
    if not cfg.cache_features:
        return None
    if cfg.device != "cpu" and torch.cuda.is_available():
        base_model(model).vision_tower.to("cuda")  # the rest follows in accelerator.prepare
    # A run whose stages all read level means only (retrieval) caches just those.
    pooled = all(KINDS[s.kind].features == "pooled" for s in cfg.stages)
    return FeatureCache.build(out / "feature_cache", stage_images(cfg), Path("/"),
                              base_model(model).vision_tower, processor.image_processor,
                              progress=progress, pooled=pooled)


def _fit(cfg: FitConfig, out: Path, resume: str | None, max_steps: int | None,
         progress: bool) -> dict[str, Any]:
    import yaml
    from accelerate.utils import set_seed

    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    state, ckpt = _resume_point(out, resume)
    set_seed(cfg.seed)
    model, processor, preset, arch = build_model(cfg)
    if state.stage > 0:
        prev = out / "stages" / f"{state.stage - 1}-{cfg.stages[state.stage - 1].name}"
        model = load_parts(model, prev)
    cache = _feature_cache(cfg, out, model, processor, progress)
    summary: dict[str, Any] = {"output_dir": str(out), "stages": []}
    t0 = time.perf_counter()
    try:
        for i in range(state.stage, len(cfg.stages)):
            stage = cfg.stages[i]
            stage_state = state if i == state.stage else TrainerState(i, 0, 0, state.global_step)
            model, stats = _run_stage(cfg, i, stage, model, processor, cache, stage_state,
                                      ckpt if i == state.stage else None, max_steps, progress)
            state = TrainerState(i + 1, 0, 0, stats["global_step"])
            save_parts(model, out / "stages" / f"{i}-{stage.name}", preset, arch)
            summary["stages"].append(stats)
            ckpt = None
    except _Stop as stop:
        summary["stopped"] = str(stop)
        summary["resumable"] = True
        return summary
    database = final_database(cfg) if cfg.database else None
    final = save_parts(model, out / "final", preset, arch, database)
    summary.update({"final": str(final), "train_s": round(time.perf_counter() - t0, 1),
                    "global_step": state.global_step})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


@dataclass
class _Run:
    """One stage's prepared training objects."""

    model: Any
    optimizer: Any
    loader: Any
    scheduler: Any
    accelerator: Any
    sampler: EpochSampler
    params: list[torch.Tensor]
    batches_per_epoch: int
    total_batches: int


def _prepare(cfg: FitConfig, idx: int, stage: StageConfig, model: Any, processor: Any,
             cache: FeatureCache | None) -> tuple[_Run, int]:
    """Parts, data, optimizer, schedule and accelerator of a stage; also its dataset size."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    # Each stage starts from its own seed, so a resumed run initialises LoRA exactly as the
    # uninterrupted one did, whatever happened to the RNG before.
    set_seed(cfg.seed + 1000 * (idx + 1))
    model = configure_parts(model, stage.train, cfg)
    if KINDS[stage.kind].features == "pooled" and cache is not None:
        cache = cache.pooled()  # the stage reads level means only
    if stage.reinit:  # a resumed stage then loads its checkpoint's weights over these
        reinit_retrieval_projection(model)
    model.train()
    dataset, collate = stage_batches(cfg, stage, model, processor, cache)
    sampler = EpochSampler(len(dataset), cfg.seed + 17 * idx)
    # Its own generator: creating an iterator (also the one skip_first_batches makes) then
    # draws no number from the global RNG, whose state the checkpoints restore.
    loader = torch.utils.data.DataLoader(dataset, batch_size=stage.batch_size or cfg.batch_size,
                                         sampler=sampler, collate_fn=collate, num_workers=0,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                              mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"stage {stage.name}: nothing to train (parts {stage.train})")
    weight_decay = cfg.weight_decay if stage.weight_decay is None else stage.weight_decay
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=weight_decay)
    batches_per_epoch = len(loader)
    total_batches = int(round(stage.epochs * batches_per_epoch))
    total_steps = max(1, math.ceil(total_batches / cfg.grad_accum))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(stage.warmup_ratio * total_steps),
                                                total_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    # Checkpoints hold the trainable weights only (the frozen base comes from the preset).
    def save_hook(models: list[Any], weights: list[dict], _dir: str) -> None:
        for i, m in enumerate(models):
            keep = {n for n, p in m.named_parameters() if p.requires_grad}
            weights[i] = {k: v for k, v in weights[i].items() if k in keep}

    accelerator.register_save_state_pre_hook(save_hook)
    run = _Run(model, optimizer, loader, scheduler, accelerator, sampler, params,
               batches_per_epoch, total_batches)
    return run, len(dataset)


def _run_stage(cfg: FitConfig, idx: int, stage: StageConfig, model: Any, processor: Any,
               cache: FeatureCache | None, state: TrainerState, ckpt: Path | None,
               max_steps: int | None, progress: bool) -> tuple[Any, dict[str, Any]]:
    from tqdm.auto import tqdm

    run, n_examples = _prepare(cfg, idx, stage, model, processor, cache)
    if ckpt is not None:
        run.accelerator.load_state(str(ckpt), strict=False)
    stats: dict[str, Any] = {"stage": stage.name, "kind": stage.kind, "examples": n_examples,
                             "losses": []}
    done_batches = state.epoch * run.batches_per_epoch + state.batches_done
    bar = tqdm(total=run.total_batches, initial=done_batches, desc=f"stage {idx} {stage.name}",
               disable=not progress or not run.accelerator.is_local_main_process, unit="batch")
    running: list[float] = []
    try:
        with (Path(cfg.output_dir) / "metrics.jsonl").open("a") as metrics, \
                cached_vision(base_model(run.accelerator.unwrap_model(run.model)), cache):
            global_step = _epochs(cfg, idx, stage, run, state, max_steps, bar, metrics, stats,
                                  running)
    finally:
        bar.close()
    model = run.accelerator.unwrap_model(run.model)
    model.eval()
    stats["global_step"] = global_step
    stats["final_loss"] = stats["losses"][-1] if stats["losses"] else (
        round(sum(running) / len(running), 5) if running else None)
    run.accelerator.free_memory()
    return model, stats


def _epochs(cfg: FitConfig, idx: int, stage: StageConfig, run: _Run, state: TrainerState,
            max_steps: int | None, bar: Any, metrics: IO[str], stats: dict[str, Any],
            running: list[float]) -> int:
    """The stage's batches from ``state`` on; returns the global step reached."""
    accelerator, model = run.accelerator, run.model
    global_step = state.global_step
    for epoch in range(state.epoch, math.ceil(stage.epochs)):
        run.sampler.use_epoch(epoch)
        start = state.batches_done if epoch == state.epoch else 0
        loader = accelerator.skip_first_batches(run.loader, start) if start else run.loader
        batch_index = start
        for batch in loader:
            if epoch * run.batches_per_epoch + batch_index >= run.total_batches:
                break
            with accelerator.accumulate(model):
                loss = stage_loss(model, stage, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm)
                run.optimizer.step()
                run.scheduler.step()
                run.optimizer.zero_grad()
            batch_index += 1
            bar.update(1)
            running.append(float(loss.detach()))
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if global_step % cfg.log_every == 0 or global_step == 1:
                mean = sum(running) / len(running)
                metrics.write(json.dumps({"stage": stage.name, "step": global_step,
                                          "epoch": epoch, "loss": round(mean, 5),
                                          "lr": run.scheduler.get_last_lr()[0]}) + "\n")
                metrics.flush()
                stats["losses"].append(round(mean, 5))
                bar.set_postfix(loss=f"{mean:.4f}")
                running.clear()
            stop = max_steps is not None and global_step >= max_steps
            if global_step % cfg.save_every == 0 or stop:
                _checkpoint(accelerator, cfg, TrainerState(idx, epoch, batch_index, global_step))
            if stop:
                raise _Stop(f"max_steps={max_steps} reached in stage {stage.name}")
        _checkpoint(accelerator, cfg, TrainerState(idx, epoch + 1, 0, global_step))
    return global_step


def _checkpoint(accelerator: Any, cfg: FitConfig, state: TrainerState) -> Path:
    out = Path(cfg.output_dir) / "checkpoints" / f"step-{state.global_step:07d}"
    if accelerator.is_main_process and out.exists():
        shutil.rmtree(out)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(out))
    if accelerator.is_main_process:
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        state.save(out)  # written last: a checkpoint without it is incomplete
        ckpts = sorted((out.parent).glob("step-*"))
        for old in ckpts[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    return out


def fit_from_config(path: str | Path, *, resume: str | None = None,
                    max_steps: int | None = None) -> dict[str, Any]:
    return fit(load_config(path), resume=resume, max_steps=max_steps)


__all__ = [
    "FitConfig",
    "StageConfig",
    "TrainerState",
    "fit",
    "fit_from_config",
    "latest_checkpoint",
    "load_config",
]
