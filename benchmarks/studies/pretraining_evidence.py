"""Evidence that pretraining works, on the synthetic audio-visual data.

    python benchmarks/pretraining_evidence.py [--pretrain-steps 300 --probe-steps 150 --videos 256]
    python benchmarks/pretraining_evidence.py --task rhythm   # 32 classes bound by timing alone

Pretrains four variants through launch/pretrain.py (content-aware negatives with factorised
sharing; uniform negatives, same budget; content-aware with no sharing; factorised with the public
code's unit normalisation of the rank-r code), then runs the same
linear probe (launch/finetune.py, task long_av, backbone frozen) on each and on randomly
initialised models of both shapes, scored on a held-out synthetic set. Every run lands in
MLflow (experiments pemt-pretrain and pemt-finetune under --root, probes tagged with the run
they start from); a summary run in `pemt-evidence` holds the table and the plot, which are also
written to benchmarks/results/ (`--out`). Each finished pretraining run and probe is kept in
`<root>/evidence_rows.json` with the settings it ran under, so an interrupted build continues where
it stopped and a rerun with the same settings launches nothing.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # the benchmarks' shared helpers (common, probes), never another benchmark

from common import cached_rows, launch, probe_accuracy, results_stem, save_rows  # noqa: E402

FACTORISED, NO_SHARING = "[layer,cross,factorized]", "[]"
PRETRAIN_VARIANTS = {  # name: (negatives, sharing, other overrides)
    "content+factorised": ("content", FACTORISED, []),
    "uniform+factorised": ("uniform", FACTORISED, []),
    "content+no sharing": ("content", NO_SHARING, []),
    # the public code's normalisation of the factorised code (pemt's default before it was measured)
    "content+factorised, unit norm": ("content", FACTORISED, ["model.factorized.normalize=unit"]),
}
RANDOM_VARIANTS = {"random+factorised": FACTORISED, "random+no sharing": NO_SHARING}
CACHE_FILE = "evidence_rows.json"
CACHE_SETTINGS = ("pretrain_steps", "probe_steps", "videos", "classes", "seed", "task", "test_videos")


def transformer_params(sharing: str) -> int:
    from pemt.config import compose_config
    from pemt.model.factory import build_pretraining_model
    from pemt.model.params import count_parameters

    cfg = compose_config("pretrain", overrides=[f"model.sharing={sharing}"])
    return count_parameters(build_pretraining_model(cfg))["transformers"]


class EvidenceRows:
    """Each variant's finished launches (pretraining, probe), saved as each finishes (`common.save_rows`): a
    finished pretraining survives an interrupted probe, and a relaunched finished run, which would
    resume at once and time nothing, is not relaunched."""

    def __init__(self, path: Path, settings: dict) -> None:
        self.path, self.settings = path, settings
        self.rows = {r["variant"]: r for r in cached_rows(path, settings)}

    def get(self, variant: str) -> dict:
        return self.rows.setdefault(variant, {"variant": variant, "settings": self.settings})

    def put(self, variant: str, **fields: object) -> None:
        self.get(variant).update(fields)
        save_rows(self.path, self.settings, list(self.rows.values()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=REPO / "outputs" / "evidence")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--probe-steps", type=int, default=150)
    parser.add_argument("--videos", type=int, default=256)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--task",
        choices=["classes", "rhythm"],
        default="classes",
        help="data.synthetic.task; rhythm: 4 s videos, 32 classes, 1024 videos, 256 held out unless given",
    )
    parser.add_argument("--test-videos", type=int, default=None, help="held-out videos (default 32; rhythm 256)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the table and the plot")
    args = parser.parse_args(argv)
    if args.task == "rhythm":  # the sharing study's data: a class is which shape blinks with which tone
        args.classes = 32
        args.videos = 1024 if args.videos == 256 else args.videos
    args.test_videos = args.test_videos or (256 if args.task == "rhythm" else 32)
    from tqdm import tqdm

    args.root = args.root.resolve()
    data = [
        f"paths.root={args.root}",
        f"data.synthetic.videos={args.videos}",
        f"data.synthetic.classes={args.classes}",
        f"seed={args.seed}",
        "mlflow.system_metrics=false",
    ]
    if args.task != "classes":
        data += [f"data.synthetic.task={args.task}", "data.synthetic.seconds=4.0"]
    probe_data = [*data, f"eval.synthetic_videos={args.test_videos}"]
    rows = EvidenceRows(args.root / CACHE_FILE, {k: vars(args)[k] for k in CACHE_SETTINGS})
    launches = sum(("pretrain_run" not in rows.get(n)) + ("top1" not in rows.get(n)) for n in PRETRAIN_VARIANTS)
    launches += sum("top1" not in rows.get(n) for n in RANDOM_VARIANTS)
    with tqdm(total=launches, desc="evidence runs (pretraining and probes)") as progress:
        for name, (negatives, sharing, other) in PRETRAIN_VARIANTS.items():
            row = rows.get(name)
            if "pretrain_run" not in row:  # a finished pretraining survives an interrupted probe
                _, run_id, pretrain_s = launch(
                    "pretrain.py",
                    [
                        *data,
                        f"loss.sampling={negatives}",
                        f"model.sharing={sharing}",
                        *other,
                        f"train.max_steps={args.pretrain_steps}",
                        f"train.checkpoint_every={args.pretrain_steps}",
                    ],
                )
                rows.put(
                    name,
                    negatives=negatives,
                    sharing=sharing,
                    pretrain_steps=args.pretrain_steps,
                    pretrain_s=pretrain_s,
                    pretrain_run=run_id,
                )
                progress.update()
            if "top1" not in row:
                probe_dir, probe_id, probe_s = launch(
                    "finetune.py",
                    [
                        *probe_data,
                        f"task.init={row['pretrain_run']}",
                        "task.freeze=[backbone]",
                        f"train.max_steps={args.probe_steps}",
                        f"train.checkpoint_every={args.probe_steps}",
                    ],
                )
                rows.put(name, probe_s=probe_s, top1=probe_accuracy(probe_dir, args.probe_steps), probe_run=probe_id)
                progress.update()
        for name, sharing in RANDOM_VARIANTS.items():
            if "top1" not in rows.get(name):
                probe_dir, probe_id, probe_s = launch(
                    "finetune.py",
                    [
                        *probe_data,
                        f"model.sharing={sharing}",
                        "task.freeze=[backbone]",
                        f"train.max_steps={args.probe_steps}",
                        f"train.checkpoint_every={args.probe_steps}",
                    ],
                )
                rows.put(
                    name,
                    negatives="-",
                    sharing=sharing,
                    pretrain_steps=0,
                    pretrain_s=0.0,
                    pretrain_run="-",
                    probe_s=probe_s,
                    top1=probe_accuracy(probe_dir, args.probe_steps),
                    probe_run=probe_id,
                )
                progress.update()
    ordered = [rows.get(name) for name in (*PRETRAIN_VARIANTS, *RANDOM_VARIANTS)]
    table_rows = [{**row, "transformer_params": transformer_params(row["sharing"])} for row in ordered]
    table = render(table_rows, args)
    print(table)
    stem = results_stem(args.out, "pretraining_evidence", args.task)
    stem.parent.mkdir(parents=True, exist_ok=True)
    out = stem.with_suffix(".md")
    out.write_text(table)
    plot = plot_results(table_rows, stem.with_suffix(".png"))
    record(args, table_rows, out, plot)
    print(f"wrote {out} and {plot}")
    return 0


def render(rows: list[dict], args: argparse.Namespace) -> str:
    by_name = {r["variant"]: r for r in rows}
    command = "python benchmarks/pretraining_evidence.py" + ("" if args.task == "classes" else f" --task {args.task}")
    lines = [
        "# Pretraining evidence: linear probe on the synthetic audio-visual data",
        "",
        f"{datetime.date.today()}, CPU, tiny model, seed {args.seed}; pretraining {args.pretrain_steps} steps "
        f"x 8 videos on {args.videos} synthetic videos ({args.classes} classes); linear probe {args.probe_steps} "
        f"steps (task long_av, backbone frozen) scored on {args.test_videos} held-out videos (`eval.seed=1`); "
        f"data.synthetic.task={args.task}.",
        f"Generated by `{command}`. "
        f"{args.test_videos} test videos: one video is {100 / args.test_videos:.1f} points; "
        f"chance is {100 / args.classes:.1f}%.",
        "",
        "| variant | transformer params | pretrain steps | pretrain time (s) | probe time (s) | probe top-1 (%) "
        "| vs random, same shape |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        baseline = by_name["random+factorised" if r["sharing"] == FACTORISED else "random+no sharing"]
        lines.append(
            f"| {r['variant']} | {r['transformer_params']:,} | {r['pretrain_steps']} | {r['pretrain_s']:.0f} "
            f"| {r['probe_s']:.0f} | {r['top1']:.1f} | {r['top1'] - baseline['top1']:+.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_results(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(11, 4))
    bars.barh(
        [r["variant"] for r in rows],
        [r["top1"] for r in rows],
        color=["tab:blue" if r["pretrain_steps"] else "tab:gray" for r in rows],
    )
    bars.set_xlabel("linear probe top-1 (%)")
    bars.invert_yaxis()
    for r in rows:
        scatter.scatter(r["transformer_params"], r["top1"], label=r["variant"])
    scatter.set_xscale("log")
    scatter.set_xlabel("transformer parameters")
    scatter.set_ylabel("linear probe top-1 (%)")
    scatter.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def record(args: argparse.Namespace, rows: list[dict], table: Path, plot: Path) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{args.root.resolve()}/mlflow.db")
    mlflow.set_experiment("pemt-evidence")
    with mlflow.start_run(run_name=f"evidence {args.task} seed {args.seed}"):
        mlflow.log_params(
            {
                "pretrain_steps": args.pretrain_steps,
                "probe_steps": args.probe_steps,
                "videos": args.videos,
                "classes": args.classes,
                "task": args.task,
                "test_videos": args.test_videos,
                "seed": args.seed,
            }
        )
        for r in rows:
            key = re.sub(r"\W+", "_", r["variant"])  # MLflow metric names: no "+" or ","
            mlflow.log_metric(f"{key}_top1", r["top1"])
        mlflow.log_artifact(str(table))
        mlflow.log_artifact(str(plot))


if __name__ == "__main__":
    sys.exit(main())
