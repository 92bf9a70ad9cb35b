"""Does sharing (and factorising) the transformers cost what they learn? Measured on a task only
audio-visual synchrony solves.

    python benchmarks/sharing_quality.py                 # the table: ~2 h of 2 cores; continues where it stopped
    python benchmarks/sharing_quality.py --quick         # a smoke run of the whole path (minutes)
    python benchmarks/sharing_quality.py --rows supervised --variants none --seeds 0 \
        --videos 8192 --steps 1800 --eval-every 300      # the ceiling alone, with its held-out curve

Data: `data.synthetic.task=rhythm` (`--task`; 32 classes: which of 4 shapes blinks in time with
which of 8 tones, beside a decoy shape and a decoy tone beating at tempi of their own, over moving
distractors and noise: neither modality alone nor the pair without timing gives the class), or
`sync` (the same classes, shown by two synchronous events instead of a rhythm), or `classes` (the
easy task, where either modality alone gives the class). `--set KEY=VALUE` applies an override to
every variant (an objective's weight, the CNNs' `out_norm`). Tasks other than rhythm, and overrides,
add to the file name (`sharing_quality_<task>_<key>-<value>.md`). Model: the tiny CNNs with
transformers of hidden 256, 4 layers, 4 heads, FFN 512. Every variant pretrains through
launch/pretrain.py with the same steps, batch, data and seeds (MLflow experiment `pemt-evidence`).

Probe: the frozen model's features of every video (the multimodal transformer's BOS output and its
mean visual and audio outputs, concatenated) are computed once per model; a multinomial logistic
regression (L-BFGS, weight decay) is fit on the features of k videos per class (k = 2, 4, 8; three
draws each, averaged) and of all training videos, and scored on a fixed held-out set. Random
initialisations of each shape give the floor; `--rows ... supervised` adds the ceiling: each variant
trained on the labels end to end with the same budget (launch/finetune.py, `task.name=long_av`) and
scored on the same held-out set (`--eval-every N`: also every N steps, the row's curve). Each
pretraining run, probe and supervised run is cached in `<root>/rows.json`, so an interrupted build
continues where it stopped.
Writes benchmarks/results/sharing_quality.{md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from overrides import add_set_option  # noqa: E402
from pretraining_evidence import launch  # noqa: E402
from row_cache import save_rows  # noqa: E402
from sharing_quality_table import (  # noqa: E402
    LOSSES,
    PRETRAINED,
    RANDOM,
    SHOTS,
    SUPERVISED,
    cached_rows,
    output_name,
    plot,
    render,
    row_key,
)

FACTORIZED = "[layer,cross,factorized]"
# name: overrides (each also pretrained from scratch with the same budget)
VARIANTS = {
    "none": ["model.sharing=[]"],
    "layer": ["model.sharing=[layer]"],
    "layer+cross": ["model.sharing=[layer,cross]"],
    "factorized r32": [f"model.sharing={FACTORIZED}", "model.factorized.rank=32"],
    "factorized r64": [f"model.sharing={FACTORIZED}", "model.factorized.rank=64"],
    "factorized r64, uniform negatives": [
        f"model.sharing={FACTORIZED}",
        "model.factorized.rank=64",
        "loss.sampling=uniform",
    ],
    "none, uniform negatives": ["model.sharing=[]", "loss.sampling=uniform"],
    "factorized r64, free inner": [
        f"model.sharing={FACTORIZED}",
        "model.factorized.rank=64",
        "model.factorized.inner=free",
    ],
    "factorized r64, not normalised": [
        f"model.sharing={FACTORIZED}",
        "model.factorized.rank=64",
        "model.factorized.normalize=false",
    ],
    "factorized r64, input shared": [
        f"model.sharing={FACTORIZED}",
        "model.factorized.rank=64",
        "model.factorized.shared=input",
    ],
    "factorized r64, unit-normalised (public code)": [
        f"model.sharing={FACTORIZED}",
        "model.factorized.rank=64",
        "model.factorized.normalize=unit",
    ],
}
FRAMES = 32  # frames per video (4 s at 8 fps), cut into --clips clips
RANDOM_OF = ["none", "layer", "layer+cross", "factorized r64"]  # random initialisations probed as floors


def model_overrides(args: argparse.Namespace) -> list[str]:
    """The model's size, then the `--set` overrides every variant shares."""
    return [
        f"model.hidden_size={args.hidden}",
        f"model.num_layers={args.layers}",
        "model.num_heads=4",
        f"model.ffn_size={2 * args.hidden}",
        *args.overrides,
    ]


def data_overrides(args: argparse.Namespace, videos: int, seed: int) -> list[str]:
    return [
        f"data.synthetic.task={args.task}",
        "data.synthetic.classes=32",
        f"data.synthetic.videos={videos}",
        "data.synthetic.seconds=4.0",
        f"data.synthetic.videos_per_shard={max(1, videos // 32)}",
        f"data.synthetic.seed={seed}",
        # The whole 4 s at 8 fps (32 frames), cut into `clips` tokens per modality.
        f"data.clips={args.clips}",
        f"data.frames_per_clip={FRAMES // args.clips}",
        "data.fps=8",
    ]


def pretrain_overrides(args: argparse.Namespace, root: Path, variant: str, seed: int) -> list[str]:
    return [
        f"paths.root={root}",
        "mlflow.experiment=pemt-evidence",
        "mlflow.system_metrics=false",
        "gpus_per_node=1",
        f"seed={seed}",
        *data_overrides(args, args.videos, 0),
        *model_overrides(args),
        *VARIANTS[variant],
        f"train.max_steps={args.steps}",
        f"train.checkpoint_every={args.steps}",
        f"train.log_every={max(1, args.steps // 20)}",
        f"train.global_batch_size={args.batch}",
        f"train.warmup_steps={max(1, args.steps // 20)}",
        "data.streams=8",
    ]


def supervised_overrides(args: argparse.Namespace, root: Path, variant: str, seed: int) -> list[str]:
    """The same model, data and budget trained on the labels end to end (launch/finetune.py from a
    random initialisation), scored on the probes' held-out set: what the architecture can learn of
    the task in this budget when it is told the class."""
    return [
        *pretrain_overrides(args, root, variant, seed),
        "task.name=long_av",
        "eval.seed=1",  # the probes' held-out videos (videos_of(..., seed=1))
        f"eval.synthetic_videos={args.test_videos}",
        "eval.batch_size=32",
        *([f"eval.every={args.eval_every}"] if args.eval_every else []),
    ]


def supervised_top1(run_dir: Path) -> dict[int, float]:
    """Held-out top-1 (%) of a fine-tuning run at each evaluation (launch/finetune.py's eval.jsonl),
    in step order; the last one is the row's."""
    from pemt.downstream.task import EVAL_LOG

    records = [json.loads(line) for line in (run_dir / EVAL_LOG).read_text().splitlines() if line.strip()]
    if not records or records[-1].get("test_bad_samples"):
        raise SystemExit(f"{run_dir / EVAL_LOG}: no clean final evaluation ({records[-1:] or 'empty'})")
    return {int(r["step"]): float(r["test_top1"]) for r in records if not r.get("test_bad_samples")}


def final_losses(root: Path, run_id: str) -> dict[str, float]:
    """The pretraining objectives' last logged values: has the run learned anything?"""
    from mlflow.tracking import MlflowClient

    tracking_uri = _compose([f"paths.root={root}"]).mlflow.tracking_uri  # where launch/pretrain.py logged it
    metrics = MlflowClient(tracking_uri).get_run(run_id).data.metrics
    return {k: metrics[k] for k in LOSSES if k in metrics}


def _compose(overrides: list[str]):
    from pemt.config import compose_config

    return compose_config("pretrain", overrides=overrides)


def videos_of(args: argparse.Namespace, root: Path, videos: int, seed: int) -> dict:
    """Decoded clips and labels of a synthetic set (decoded once, cached as tensors)."""
    import torch

    cache = root / f"decoded-{args.task}-{videos}-{seed}{'' if args.clips == 8 else f'-{args.clips}clips'}.pt"
    if cache.exists():
        return torch.load(cache, weights_only=True)
    from pemt.data.loader import clip_spec, decode_sample
    from pemt.data.shards import read_manifest
    from pemt.data.stream import shard_samples
    from pemt.data.synthetic import ensure_synthetic_shards

    cfg = _compose([f"paths.root={root}", *data_overrides(args, videos, seed)])
    folder = ensure_synthetic_shards(cfg)
    spec = clip_spec(cfg.data)
    decoded = [
        decode_sample(sample, spec, window_seed=None)
        for entry in read_manifest(folder)
        for sample, _ in shard_samples(str(folder / entry["name"]), int(entry["samples"]))
    ]
    out = {
        "video": torch.stack([d["video"] for d in decoded]),
        "audio": torch.stack([d["audio"] for d in decoded]),
        "label": torch.tensor([d["label"] for d in decoded]),
    }
    torch.save(out, cache)
    return out


def _forward(backbone, video, audio):
    """Clip embeddings of both modalities and the multimodal transformer's output, frozen."""
    import torch

    from pemt.data.decode import video_to_float

    with torch.no_grad():
        visual, audio = backbone.embed_clips(video_to_float(video, "cpu", torch.float32), audio)
        visual_out = backbone.contextualise("visual", visual)[:, 1:]
        audio_out = backbone.contextualise("audio", audio)[:, 1:]
        return visual, audio, backbone.fuse(visual_out, audio_out)


def features(model, data: dict, batch: int = 64):
    """The frozen model's features: fused BOS output, mean fused visual and audio outputs."""
    import torch

    outs = []
    model.eval()
    for i in range(0, len(data["label"]), batch):
        visual, _, fused = _forward(model.backbone, data["video"][i : i + batch], data["audio"][i : i + batch])
        length = visual.shape[1]
        outs.append(torch.cat([fused[:, 0], fused[:, 1 : 1 + length].mean(1), fused[:, 2 + length :].mean(1)], 1))
    return torch.cat(outs)


def across(x) -> float:
    """How much x (videos first) differs between videos: the standard deviation across videos relative
    to the RMS (near 0: every video looks alike to the objectives and the probe)."""
    x = x.flatten(1)
    return float(x.std(0).mean() / x.square().mean().sqrt())


def spread(model, data: dict, count: int = 64) -> dict[str, float]:
    """How much the frozen model's clip embeddings and fused BOS output differ between videos
    (`across`), and across the clips of one video for the visual embeddings."""
    model.eval()
    visual, audio, fused = _forward(model.backbone, data["video"][:count], data["audio"][:count])
    return {
        "visual clips": across(visual),
        "audio clips": across(audio),
        "visual clips within a video": float(visual.std(1).mean() / visual.square().mean().sqrt()),
        "fused BOS": across(fused[:, 0]),
    }


def fit_probe(train_x, train_y, test_x, test_y, classes: int, weight_decay: float = 1e-3) -> float:
    """Top-1 (%) of a multinomial logistic regression on standardised features."""
    import torch

    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    linear = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train_x), train_y) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return 100.0 * float((linear(test_x).argmax(1) == test_y).float().mean())


def probe_model(args: argparse.Namespace, root: Path, variant: str, seed: int, run_dir: Path | None) -> dict:
    """Probe accuracies (full and k-shot) of a pretrained run, or of a random initialisation."""
    import torch

    from pemt.model.factory import build_pretraining_model

    if run_dir is None:
        torch.manual_seed(seed)
        model = build_pretraining_model(
            _compose([*data_overrides(args, args.videos, 0), *model_overrides(args), *VARIANTS[variant]])
        )
    else:
        from omegaconf import OmegaConf

        from pemt.train.export import consolidated_state

        weights, saved = consolidated_state(run_dir)
        model = build_pretraining_model(OmegaConf.create(saved["config"]))
        model.load_state_dict(weights, strict=True)
    train, test = videos_of(args, root, args.videos, 0), videos_of(args, root, args.test_videos, 1)
    train_x, test_x = features(model, train), features(model, test)
    train_y, test_y = train["label"], test["label"]
    result = {"full": fit_probe(train_x, train_y, test_x, test_y, 32), "spread": spread(model, train)}
    for shots in SHOTS:
        scores = []
        for draw in range(3):
            generator = torch.Generator().manual_seed(1000 * shots + draw)
            chosen = torch.cat(
                [
                    torch.nonzero(train_y == c).squeeze(1)[
                        torch.randperm(int((train_y == c).sum()), generator=generator)[:shots]
                    ]
                    for c in range(32)
                ]
            )
            scores.append(fit_probe(train_x[chosen], train_y[chosen], test_x, test_y, 32))
        result[f"{shots}-shot"] = statistics.mean(scores)
    return result


def transformer_params(args: argparse.Namespace, variant: str) -> int:
    import torch

    from pemt.model.factory import build_pretraining_model
    from pemt.model.params import count_parameters

    torch.manual_seed(0)
    cfg = _compose([*data_overrides(args, args.videos, 0), *model_overrides(args), *VARIANTS[variant]])
    return count_parameters(build_pretraining_model(cfg))["transformers"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=REPO / "outputs" / "sharing_quality")
    parser.add_argument("--task", choices=["rhythm", "sync", "classes"], default="rhythm", help="data.synthetic.task")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--videos", type=int, default=1024, help="pretraining (and probe training) videos")
    parser.add_argument("--test-videos", type=int, default=256, help="held-out videos (one video < 0.5 point)")
    parser.add_argument(
        "--clips",
        type=int,
        default=8,
        choices=[8, 16, 32],
        help="clips (tokens per modality) per 4 s video: each token pools 4 s / clips of time",
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    add_set_option(parser, "loss.contrastive_weight=1.0")
    parser.add_argument(
        "--rows",
        nargs="+",
        default=[PRETRAINED, RANDOM],
        choices=[PRETRAINED, RANDOM, SUPERVISED],
        help="which rows: pretrained and probed; a random initialisation probed (the floor); trained on the "
        "labels with the same budget and scored on the held-out set (the ceiling)",
    )
    parser.add_argument(
        "--eval-every", type=int, default=0, help="supervised rows: also score the held-out set every N steps"
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 variant, 1 seed, few steps and videos")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.videos, args.test_videos, args.seeds = 4, 64, 64, [0]
        args.hidden, args.layers, args.batch, args.variants = 64, 2, 16, ["factorized r64"]
    from tqdm import tqdm

    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("task", "steps", "batch", "videos", "test_videos", "hidden", "layers")}
    # Only when given, so rows cached before these options existed still match.
    if args.overrides:
        settings["overrides"] = args.overrides
    if args.clips != 8:
        settings["clips"] = args.clips
    done_file = root / "rows.json"
    rows = cached_rows(done_file, settings)
    wanted = [(v, s, PRETRAINED) for v in args.variants for s in args.seeds if PRETRAINED in args.rows]
    wanted += [(v, s, RANDOM) for v in RANDOM_OF if v in args.variants for s in args.seeds if RANDOM in args.rows]
    wanted += [(v, s, SUPERVISED) for v in args.variants for s in args.seeds if SUPERVISED in args.rows]
    todo = [w for w in wanted if not any(row_key(r) == w for r in rows)]
    for variant, seed, kind in tqdm(todo, desc="pretraining runs and probes"):
        row = {"variant": variant, "seed": seed, "random": kind == RANDOM, "settings": settings, "pretrain_s": 0.0}
        if kind == SUPERVISED:
            row["supervised"] = True
            run_dir, row["run_id"], row["pretrain_s"] = launch(
                "finetune.py", supervised_overrides(args, root, variant, seed)
            )
            row["held_out_by_step"] = supervised_top1(run_dir)
            row["probe"] = {"full": list(row["held_out_by_step"].values())[-1]}
        else:
            run_dir = None
            if kind == PRETRAINED:
                run_dir, row["run_id"], row["pretrain_s"] = launch(
                    "pretrain.py", pretrain_overrides(args, root, variant, seed)
                )
                row["losses"] = final_losses(root, row["run_id"])
            started = time.perf_counter()
            row["probe"] = probe_model(args, root, variant, seed, run_dir)
            row["probe_s"] = time.perf_counter() - started
        rows.append(row)
        save_rows(done_file, settings, rows)
    params = {v: transformer_params(args, v) for v in args.variants}
    table = render([r for r in rows if row_key(r) in wanted], args, params)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    name = output_name(args)
    (args.out / f"{name}.md").write_text(table)
    plot(rows, args, params, args.out / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
