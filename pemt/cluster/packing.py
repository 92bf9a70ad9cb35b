"""Packing a corpus into shards as a Slurm job array (`tools/make_shards.py ... --slurm TASKS`).

The shards are those a one-machine run makes (pemt.data.ingest: the same groups of inputs, names
and bytes); task t of T writes the shards i with i % T == t, so a rerun gives the same slices.
Each task records its shards in `progress-task-NNNN.jsonl` as they are renamed into place, so a
task killed mid-way (preemption, time limit, scancel, a dead node) keeps what it finished: it is
requeued (preemption, time limit) or rerun (running the command again submits only the slices
with unfinished shards). The manifest is merged once every shard is recorded: when the last task
ends, or by running the command again. The inputs and OUT must be on a file system every node
sees.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pemt.data.ingest import PackPlan, finished_shards, merge_manifest, plan_inputs, read_inputs, write_slice
from pemt.data.transcode import Transcode

ARRAY_FOLDER = ".slurm"  # submitit's job files and each task's log, under OUT
JOBS = "array_jobs.jsonl"  # the jobs each run of the command submitted (for --status)
ARRAY_SETTINGS = "array.json"  # what the packing was asked (for --status OUT)


@dataclass(frozen=True)
class SlurmOptions:
    tasks: int
    partition: str | None = None
    time_min: int = 240
    cpus_per_task: int = 4
    parallelism: int = 256  # tasks running at once


def slice_of(plan: PackPlan, task: int, tasks: int) -> list[int]:
    return [i for i in range(len(plan.groups)) if i % tasks == task]


def progress_file(out_dir: Path, task: int) -> Path:
    return out_dir / f"progress-task-{task:04d}.jsonl"


class PackSlice:
    """One array task: the shards of its slice not written yet. Requeued by submitit on
    preemption or the time limit (`checkpoint`), and it continues where it stopped."""

    def __init__(
        self,
        source: str,
        out_dir: str,
        max_samples: int | None,
        max_mb: float | None,
        recode: Transcode | None,
        keep_original: bool,
        tasks: int,
        processes: int,
        upload: str | None = None,
    ) -> None:
        self.source, self.out_dir, self.max_samples, self.max_mb = source, out_dir, max_samples, max_mb
        self.recode, self.keep_original, self.tasks, self.processes = recode, keep_original, tasks, processes
        self.upload = upload

    def save(self, path: Path) -> None:
        settings = {k: v for k, v in vars(self).items() if k != "recode"}
        settings["recode"] = vars(self.recode) if self.recode else None
        path.write_text(json.dumps(settings, indent=1))

    @classmethod
    def load(cls, path: Path) -> PackSlice:
        settings = json.loads(path.read_text())
        recode = Transcode(**settings.pop("recode")) if settings.get("recode") else None
        settings.pop("recode", None)
        return cls(**settings, recode=recode)

    def plan(self) -> PackPlan:
        inputs = read_inputs(Path(self.source))
        return plan_inputs(inputs, self.max_samples, self.max_mb, self.recode, self.keep_original)

    def __call__(self, task: int) -> dict[str, Any]:
        out = Path(self.out_dir)
        plan = self.plan()
        indices = slice_of(plan, task, self.tasks)
        written = write_slice(
            plan, out, indices, progress_file(out, task), self.processes, False, self.recode, self.keep_original
        )
        if self.upload:
            from pemt.data.shards import upload_shard_files

            done = finished_shards(out)
            upload_shard_files(out, [done[i]["shard"] for i in indices if done[i]["shard"]], self.upload)
        return {"task": task, "shards": len(indices), "written": written}

    def checkpoint(self, task: int) -> Any:
        """On preemption or the time limit: the same task again (what it finished is kept)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, task)


def status(out_dir: Path, plan: PackPlan) -> dict[str, Any]:
    """Shards and videos done out of all, bytes written, skipped inputs, slices left."""
    done = finished_shards(out_dir)
    videos = sum(len(g) for g in plan.groups)
    finished = [done[i] for i in sorted(done)]
    return {
        "shards": len(plan.groups),
        "shards_done": len(done),
        "videos": videos,
        "videos_done": sum(len(plan.groups[r["index"]]) for r in finished),
        "skipped": sum(len(r["skipped"]) for r in finished),
        "bytes": sum((r["shard"] or {}).get("bytes", 0) for r in finished),
    }


def unfinished_slices(out_dir: Path, plan: PackPlan, tasks: int) -> list[int]:
    done = finished_shards(out_dir)
    return [t for t in range(tasks) if any(i not in done for i in slice_of(plan, t, tasks))]


def pack_on_slurm(
    out_dir: Path,
    pack: PackSlice,
    options: SlurmOptions,
    extra: dict[str, Any] | None = None,
    poll_s: float = 2.0,
) -> dict[str, Any] | None:
    """Submit the unfinished slices as one job array and follow it: videos and bytes done over all
    tasks, rate and ETA (tqdm), failed tasks with their logs. Returns the manifest once every shard
    is written (None: some task failed; running the command again finishes it)."""
    import submitit

    plan = pack.plan()
    todo = unfinished_slices(out_dir, plan, options.tasks)
    if todo:
        executor = submitit.AutoExecutor(folder=out_dir / ARRAY_FOLDER / "%j", cluster="slurm")
        executor.update_parameters(
            slurm_partition=options.partition,
            timeout_min=options.time_min,
            cpus_per_task=options.cpus_per_task,
            slurm_array_parallelism=options.parallelism,
            name=f"make_shards-{out_dir.name}",
        )
        jobs = executor.map_array(pack, todo)
        with (out_dir / JOBS).open("a") as log:
            for task, job in zip(todo, jobs):
                log.write(json.dumps({"task": task, "job_id": job.job_id, "time": time.time()}) + "\n")
        _follow(out_dir, plan, jobs, poll_s)
        # what a task finished is in the progress files, whatever Slurm says of a job on a dead node
        unfinished = set(unfinished_slices(out_dir, plan, options.tasks))
        for task, job in zip(todo, jobs):
            if task in unfinished:
                state = f"job {job.job_id}, {job.state}"
                print(f"make_shards: slice {task} ({state}) is unfinished; log: {job.paths.stderr}")
        if unfinished:
            print("make_shards: run the same command again: it submits only the slices with unfinished shards")
    manifest = merge_manifest(plan, out_dir, extra, pack.recode)
    if manifest is not None and pack.upload:
        from pemt.data.shards import upload_manifest

        upload_manifest(out_dir, pack.upload)
    return manifest


def _follow(out_dir: Path, plan: PackPlan, jobs: list[Any], poll_s: float) -> None:
    """A progress bar of videos done over every task, until every job has ended."""
    start = status(out_dir, plan)
    with tqdm(total=start["videos"], initial=start["videos_done"], desc="videos (all tasks)", unit="video") as bar:
        while True:
            now = status(out_dir, plan)
            bar.update(now["videos_done"] - bar.n)
            bar.set_postfix(MB=f"{now['bytes'] / 2**20:.0f}", skipped=now["skipped"], refresh=False)
            if all(job.done() for job in jobs):
                return
            time.sleep(poll_s)


def describe_status(out_dir: Path, pack: PackSlice) -> str:
    """`--status OUT`: where the packing stands, and the last submitted job of every slice."""
    plan = pack.plan()
    now = status(out_dir, plan)
    lines = [
        f"{now['shards_done']}/{now['shards']} shards, {now['videos_done']}/{now['videos']} videos "
        f"({now['skipped']} skipped), {now['bytes'] / 2**20:.1f} MB written; "
        + ("manifest written" if (out_dir / "manifest.json").exists() else "no manifest yet")
    ]
    jobs: dict[int, dict[str, Any]] = {}
    if (out_dir / JOBS).exists():
        for line in (out_dir / JOBS).read_text().splitlines():
            record = json.loads(line)
            jobs[record["task"]] = record
    for task in unfinished_slices(out_dir, plan, pack.tasks):
        job = jobs.get(task, {}).get("job_id", "never submitted")
        lines.append(f"  slice {task}: unfinished (last job {job}; logs under {out_dir / ARRAY_FOLDER})")
    return "\n".join(lines)
