"""Does the same run learn the same at any width? Loss curves of runs that change only how a step
is computed, against a control (torchtitan's "converging" check).

    python benchmarks/converging.py                 # ~40 min of 2 cores; continues where it stopped
    python benchmarks/converging.py --steps 20 --seeds 0 1   # a smoke run of the whole path

Control: ZeRO-2 on 2 ranks, eager, on the embedded default (tiny model, synthetic data), run with
each of `--seeds` to measure the seeds' spread. Test runs (the first seed) change one thing:
ZeRO-1, ZeRO-3, 1 rank, 4 ranks (the same global batch and the same samples: the sample order is
fixed by `data.streams`, not the world size), `train.compile=true`, gradient accumulation 2.
Global BatchNorm over ranks and negatives drawn over the global batch are where a width could
change the maths: ZeRO stages and rank counts should follow the control to rounding, compilation
to within the seeds' spread; gradient accumulation draws masks, pairs and negatives per
micro-batch, so it is held to the seeds' spread too.

Every run goes through launch/pretrain.py (its own run dir under `--root`, MLflow experiment
`pemt-converging`); each finished run's curves are kept in `<root>/rows.json`, so an interrupted
build continues. Writes benchmarks/results/converging.{md,png}: per run and objective, the largest
deviation from the control over the logged steps, against the seeds' spread (the largest
difference between control seeds at any logged step).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from common import cached_rows, launch, machine_line, save_rows
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


CURVES = ("loss", "loss_mep_visual", "loss_mep_audio", "loss_pair", "loss_contrastive")
CONTROL = ["deepspeed=zero2", "gpus_per_node=2", "train.compile=false"]
TESTS = {  # name: what changes from the control
    "ZeRO-1": ["deepspeed=zero1"],
    "ZeRO-3": ["deepspeed=zero3"],
    "1 rank": ["gpus_per_node=1"],
    "4 ranks": ["gpus_per_node=4"],
    "compiled": ["train.compile=true"],
    "grad accumulation 2": ["train.grad_accum_steps=2"],
}


def overrides(args: argparse.Namespace, root: Path, name: str, seed: int, change: list[str]) -> list[str]:
    folder = name.replace(" ", "-")
    return [
        f"paths.root={root}",
        f"run_dir={root / 'runs' / f'{folder}-seed{seed}'}",
        "mlflow.experiment=pemt-converging",
        "mlflow.system_metrics=false",
        f"seed={seed}",
        f"train.max_steps={args.steps}",
        f"train.checkpoint_every={args.steps}",
        f"train.log_every={args.log_every}",
        f"train.global_batch_size={args.batch}",
        *CONTROL,
        *change,
    ]


def curves(root: Path, run_id: str) -> dict[str, dict[int, float]]:
    """Each objective's logged values by step."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    return {
        key: {int(m.step): float(m.value) for m in client.get_metric_history(run_id, key)}
        for key in CURVES
        if client.get_metric_history(run_id, key)
    }


def warmup_end(root: Path, run_id: str) -> int | None:
    """The step the CNN warm-up ended at (decided on the InfoNCE reduced over ranks: the same at any width)."""
    from mlflow.tracking import MlflowClient

    ended = MlflowClient(f"sqlite:///{root}/mlflow.db").get_metric_history(run_id, "cnn_warmup_end")
    return int(ended[0].value) if ended else None


def deviation(run: dict[int, float], control: dict[int, float]) -> float:
    return max(abs(run[s] - control[s]) for s in control if s in run)


def seed_spread(runs: list[dict[int, float]]) -> float:
    steps = set.intersection(*(set(r) for r in runs))
    return max(max(r[s] for r in runs) - min(r[s] for r in runs) for s in steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=REPO / "outputs" / "converging")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16, help="global batch (divisible by 8 streams x accumulation 2)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="control seeds; tests use the first")
    parser.add_argument("--tests", nargs="+", default=list(TESTS), choices=list(TESTS))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    settings = {"steps": args.steps, "log_every": args.log_every, "batch": args.batch}
    done_file = root / "rows.json"
    rows = {(r["name"], r["seed"]): r for r in cached_rows(done_file, settings)}
    wanted = [("control", s, []) for s in args.seeds] + [(n, args.seeds[0], TESTS[n]) for n in args.tests]
    todo = [w for w in wanted if w[:2] not in rows]
    for name, seed, change in tqdm(todo, desc="converging runs"):
        _, run_id, seconds = launch("pretrain.py", overrides(args, root, name, seed, change))
        rows[(name, seed)] = {
            "name": name,
            "seed": seed,
            "settings": settings,
            "seconds": seconds,
            "curves": {k: {str(s): v for s, v in c.items()} for k, c in curves(root, run_id).items()},
            "warmup_end": warmup_end(root, run_id),
        }
        save_rows(done_file, settings, list(rows.values()))
    loaded = {key: {k: {int(s): v for s, v in c.items()} for k, c in r["curves"].items()} for key, r in rows.items()}
    ends = {key: r.get("warmup_end") for key, r in rows.items()}
    table = render(args, loaded, {key: r["seconds"] for key, r in rows.items()}, ends)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "converging.md").write_text(table)
    plot(args, loaded, args.out / "converging.png")
    return 0


def render(
    args: argparse.Namespace, loaded: dict[tuple[str, int], dict[str, dict[int, float]]], seconds: dict, ends: dict
) -> str:
    control = loaded[("control", args.seeds[0])]
    spreads = {k: seed_spread([loaded[("control", s)][k] for s in args.seeds]) for k in CURVES}
    lines = [
        "# The same run at any width: loss curves against the control",
        "",
        f"{datetime.date.today()}, {machine_line()}. Embedded default (tiny model, synthetic data), "
        f"{args.steps} steps x global batch {args.batch}, logged every {args.log_every} steps. Control: ZeRO-2, "
        f"2 ranks, eager, seeds {', '.join(map(str, args.seeds))}; each test run changes one thing (seed "
        f"{args.seeds[0]}). Cells: the largest |test - control| over the logged steps; the seeds' spread is the "
        "largest difference between control seeds at a logged step. `CNN warm-up end`: the step MEP and the pair "
        "start at (`loss.cnn_warmup_until`); a run that ends it elsewhere than the control is not within.",
        f"Generated by `python benchmarks/converging.py --steps {args.steps}`.",
        "",
        "| run | " + " | ".join(CURVES) + " | CNN warm-up end | within the seeds' spread | minutes |",
        "|---|" + "---:|" * len(CURVES) + "---:|---|---:|",
        "| seeds' spread (control) | "
        + " | ".join(f"{spreads[k]:.4f}" for k in CURVES)
        + " | "
        + " / ".join(str(ends.get(("control", s))) for s in args.seeds)
        + f" | - | {seconds[('control', args.seeds[0])] / 60:.1f} |",
    ]
    for name in args.tests:
        run = loaded[(name, args.seeds[0])]
        deviations = {k: deviation(run[k], control[k]) for k in CURVES if k in run}
        end = ends.get((name, args.seeds[0]))
        within = all(deviations[k] <= spreads[k] for k in deviations) and end == ends.get(("control", args.seeds[0]))
        lines.append(
            f"| {name} | "
            + " | ".join(f"{deviations.get(k, float('nan')):.4f}" for k in CURVES)
            + f" | {end} | {'yes' if within else '**no**'} | {seconds[(name, args.seeds[0])] / 60:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(args: argparse.Namespace, loaded: dict[tuple[str, int], dict[str, dict[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.6))
    for ax, key in zip(axes, CURVES):
        for seed in args.seeds:
            curve = loaded[("control", seed)][key]
            ax.plot(list(curve), list(curve.values()), color="black", lw=2 if seed == args.seeds[0] else 0.8,
                    alpha=1 if seed == args.seeds[0] else 0.4, label=f"control, seed {seed}")  # fmt: skip
        for name in args.tests:
            curve = loaded[(name, args.seeds[0])].get(key, {})
            ax.plot(list(curve), list(curve.values()), lw=1, ls="--", label=name)
        ax.set(title=key, xlabel="step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
