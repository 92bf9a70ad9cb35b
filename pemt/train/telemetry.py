"""What the trainer reports at each log step: losses, throughput, FLOPs and MFU, memory.

Values are reduced over ranks (means of losses, totals of bad samples, min/avg/max of memory)
in the same collectives on every rank; rank 0 hands them to the tracker.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from pemt.distributed import all_reduce, min_avg_max
from pemt.track.metrics import Throughput, data_rss_gib, device_memory, host_rss_gib, peak_tflops

log = logging.getLogger(__name__)


class Telemetry:
    def __init__(self, cfg: DictConfig, device: torch.device, dtype: torch.dtype, world_size: int) -> None:
        self.cfg, self.device, self.world_size = cfg, device, world_size
        self.meter = Throughput()
        self.flops_per_sample: float | None = None  # forward + backward, counted on the first step
        self.peak, source = peak_tflops(OmegaConf.select(cfg, "metrics.peak_tflops"), device, dtype)
        log.info("MFU against %.3g TFLOP/s per device (%s)", self.peak, source)
        # per key: MEP and the pair report nothing while the CNN warm-up skips the transformers
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        # data workers' decode time, samples, and those served decoded (data.decoded_cache_mb) since the last report
        self.decode_s, self.decoded, self.cached = 0.0, 0, 0
        self.retries = 0  # remote reads the data workers tried again since the last report
        # The current curriculum stage's sequence shape (set by the trainer).
        self.clips = int(cfg.data.clips)
        self.tokens_per_clip = int(OmegaConf.select(cfg, "model.tokens_per_clip", default=1) or 1)

    def set_flops(self, flops: int, micro_batch: int) -> None:
        self.flops_per_sample = flops / micro_batch
        log.info("%.3f GFLOP per sample (forward + backward)", self.flops_per_sample / 1e9)

    def add_batch(self, batch: dict[str, Any]) -> None:
        """A micro-batch as the loader delivered it: how long its samples took to decode."""
        self.decode_s += float(batch.get("decode_s", 0.0))
        self.decoded += len(batch["key"]) + len(batch["errors"])
        self.cached += int(batch.get("cached", 0))
        self.retries += int(batch.get("retries", 0))

    def add_micro_step(self, out: dict[str, torch.Tensor]) -> None:
        for key, value in out.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach()
            self.counts[key] = self.counts.get(key, 0) + 1

    def report(
        self, samples: int, lr: float, grad_norm: float | None, bad_errors: int, bad_slots: int
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Collective. The metrics to log, and the bad-sample totals every rank checks."""
        decode = {
            "decode_s_per_sample": self.decode_s / max(1, self.decoded),
            "decoded_cache_share": self.cached / max(1, self.decoded),
        }
        # every rank has the same keys: the same steps were skipped everywhere
        means = all_reduce({**{k: float(v) / self.counts[k] for k, v in self.sums.items()}, **decode}, self.device)
        self.sums, self.counts = {}, {}
        self.decode_s, self.decoded, self.cached = 0.0, 0, 0
        totals = all_reduce(
            {"bad_samples": bad_errors, "slots": bad_slots, "remote_retries": self.retries}, self.device, mean=False
        )
        self.retries = 0
        speed = self.meter.report()
        memory = min_avg_max(
            {"host_rss_gib": host_rss_gib(), "data_rss_gib": data_rss_gib(), **device_memory()}, self.device
        )
        clips, tokens = self.clips, self.clips * self.tokens_per_clip
        metrics: dict[str, Any] = {
            **means,
            "lr": lr,
            "samples": samples,
            **speed,
            "clips_per_s": speed["samples_per_s"] * clips,
            # per modality, before node sparsity; the multimodal transformer reads both
            "visual_tokens_per_s": speed["samples_per_s"] * tokens,
            "audio_tokens_per_s": speed["samples_per_s"] * tokens,
            "bad_samples": totals["bad_samples"],
            "remote_retries": totals["remote_retries"],
            **memory,
        }
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if self.flops_per_sample:
            per_device = self.flops_per_sample * speed["samples_per_s"] / self.world_size / 1e12
            metrics.update({"tflops_per_device": per_device, "mfu_pct": 100.0 * per_device / self.peak})
        return metrics, totals
