"""Pretrain an audio-visual transformer.

    python launch/pretrain.py                          # embedded default: local, CPU, tiny model
    python launch/pretrain.py -m deepspeed=zero1,zero2 # a sweep: one run per point
    python launch/pretrain.py -m cluster=slurm nodes=8 # on a Slurm cluster
    pemt-pretrain ...                                  # the same, installed (pip install .)

Every invocation is a sweep of one or more points submitted through hydra-submitit-launcher;
see pemt/configs/pretrain.yaml for the keys.
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

import pemt.config  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="../configs", config_name="pretrain", version_base="1.3")
def main(cfg: DictConfig) -> dict[str, Any]:
    from pemt.train.trainer import train

    return train(cfg)


if __name__ == "__main__":
    main()
