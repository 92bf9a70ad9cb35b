"""All the checks of a composed config, in one call: each component checks the section it reads
(this module only puts them in an order where the first message names the first thing to fix).
The launcher runs it for every point of a sweep before submitting anything; each job again."""

from __future__ import annotations

from omegaconf import DictConfig

from pemt.cluster.keys import check_cluster
from pemt.curriculum import stages
from pemt.data.loader import check_data
from pemt.model.factory import check_model
from pemt.train.cnn_warmup import check_cnn_warmup
from pemt.train.collapse import check_collapse
from pemt.train.compilation import check_compile
from pemt.train.engine_config import check_batch, check_world
from pemt.train.optimizer import check_optimizer
from pemt.train.profiling import check_profile


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the key and value if `cfg` cannot run."""
    check_world(cfg)
    check_batch(cfg)
    check_data(cfg)
    check_cluster(cfg)
    check_model(cfg)
    stages(cfg)  # the curriculum's stages, or the one stage of the plain config
    check_profile(cfg)
    check_compile(cfg)
    check_optimizer(cfg)
    check_collapse(cfg)
    check_cnn_warmup(cfg)
    if "task" in cfg:
        from pemt.downstream.task import check_task

        check_task(cfg)
