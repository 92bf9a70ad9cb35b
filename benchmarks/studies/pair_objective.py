"""Can the correct-pair objective learn at all? Memorising a fixed batch against learning from new ones.

    python benchmarks/pair_objective.py            # ~15 min of 2 cores
    python benchmarks/pair_objective.py --quick    # a smoke run (seconds)

The pair objective alone (`loss.mep_weight=0`), no sharing, the model of `sharing_quality.py` on the
easy `classes` task, where either modality's class decides the pair (mismatched audio is of another
class 31 times in 32). Each row trains with AdamW (linear warmup over 5 steps, clip 1.0) either on one
fixed batch of 32 videos (can it memorise?) or on a new random batch of 32 from 256 videos each step
(can it learn?), with the paper's head (`bos`: linear on the fused visual BOS) or one that compares
(`loss.pair_head=agreement`: a dot product of the fused visual and audio BOS). Accuracy is that of
each batch before its update, averaged over the last 10 steps.
The spreads are how much the model's inputs and outputs differ between videos (std across videos
over RMS, training mode): the clip embeddings, the visual transformer's tokens, the fused BOS the
pair head reads. Writes benchmarks/results/pair_objective.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # the benchmarks' shared helpers (common, probes), never another benchmark

from probes import across, decoded  # noqa: E402

# The sharing study's model and the easy `classes` task (either modality's class decides the pair)
DATA = [
    "data.synthetic.task=classes",
    "data.synthetic.classes=32",
    "data.synthetic.seconds=4.0",
    "data.clips=8",
    "data.frames_per_clip=4",
    "data.fps=8",
]

OUT_NORM = ["model.visual_cnn.out_norm=true", "model.audio_cnn.out_norm=true"]
NO_OUT_NORM = ["model.visual_cnn.out_norm=false", "model.audio_cnn.out_norm=false"]
AGREEMENT = [*OUT_NORM, "loss.pair_head=agreement"]
# (CNN features, pair head, overrides, batches, lr)
ROWS = [
    ("no out_norm", "bos", NO_OUT_NORM, "fixed", 1e-3),
    ("out_norm", "bos", OUT_NORM, "fixed", 1e-3),
    ("out_norm", "bos", OUT_NORM, "new", 1e-4),
    ("out_norm", "bos", OUT_NORM, "new", 1e-3),
    ("out_norm", "agreement", AGREEMENT, "new", 1e-4),
    ("out_norm", "agreement", AGREEMENT, "new", 1e-3),
]


def spreads(model, video, audio) -> dict[str, float]:
    import torch

    backbone = model.backbone
    with torch.no_grad():
        visual, sound = backbone.embed_clips(video, audio)
        visual_out = backbone.contextualise("visual", visual)
        fused = backbone.fuse(visual_out[:, 1:], backbone.contextualise("audio", sound)[:, 1:])
    return {
        "visual clips": across(visual),
        "audio clips": across(sound),
        "visual tokens": across(visual_out[:, 1:]),
        "fused BOS": across(fused[:, 0]),
    }


def train_row(args: argparse.Namespace, data: dict, overrides: list[str], batches: str, lr: float) -> dict:
    """`data["video"]` already as floats (converted once for every row and step)."""
    import torch

    from pemt.config import compose_config
    from pemt.model.factory import build_pretraining_model

    cfg = compose_config(
        "pretrain",
        [
            *DATA,
            f"data.synthetic.videos={args.videos}",
            f"model.hidden_size={args.hidden}",
            f"model.num_layers={args.layers}",
            "model.num_heads=4",
            f"model.ffn_size={2 * args.hidden}",
            "model.sharing=[]",
            "loss.mep_weight=0",
            *overrides,
        ],
    )
    torch.manual_seed(0)
    model = build_pretraining_model(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    order = torch.Generator().manual_seed(0)
    history = []
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / 5)
        chosen = torch.arange(args.batch) if batches == "fixed" else torch.randperm(args.videos, generator=order)
        chosen = chosen[: args.batch]
        out = model(data["video"][chosen], data["audio"][chosen], step_seed=step)
        optimizer.zero_grad()
        out["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append((float(out["loss_pair"]), float(out["pair_accuracy"]), float(grad_norm)))
    last = history[-10:]
    return {
        "loss": statistics.mean(h[0] for h in last),
        "accuracy": statistics.mean(h[1] for h in last),
        "grad_norm": statistics.mean(h[2] for h in last),
        "spread": spreads(model, data["video"][: args.batch], data["audio"][: args.batch]),
        "seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=REPO / "outputs" / "sharing_quality")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny model, 3 steps")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.batch, args.videos, args.hidden, args.layers = 32, 256, 256, 4
    if args.quick:
        args.steps, args.batch, args.videos, args.hidden, args.layers = 3, 8, 16, 64, 2
    import torch
    from tqdm import tqdm

    from pemt.config import compose_config
    from pemt.data.decode import video_to_float
    from pemt.data.synthetic import ensure_synthetic_shards

    root = args.root.resolve()
    cfg = compose_config("pretrain", [f"paths.root={root}", *DATA, f"data.synthetic.videos={args.videos}"])
    data = decoded(ensure_synthetic_shards(cfg), cfg.data, root / f"decoded-classes-{args.videos}-0.pt")
    data["video"] = video_to_float(data["video"], "cpu", torch.float32)
    lines = [
        "# The correct-pair objective alone: memorising a fixed batch vs learning from new ones\n",
        f"`classes` task, {args.videos} videos, batch {args.batch}, {args.steps} steps, no sharing, hidden "
        f"{args.hidden}, {args.layers} layers; loss and accuracy: mean of the last 10 steps (chance: ln 2 = "
        "0.693, 0.50). Spread: std across videos / RMS, training mode, after the last step. Generated by "
        f"`python benchmarks/pair_objective.py{' --quick' if args.quick else ''}`.\n",
        "| CNN features | pair head | batches | lr | pair loss | accuracy | grad norm | spread: visual / audio clips | "
        "visual tokens | fused BOS | s |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name, head, overrides, batches, lr in tqdm(ROWS, desc="pair objective rows"):
        row = train_row(args, data, overrides, batches, lr)
        s = row["spread"]
        lines.append(
            f"| {name} | {head} | {batches} | {lr:g} | {row['loss']:.3f} | {row['accuracy']:.2f} | "
            f"{row['grad_norm']:.2f} | "
            f"{s['visual clips']:.3f} / {s['audio clips']:.3f} | {s['visual tokens']:.3f} | {s['fused BOS']:.3f} | "
            f"{row['seconds']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"pair_objective{'_quick' if args.quick else ''}.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
