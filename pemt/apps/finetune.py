"""Fine-tune and evaluate on a downstream task, from a pretraining run or an exported model.

    python launch/finetune.py                                     # embedded default: synthetic, random init
    python launch/finetune.py task.init=outputs/pemt-pretrain/default task.freeze=[backbone]   # linear probe
    python launch/finetune.py task.init=<MLflow run id of a pretraining run>
    python launch/finetune.py -m cluster=slurm task=... data=shards data.shards=UCF/train eval.shards=UCF/test
    pemt-finetune ...                                             # the same, installed

Same launcher, cluster configs and fault tolerance as pretraining; see pemt/configs/finetune.yaml.
Quote run dirs whose names hold '=' or ',' for Hydra: task.init="'outputs/pemt-pretrain/a=1,b=2'".
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

import pemt.config  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="../configs", config_name="finetune", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any]:
    from pemt.downstream.pretrained import load_pretrained
    from pemt.downstream.task import FinetuneTask, with_pretrained_model
    from pemt.train.trainer import train

    pretrained = load_pretrained(str(cfg.task.init), str(cfg.mlflow.tracking_uri)) if cfg.task.init else None
    cfg = with_pretrained_model(cfg, pretrained)
    return train(cfg, FinetuneTask(cfg, pretrained))


if __name__ == "__main__":
    main()
