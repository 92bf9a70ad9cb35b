"""A resumed run trains what its checkpoint was training, or says plainly what changed.

On resume the checkpoint's resolved config is compared with the new one. Keys that only say how
or where the run executes (the keys left out of run names: resources, intervals, paths,
tracking) may change freely; any other difference is refused with the keys named, unless the
user accepts them with `train.allow_config_change=[key, ...]` (a key accepts everything below
it). A shard folder whose manifest changed under the run is refused the same way (accept it as
`data.shards`). A longer or shorter `train.max_steps` stretches the cosine schedule: the log says
by how much the learning rate moves at the step the run resumes from.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from pemt.config import ConfigError
from pemt.track.tracker import flatten
from pemt.train.optimizer import lr_factor

log = logging.getLogger(__name__)

# How a run executes, not what it learns; they may differ from the checkpoint's.
EXECUTION_KEYS = (
    "nodes",
    "gpus_per_node",
    "cluster",
    "preflight",
    "paths",
    "run_dir",
    "mlflow",
    "metrics",
    "train.max_steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_last",
    "train.keep_every",
    "train.async_checkpoint",
    "train.checkpoint_direct_io",
    "train.compile",
    "model.batchnorm",
    "train.record_samples",
    "train.collective_timeout_min",
    "train.max_skipped_steps",
    "train.allow_config_change",
    "train.stop_on_collapse",
    "train.collapse",
    "data.num_workers",
    "data.decode_threads",
    "data.decoded_cache_mb",
    "data.remote",
    "data.shards",
    "eval.every",
    "eval.batch_size",
    "profile",
)

# Keys added since checkpoints were first written, with the value that gives what runs without them
# learned: a checkpoint's config without one is compared with that value.
EARLIER_VALUES = {"train.transformer_lr_scale": 1.0, "loss.cnn_warmup_steps": 0, "loss.cnn_warmup_until": None}


def _same(before: str, now: str) -> bool:
    """Equal values, numbers by value (`1` and `1.0` are one learning rate scale)."""
    try:
        return float(before) == float(now)
    except ValueError:
        return before == now


def _under(key: str, prefixes: Any) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def manifest_digest(source: str | Path, cache_dir: str | None = None) -> str | None:
    """The digest of a shard set's manifest (of manifest.json's bytes where there is one): it fixes
    every sample's place in the order."""
    from pemt.data.shard_sets import load_manifest
    from pemt.data.storage import StorageError

    try:
        return load_manifest(str(source), cache_dir).digest
    except (OSError, ValueError, StorageError):  # unreadable now: the loader will say so, with the reason
        return None


def check_continuity(
    saved: dict[str, Any], cfg: DictConfig, current_config: dict[str, Any], current_manifest: str | None, step: int
) -> None:
    """Raise ConfigError naming what changed in what is learned since the checkpoint (`saved`: its
    trainer state, with the resolved config and the manifest digest)."""
    allowed = [str(k) for k in (OmegaConf.select(cfg, "train.allow_config_change") or [])]
    before, now = flatten(saved.get("config") or {}), flatten(current_config)
    if before:
        before = {**{k: str(v) for k, v in EARLIER_VALUES.items() if k in now}, **before}
    changed = sorted(
        k
        for k in before.keys() & now.keys()
        if not _same(before[k], now[k]) and not _under(k, EXECUTION_KEYS) and not _under(k, allowed)
    )
    if saved.get("data_manifest") and saved["data_manifest"] != current_manifest and not _under("data.shards", allowed):
        changed.append("data.shards (its manifest.json changed)")
    if changed:
        shown = "; ".join(f"{k}: {before.get(k, '?')} -> {now.get(k, '?')}" for k in changed if k in before) or ""
        raise ConfigError(
            f"resuming would change what the run learns: {', '.join(changed)}"
            + (f" ({shown})" if shown else "")
            + ". Use the checkpoint's values, start a new run (another run_dir), or accept the change with "
            f"train.allow_config_change=[{','.join(k.split(' ')[0] for k in changed)}]"
        )
    accepted = sorted(k for k in before.keys() & now.keys() if not _same(before[k], now[k]) and _under(k, allowed))
    if accepted:
        log.warning("resuming with changes accepted by train.allow_config_change: %s", ", ".join(accepted))
    new = sorted(k for k in now.keys() - before.keys() if not _under(k, EXECUTION_KEYS))
    if before and new:
        log.warning("keys the checkpoint's config did not have, taken as they are now: %s", ", ".join(new))
    # a warm-up that ended is a fact of the run (pemt.train.cnn_warmup): a new max_steps does not move it
    warmup_over = (saved.get("cnn_warmup") or {}).get("ended_at") is not None
    _report_schedule(saved.get("config") or {}, cfg, step, warmup_over)


def _report_schedule(saved: dict[str, Any], cfg: DictConfig, step: int, warmup_over: bool = False) -> None:
    train = saved.get("train") or {}
    if "max_steps" not in train or int(train["max_steps"]) == int(cfg.train.max_steps):
        return
    if not warmup_over:
        _report_cnn_warmup(saved, cfg, step)
    warmup, lr = int(cfg.train.warmup_steps), float(cfg.train.lr)
    before = lr * lr_factor(step, warmup, int(train["max_steps"]))
    after = lr * lr_factor(step, warmup, int(cfg.train.max_steps))

    def decay(total: int) -> str:
        return f"{total - warmup} steps" if total > warmup else f"none (train.warmup_steps={warmup} outlasts it)"

    log.warning(
        "train.max_steps %s -> %s: the cosine schedule's decay is now %s instead of %s; at step %d "
        "the learning rate goes from %.3g to %.3g",
        train["max_steps"],
        cfg.train.max_steps,
        decay(int(cfg.train.max_steps)),
        decay(int(train["max_steps"])),
        step,
        before,
        after,
    )


def _report_cnn_warmup(saved: dict[str, Any], cfg: DictConfig, step: int) -> None:
    """The CNN warm-up takes at most half the run: a run of under twice `loss.cnn_warmup_steps`
    whose `train.max_steps` changes before its warm-up ended has another one."""
    from pemt.model.factory import warmup_of

    before = warmup_of(saved.get("loss") or {}, int(saved["train"]["max_steps"]))
    after = warmup_of(cfg.get("loss") or {}, int(cfg.train.max_steps))
    if before != after and step < max(before, after):
        log.warning(
            "train.max_steps %s -> %s: the CNN warm-up (at most half the run) is now %d steps instead of %d; "
            "from step %d MEP and the pair %s",
            saved["train"]["max_steps"],
            cfg.train.max_steps,
            after,
            before,
            step,
            "train" if step >= after else f"wait until step {after}",
        )
