"""Does sharing (and factorising) the transformers cost what they learn?

    python benchmarks/sharing_quality.py                 # the digits table: ~2.2 h here (7.5 min a run), resumable
    python benchmarks/sharing_quality.py --table-only    # the table of the rows kept so far; runs nothing
    python benchmarks/sharing_quality.py --quick         # a smoke run of the whole path (minutes)
    python benchmarks/sharing_quality.py --rows supervised --variants none --seeds 0 --eval-every 150
    python benchmarks/sharing_quality.py --task rhythm   # the timing study (results/sharing_quality.md)

Tasks (`--task`):
- `digits` (the default): spoken and handwritten digits (tools/make_av_digits.py): each second of a
  video shows a handwritten digit among distractor strokes while a voice says it over noise and babble;
  held-out videos use digit images and voices no training video uses. Probe label: the digit shown
  and spoken most often (10 classes); the table also probes `unspoken` (shown, never spoken: only
  both modalities tell it). Few-shot probes use 1, 5 and 10 videos per class.
- `rhythm`, `sync`, `classes`: the generated timing tasks (pemt/data/synthetic.py; 32 classes;
  2, 4 and 8 shots), which the model cannot learn at this budget (results/sharing_quality*.md).

Every variant pretrains through launch/pretrain.py with the same steps, batch, data and seeds, and
the defaults of configs/pretrain.yaml (MLflow experiment `pemt-evidence`); `--set KEY=VALUE`
applies an override to every variant and names the results file. Probe: the frozen model's features
of every video (the multimodal transformer's BOS output and its mean visual and audio outputs)
feed a multinomial logistic regression fit on k videos per class (three draws, averaged) and on all
training videos, scored on the held-out set. Random initialisations give the floor; `--rows ...
supervised` the ceiling: each variant trained on the labels end to end with the same budget
(launch/finetune.py, `task.name=long_av`), scored on the same held-out set. The gate (digits) is
printed above the table: ceiling >= 85%, the random floor >= 30 points below it, the unshared
model pretrained >= 20 points above its floor. Each pretraining run, probe and supervised run is
kept in `<root>/rows.json` and beside the table (`<table>.rows.json`, committed with it), and the
table is rewritten after every row, so an interrupted build continues, here or on another machine
from the committed rows; the table lists the rows still to run. A row counts only while its variant
still builds the model it ran (a digest of the resolved model config): after a model default
changes, the rows built before stay in the files and run again. Writes
benchmarks/results/sharing_quality[_<task>][_<key>-<value>].{md,png,rows.json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import add_set_option, launch, save_rows
from probes import clip_probe, decoded, features, few_shot, fit_probe, spread
from sharing_quality_table import PRETRAINED, RANDOM, SUPERVISED, cached_rows, output_name, plot, render, row_key

from pemt.data.digits import DigitsSpec

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

FACTORIZED = "[layer,cross,factorized]"
# name: overrides (each also pretrained from scratch with the same budget)
VARIANTS = {
    "none": ["model.sharing=[]"],
    "layer": ["model.sharing=[layer]"],
    "layer+cross": ["model.sharing=[layer,cross]"],
    "factorized r32": [f"model.sharing={FACTORIZED}", "model.factorized.rank=32"],
    "factorized r64": [f"model.sharing={FACTORIZED}", "model.factorized.rank=64"],
    "factorized r128": [f"model.sharing={FACTORIZED}", "model.factorized.rank=128"],  # the most at <= 1/5 (digits)
    "factorized r64, uniform negatives": [
        f"model.sharing={FACTORIZED}",
        "model.factorized.rank=64",
        "loss.sampling=uniform",
    ],
    "none, uniform negatives": ["model.sharing=[]", "loss.sampling=uniform"],
    "factorized r64, input shared": [
        f"model.sharing={FACTORIZED}",
        "model.factorized.rank=64",
        "model.factorized.shared=input",
    ],
    # the rank-r code normalised: to unit RMS (the default until the digits rows), or L2 as in the public code
    **{
        f"factorized r{rank}, rms normalised": [
            f"model.sharing={FACTORIZED}",
            f"model.factorized.rank={rank}",
            "model.factorized.normalize=rms",
        ]
        for rank in (64, 128)
    },
    "factorized r64, free inner, rms normalised": [
        f"model.sharing={FACTORIZED}",
        "model.factorized.rank=64",
        "model.factorized.inner=free",
        "model.factorized.normalize=rms",
    ],
    "factorized r64, unit-normalised (public code)": [
        f"model.sharing={FACTORIZED}",
        "model.factorized.rank=64",
        "model.factorized.normalize=unit",
    ],
}
RANDOM_OF = ["none", "layer", "layer+cross", "factorized r64"]  # random initialisations probed as floors


@dataclass(frozen=True)
class Task:
    classes: int
    shots: tuple[int, ...]
    variants: tuple[str, ...]  # the table's rows by default
    steps: int
    batch: int
    videos: int
    test_videos: int
    labels: tuple[str, ...] = ("label",)  # probed, the first is the table's (and the ceiling's) label
    # per clip: (modality, label) probed from each clip's CNN embedding ("seconds <modality>")
    clip_labels: tuple[tuple[str, str], ...] = ()


TASKS = {
    "digits": Task(
        classes=10,
        shots=(1, 5, 10),
        variants=("none", "layer", "layer+cross", "factorized r64", "factorized r64, uniform negatives"),
        steps=600,
        batch=32,
        videos=2048,
        test_videos=512,
        labels=("label", "unspoken"),
        clip_labels=(("visual", "shown"), ("audio", "spoken")),
    ),
    **{
        name: Task(32, (2, 4, 8), tuple(VARIANTS), steps=300, batch=32, videos=1024, test_videos=256)
        for name in ("rhythm", "sync", "classes")
    },
}
# The digits study's clips: one token per second of a 6-second video, 2 frames each, 32 x 32
DIGITS_DATA = ["data.clips=6", "data.frames_per_clip=2", "data.fps=2", "data.crop=32"]
# ... and CNNs that can read a digit of 10-16 pixels and hear a word in noise: 3 stages of width 16
# (the tiny model's 2 stages of width 8 do not learn either in this budget)
DIGITS_CNNS = [
    "model.visual_cnn.width=16",
    "model.visual_cnn.layers=[1,1,1]",
    "model.audio_cnn.width=16",
    "model.audio_cnn.layers=[1,1,1]",
    "model.audio_cnn.stem_stride=2",
]
SAMPLES_PER_SHARD = 32  # digit videos per shard; the timing tasks write videos // 32 per shard
SYNTHETIC_FRAMES = 32  # frames per timing-task video (4 s at 8 fps), cut into --clips clips


def model_overrides(args: argparse.Namespace) -> list[str]:
    """The model's size (the task's CNNs), then the `--set` overrides every variant shares."""
    return [
        f"model.hidden_size={args.hidden}",
        f"model.num_layers={args.layers}",
        "model.num_heads=4",
        f"model.ffn_size={2 * args.hidden}",
        *(DIGITS_CNNS if args.task == "digits" else []),
        *args.overrides,
    ]


def digits_spec(args: argparse.Namespace) -> DigitsSpec:
    """The digit videos' settings: the tool's defaults (6 s, 32 px, a new background and voice
    every second)."""
    return DigitsSpec(videos=args.videos)


def digits_root(args: argparse.Namespace, root: Path) -> Path:
    """Where the digit videos of these settings are packed (train/ and held_out/): named by their
    settings' digest, so a changed generator never reuses videos made by another."""
    return root / f"digits-{args.videos}-{args.test_videos}-{digits_spec(args).digest()}"


def data_overrides(args: argparse.Namespace, videos: int, seed: int, root: Path | None = None) -> list[str]:
    """The data of the training set (seed 0) or the held-out one (seed 1)."""
    if args.task == "digits":
        assert root is not None, "digit shards live under the benchmark's root"
        split = "train" if seed == 0 else "held_out"
        # Each digit video is exactly the window and its frames the crop: decoded once, kept
        # (~235 MB for 2,048), and the run is bitwise what decoding it every epoch gives.
        return [
            "data=shards",
            f"data.shards={digits_root(args, root) / split}",
            *DIGITS_DATA,
            "data.num_workers=1",
            "data.decoded_cache_mb=512",
        ]
    return [
        f"data.synthetic.task={args.task}",
        "data.synthetic.classes=32",
        f"data.synthetic.videos={videos}",
        "data.synthetic.seconds=4.0",
        f"data.synthetic.videos_per_shard={max(1, videos // SAMPLES_PER_SHARD)}",
        f"data.synthetic.seed={seed}",
        # The whole 4 s at 8 fps (32 frames), cut into `clips` tokens per modality.
        f"data.clips={args.clips}",
        f"data.frames_per_clip={SYNTHETIC_FRAMES // args.clips}",
        "data.fps=8",
    ]


def pretrain_overrides(args: argparse.Namespace, root: Path, variant: str, seed: int) -> list[str]:
    # Run dirs live under the experiment's name: digits runs under other learning defaults get their
    # own, so a run of these defaults never resumes one of theirs.
    experiment = f"pemt-evidence-{defaults_digest()}" if args.task == "digits" else "pemt-evidence"
    return [
        f"paths.root={root}",
        f"mlflow.experiment={experiment}",
        "mlflow.system_metrics=false",
        "gpus_per_node=1",
        f"seed={seed}",
        *data_overrides(args, args.videos, 0, root),
        *model_overrides(args),
        *VARIANTS[variant],
        f"train.max_steps={args.steps}",
        f"train.checkpoint_every={args.steps}",
        f"train.log_every={max(1, args.steps // 20)}",
        f"train.global_batch_size={args.batch}",
        f"train.warmup_steps={max(1, args.steps // 20)}",
        f"data.streams={streams(args)}",
    ]


def streams(args: argparse.Namespace) -> int:
    """Streams per run: 8, or one per shard where there are fewer (the quick run's 64 videos)."""
    return max(1, min(8, args.videos // SAMPLES_PER_SHARD))


def supervised_overrides(args: argparse.Namespace, root: Path, variant: str, seed: int) -> list[str]:
    """The same model, data and budget trained on the labels end to end (launch/finetune.py from a
    random initialisation), scored on the probes' held-out set: what the architecture can learn of
    the task in this budget when it is told the class."""
    held_out = (
        [f"eval.shards={digits_root(args, root) / 'held_out'}"]
        if args.task == "digits"
        else ["eval.seed=1", f"eval.synthetic_videos={args.test_videos}"]  # the probes' held-out videos
    )
    return [
        *pretrain_overrides(args, root, variant, seed),
        "task.name=long_av",
        *held_out,
        # trained on the labels at the rate its ceiling was measured at (digits: 85.5% held-out after
        # 600 steps at 1e-3), not at the pretraining default
        "train.lr=1e-3",
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


def run_outcome(root: Path, run_id: str) -> dict:
    """From the run's MLflow record: the objectives' last logged values and representation spreads
    (has it learned?) and what its collapse watch said (None: it never fired)."""
    from mlflow.tracking import MlflowClient

    from pemt.train.collapse import TAG

    data = MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(run_id).data
    losses = {k: v for k, v in data.metrics.items() if k.startswith(("loss_", "spread_", "pair_accuracy"))}
    return {"losses": losses, "collapse": data.tags.get(TAG)}


def _compose(overrides: list[str]):
    from pemt.config import compose_config

    return compose_config("pretrain", overrides=overrides)


def variant_config(args: argparse.Namespace, root: Path, variant: str):
    """The pretraining config a variant builds its model from (the task's data and sizes)."""
    return _compose([*data_overrides(args, args.videos, 0, root), *model_overrides(args), *VARIANTS[variant]])


def defaults_digest() -> str:
    """A digest of the default objectives and optimiser settings (`loss.*`, `train.lr`, its scale
    for the transformers and the optimiser's keys): rows pretrained under other defaults are not
    this build's rows."""
    import hashlib

    from omegaconf import OmegaConf

    cfg = _compose([])
    optimiser = ("lr", "transformer_lr_scale", "amsgrad", "weight_decay", "grad_clip")
    learned = {"loss": cfg.loss, **{k: cfg.train[k] for k in optimiser}}
    return hashlib.sha1(OmegaConf.to_yaml(OmegaConf.create(learned)).encode()).hexdigest()[:12]


def model_digest(args: argparse.Namespace, root: Path, variant: str) -> str:
    """A digest of the variant's resolved model config (the factorised layers' keys only where it
    factorises): a row built under other model defaults is not this build's row."""
    import hashlib

    from omegaconf import OmegaConf

    cfg = variant_config(args, root, variant)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(model, dict)
    if "factorized" not in model["sharing"]:
        model.pop("factorized", None)
    return hashlib.sha1(json.dumps(model, sort_keys=True).encode()).hexdigest()[:12]


def current_rows(args: argparse.Namespace, root: Path, rows: list[dict]) -> list[dict]:
    """The rows whose variant still builds the model they ran (a changed default, or a variant
    renamed or dropped, leaves a row in the file but out of the table and the done list)."""
    digests = {v: model_digest(args, root, v) for v in {r["variant"] for r in rows} if v in VARIANTS}
    return [r for r in rows if r.get("model") is not None and r.get("model") == digests.get(r["variant"])]


def make_data(args: argparse.Namespace, root: Path) -> None:
    """The digit videos, packed once per setting (the timing tasks are generated by the launches)."""
    if args.task != "digits":
        return
    from pemt.apps.make_av_digits import make_av_digits

    make_av_digits(digits_root(args, root), digits_spec(args), args.test_videos, samples_per_shard=SAMPLES_PER_SHARD)


def videos_of(args: argparse.Namespace, root: Path, videos: int, seed: int) -> dict:
    """Decoded clips and labels of the training (seed 0) or held-out (seed 1) set, decoded once."""
    task = TASKS[args.task]
    labels = (*task.labels, *(label for _, label in task.clip_labels))
    if args.task == "digits":
        cfg = _compose(data_overrides(args, videos, seed, root))
        folder = Path(cfg.data.shards)
        return decoded(folder, cfg.data, digits_root(args, root) / f"decoded-{videos}-{seed}.pt", labels)
    from pemt.data.synthetic import ensure_synthetic_shards

    cfg = _compose([f"paths.root={root}", *data_overrides(args, videos, seed)])
    folder = ensure_synthetic_shards(cfg)
    clips = "" if args.clips == 8 else f"-{args.clips}clips"
    return decoded(folder, cfg.data, root / f"decoded-{args.task}-{videos}-{seed}{clips}.pt", labels)


def probe_model(args: argparse.Namespace, root: Path, variant: str, seed: int, run_dir: Path | None) -> dict:
    """Probe accuracies (full and k-shot; full for every other label) of a pretrained run, or of a
    random initialisation."""
    import torch

    from pemt.model.factory import build_pretraining_model

    if run_dir is None:
        torch.manual_seed(seed)
        model = build_pretraining_model(variant_config(args, root, variant))
    else:
        from omegaconf import OmegaConf

        from pemt.train.export import consolidated_state

        weights, saved = consolidated_state(run_dir)
        model = build_pretraining_model(OmegaConf.create(saved["config"]))
        model.load_state_dict(weights, strict=True)
    task = TASKS[args.task]
    train, test = videos_of(args, root, args.videos, 0), videos_of(args, root, args.test_videos, 1)
    (train_x, *train_clips), (test_x, *test_clips) = features(model, train), features(model, test)
    main, *others = task.labels
    result = {"full": fit_probe(train_x, train[main], test_x, test[main], task.classes), "spread": spread(model, train)}
    for label in others:
        result[f"full {label}"] = fit_probe(train_x, train[label], test_x, test[label], task.classes)
    for shots in task.shots:
        result[f"{shots}-shot"] = few_shot(train_x, train[main], test_x, test[main], task.classes, shots)
    if task.clip_labels:
        for index, (modality, label) in enumerate(task.clip_labels):
            result[f"seconds {modality}"] = clip_probe(
                train_clips[index], train[label], test_clips[index], test[label], task.classes
            )
    return result


def transformer_params(args: argparse.Namespace, root: Path, variant: str) -> int:
    from pemt.model.factory import describe_counts

    cfg = variant_config(args, root, variant)
    return int(describe_counts(cfg)["transformers"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the task's defaults (or the quick run's settings) filled in."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=REPO / "outputs" / "sharing_quality")
    parser.add_argument("--task", choices=list(TASKS), default="digits")
    parser.add_argument("--steps", type=int, help="pretraining steps (default: the task's)")
    parser.add_argument("--batch", type=int, help="global batch (default: the task's)")
    parser.add_argument("--videos", type=int, help="pretraining (and probe training) videos")
    parser.add_argument("--test-videos", type=int, help="held-out videos")
    parser.add_argument(
        "--clips",
        type=int,
        default=8,
        choices=[8, 16, 32],
        help="timing tasks: clips (tokens per modality) per 4 s video; each token pools 4 s / clips of time",
    )
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="rows (default: the task's)")
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
    parser.add_argument(
        "--table-only", action="store_true", help="write the table and chart of the rows kept so far; run nothing"
    )
    args = parser.parse_args(argv)
    task = TASKS[args.task]
    for key in ("steps", "batch", "videos", "test_videos"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(task, key))
    args.variants = args.variants or list(task.variants)
    if args.quick:
        args.steps, args.videos, args.test_videos, args.seeds = 4, 64, 32 if args.task == "digits" else 64, [0]
        args.hidden, args.layers, args.batch, args.variants = 64, 2, 16, ["factorized r64"]
    return args


def table_settings(args: argparse.Namespace) -> dict:
    """What a row must have run under to be this table's: the task's sizes, the overrides and,
    for digits, the videos' generator settings and the learning defaults."""
    settings = {k: getattr(args, k) for k in ("task", "steps", "batch", "videos", "test_videos", "hidden", "layers")}
    # Only when given, so rows cached before these options existed still match.
    if args.overrides:
        settings["overrides"] = args.overrides
    if args.clips != 8:
        settings["clips"] = args.clips
    if args.task == "digits":  # rows of videos made by another generator are not reused
        settings["data"] = digits_spec(args).digest()
        # ... nor rows pretrained under other defaults of what is learned (objectives, optimiser)
        settings["defaults"] = defaults_digest()
    return settings


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    root, settings = args.root.resolve(), table_settings(args)
    out_stem = args.out / output_name(args)
    # The rows behind a committed table are read back too: a build continues on any machine
    rows = kept_rows([root / "rows.json", beside(out_stem, ".rows.json")], settings)
    if args.table_only:
        return write_table(args, root, settings, rows, out_stem)
    root.mkdir(parents=True, exist_ok=True)
    make_data(args, root)
    current = current_rows(args, root, rows)
    todo = [w for w in wanted_rows(args) if not any(row_key(r) == w for r in current)]
    for variant, seed, kind in tqdm(todo, desc="pretraining runs and probes"):
        row = {"variant": variant, "seed": seed, "random": kind == RANDOM, "settings": settings, "pretrain_s": 0.0}
        row["model"] = model_digest(args, root, variant)
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
                row |= run_outcome(root, row["run_id"])
            started = time.perf_counter()
            row["probe"] = probe_model(args, root, variant, seed, run_dir)
            row["probe_s"] = time.perf_counter() - started
        rows.append(row)
        save_rows(root / "rows.json", settings, rows)
        # the table as it stands after every row: an interrupted build leaves one to read
        write_table(args, root, settings, rows, out_stem, quiet=True)
    return write_table(args, root, settings, rows, out_stem)


def wanted_rows(args: argparse.Namespace) -> list[tuple[str, int, str]]:
    """(variant, seed, kind) of every row asked for, in the order they run."""
    wanted = [(v, s, PRETRAINED) for v in args.variants for s in args.seeds if PRETRAINED in args.rows]
    wanted += [(v, s, RANDOM) for v in RANDOM_OF if v in args.variants for s in args.seeds if RANDOM in args.rows]
    return wanted + [(v, s, SUPERVISED) for v in args.variants for s in args.seeds if SUPERVISED in args.rows]


def kept_rows(files: list[Path], settings: dict) -> list[dict]:
    """The rows of these settings kept in any of `files`, each (variant, seed, kind) once per model."""
    rows: dict[tuple, dict] = {}
    for path in files:
        for row in cached_rows(path, settings):
            rows.setdefault((*row_key(row), row.get("model")), row)
    return list(rows.values())


def beside(stem: Path, suffix: str) -> Path:
    return stem.parent / f"{stem.name}{suffix}"  # not with_suffix: names hold values such as lr-0.0001


def write_table(
    args: argparse.Namespace, root: Path, settings: dict, rows: list[dict], out_stem: Path, quiet: bool = False
) -> int:
    """`<out_stem>.md`, `.png` and `.rows.json`: the table of the asked variants and seeds (with any
    supervised row of theirs that is kept: the gate's ceiling) and the rows still to run, the chart,
    and every row of these settings (those of other model defaults too: kept, not shown)."""
    params = {v: transformer_params(args, root, v) for v in args.variants}
    current = current_rows(args, root, rows)
    shown = [r for r in current if r["variant"] in args.variants and r["seed"] in args.seeds]
    missing = [w for w in wanted_rows(args) if not any(row_key(r) == w for r in current)]
    table = render(shown, args, params, TASKS[args.task], missing)
    if not quiet:
        print(table)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    beside(out_stem, ".md").write_text(table)
    plot(shown, args, params, TASKS[args.task], beside(out_stem, ".png"))
    save_rows(beside(out_stem, ".rows.json"), settings, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
