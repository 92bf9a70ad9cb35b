"""The training job: composes distributed setup, data, model, DeepSpeed engine, checkpoints,
preemption handling and tracking around a task (pretraining, fine-tuning). Runs in every rank
of a submitted job."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from pemt.checks import validate
from pemt.config import ConfigError, plain, world_size
from pemt.curriculum import Stage, stage_at, stage_data_config, stages
from pemt.data.errors import BadSamples
from pemt.data.loader import build_loader, shard_source
from pemt.data.shards import transform_warnings
from pemt.distributed import from_main, init_distributed, leave_distributed, submitit_environment, tag_log_lines
from pemt.ownership import RunLock, own_run_dir
from pemt.secrets import redact_config
from pemt.track.metrics import counting_flops
from pemt.track.tracker import MlflowTracker
from pemt.train import exit_deadline
from pemt.train.checkpoint import Checkpointer, CheckpointError
from pemt.train.cnn_warmup import TAG as WARMUP_TAG
from pemt.train.cnn_warmup import CnnWarmup
from pemt.train.collapse import TAG as COLLAPSE_TAG
from pemt.train.collapse import CollapseError, CollapseLimits, CollapseWatch
from pemt.train.compilation import compile_blocks, compiles
from pemt.train.continuity import check_continuity, manifest_digest
from pemt.train.engine_config import deepspeed_config
from pemt.train.guard import StepGuard
from pemt.train.journal import RunJournal
from pemt.train.optimizer import build_optimizer
from pemt.train.preemption import StopRequest, shielded_workers
from pemt.train.profiling import StepProfiler, profile_window
from pemt.train.task import PretrainTask, Task, TaskContext, micro_batch_keys
from pemt.train.telemetry import Telemetry

log = logging.getLogger(__name__)

# How long a job stopped by a signal waits for MLflow before it requeues.
STOP_DELIVERY_S = 5.0
# How long a job stopped by a signal waits for the checkpoint being written in the background
# before it gives it up and writes its final one.
STOP_SETTLE_S = 30.0


class Trainer:
    def __init__(self, cfg: DictConfig, task: Task | None = None) -> None:
        validate(cfg)
        self.cfg = cfg
        self.task = task or PretrainTask()
        self.keys = micro_batch_keys(int(cfg.seed), int(cfg.train.grad_accum_steps))
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.info = init_distributed(float(cfg.train.collective_timeout_min))
        tag_log_lines(self.info.rank)
        self.lock = RunLock(self.run_dir)
        own_run_dir(self.lock, self.run_dir, self.info.is_main, self.info.world_size)
        if self.info.world_size != world_size(cfg):
            raise ConfigError(
                f"the job has {self.info.world_size} processes but nodes x gpus_per_node = {world_size(cfg)}"
            )
        # Signals are only recorded from here on; the loop acts on them at step boundaries.
        self.stop = StopRequest()
        self.stop.install()
        self.checkpointer = Checkpointer(
            self.run_dir / "checkpoints",
            keep_last=int(cfg.train.keep_last),
            keep_every=int(cfg.train.keep_every),
            asynchronous=bool(cfg.train.async_checkpoint),
            direct_io=bool(cfg.train.checkpoint_direct_io),
        )
        self.resume_from = self.checkpointer.select()
        self.elastic = bool(self.resume_from and self.resume_from.manifest["world_size"] != self.info.world_size)
        import deepspeed

        torch.manual_seed(cfg.seed)
        model = self.task.build_model(cfg)
        if compiles(cfg):
            compile_blocks(model)
        optimizer, scheduler = build_optimizer(model, cfg.train)
        engine_config = deepspeed_config(cfg)
        if self.elastic:
            engine_config["checkpoint"] = {"load_universal": True}
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=engine_config
        )
        self.checkpointer.attach(self.engine)
        self.dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        self.context = TaskContext(self.engine, self.dtype, self.info.rank, self.run_dir)
        self.tracker = MlflowTracker(cfg, self.run_dir, enabled=self.info.is_main)
        self.telemetry = Telemetry(cfg, self.engine.device, self.dtype, self.info.world_size)
        self.guard = StepGuard(self.engine.module, int(cfg.train.max_skipped_steps), self.engine.device)
        self.cnn_warmup = CnnWarmup.from_config(cfg, getattr(model, "cnn_warmup_steps", 0))
        self.collapse = CollapseWatch(CollapseLimits.from_config(cfg.train), 0)
        self._apply_cnn_warmup()
        self.journal = RunJournal(self.run_dir, enabled=self.info.is_main)
        self.profiler = StepProfiler(profile_window(cfg), self.run_dir / "profile", self.info.rank, self.engine.device)
        if self.info.is_main:
            for line in [*transform_warnings(shard_source(cfg), cfg.data), *self.task.config_warnings(cfg)]:
                log.warning(line)

    def _apply_cnn_warmup(self) -> None:
        """The model counts MEP and the pair from the warm-up's end; the collapse watch judges the
        pair once it has trained through a learning-rate warm-up of its own after that."""
        model = self.engine.module
        if hasattr(model, "cnn_warmup_steps"):
            model.cnn_warmup_steps = self.cnn_warmup.end
        self.collapse.warmup_steps = int(self.cfg.train.warmup_steps) + self.cnn_warmup.end

    def _watch_cnn_warmup(self, step: int, outs: list[dict[str, torch.Tensor]]) -> None:
        """Collective while the warm-up may still end early; says where it ended."""
        said = self.cnn_warmup.observe_step(step, outs, self.engine.device)
        if said:
            self._apply_cnn_warmup()
            if self.info.is_main:  # a warning where it ran its longest without the CNNs learning
                log.log(logging.INFO if self.cnn_warmup.learned else logging.WARNING, "%s", said)
            if not self.cnn_warmup.learned:  # ... and a tag, where people look
                self.tracker.set_tags({WARMUP_TAG: said})
            self.tracker.log_metrics({"cnn_warmup_end": self.cnn_warmup.end}, step)

    def _restore(self) -> dict[str, Any]:
        if self.resume_from is None:
            return {}
        # Before the load: a checkpoint that would not load under the changed config (another optimizer
        # layout) is refused by what changed, not set aside as unloadable.
        selected = self.resume_from
        check_continuity(
            selected.manifest["state"], self.cfg, self._resolved(), self._data_manifest, int(selected.step)
        )
        self.resume_from, state = self.checkpointer.load(self.engine, self.resume_from, universal=self.elastic)
        if self.elastic:
            # Per-rank random streams cannot carry over to another world size; reseed them
            # from the step so the continuation is still reproducible.
            torch.manual_seed(self.cfg.seed * 1_000_003 + int(state["step"]) * 1009 + self.info.rank)
            log.info(
                "resumed at world size %d from a checkpoint written at %d",
                self.info.world_size,
                self.resume_from.manifest["world_size"],
            )
        saved = state.get("data_cursor")
        self.cnn_warmup.load_state_dict(state.get("cnn_warmup"))
        self._apply_cnn_warmup()
        if saved and saved["streams"] != self.cfg.data.streams:
            raise ConfigError(
                f"data.streams={self.cfg.data.streams} but the checkpoint was written with "
                f"data.streams={saved['streams']}: the sample order would change; resume with the same value"
            )
        if self.resume_from.path != selected.path:  # fell back to an earlier checkpoint
            check_continuity(state, self.cfg, self._resolved(), self._data_manifest, int(state["step"]))
        return state

    @functools.cached_property
    def _data_manifest(self) -> str | None:
        """The shards' manifest digest, read once a job: a remote one is a request, and a save on
        the preemption signal must not wait on the store."""
        return manifest_digest(shard_source(self.cfg), str(self.cfg.paths.cache))

    def _resolved(self) -> dict[str, Any]:
        resolved: dict[str, Any] = redact_config(plain(self.cfg))
        return resolved

    def _log(self, step: int, samples: int, progress: tqdm[Any], bad: BadSamples) -> str | None:
        """Collective. Report this log step; the collapse message if the run was just found
        collapsed (every rank finds it alike: it reads metrics reduced over ranks)."""
        metrics, totals = self.telemetry.report(
            samples, self.engine.get_lr()[0], self.engine.get_global_grad_norm(), bad.errors, bad.slots
        )
        metrics["skipped_steps"] = self.guard.skipped
        collapsed = self.collapse.observe(step, metrics)
        if collapsed:  # once, every rank alike (metrics reduced over ranks)
            metrics["collapsed"] = 1.0
            if self.info.is_main:
                log.warning("%s", collapsed)
            self.tracker.set_tags({COLLAPSE_TAG: collapsed})
        self.tracker.log_metrics(metrics, step)
        if "loss" in metrics:
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
        bad.check(totals["bad_samples"], totals["slots"])  # every rank sees the same totals
        return collapsed

    def _micro_step(self, batch: dict[str, Any], count_flops: bool) -> dict[str, torch.Tensor]:
        """Forward, backward and (at the accumulation boundary) the optimizer step."""
        engine = self.engine
        counter: contextlib.AbstractContextManager[dict[str, int]] = (
            counting_flops() if count_flops else contextlib.nullcontext({})
        )
        with counter as counted:
            step_seed, step = self.keys(batch)
            out = self.task.forward(engine, batch, self.dtype, step_seed=step_seed, step=step)
            engine.backward(out["loss"])
        engine.step()
        if count_flops:
            self.telemetry.set_flops(counted["flops"], len(batch["key"]))
        return out

    def _step(self, step: int, batches: list[dict[str, Any]], count_flops: bool) -> bool:
        """One optimizer step over its micro-batches; False when every rank skipped it."""
        if self.guard.any_empty(batches):
            self.guard.skip_empty(step, batches)
            return False
        self.guard.before_forward()
        outs = []
        with self.task.accumulation(self.engine, batches, self.dtype, self.keys) as micro_step:
            for i, batch in enumerate(batches):
                with micro_step(i):
                    outs.append(self._micro_step(batch, count_flops=count_flops and i == 0))
        if not self.guard.after_step(self.engine.was_step_applied(), step, outs[-1]["loss"]):
            return False
        for out in outs:
            self.telemetry.add_micro_step(out)
        self._watch_cnn_warmup(step, outs)
        return True

    def _batches(self, start_micro: int, bad: BadSamples, stage: Stage) -> Iterator[dict[str, Any]]:
        """Micro-batches from `start_micro` on, decoded for `stage`, each recorded and counted before use."""
        cfg, info = self.cfg, self.info
        loader = build_loader(
            stage_data_config(cfg.data, stage),
            shard_source(cfg),
            self.engine.train_micro_batch_size_per_gpu(),
            info.rank,
            info.world_size,
            seed=cfg.seed,
            start_micro_step=start_micro,
            check=self.task.sample_check(),
            cache_dir=str(cfg.paths.cache),
        )
        record = None
        if cfg.train.record_samples:
            (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
            record = (self.run_dir / "samples" / f"rank{info.rank:05d}.jsonl").open("a")
        accum = int(cfg.train.grad_accum_steps)
        with shielded_workers(loader) as iterator:  # its workers ignore the signals this process acts on
            for batch in iterator:
                bad.add(batch)
                self.telemetry.add_batch(batch)
                if record is not None:
                    record.write(
                        json.dumps(
                            {
                                "step": batch["micro_step"] // accum + 1,
                                "micro_step": batch["micro_step"],
                                "keys": batch["key"],
                            }
                        )
                        + "\n"
                    )
                    record.flush()
                yield batch

    def _save(self, step: int, samples: int, run_id: str | None, final: bool = False) -> None:
        """Collective. A checkpoint at `step`: in the background, unless `final` (the last one, or
        one on a signal), which is on disk when this returns."""
        cfg = self.cfg
        self.guard.check_finite(step)
        accum = int(cfg.train.grad_accum_steps)
        state = {
            "step": step,
            "samples": samples,
            "mlflow_run_id": run_id,
            "world_size": self.info.world_size,
            "data_cursor": {"micro_step": step * accum, "streams": int(cfg.data.streams), "seed": int(cfg.seed)},
            "config": self._resolved(),
            "data_manifest": self._data_manifest,
            "cnn_warmup": self.cnn_warmup.state_dict(),
        }
        report = self.checkpointer.save(self.engine, step, state, final=final)
        delay = OmegaConf.select(cfg, "cluster.signal_delay_s")
        if delay and not report.asynchronous and report.stall_s > 0.5 * delay:
            log.warning(
                "saving took %.0f s, over half of cluster.signal_delay_s=%s: a save on preemption "
                "may not finish before the job is killed; raise the signal delay",
                report.stall_s,
                delay,
            )
        if final and not report.committed:
            raise CheckpointError(
                f"the checkpoint at step {step} could not be written (see above); the previous one stays `latest`"
            )
        timing = {"checkpoint_save_s": report.stall_s, "checkpoint_failures": self.checkpointer.failures}
        if report.asynchronous:
            timing["checkpoint_host_copy_gib"] = report.host_copy_bytes / 2**30
        self.tracker.log_metrics(timing, step, replayed=True)

    def _enter(self, stage: Stage, step: int, bad: BadSamples, count: int) -> tuple[Stage, Iterator[dict[str, Any]]]:
        """Start (or resume into) a curriculum stage: the model's sequence settings and a loader
        decoding the stage's clips, from the current step on."""
        self.task.enter_stage(self.engine.module, stage)
        self.telemetry.tokens_per_clip = stage.tokens_per_clip
        self.telemetry.clips = stage.clips
        if count > 1:
            log.info("curriculum %s", stage.describe())
            self.tracker.log_metrics({"stage": stage.index}, step + 1, replayed=True)  # its first step
        return stage, self._batches(step * int(self.cfg.train.grad_accum_steps), bad, stage)

    def _first_step(self, step: int, segment: dict[str, Any]) -> None:
        """Per job: how long it took to start, and the time lost since the previous job."""
        now = time.time()
        since_start = now - psutil.Process().create_time()
        log.info("first step %d done %.1f s after the job started", step, since_start)
        timings = {"time_to_first_step_s": since_start, "segment": segment["segment"]}
        if segment["previous_end"] is not None:
            timings["resume_gap_s"] = now - segment["previous_end"]
        if self.tracker.logged_until >= step:
            timings["replayed_steps"] = self.tracker.logged_until - step + 1
        self.tracker.log_metrics(timings, step, replayed=True)

    def _profiled(self, written: list[Path], together: bool) -> None:
        """Profile files go to MLflow: every rank's once all have written them (`together`: every
        rank ends the window in this step), else only this rank's."""
        if not written:
            return
        if together and self.info.world_size > 1:
            dist.barrier()
            written = self.profiler.every_rank_files()
        self.tracker.log_artifacts(written, "profile")

    def fit(self) -> dict[str, Any]:
        cfg, engine, info = self.cfg, self.engine, self.info
        loaded = time.perf_counter()
        state = self._restore()
        load_s = time.perf_counter() - loaded
        step, samples = int(state.get("step", 0)), int(state.get("samples", 0))
        segment = self.journal.start(step, info.world_size)
        # rank 0 owns the MLflow run; every rank keeps its id for the checkpoint
        started = self.tracker.start(cfg, run_id=state.get("mlflow_run_id"), segment=segment, tags=self.task.run_tags())
        run_id = from_main(started, info.world_size)
        if state:
            self.tracker.log_metrics({"checkpoint_load_s": load_s}, step, replayed=True)
        status, stop, reason = "FAILED", None, None
        try:
            accum = int(cfg.train.grad_accum_steps)
            bad = BadSamples(float(cfg.data.max_error_rate))
            all_stages, stage = stages(cfg), None
            batches: Iterator[dict[str, Any]] = iter(())
            progress = tqdm(
                total=cfg.train.max_steps,
                initial=step,
                desc=self.task.name,
                unit="step",
                disable=not info.is_main,
                dynamic_ncols=True,
                mininterval=1.0,
            )
            first_step, counted = True, None  # the phase whose FLOPs per sample are counted
            eval_every = int(OmegaConf.select(cfg, "eval.every", default=0) or 0)
            while step < cfg.train.max_steps:
                current = stage_at(all_stages, step)
                if stage != current:
                    stage, batches = self._enter(current, step, bad, len(all_stages))
                phase = (current, step < self.cnn_warmup.end)  # another stage, or past the warm-up: other FLOPs
                self.profiler.before(step + 1)
                asked = time.perf_counter()
                micro_batches = [next(batches) for _ in range(accum)]
                waited_for_data = time.perf_counter() - asked
                if self._step(step + 1, micro_batches, count_flops=phase != counted):
                    counted = phase
                step += 1
                self._profiled(self.profiler.after(step), together=True)
                if first_step:
                    first_step = False
                    self._first_step(step, segment)
                samples += int(cfg.train.global_batch_size)
                self.telemetry.meter.add(int(cfg.train.global_batch_size), waited_for_data)
                progress.update(1)
                collapsed = None
                if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                    collapsed = self._log(step, samples, progress, bad)
                if collapsed and cfg.train.stop_on_collapse:
                    self._save(step, samples, run_id, final=True)
                    raise CollapseError.stopped(collapsed, step)
                if step == cfg.train.max_steps or (eval_every and step % eval_every == 0):
                    evaluated = self.task.evaluate(self.context, step)
                    if evaluated:
                        self.tracker.log_metrics(evaluated, step)
                stop = self.stop.agreed(engine.device)
                final = step == cfg.train.max_steps or bool(stop)
                if stop:  # what is in flight is finished, or given up within its share of the notice
                    self.checkpointer.settle(timeout_s=STOP_SETTLE_S)
                if step % cfg.train.checkpoint_every == 0 or final:
                    self._save(step, samples, run_id, final=final)
                    # a signal that came during the save: that checkpoint is the one to stop on
                    if not stop:
                        stop = self.stop.agreed(engine.device)
                        if stop:  # ... once it is written, if it went to the background
                            self.checkpointer.settle()
                if stop:
                    waited = time.time() - (self.stop.received_at or time.time())
                    log.warning(
                        "stopped by %s at step %d: checkpoint committed %.2f s after the signal",
                        signal.Signals(stop).name,
                        step,
                        waited,
                    )
                    self.tracker.log_metrics({"signal_to_commit_s": waited}, step, replayed=True)
                    status = "KILLED"
                    break
            else:
                status = "FINISHED"
            progress.close()
        except BaseException as err:
            reason = f"{type(err).__name__}: {err}"
            raise
        finally:
            # after a signal the job has seconds left: what MLflow has not taken by then stays
            # in the outbox for the next job
            self.checkpointer.settle()  # nothing left half-written in the background
            self._profiled(self.profiler.finish(step), together=False)
            self.tracker.finish(status, timeout_s=STOP_DELIVERY_S if stop else 30.0)
            outcome = {"FINISHED": "finished", "FAILED": "failed"}.get(status)
            outcome = outcome or self.stop.outcome(stop, cfg)
            self.journal.end(outcome, step, reason)
            if not stop:  # a requeue hands the run dir to this job's next run, which takes it over
                self.lock.release()
        if stop:
            self.stop.warn_if_slow(cfg)
            self.stop.hand_over(stop, requeue=bool(OmegaConf.select(self.cfg, "cluster.requeue", default=True)))
            self.stop.uninstall()
        else:
            self.stop.finished()
        return {"step": step, "samples": samples, "run_dir": str(self.run_dir), "mlflow_run_id": run_id}


def train(cfg: DictConfig, task: Task | None = None) -> dict[str, Any]:
    """Run `cfg` in this job process: train, then leave the process group (a requeue's exit
    included) with the process bounded in how long it may take to end."""
    ended = False
    try:
        result = Trainer(cfg, task).fit()
        ended = True
        return result
    finally:
        if submitit_environment() is not None:  # a job's process: nothing runs in it after this
            exit_deadline.arm()
        leave_distributed(together=ended)
