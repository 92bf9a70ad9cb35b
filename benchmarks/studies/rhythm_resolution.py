"""How much of the `rhythm` task's class can tokens keep that each pool a clip's time?

    python benchmarks/rhythm_resolution.py [--videos 3000]

The class of a `rhythm` video is the (shape, tone) pair that beats together (0.8-2.4 Hz, on for half
of each beat) beside a decoy shape and a decoy tone at tempi of their own. The model sees a 4 s video
as `data.clips` tokens per modality, each pooled over its clip's time (the visual CNN's frames at
8 fps, the audio CNN's spectrogram), so a token keeps how much of its clip a beat was on, not when.
This measures what survives that pooling, without any model: an ideal observer that knows which
corner holds which shape and which pitch is which, sees each beat's per-clip on-fraction (plus
Gaussian noise of sd `noise` times the beat's on/off swing, standing in for everything else a token
carries), and picks the pair of series that correlate best. With 2 shapes and 2 tones on screen it
picks among 4 pairs (25% by chance). The draws are the generator's own (`draw_rhythm`).
Writes benchmarks/results/rhythm_resolution.{md,png}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
SECONDS, FPS, AUDIO_RATE = 4.0, 8, 1600  # the study's window; audio sampled finely enough for on-fractions
CLIPS = (8, 16, 32)
NOISE = (0.0, 0.1, 0.2)
BANDS = ((0.8, 1.2), (1.2, 1.6), (1.6, 2.0), (2.0, 2.4))


def on_fractions(on: np.ndarray, clips: int) -> np.ndarray:
    """Per-clip share of samples during which a beat is on: what a token pooled over its clip keeps."""
    return on.reshape(clips, -1).mean(1)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / norm if norm > 0 else 0.0


def observe(videos: int, clips: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per video: whether the observer picked the pair, the pair's tempo, and the share of the beat's
    swing the pair's visual tokens keep (their sd over the beat's own sd, 0.5)."""
    from pemt.data.synthetic import SyntheticSpec, draw_rhythm, rhythm_rng

    spec = SyntheticSpec(videos=videos, classes=32, seconds=SECONDS, task="rhythm", seed=seed)
    frame_times = np.arange(int(SECONDS * FPS)) / FPS
    audio_times = (np.arange(int(SECONDS * AUDIO_RATE)) + 0.5) / AUDIO_RATE
    noise_rng = np.random.default_rng([seed, clips, int(noise * 1000)])
    right, tempo, kept = np.zeros(videos, bool), np.zeros(videos), np.zeros(videos)
    for index in range(videos):
        draw = draw_rhythm(rhythm_rng(spec, index), spec.classes)
        shapes = [on_fractions(draw.lit(which, frame_times), clips) for which in (0, 1)]  # the pair's, the decoy's
        tones = [on_fractions(draw.lit(which, audio_times), clips) for which in (0, 2)]
        kept[index] = shapes[0].std() / 0.5
        shapes = [x + noise * noise_rng.standard_normal(clips) for x in shapes]
        tones = [x + noise * noise_rng.standard_normal(clips) for x in tones]
        scores = [correlation(s, t) for s in shapes for t in tones]
        right[index], tempo[index] = int(np.argmax(scores)) == 0, draw.tempi[0]
    return right, tempo, kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from tqdm import tqdm

    results = {}
    for clips, noise in tqdm([(c, n) for n in NOISE for c in CLIPS], desc="settings"):
        results[clips, noise] = observe(args.videos, clips, noise)
    band_names = [f"{lo}-{hi} Hz" for lo, hi in BANDS]
    lines = [
        "# The rhythm task through clip tokens: what an ideal observer can still bind\n",
        f"`python benchmarks/rhythm_resolution.py --videos {args.videos}`: the generator's draws for "
        f"{args.videos} videos (seed 0), {SECONDS:.0f} s at {FPS} fps. Cells: % of videos where the observer "
        "picks the pair (chance 25%); in brackets, the share of the beat's on/off swing the pair's visual "
        "tokens keep.\n",
        "| clips | s per token | noise | all | " + " | ".join(band_names) + " |",
        "|---:|---:|---:|---:|" + "---:|" * len(BANDS),
    ]
    for noise in NOISE:
        for clips in CLIPS:
            right, tempo, kept = results[clips, noise]
            cells = []
            for lo, hi in BANDS:
                band = (tempo >= lo) & (tempo < hi)
                cells.append(f"{100 * right[band].mean():.0f} ({kept[band].mean():.2f})")
            lines.append(
                f"| {clips} | {SECONDS / clips:.3f} | {noise} | {100 * right.mean():.1f} | " + " | ".join(cells) + " |"
            )
    table = "\n".join(lines) + "\n"
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rhythm_resolution.md").write_text(table)
    plot(results, args.out / "rhythm_resolution.png")
    return 0


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(0.8, 2.4, 17)
    fig, ax = plt.subplots(figsize=(7, 4))
    for (clips, noise), (right, tempo, _) in sorted(results.items()):
        if noise != 0.1:
            continue
        which = np.clip(np.digitize(tempo, edges) - 1, 0, len(edges) - 2)
        share = [100 * right[which == b].mean() if (which == b).any() else np.nan for b in range(len(edges) - 1)]
        ax.plot((edges[:-1] + edges[1:]) / 2, share, marker="o", label=f"{clips} clips ({SECONDS / clips:.3g} s each)")
    ax.axhline(25, color="grey", linestyle=":", label="chance (4 pairs)")
    ax.set(xlabel="the pair's tempo (Hz)", ylabel="ideal observer picks the pair (%)", ylim=(0, 105))
    ax.set_title("rhythm task: what tokens pooled over a clip keep (noise 0.1)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
