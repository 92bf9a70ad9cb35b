"""hydra-submitit-launcher, with the work that must happen once before any job starts.

Before submitting a sweep, every point's config is composed and checked, so a bad value stops
the launch with a message instead of failing inside a queued job; the tracking store and any
generated data are made ready in this process, so ranks never race to create them; and while
the launcher waits, rank 0's output is echoed to the terminal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf

from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from pemt.cluster import preflight
from pemt.cluster.relay import LogRelay
from pemt.config import ConfigError, hydra_quoted, hydra_unquoted
from pemt.secrets import mask_log_secrets, redact
from pemt.track.context import move_credentials_to_env
from pemt.track.store import TrackingError

# hydra-submitit-launcher submits a sweep as one job array with one set of resources.
_SAME_FOR_WHOLE_SWEEP = ("nodes", "gpus_per_node", "cluster")


def _compose_points(launcher: Any, job_overrides: Sequence[Sequence[str]]) -> list[DictConfig]:
    # every component's checks: they import the model and data code (torch), which a launch needs
    # and `--help` does not
    from pemt.checks import validate

    loader = launcher.hydra_context.config_loader
    configs = []
    for overrides in job_overrides:
        cfg = loader.load_sweep_config(launcher.config, list(overrides))
        try:
            validate(cfg)
            if redact(str(cfg.mlflow.tracking_uri)) != str(cfg.mlflow.tracking_uri):
                raise ConfigError(
                    "mlflow.tracking_uri in a config file carries credentials: Hydra copies configs into "
                    "every run dir; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead"
                )
        except ConfigError as err:
            point = " ".join(overrides) or "(no overrides)"
            raise ConfigError(f"{err}\n  in sweep point: {redact(point)}") from None
        configs.append(cfg)
    return configs


def _normalised(job_overrides: Sequence[Sequence[str]]) -> list[list[str]]:
    """Overrides as the jobs must see them: a tracking URI's user:password moved into MLflow's
    environment variables (the jobs inherit them; Hydra writes overrides into every run dir), and
    `run_dir=PATH` made absolute (jobs may start elsewhere) and refused in a sweep of several
    points (it names one run)."""
    cleaned = []
    for overrides in job_overrides:
        point = []
        for override in overrides:
            key, sep, value = override.partition("=")
            if key.lstrip("+~") == "mlflow.tracking_uri" and sep:
                try:  # the value as Hydra reads it: a sweep's overrides come with `:` escaped
                    uri = move_credentials_to_env(str(_parsed_value(override)), os.environ)
                except ValueError as err:
                    raise ConfigError(str(err)) from None
                override = f"{key}={hydra_quoted(uri)}"
            elif key.lstrip("+~") == "run_dir" and sep:
                if len(job_overrides) > 1:
                    raise ConfigError(
                        f"run_dir={value} names one run, but the sweep has {len(job_overrides)} points: "
                        "drop run_dir and let each point get its own"
                    )
                override = f"{key}={hydra_quoted(os.path.abspath(hydra_unquoted(value)))}"
            point.append(override)
        cleaned.append(point)
    return cleaned


def _parsed_value(override: str) -> Any:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(override).value()


def _check_sweep_resources(configs: list[DictConfig]) -> None:
    for key in _SAME_FOR_WHOLE_SWEEP:
        values = {OmegaConf.to_yaml(OmegaConf.create({key: cfg[key]})) for cfg in configs}
        if len(values) > 1:
            shown = ", ".join(sorted(str(cfg[key]) for cfg in configs))
            raise ConfigError(
                f"{key} differs between sweep points ({shown}); one sweep is one job array "
                f"with one shape: launch a separate sweep for each {key}"
            )


def prepare(configs: list[DictConfig]) -> None:
    """Make what all ranks share exist before they start: tracking store, generated data."""
    from pemt.data.synthetic import ensure_synthetic_shards
    from pemt.track.store import ensure_experiment  # imports mlflow: only when launching

    for uri, experiment, root in sorted({(c.mlflow.tracking_uri, c.mlflow.experiment, c.paths.root) for c in configs}):
        ensure_experiment(uri, experiment, Path(str(root)) / "mlartifacts")
    for cfg in configs:
        if cfg.data.name == "synthetic":
            ensure_synthetic_shards(cfg)
            if "eval" in cfg and not cfg.eval.shards:  # fine-tuning's held-out synthetic set
                from pemt.downstream.task import held_out_config

                ensure_synthetic_shards(held_out_config(cfg))


def _summarise(results: Sequence[JobReturn], configs: list[DictConfig]) -> None:
    """Where each finished run is, and how to look at it."""
    uris = set()
    for result, cfg in zip(results, configs):
        if result.status == JobStatus.COMPLETED and isinstance(result.return_value, dict):
            done = result.return_value
            print(
                f"pemt: run at step {done['step']} in {done['run_dir']} (MLflow run {done['mlflow_run_id']})",
                file=sys.stderr,
            )
            uris.add(str(cfg.mlflow.tracking_uri))
    for uri in sorted(uris):
        print(f"pemt: look at it with: mlflow ui --backend-store-uri {redact(uri)}", file=sys.stderr)


def _check_and_plan(
    configs: list[DictConfig], job_overrides: Sequence[Sequence[str]], scheduler_check: Any = None
) -> None:
    """Preflight every point and print its plan (and ask the scheduler, where there is one); with
    preflight=true stop there."""
    plans = []
    for cfg, overrides in zip(configs, job_overrides):
        try:
            plans.append(preflight.check(cfg))
        except ConfigError as err:
            point = " ".join(overrides) or "(no overrides)"
            raise ConfigError(f"{err}\n  in sweep point: {redact(point)}") from None
    if scheduler_check is not None:  # after pemt's own checks, whose messages name the key at fault
        scheduler_check(configs)
    for index, (plan, overrides) in enumerate(zip(plans, job_overrides)):
        header = f" {index + 1}/{len(configs)}: {redact(' '.join(overrides))}" if len(configs) > 1 else ""
        print(f"pemt: plan{header}\n{plan.describe()}", file=sys.stderr)
    if configs[0].preflight:
        print("pemt: preflight passed; nothing submitted (drop preflight=true to launch)", file=sys.stderr)
        raise SystemExit(0)


def _summary(message: str) -> str:
    """The first line of a submitit error, and the job log paths it lists."""
    lines = message.strip().splitlines() or ["(no message)"]
    return "\n".join([lines[0], *(line for line in lines if line.strip().startswith("- /"))])


def _job_error(result: JobReturn) -> str:
    try:
        result.return_value  # noqa: B018 - raises the job's exception
    except Exception as err:  # noqa: BLE001 - any exception the job raised
        return f"{type(err).__name__}: {_summary(str(err))}"
    return "failed"


def _report_failures(failures: list[tuple[str, DictConfig]]) -> None:
    """Jobs that failed or were lost: what happened and how to continue, without a traceback.
    A job lost with its node could not end its MLflow run: it is marked FAILED here."""
    from pemt.track.tracker import RUN_ID_FILE

    for reason, cfg in failures:
        run_dir = preflight.run_dir_of(cfg)
        print(
            f"pemt: a job did not finish: {reason}\npemt: continue it with: python tools/resume.py {run_dir}",
            file=sys.stderr,
        )
        if (run_dir / RUN_ID_FILE).exists():
            _mark_failed(str(cfg.mlflow.tracking_uri), (run_dir / RUN_ID_FILE).read_text().strip())


def _mark_failed(tracking_uri: str, run_id: str) -> None:
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="FAILED")
    except Exception as err:  # noqa: BLE001 - reporting must not hide the failure itself
        print(f"pemt: MLflow run {run_id} not marked FAILED: {err}", file=sys.stderr)


class _PreparedLaunch:
    # Set by hydra-submitit-launcher's launchers, which this is mixed into
    params: dict[str, Any]
    config: DictConfig

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        mask_log_secrets()  # Hydra's and submitit's log lines name each point's overrides
        try:
            job_overrides = _normalised(job_overrides)
            configs = _compose_points(self, job_overrides)
            _check_sweep_resources(configs)
            self._adjust_params()
            _check_and_plan(configs, job_overrides, self._scheduler_check)
            prepare(configs)
        except (ConfigError, TrackingError) as err:
            # A user error, not a crash: the message alone, no traceback, nothing submitted.
            print(f"pemt: cannot launch: {redact(str(err))}", file=sys.stderr)
            raise SystemExit(2) from None
        parent = self._start_sweep_run(configs, job_overrides)
        if parent:
            job_overrides = [[*overrides, f"mlflow.parent_run_id={parent}"] for overrides in job_overrides]
        self._before_waiting()
        relay = LogRelay(self.params["submitit_folder"])
        relay.start()
        with self._while_waiting():  # waiting, relaying, and reporting: Ctrl-C is handled in all of them
            try:
                results: Sequence[JobReturn] = super().launch(job_overrides, initial_job_idx)  # type: ignore[misc]
            except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as err:
                # A job lost without a result (node failure, killed): the others may still run.
                relay.stop()
                _report_failures([(_summary(str(err)), cfg) for cfg in configs])
                self._end_sweep_run(configs, parent, "FAILED")
                raise SystemExit(1) from None
            finally:
                relay.stop()
            _summarise(results, configs)
            failures = [(_job_error(r), cfg) for r, cfg in zip(results, configs) if r.status == JobStatus.FAILED]
            self._end_sweep_run(configs, parent, "FAILED" if failures else "FINISHED")
            if failures:
                _report_failures(failures)
                raise SystemExit(1)
        return results

    @staticmethod
    def _start_sweep_run(configs: list[DictConfig], job_overrides: Sequence[Sequence[str]]) -> str | None:
        """A multirun into one experiment gets a parent run; its points become child runs."""
        from pemt.track.sweep import start_sweep_run

        stores = {(str(c.mlflow.tracking_uri), str(c.mlflow.experiment)) for c in configs}
        if len(configs) < 2 or len(stores) != 1:
            return None
        [(uri, experiment)] = stores
        return start_sweep_run(uri, experiment, job_overrides)

    @staticmethod
    def _end_sweep_run(configs: list[DictConfig], parent: str | None, status: str) -> None:
        from pemt.track.sweep import end_sweep_run

        if parent:
            end_sweep_run(str(configs[0].mlflow.tracking_uri), parent, status)

    def _before_waiting(self) -> None:
        pass

    def _adjust_params(self) -> None:
        """Set the submission parameters the config implies, before they are checked or used."""

    _scheduler_check: Any = None

    def _while_waiting(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def _say_now(message: str) -> None:
    """Write to stderr without waiting: a full pipe nobody reads drops the message instead of
    blocking, and no Python buffer (whose lock another thread may hold, blocked on that pipe) is
    touched."""
    fd = sys.stderr.fileno()
    try:
        os.set_blocking(fd, False)
        os.write(fd, message.encode())
    except OSError:
        pass


@contextlib.contextmanager
def _detach_on_interrupt(message: str) -> Iterator[None]:
    """Ctrl-C (or a closed terminal: SIGHUP) ends this process at once with exit 130, saying
    `message`: the jobs run on Slurm without it. Exiting from the handler rather than unwinding
    means that whatever the launcher is in (a sacct poll, the log relay blocked on a pipe, an MLflow
    write for a lost job, interpreter shutdown) cannot keep the user waiting."""

    def detach(signum: int, frame: Any) -> None:
        _say_now(message)
        os._exit(130)

    previous = {s: signal.signal(s, detach) for s in (signal.SIGINT, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _ranks_stop_on_interrupt() -> Iterator[None]:
    """Local jobs: Ctrl-C reaches the ranks (the terminal signals its whole process group), which
    save at the next step boundary and end, as on a preemption. This process and submitit's job
    controllers ignore it (the ignore is inherited by the processes started meanwhile; the ranks
    put their own handler back), so nothing kills the ranks mid-save; the launch then reports
    where each run stopped."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class LocalLauncher(_PreparedLaunch, submitit_launcher.LocalLauncher):  # type: ignore[misc]
    def _while_waiting(self) -> contextlib.AbstractContextManager[None]:
        return _ranks_stop_on_interrupt()


class SlurmLauncher(_PreparedLaunch, submitit_launcher.SlurmLauncher):  # type: ignore[misc]
    def _adjust_params(self) -> None:
        if not self.config.cluster.gpus:  # CPU-only cluster: ask for tasks, not GPUs
            self.params.pop("gpus_per_node", None)
        # Explicit either way: submitit's requeue needs a requeueable job even on clusters
        # whose default (JobRequeue=0) is not.
        flags = dict(self.params.get("additional_parameters") or {})
        flags.pop("requeue", None), flags.pop("no_requeue", None)
        flags["requeue" if self.config.cluster.requeue else "no_requeue"] = True
        self.params["additional_parameters"] = flags

    def _scheduler_check(self, configs: list[DictConfig]) -> None:
        """Slurm itself judges the job as it will be submitted (`sbatch --test-only` of the very
        script submitit writes): GRES, time limit, QOS, account and partition errors show now."""
        preflight.check_submission(self._sbatch_script())
        for line in preflight.tracking_store_warnings(configs):
            print(f"pemt: warning: {line}", file=sys.stderr)

    def _sbatch_script(self) -> str:
        """The sbatch script of this launch, made by submitit from the same parameters
        hydra-submitit-launcher hands it (its own mapping of names, repeated here)."""
        import tempfile

        import submitit

        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        with tempfile.TemporaryDirectory(prefix="pemt-sbatch-") as folder:
            init_keys = {"submitit_folder", "max_num_timeout"}
            executor = submitit.AutoExecutor(
                cluster="slurm", folder=folder, slurm_max_num_timeout=self.params.get("max_num_timeout", 0)
            )
            base = set(OmegaConf.structured(BaseQueueConf).keys())
            executor.update_parameters(
                **{k if k in base else f"slurm_{k}": v for k, v in self.params.items() if k not in init_keys}
            )
            script: str = executor._executor._make_submission_file_text("true", "preflight")  # type: ignore[attr-defined]
            return script

    def _while_waiting(self) -> contextlib.AbstractContextManager[None]:
        return _detach_on_interrupt(
            f"\npemt: stopped waiting; the jobs keep running. Where they stand: "
            f"python tools/resume.py --list {self.config.hydra.sweep.dir}\n"
        )

    def _before_waiting(self) -> None:
        print(
            f"pemt: submitting to Slurm; Ctrl-C here stops waiting, not the jobs. Where they stand: "
            f"python tools/resume.py --list {self.config.hydra.sweep.dir} (or squeue --me)",
            file=sys.stderr,
        )
