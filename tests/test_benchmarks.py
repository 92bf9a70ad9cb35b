"""Benchmarks whose smoke runs CI keeps working (the full runs take hours)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def _mlflow_runs(root: Path) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")  # the pretraining config's store under paths.root
    # digits runs are filed under pemt-evidence-<digest of the learning defaults>
    experiments = [e.experiment_id for e in client.search_experiments() if e.name.startswith("pemt-evidence")]
    return len(client.search_runs(experiments)) if experiments else 0


@pytest.mark.slow
def test_sharing_quality_quick_runs_the_whole_path_and_continues_from_its_cache(tmp_path: Path) -> None:
    """`sharing_quality.py --quick` on the digits task: the digit videos packed once, a pretraining run
    through launch/pretrain.py (in MLflow), probes of it and of a random initialisation of the same
    shape, the table (with the gate's lines) and the plot; run again, it pretrains nothing and writes
    the same table."""
    root, out = tmp_path / "root", tmp_path / "out"
    command = [sys.executable, str(REPO / "benchmarks" / "sharing_quality.py"), "--quick", "--root", str(root)]
    first = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    table = (out / "sharing_quality_digits_quick.md").read_text()
    assert "| random init, factorized r64 |" in table and "| factorized r64 |" in table
    assert "The gate needs the rows of `none`" in table, "the gate is named even where it cannot be judged"
    assert (out / "sharing_quality_digits_quick.png").stat().st_size > 0
    rows = json.loads((root / "rows.json").read_text())
    assert sorted(r["random"] for r in rows) == [False, True]
    for row in rows:
        probe = row["probe"]
        assert all(0.0 <= probe[k] <= 100.0 for k in ("full", "1-shot", "5-shot", "10-shot", "full unspoken"))
        assert all(0.0 < v < 2.0 for v in probe["spread"].values()), probe["spread"]
    from pemt.data.digits import DigitsSpec

    assert {r["settings"]["data"] for r in rows} == {DigitsSpec(videos=64).digest()}, "rows name their videos"
    pretrained = next(r for r in rows if not r["random"])
    assert {"loss_mep_visual", "loss_mep_audio", "loss_pair", "spread_fused"} <= set(pretrained["losses"])
    assert "collapse" in pretrained, "whether the run's collapse watch fired"
    assert _mlflow_runs(root) >= 1
    runs = _mlflow_runs(root)

    again = subprocess.run([*command, "--out", str(tmp_path / "again")], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _mlflow_runs(root) == runs, "nothing pretrained again"
    assert (tmp_path / "again" / "sharing_quality_digits_quick.md").read_text() == table


def _benchmark(name: str):
    """A benchmark script (`name`, or `studies/name`) as a module; the benchmarks' folder on the path,
    as when it runs (it imports the shared helpers)."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(Path(name).name, REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # registered first, as an import would: dataclasses look their module up while the class is made
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_sharing_quality_never_takes_the_videos_of_another_digits_generator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A changed generator makes other videos from the same settings: they go to another folder (and
    their rows are keyed by it), so a table never mixes the two."""
    bench = _benchmark("sharing_quality")
    args = argparse.Namespace(task="digits", videos=64, test_videos=32)
    before = bench.digits_root(args, tmp_path)
    assert before.name.startswith("digits-64-32-")
    monkeypatch.setattr("pemt.data.digits.GENERATOR_VERSION", 99)
    assert bench.digits_root(args, tmp_path) != before


def test_sharing_quality_continues_from_the_rows_committed_beside_its_table(tmp_path: Path) -> None:
    """The rows behind a committed table (`<table>.rows.json`) count as done on a machine whose own
    cache is empty: `--table-only` renders them without running anything, names the rows still to
    run, and keeps the rows of other settings in that file. A row built under other model defaults
    (the variant's resolved model config changed since) is kept in the file but neither shown nor
    counted as done."""
    bench = _benchmark("sharing_quality")
    out, fresh = tmp_path / "results", tmp_path / "fresh"
    argv = ["--root", str(fresh), "--out", str(out), "--variants", "none", "layer", "--seeds", "0", "1"]
    args = bench.parse_args([*argv, "--rows", "pretrained"])
    settings = bench.table_settings(args)
    probe = {"full": 97.5, "1-shot": 70.0, "5-shot": 88.0, "10-shot": 92.0, "spread": {"fused BOS": 0.4}}
    committed = {"variant": "none", "seed": 0, "random": False, "settings": settings, "pretrain_s": 900.0}
    committed |= {"probe": probe, "losses": {"loss_mep_visual": 2.8, "loss_mep_audio": 2.8, "loss_pair": 0.4}}
    committed["collapse"] = "representation collapse at step 330: ..."  # what the run's watch said
    committed["model"] = bench.model_digest(args, fresh, "none")
    stale = {**committed, "variant": "layer", "model": "built-before"}
    elsewhere = {**committed, "settings": {**settings, "steps": 1}}
    bench.save_rows(out / "sharing_quality_digits.rows.json", settings, [committed, stale])
    bench.save_rows(out / "sharing_quality_digits.rows.json", elsewhere["settings"], [elsewhere])

    assert bench.main([*argv, "--rows", "pretrained", "--table-only"]) == 0
    table = (out / "sharing_quality_digits.md").read_text()
    assert "| none | " in table and "| 97.5 ± 0.0 | 70.0 ± 0.0 |" in table and "| 1 of 1 | 15.0 |" in table
    assert "| layer | " not in table, "a row built under other model defaults is not shown"
    assert "**Partial: 3 rows still to run**" in table
    assert "none pretrained (seeds 1); layer pretrained (seeds 0, 1)" in table
    assert (out / "sharing_quality_digits.png").stat().st_size > 0
    assert not fresh.exists(), "nothing generated, nothing run"
    kept = json.loads((out / "sharing_quality_digits.rows.json").read_text())
    assert committed in kept and elsewhere in kept and stale in kept
    kept_here = bench.kept_rows([fresh / "rows.json", out / "sharing_quality_digits.rows.json"], settings)
    assert kept_here == [committed, stale] and bench.current_rows(args, fresh, kept_here) == [committed]


def test_sharing_quality_pairs_each_variant_with_unshared_seed_by_seed(tmp_path: Path) -> None:
    """Below the table, each pretrained variant minus unshared on the seeds both ran, the mean and
    each seed's difference; a variant with no seed in common, or a random row, is not paired."""
    bench = _benchmark("sharing_quality")
    args = bench.parse_args(
        ["--root", str(tmp_path), "--variants", "none", "layer", "layer+cross", "--seeds", "0", "1"]
    )

    def row(variant: str, seed: int, full: float, one_shot: float, random: bool = False) -> dict:
        probe = {"full": full, "1-shot": one_shot, "spread": {"fused BOS": 0.3}}
        return {"variant": variant, "seed": seed, "random": random, "probe": probe, "pretrain_s": 600.0}

    rows = [
        row("none", 0, 98.0, 70.0),
        row("none", 1, 97.0, 80.0),
        row("layer", 0, 97.5, 60.0),
        row("layer", 1, 98.0, 75.0),
        row("layer", 0, 50.0, 15.0, random=True),
        row("layer+cross", 2, 96.0, 50.0),
    ]
    table = bench.render(
        rows, args, {"none": 6_000_000, "layer": 1_500_000, "layer+cross": 500_000}, bench.TASKS["digits"]
    )
    assert "| layer | 0, 1 | +0.2 (-0.5, +1.0) | -7.5 (-10.0, -5.0) | - | - | - |" in table, "not the random row"
    assert "| layer+cross | 2 |" not in table, "no unshared run of seed 2 to pair with"


def test_sharing_quality_decodes_the_timing_tasks_too(tmp_path: Path) -> None:
    """`--task rhythm` (the timing study) decodes its generated videos once, with their labels."""
    bench = _benchmark("sharing_quality")
    args = argparse.Namespace(task="rhythm", clips=8, videos=4, test_videos=4)
    videos = bench.videos_of(args, tmp_path, 4, 0)
    assert videos["video"].shape[:2] == (4, 8) and videos["label"].shape == (4,)
    assert (tmp_path / "decoded-rhythm-4-0.pt").exists()


def test_pretraining_evidence_continues_where_it_stopped_with_the_times_measured_then(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupted `pretraining_evidence.py` keeps every finished pretraining run and probe: run
    again it launches only what is missing (the probe of a pretraining run finished before the
    interruption starts from that run), and the table shows the times measured when each ran; run a
    third time it launches nothing; other settings run everything. The launches stand in for
    launch/pretrain.py and launch/finetune.py, which `sharing_quality.py --quick` drives for real
    above: this is about what the benchmark does around them."""
    bench = _benchmark("studies/pretraining_evidence")
    launched: list[tuple[str, list[str]]] = []
    interrupt_at = [3]

    def launch(script: str, overrides: list[str]) -> tuple[Path, str, float]:
        if len(launched) == interrupt_at[0]:
            raise SystemExit("interrupted")
        launched.append((script, overrides))
        run_dir = tmp_path / "runs" / str(len(launched))
        run_dir.mkdir(parents=True)
        (run_dir / "eval.jsonl").write_text(json.dumps({"step": 2, "test_top1": 10.0 + len(launched)}) + "\n")
        return run_dir, f"run{len(launched)}", float(len(launched))

    monkeypatch.setattr(bench, "launch", launch)
    argv = ["--root", str(tmp_path / "root"), "--out", str(tmp_path / "out"), "--pretrain-steps", "2"]
    argv += ["--probe-steps", "2"]
    with pytest.raises(SystemExit, match="interrupted"):
        bench.main(argv)
    assert [script for script, _ in launched] == ["pretrain.py", "finetune.py", "pretrain.py"]

    interrupt_at[0] = -1
    assert bench.main(argv) == 0
    again = launched[3:]
    assert [script for script, _ in again] == [
        "finetune.py",
        *["pretrain.py", "finetune.py"] * 2,
        "finetune.py",
        "finetune.py",
    ]
    assert "task.init=run3" in again[0][1], "the probe starts from the run pretrained before the interruption"
    table = (tmp_path / "out" / "pretraining_evidence.md").read_text()
    assert "| content+factorised | 35,712 | 2 | 1 | 2 | 12.0 | -7.0 |" in table, table
    assert "| uniform+factorised | 35,712 | 2 | 3 | 4 | 14.0 | -5.0 |" in table, table
    assert "| random+factorised | 35,712 | 0 | 0 | 9 | 19.0 | +0.0 |" in table, table

    assert bench.main(argv) == 0
    assert len(launched) == 10, "nothing launched again"
    assert (tmp_path / "out" / "pretraining_evidence.md").read_text() == table
    assert bench.main([*argv, "--seed", "1"]) == 0
    assert len(launched) == 20, "other settings run every launch"


def test_sharing_quality_supervised_ceiling_trains_the_same_model_on_the_probes_data(tmp_path: Path) -> None:
    """Supervised rows (`--rows supervised`): launch/finetune.py's config from the benchmark's overrides validates and
    trains the pretraining run's model, data and budget, and scores the probes' held-out videos; the
    row takes the last clean evaluation, refuses one with undecodable samples, and renders with only
    the held-out column filled."""
    from pemt.checks import validate
    from pemt.config import compose_config
    from pemt.downstream.task import EVAL_LOG, held_out_config

    bench = _benchmark("sharing_quality")
    args = argparse.Namespace(
        task="rhythm",
        steps=300,
        batch=32,
        videos=1024,
        test_videos=256,
        hidden=256,
        layers=4,
        overrides=[],
        eval_every=0,
        clips=8,
    )
    variant = "factorized r64"
    supervised = compose_config("finetune", bench.supervised_overrides(args, tmp_path, variant, 2))
    pretrain = compose_config("pretrain", bench.pretrain_overrides(args, tmp_path, variant, 2))
    validate(supervised)
    assert supervised.task.name == "long_av" and supervised.task.init is None
    for section in ("model", "data"):
        assert supervised[section] == pretrain[section], section
    # the same training but its learning rate: the supervised ceiling's own (it was measured at 1e-3,
    # one rate for the whole model)
    rates = {"lr": None, "transformer_lr_scale": None}
    assert {**supervised.train, **rates} == {**pretrain.train, **rates} and supervised.train.lr == 1e-3
    assert supervised.train.transformer_lr_scale == 1.0
    assert supervised.seed == 2
    held_out = held_out_config(supervised).data.synthetic
    probes = compose_config("pretrain", bench.data_overrides(args, args.test_videos, 1)).data.synthetic
    assert (held_out.seed, held_out.videos, held_out.task) == (probes.seed, probes.videos, probes.task)
    # digits: the ceiling trains on the probes' training shards and is scored on their held-out ones
    digits = argparse.Namespace(**{**vars(args), "task": "digits"})
    trained = compose_config("finetune", bench.supervised_overrides(digits, tmp_path, variant, 2))
    assert trained.data.shards == str(bench.digits_root(digits, tmp_path) / "train")
    assert trained.eval.shards == str(bench.digits_root(digits, tmp_path) / "held_out")
    assert trained.model.audio_cnn.stem_stride == 2, "the digits study's CNNs"

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    evals = [
        {"step": 150, "test_top1": 20.0, "test_bad_samples": 0},
        {"step": 300, "test_top1": 41.5, "test_bad_samples": 0},
    ]
    (run_dir / EVAL_LOG).write_text("".join(json.dumps(e) + "\n" for e in evals))
    assert bench.supervised_top1(run_dir) == {150: 20.0, 300: 41.5}
    args.eval_every = 150
    assert "eval.every=150" in bench.supervised_overrides(args, tmp_path, variant, 2)
    (run_dir / EVAL_LOG).write_text(json.dumps({"step": 300, "test_top1": 41.5, "test_bad_samples": 3}) + "\n")
    with pytest.raises(SystemExit, match=EVAL_LOG):
        bench.supervised_top1(run_dir)

    args.variants, args.seeds = [variant], [0, 1]
    settings = {"task": "rhythm", "steps": 300}
    rows = [
        {"variant": variant, "seed": seed, "random": False, "supervised": True, "settings": settings}
        | {"probe": {"full": top1}, "pretrain_s": 60, "held_out_by_step": {"150": 20.0, "300": top1}}
        for seed, top1 in ((0, 40.0), (1, 44.0))
    ]
    bench.save_rows(tmp_path / "rows.json", settings, [*rows, {**rows[0], "supervised": False, "probe": {"full": 9.0}}])
    assert bench.cached_rows(tmp_path / "rows.json", settings) == rows, "kept, not run again; the old probe is"
    table = bench.render(rows, args, {variant: 550_000}, bench.TASKS["rhythm"])
    supervised = "| supervised, factorized r64 (held-out top-1) | 0.55M | - | 42.0 ± 2.8 |"
    assert supervised + " - | - | - | - | - | - | 1.0 |" in table, "no shots, spread, losses or collapse: its own run"
    assert "- factorized r64, seed 1: 150: 20.0, 300: 44.0" in table, "the held-out curve, in step order"


def test_pair_objective_quick_writes_every_row_and_out_norm_spreads_the_clips(tmp_path: Path) -> None:
    """`pair_objective.py --quick`: every row trains and lands in the table, and the rows with
    `out_norm` show clip embeddings that differ between videos far more than the row without."""
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "benchmarks" / "studies" / "pair_objective.py"), "--quick"]
    command += ["--root", str(tmp_path)]
    done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in (out / "pair_objective_quick.md").read_text().splitlines() if line.startswith("|")]
    rows = [line.split("|")[1:-1] for line in table[2:]]  # after the header and its rule
    assert [(r[0].strip(), r[1].strip(), r[2].strip()) for r in rows] == [
        ("no out_norm", "bos", "fixed"),
        ("out_norm", "bos", "fixed"),
        ("out_norm", "bos", "new"),
        ("out_norm", "bos", "new"),
        ("out_norm", "agreement", "new"),
        ("out_norm", "agreement", "new"),
    ]
    for row in rows:
        assert 0.0 < float(row[4]) < 10.0 and 0.0 <= float(row[5]) <= 1.0, row
    visual_spread = [float(r[7].split("/")[0]) for r in rows]
    assert min(visual_spread[1:]) > 3 * visual_spread[0], visual_spread


def test_step_overhead_meets_a_goal_only_where_every_round_meets_it() -> None:
    """`step_overhead.py --rounds`: each ratio is taken within a round (a shared machine's speed drifts),
    the table gives their mean and range, and a goal counts as met only in the rounds that meet it."""
    bench = _benchmark("step_overhead")
    rounds = {
        "bare": [1.0, 2.0, 1.0],  # the machine slowed in round 2: within-round ratios see through it
        "zero1": [1.2, 2.3, 1.1],
        "zero2": [1.02, 2.16, 1.04],
        "loop": [1.05, 2.1, 1.04],
    }
    rows = {
        "tiny": {name: [{"mean_s": s, "phases": {"forward": s / 2}} for s in times] for name, times in rounds.items()}
    }
    args = argparse.Namespace(models=["tiny"], steps=12, warmup=3, rounds=3, ranks=2, overrides=[])
    lines = {
        line.split(" | ")[1]: line
        for line in bench._report(rows, args, "cpu").splitlines()
        if line.startswith("| tiny")
    }
    assert "| 1.000 | - | - |" in lines["(a) bare DDP"]
    assert "| 1.150 | 1.100-1.200 | no (<= 1.05) |" in lines["(b) pemt step, ZeRO-1"]
    assert "| 1.047 | 1.020-1.080 | 2 of 3 rounds (<= 1.05) |" in lines["(b) pemt step, ZeRO-2"]
    # the loop against bare has no goal; against the step its goal is 1.03
    assert "| 1.047 | 1.040-1.050 | - | 1.001 | 0.972-1.029 | yes (<= 1.03) |" in lines["(c) pemt loop, ZeRO-2"]


def _gpu_suite(results: Path, python: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RESULTS": str(results), "PY": python}
    command = ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--device", "cpu"]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)


@pytest.mark.slow
def test_gpu_suite_runs_every_part_on_cpu(tmp_path: Path) -> None:
    """`gpu_suite.sh --device cpu`, the GPU suite's scripts at their smallest sizes, so the suite is known to
    run before a GPU is lent: every part exits 0 and writes its table (bf16 attention, the full loop)."""
    done = _gpu_suite(tmp_path, sys.executable)
    log = (tmp_path / "cpu_smoke_suite.log").read_text()
    assert done.returncode == 0, log[-3000:]
    for part in ("throughput", "step_overhead", "sparse_attention", "batchnorm"):
        assert f"## {part}: exit 0" in log, log[-3000:]
    throughput = (tmp_path / "cpu_smoke_throughput.md").read_text()
    for sharing in ("none", "layer", "layer+cross", "layer+cross+factorized"):
        assert f"| 2 | {sharing} | off |" in throughput, throughput
    overhead = (tmp_path / "cpu_smoke_step_overhead.md").read_text()
    for variant in ("(a) bare DDP", "(b) pemt step, ZeRO-2", "(c) pemt loop, ZeRO-2"):
        assert f"| tiny | {variant} |" in overhead, overhead
    attention = (tmp_path / "cpu_smoke_sparse_attention.md").read_text()
    assert "(cpu, bf16)" in attention and "| 1 | 62 |" in attention and "| 2 | 122 |" in attention, attention
    batchnorm = (tmp_path / "cpu_smoke_batchnorm.md").read_text()
    assert "| visual stem | 2x64x8x16x16 |" in batchnorm and "| visual res5 output |" in batchnorm, batchnorm
    across_ranks = next(line for line in batchnorm.splitlines() if line.startswith("| explicit |"))
    differences = [float(cell) for cell in across_ranks.split("|")[2:-1]]
    assert len(differences) == 5 and max(differences) < 0.05, across_ranks  # bf16: the same batch, split in two


def test_gpu_suite_records_a_failing_part_runs_the_others_and_exits_non_zero(tmp_path: Path) -> None:
    done = _gpu_suite(tmp_path, "false")  # every part's interpreter fails at once
    log = (tmp_path / "cpu_smoke_suite.log").read_text()
    assert done.returncode != 0
    for part in ("throughput", "step_overhead", "sparse_attention", "batchnorm"):
        assert f"## {part}: exit 1" in log, log


def test_converging_holds_a_test_run_to_the_seeds_spread_of_the_control() -> None:
    """`converging.py`: each test run's largest deviation from the control, per objective, against the
    largest difference between control seeds; a run outside it is flagged."""
    bench = _benchmark("converging")
    args = argparse.Namespace(steps=30, log_every=10, batch=16, seeds=[0, 1], tests=["ZeRO-1", "compiled", "1 rank"])

    def curve(offset: float) -> dict[str, dict[int, float]]:
        return {key: {10: 3.0 + offset, 20: 2.5 + offset, 30: 2.0 + offset} for key in bench.CURVES}

    loaded = {("control", 0): curve(0.0), ("control", 1): curve(0.05), ("ZeRO-1", 0): curve(1e-6)}
    loaded[("compiled", 0)] = curve(0.2)
    loaded[("1 rank", 0)] = curve(1e-6)  # follows the curves, but starts MEP and the pair a step late
    ends = {("control", 0): 12, ("control", 1): 11, ("ZeRO-1", 0): 12, ("compiled", 0): 12, ("1 rank", 0): 13}
    table = bench.render(args, loaded, {key: 60.0 for key in loaded}, ends)
    lines = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert "| 0.0500 |" in lines["| seeds' spread (control)"]
    assert lines["| ZeRO-1"].endswith("| 12 | yes | 1.0 |") and "| 0.0000 |" in lines["| ZeRO-1"]
    assert lines["| compiled"].endswith("| 12 | **no** | 1.0 |") and "| 0.2000 |" in lines["| compiled"]
    assert lines["| 1 rank"].endswith("| 13 | **no** | 1.0 |"), "another warm-up end is another run"
    assert "| 12 / 11 |" in lines["| seeds' spread (control)"]
