"""Does sparse attention keep the quality of dense attention at a fraction of its cost?

    python benchmarks/sparse_quality.py [--stage1-steps 300 --steps 300 --probe-lr 1e-2 --seeds 0 1 2 3 4
                                         --sparse 16,1,1,0.7]
    python benchmarks/sparse_quality.py --task rhythm --seeds 0   # 32 classes bound by timing alone

Pretrains the tiny model on the synthetic data through launch/pretrain.py with the temporal
curriculum, once dense and once per sparse variant, for each seed: stage 1 (dense, one token per
clip) is the same for all; stage 2 goes to a long token sequence (clips x tokens per clip per
modality) with dense attention, or block-sparse attention plus node sparsity. Each is then
linear-probed (launch/finetune.py, backbone frozen, in its last stage's settings) on held-out
videos, as is a random initialisation of the same shape (the probe's floor). A sparse variant is
`block size,local window,random blocks,keep rate`. Pretraining runs and probes measured before
under the same --root and settings are reused, so adding a seed, a variant or a probe setting
runs only that. Reports the probe top-1, the masked-embedding and pair objectives at the
end of pretraining, the attention cost of one forward (query-key pairs over all three
transformers and layers, node sparsity included) and the time taken; writes a table and a plot
to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path

from common import cached_rows, launch, probe_accuracy, results_stem, save_rows

HERE = Path(__file__).resolve().parent

DENSE = "dense"
RANDOM = "random"  # no pretraining: the probe's floor
CURVES = ("loss_mep_visual", "loss_mep_audio", "loss_pair")


def parse_variant(text: str) -> tuple[int, int, int, float]:
    block, window, random_blocks, keep = text.split(",")
    return int(block), int(window), int(random_blocks), float(keep)


def variant_name(variant: str) -> str:
    if variant == DENSE:
        return DENSE
    if variant == RANDOM:
        return "no pretraining (random init, dense)"
    block, window, random_blocks, keep = parse_variant(variant)
    return f"sparse b{block} w{window} r{random_blocks} keep {keep:g}"


def attention_pairs(tokens: int, layers: int, variant: str) -> int:
    """Query-key pairs of one forward: visual, audio and multimodal transformers, every layer."""
    from pemt.model.sparse_attention import BlockSparsity
    from pemt.model.sparse_attention import attention_pairs as pairs

    spec, keep = None, 1.0
    if variant != DENSE:
        block, window, random_blocks, keep = parse_variant(variant)
        spec = BlockSparsity(block, window, random_blocks)
    total = 0
    for layer in range(layers):
        visual = tokens if layer == 0 else math.ceil(keep * tokens)  # pruned after layer 1
        total += pairs(visual, 1, spec) + pairs(tokens, 1, spec)  # visual, audio transformers
        total += pairs(visual + tokens, 2, spec)  # multimodal
    return total


def curriculum(args: argparse.Namespace, variant: str) -> str:
    stage2 = f"steps:1,clips:{args.clips},tokens_per_clip:{args.tokens_per_clip}"
    if variant != DENSE:
        block, window, random_blocks, keep = parse_variant(variant)
        stage2 += (
            f",keep_rate:{keep},attention:{{kind:block_sparse,block_size:{block},local_window:{window},"
            f"random_blocks:{random_blocks}}}"
        )
    return f"curriculum.stages=[{{steps:{args.stage1_steps},clips:{args.clips},tokens_per_clip:1}},{{{stage2}}}]"


def metric_history(run_id: str, root: Path, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(f"sqlite:///{root}/mlflow.db").get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


def final_mean(history: list[tuple[int, float]], last: int = 20) -> float:
    return statistics.fmean(v for _, v in history[-last:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=HERE.parent / "outputs" / "sparse_quality")
    parser.add_argument("--stage1-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=300, help="stage 2 steps (long sequence)")
    parser.add_argument("--probe-steps", type=int, default=150)
    parser.add_argument(
        "--probe-lr",
        type=float,
        default=1e-2,
        help="linear probe learning rate (at 1e-3 a 150-step probe has not converged)",
    )
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--tokens-per-clip", type=int, default=16)
    parser.add_argument("--videos", type=int, default=256)
    parser.add_argument("--test-videos", type=int, default=128)
    parser.add_argument(
        "--probe-videos",
        type=int,
        nargs="+",
        default=[256, 16],
        help="probe training sets (videos; 256 is the pretraining set): one column each. With "
        "every video the probe saturates; with 2 per class it tells features apart",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--task",
        choices=["classes", "rhythm"],
        default="classes",
        help="data.synthetic.task; rhythm: 32 classes, and by default 1024 videos, 256 held out, probes on 1024 or 64",
    )
    parser.add_argument(
        "--sparse",
        nargs="+",
        default=["16,1,1,0.7", "8,1,1,0.7"],
        help="sparse variants: block size,local window,random blocks,keep rate",
    )
    args = parser.parse_args(argv)
    args.classes = 32 if args.task == "rhythm" else 8
    if args.task == "rhythm" and args.videos == 256:  # the sharing study's data set, 2 probe videos per class
        args.videos, args.test_videos, args.probe_videos = 1024, 256, [1024, 64]
    from tqdm import tqdm

    root = args.root.resolve()
    tokens = args.clips * args.tokens_per_clip
    variants = [DENSE, *args.sparse]
    for variant in args.sparse:
        parse_variant(variant)
    # Pretraining runs and probes measured before under this root with the same settings are kept, so a new
    # seed, variant or probe setting runs only what it adds.
    pretrain_settings = {k: getattr(args, k) for k in ("stage1_steps", "steps", "clips", "tokens_per_clip", "videos")}
    if args.task != "classes":  # runs cached before the switch existed are the classes task's
        pretrain_settings["task"] = args.task
    done_file = root / "rows.json"
    done = cached_rows(done_file, pretrain_settings)
    rows = [r for r in done if r["seed"] in args.seeds and r["variant"] in (RANDOM, *variants)]
    todo = [
        (seed, variant)
        for seed in args.seeds
        for variant in (RANDOM, *variants)
        if not any(r["seed"] == seed and r["variant"] == variant for r in rows)
    ]
    pretrainings = sum(variant != RANDOM for _, variant in todo)
    probes = len(todo) * len(args.probe_videos) + sum(
        probe_key(args, videos) not in r["probes"] for r in rows for videos in args.probe_videos
    )
    with tqdm(total=pretrainings + probes, desc="pretraining runs and probes") as progress:
        for seed, variant in todo:
            row = {
                "seed": seed,
                "variant": variant,
                "settings": pretrain_settings,
                "pairs": attention_pairs(tokens, 2, DENSE if variant == RANDOM else variant),
                "run_id": None,
                "pretrain_s": 0.0,
                "probes": {},
            }
            if variant != RANDOM:
                _, row["run_id"], row["pretrain_s"] = launch(
                    "pretrain.py",
                    [
                        *common_overrides(args, root, seed),
                        curriculum(args, variant),
                        f"train.max_steps={args.stage1_steps + args.steps}",
                        f"train.checkpoint_every={args.stage1_steps + args.steps}",
                    ],
                )
                curves = {key: metric_history(row["run_id"], root, key) for key in (*CURVES, "pair_accuracy")}
                row.update(curves=curves, **{key: final_mean(curves[key]) for key in curves})
                progress.update()
            rows.append(row)
            save_rows(done_file, pretrain_settings, [r for r in done if r not in rows] + rows)
        for row in rows:
            for videos in args.probe_videos:
                if probe_key(args, videos) not in row["probes"]:
                    row["probes"][probe_key(args, videos)] = probe(args, root, row, videos)
                    progress.update()
                    save_rows(done_file, pretrain_settings, [r for r in done if r not in rows] + rows)
    for row in rows:
        row["probe_top1"] = {videos: row["probes"][probe_key(args, videos)]["top1"] for videos in args.probe_videos}
    rows.sort(key=lambda r: (r["seed"], [RANDOM, *variants].index(r["variant"])))
    table = render(rows, args, tokens, variants)
    print(table)
    out = results_stem(HERE / "results", "sparse_quality", args.task)
    out.with_suffix(".md").write_text(table)
    plot = plot_results(rows, args, variants, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.md')} and {plot}")
    return 0


def common_overrides(args: argparse.Namespace, root: Path, seed: int) -> list[str]:
    return [
        f"paths.root={root}",
        f"data.synthetic.videos={args.videos}",
        f"data.synthetic.task={args.task}",
        f"data.synthetic.classes={args.classes}",
        f"data.clips={args.clips}",
        f"seed={seed}",
        "data.synthetic.seconds=4.0",
        "data.fps=16",
        "mlflow.system_metrics=false",
    ]


def probe_key(args: argparse.Namespace, videos: int) -> str:
    return json.dumps(
        {
            "probe_steps": args.probe_steps,
            "probe_lr": args.probe_lr,
            "test_videos": args.test_videos,
            "probe_videos": videos,
        },
        sort_keys=True,
    )


def probe(args: argparse.Namespace, root: Path, row: dict, videos: int) -> dict:
    """Linear-probe one pretraining run (or a random initialisation in stage 2's shape) trained on `videos`
    synthetic videos: top-1 on the held-out set, and time."""
    init = [f"task.init={row['run_id']}"] if row["run_id"] else [f"model.tokens_per_clip={args.tokens_per_clip}"]
    # A small training set is written as few shards: one loader stream per rank.
    small = [f"data.synthetic.videos={videos}", "data.streams=2"] if videos != args.videos else []
    probe_dir, _, probe_s = launch(
        "finetune.py",
        [
            *common_overrides(args, root, row["seed"]),
            *small,
            *init,
            "task.freeze=[backbone]",
            f"eval.synthetic_videos={args.test_videos}",
            f"train.lr={args.probe_lr}",
            f"train.max_steps={args.probe_steps}",
            f"train.checkpoint_every={args.probe_steps}",
        ],
    )
    return {"top1": probe_accuracy(probe_dir, args.probe_steps), "probe_s": probe_s}


def render(rows: list[dict], args: argparse.Namespace, tokens: int, variants: list[str]) -> str:
    lines = [
        "# Sparse vs dense attention: quality at a long sequence (synthetic data)",
        "",
        f"{datetime.date.today()}, CPU, tiny model, seeds {' '.join(map(str, args.seeds))}. Pretraining with the "
        f"curriculum: stage 1 {args.stage1_steps} steps dense at {args.clips} clips x 1 token; stage 2 {args.steps} "
        f"steps at {args.clips} clips x {args.tokens_per_clip} tokens = {tokens} tokens per modality, dense or sparse "
        "(`sparse bB wW rR keep K`: blocks of B tokens, W local blocks each side, R random blocks, BOS global; node "
        "sparsity keeps K of the visual tokens after layer 1); 8 videos per step of "
        f"{args.videos} (data.synthetic.task={args.task}, {args.classes} classes). Linear probe (backbone frozen, "
        f"stage 2 settings) {args.probe_steps} steps at "
        f"learning rate {args.probe_lr:g}, trained on {' or '.join(map(str, args.probe_videos))} videos and scored "
        f"on {args.test_videos} held-out videos (one video = {100 / args.test_videos:.1f} points; "
        f"chance {100 / args.classes:.1f}%). "
        "The probe of a random initialisation of the same shape is the floor. "
        "Objectives: mean of the last 20 steps. Generated by `python benchmarks/sparse_quality.py "
        f"--task {args.task} --stage1-steps {args.stage1_steps} --steps {args.steps} "
        f"--probe-steps {args.probe_steps} --probe-lr "
        f"{args.probe_lr:g} --probe-videos {' '.join(map(str, args.probe_videos))} --seeds "
        f"{' '.join(map(str, args.seeds))} --sparse {' '.join(args.sparse)}`.",
        "",
        "| seed | attention | query-key pairs per forward | vs dense | pretrain time (s) | MEP visual | MEP audio "
        "| pair loss | pair accuracy (%) | "
        + " | ".join(f"probe top-1, {v} videos (%)" for v in args.probe_videos)
        + " |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(args.probe_videos),
    ]
    dense_pairs = attention_pairs(tokens, 2, DENSE)
    for r in rows:
        objectives = (
            "| - | - | - | - | -"
            if r["variant"] == RANDOM
            else f"| {r['pretrain_s']:.0f} | {r['loss_mep_visual']:.3f} | {r['loss_mep_audio']:.3f} "
            f"| {r['loss_pair']:.3f} | {100 * r['pair_accuracy']:.1f}"
        )
        lines.append(
            f"| {r['seed']} | {variant_name(r['variant'])} | {r['pairs']:,} | {r['pairs'] / dense_pairs:.2f} "
            f"{objectives} | " + " | ".join(f"{top1:.1f}" for top1 in r["probe_top1"].values()) + " |"
        )
    dense = {r["seed"]: r for r in rows if r["variant"] == DENSE}
    lines += [
        "",
        "| probe trained on | attention | vs dense cost | probe top-1, mean over seeds (%) "
        "| minus dense, per seed (points) | mean (points) | MEP visual minus dense, mean |",
        "|---:|---|---:|---:|---|---:|---:|",
    ]
    for videos in args.probe_videos:
        for variant in (RANDOM, *variants):
            mine = [r for r in rows if r["variant"] == variant and r["seed"] in dense]
            if not mine:
                continue
            mean_top1 = statistics.fmean(r["probe_top1"][videos] for r in mine)
            if variant == DENSE:
                lines.append(f"| {videos} videos | {DENSE} | 1.00 | {mean_top1:.1f} | - | - | - |")
                continue
            gaps = [r["probe_top1"][videos] - dense[r["seed"]]["probe_top1"][videos] for r in mine]
            mep = "-"
            if variant != RANDOM:
                mep_gaps = [r["loss_mep_visual"] - dense[r["seed"]]["loss_mep_visual"] for r in mine]
                mep = f"{statistics.fmean(mep_gaps):+.3f}"
            cost = "-" if variant == RANDOM else f"{mine[0]['pairs'] / dense_pairs:.2f}"
            lines.append(
                f"| {videos} videos | {variant_name(variant)} | {cost} | {mean_top1:.1f} "
                f"| {', '.join(f'{g:+.1f}' for g in gaps)} | {statistics.fmean(gaps):+.1f} | {mep} |"
            )
    return "\n".join(lines) + "\n"


def plot_results(rows: list[dict], args: argparse.Namespace, variants: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES) + 1, figsize=(4 * (len(CURVES) + 1), 3.8))
    colours = {RANDOM: "gray", **dict(zip(variants, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")))}
    markers = dict(zip(args.probe_videos, ("o", "^", "s", "D")))
    for r in rows:
        for videos, top1 in r["probe_top1"].items():
            axes[0].scatter(
                r["pairs"] / 1e3,
                top1,
                color=colours[r["variant"]],
                marker="x" if r["variant"] == RANDOM else markers[videos],
                alpha=0.7,
            )
        if r["variant"] == RANDOM:
            continue
        for axis, key in zip(axes[1:], CURVES):
            steps, values = zip(*r["curves"][key])
            window = 20  # running mean: per-step losses on 8 videos are noisy
            smooth = [statistics.fmean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]
            axis.plot(steps, smooth, color=colours[r["variant"]], alpha=0.7)
    for variant in (*variants, RANDOM):
        axes[0].scatter(
            [], [], color=colours[variant], label=variant_name(variant), marker="x" if variant == RANDOM else "o"
        )
    for videos, marker in markers.items():
        axes[0].scatter([], [], color="black", marker=marker, label=f"probe trained on {videos} videos")
    axes[0].axhline(100 / 8, color="gray", linestyle="--", label="chance")
    axes[0].set_ylim(0, 105)
    axes[0].set_xlabel("query-key pairs per forward (thousands)")
    axes[0].set_ylabel("linear probe top-1 (%), one dot per seed")
    axes[0].legend(fontsize=7)
    for axis, key in zip(axes[1:], CURVES):
        axis.axvline(args.stage1_steps, color="gray", linestyle=":")
        axis.set_title(f"{key} (one line per seed)", fontsize=10)
        axis.set_xlabel("step (dotted: stage 2 begins)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    sys.exit(main())
