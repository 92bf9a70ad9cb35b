"""Fine-tuning as a trainer task: a classifier initialised from pretraining, evaluated on a
held-out split, its MLflow run tagged with the pretraining run it started from."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pemt.config import ConfigError, detached, one_of, plain, positive_int
from pemt.curriculum import largest, stages
from pemt.data.decode import DecodeError, video_to_float
from pemt.data.loader import clip_spec
from pemt.data.shard_sets import load_manifest
from pemt.data.storage import retry_from_config
from pemt.downstream.evaluate import metrics, multi_hot, predict
from pemt.downstream.models import Classifier
from pemt.downstream.pretrained import Pretrained
from pemt.train.task import Task, TaskContext

log = logging.getLogger(__name__)
EVAL_LOG = "eval.jsonl"


def eval_shard_source(cfg: DictConfig) -> str:
    """The held-out shards: `eval.shards`, or for synthetic data a set drawn with `eval.seed`."""
    if cfg.eval.shards:
        return str(cfg.eval.shards)
    if cfg.data.name != "synthetic":
        raise ConfigError("eval.shards is not set: give the held-out split's shard folder")
    from pemt.data.synthetic import shard_dir

    return str(shard_dir(held_out_config(cfg)))


def held_out_config(cfg: DictConfig) -> DictConfig:
    """The synthetic data config of the held-out set: same classes and styles, other videos."""
    data = plain(cfg.data)
    data["synthetic"].update(seed=int(cfg.eval.seed), videos=int(cfg.eval.synthetic_videos))
    return OmegaConf.create({"data": data, "paths": {"cache": str(cfg.paths.cache)}})


def label_space(cfg: DictConfig) -> tuple[int, bool]:
    """(classes, multi-label) from `task.classes`, else the training shards' manifest."""
    multi_label = bool(cfg.task.multi_label)
    if cfg.task.classes:
        return int(cfg.task.classes), multi_label
    if cfg.data.name == "synthetic":
        return int(cfg.data.synthetic.classes), multi_label
    try:
        manifest = load_manifest(str(cfg.data.shards), str(cfg.paths.cache)).data
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.shards={cfg.data.shards}: {err}") from None
    if "classes" not in manifest:
        raise ConfigError(
            f"task.classes is not set and the manifest of data.shards={cfg.data.shards} names no classes "
            "(tools/make_downstream.py writes them): set task.classes"
        )
    return len(manifest["classes"]), bool(manifest.get("multi_label", multi_label))


def with_pretrained_model(cfg: DictConfig, pretrained: Pretrained | None) -> DictConfig:
    """The config to run: the model section of the pretraining run it starts from."""
    if pretrained is None:
        return cfg
    merged = detached(cfg)
    merged.model = pretrained.config["model"]
    source = OmegaConf.create(pretrained.config)
    clips, tokens_per_clip = largest(source)
    if cfg.task.name == "long_av" and int(cfg.data.clips) > clips:
        raise ConfigError(
            f"data.clips={cfg.data.clips}: the pretrained model at {pretrained.source} "
            f"has positions for {clips} clips; use at most that many"
        )
    # the sequence settings the pretraining ended with (its last curriculum stage)
    last = stages(source)[-1]
    merged.model.tokens_per_clip = last.tokens_per_clip
    merged.model.attention = last.attention
    if "node_sparsity" in merged.model:
        merged.model.node_sparsity.keep_rate = last.keep_rate
    merged.task.max_clips, merged.task.max_tokens_per_clip = clips, tokens_per_clip
    return merged


@dataclass(frozen=True)
class LabelCheck:
    """Runs in the data workers: a sample whose labels the classifier cannot take is a bad sample
    (counted, under data.max_error_rate), not an error that ends the run."""

    classes: int
    multi_label: bool

    def __call__(self, sample: dict[str, Any]) -> None:
        labels = sample["labels"] if self.multi_label else [sample["label"]]
        if self.multi_label and not labels:
            raise DecodeError("no labels (a multi-label task needs at least one)")
        wrong = [v for v in labels if not 0 <= v < self.classes]
        if wrong:
            raise DecodeError(f"label(s) {wrong[:5]} outside 0..{self.classes - 1}")


class FinetuneTask(Task):
    name = "finetune"

    def __init__(self, cfg: DictConfig, pretrained: Pretrained | None) -> None:
        self.cfg, self.pretrained = cfg, pretrained
        self.classes, self.multi_label = label_space(cfg)

    def build_model(self, cfg: DictConfig) -> nn.Module:
        task = cfg.task
        model = Classifier(
            cfg.model,
            int(task.max_clips or cfg.data.clips),
            str(task.name),
            self.classes,
            self.multi_label,
            list(task.freeze),
            str(task.loss),
            task.get("max_tokens_per_clip"),
        )
        if self.pretrained is not None:
            missing, unexpected = model.backbone.load_state_dict(self.pretrained.backbone_state(), strict=False)
            if missing or unexpected:
                raise ConfigError(
                    f"task.init={self.pretrained.source}: its weights do not fit the model "
                    f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
                )
            log.info("initialised from %s (step %d)", self.pretrained.source, self.pretrained.step)
        return model

    def _targets(self, batch: dict[str, Any]) -> torch.Tensor:
        return multi_hot(batch["labels"], self.classes) if self.multi_label else batch["label"]

    def sample_check(self) -> LabelCheck:
        return LabelCheck(self.classes, self.multi_label)

    def forward(
        self, engine: Any, batch: dict[str, Any], dtype: torch.dtype, step_seed: int, step: int
    ) -> dict[str, torch.Tensor]:
        out = engine(
            video_to_float(batch["video"], engine.device, dtype),
            batch["audio"].to(engine.device, dtype),
            self._targets(batch).to(engine.device),
        )
        return {"loss": out["loss"]}

    def run_tags(self) -> dict[str, str]:
        tags = {"pemt.task": str(self.cfg.task.name)}
        if self.pretrained is not None:
            tags["pemt.init"] = self.pretrained.source
            tags["pemt.init_step"] = str(self.pretrained.step)
            if self.pretrained.mlflow_run_id:
                tags["pemt.pretrain_run_id"] = self.pretrained.mlflow_run_id
        return tags

    def evaluate(self, context: TaskContext, step: int) -> dict[str, float]:
        cfg, engine = self.cfg, context.engine
        started = time.perf_counter()
        engine.eval()
        try:
            with torch.no_grad():
                results, errors = predict(
                    lambda v, a: engine(v, a)["scores"],
                    eval_shard_source(cfg),
                    clip_spec(cfg.data),
                    engine.device,
                    context.dtype,
                    int(cfg.eval.batch_size),
                    cfg.eval.max_samples,
                    retry_from_config(cfg.data),
                    str(cfg.paths.cache),
                )
        finally:
            engine.train()
        scores = {
            **metrics(results, self.classes, self.multi_label),
            "test_bad_samples": len(errors),
            "eval_s": time.perf_counter() - started,
        }
        if context.is_main:
            record = {"step": step, **scores, "errors": errors[:20]}
            with (context.run_dir / EVAL_LOG).open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            log.info(
                "evaluation at step %d: %s",
                step,
                ", ".join(f"{k}={v:.2f}" for k, v in scores.items() if k.startswith("test_")),
            )
        return scores


def check_task(cfg: DictConfig) -> None:
    """The `task.*` and `eval.*` keys of fine-tuning."""
    from pemt.downstream.models import FREEZABLE, TASKS
    from pemt.downstream.pretrained import is_mlflow_run_id

    if cfg.task.name not in TASKS:
        raise ConfigError(f"task.name={cfg.task.name!r}: choose one of {', '.join(TASKS)}")
    unknown = set(cfg.task.freeze) - set(FREEZABLE)
    if unknown:
        raise ConfigError(
            f"task.freeze={list(cfg.task.freeze)}: unknown {sorted(unknown)}; use any of {', '.join(FREEZABLE)}"
        )
    one_of(cfg, "task.loss", ("cross_entropy", "multi_margin"))
    init = str(cfg.task.init or "")
    if init and not Path(init).exists() and not is_mlflow_run_id(init):
        raise ConfigError(f"task.init={init}: no such run dir or file (nor an MLflow run id)")
    positive_int(cfg, "eval.batch_size")
