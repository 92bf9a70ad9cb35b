"""What the quality benchmarks share about probing a frozen model: a shard folder decoded once into
tensors, the model's features, how much they differ between videos, and linear probes (full and
k-shot) scored on a held-out set."""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

import torch

CLIP_PROBE_TRAIN = 6144  # training clips a per-clip probe is fit on (1024 six-second videos)


def decoded(folder: Path, data_cfg: Any, cache: Path, labels: tuple[str, ...] = ("label",)) -> dict[str, Any]:
    """Every sample of a shard folder, decoded as evaluation decodes it (centred window and crop),
    with the metadata fields `labels` as tensors; kept in `cache` (a .pt file) once decoded."""
    if cache.exists():
        kept = dict(torch.load(cache, weights_only=True))
        if all(name in kept for name in labels):
            return kept  # else decoded again, with the labels it lacks
    import json

    from tqdm import tqdm

    from pemt.data.loader import clip_spec, decode_sample
    from pemt.data.members import member_bytes
    from pemt.data.shards import read_manifest
    from pemt.data.stream import shard_samples

    spec = clip_spec(data_cfg)
    videos, sounds, fields = [], [], {name: [] for name in labels}  # type: ignore[var-annotated]
    entries = read_manifest(folder)
    samples = [s for e in entries for s, _ in shard_samples(str(folder / e["name"]), int(e["samples"]))]
    for sample in tqdm(samples, desc=f"decoding {folder.name}", leave=False):
        clips = decode_sample(sample, spec, window_seed=None)
        meta = json.loads(member_bytes(sample["json"]))
        videos.append(clips["video"])
        sounds.append(clips["audio"])
        for name in labels:
            fields[name].append(meta[name])  # a class, or one per clip (digits: shown, spoken)
    out = {"video": torch.stack(videos), "audio": torch.stack(sounds)}
    out.update({name: torch.tensor(values) for name, values in fields.items()})
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = cache.with_suffix(f".partial-{os.getpid()}")  # whole or not at all, whoever else decodes it
    torch.save(out, staging)
    staging.rename(cache)
    return out


def forward(backbone: Any, video: torch.Tensor, audio: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Clip embeddings of both modalities and the multimodal transformer's output, frozen."""
    from pemt.data.decode import video_to_float

    with torch.no_grad():
        visual, sound = backbone.embed_clips(video_to_float(video, "cpu", torch.float32), audio)
        visual_out = backbone.contextualise("visual", visual)[:, 1:]
        audio_out = backbone.contextualise("audio", sound)[:, 1:]
        return visual, sound, backbone.fuse(visual_out, audio_out)


def clip_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, classes: int
) -> float:
    """Top-1 (%) of a probe of each clip's own label ((videos, clips)) from its own features
    ((videos, clips, D)): does the model tell what happens in each second? At most CLIP_PROBE_TRAIN
    training clips."""
    return fit_probe(
        train_x.flatten(0, 1)[:CLIP_PROBE_TRAIN],
        train_y.flatten()[:CLIP_PROBE_TRAIN],
        test_x.flatten(0, 1),
        test_y.flatten(),
        classes,
    )


def features(model: Any, data: dict[str, Any], batch: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frozen model's features per video (the fused BOS output and the mean fused visual and
    audio outputs, concatenated), and from the same pass its CNNs' embedding of every clip: visual
    and audio, each (videos, clips, hidden)."""
    outs, visual_clips, audio_clips = [], [], []
    model.eval()
    for i in range(0, len(data["video"]), batch):
        visual, sound, fused = forward(model.backbone, data["video"][i : i + batch], data["audio"][i : i + batch])
        length = visual.shape[1]
        outs.append(torch.cat([fused[:, 0], fused[:, 1 : 1 + length].mean(1), fused[:, 2 + length :].mean(1)], 1))
        visual_clips.append(visual)
        audio_clips.append(sound)
    return torch.cat(outs), torch.cat(visual_clips), torch.cat(audio_clips)


def across(x: torch.Tensor) -> float:
    """How much x (videos first) differs between videos: the standard deviation across videos relative
    to the RMS (near 0: every video looks alike to the objectives and the probe)."""
    x = x.flatten(1)
    return float(x.std(0).mean() / x.square().mean().sqrt())


def spread(model: Any, data: dict[str, Any], count: int = 64) -> dict[str, float]:
    """How much the frozen model's clip embeddings and fused BOS output differ between videos
    (`across`), and across the clips of one video for the visual embeddings."""
    model.eval()
    visual, audio, fused = forward(model.backbone, data["video"][:count], data["audio"][:count])
    return {
        "visual clips": across(visual),
        "audio clips": across(audio),
        "visual clips within a video": float(visual.std(1).mean() / visual.square().mean().sqrt()),
        "fused BOS": across(fused[:, 0]),
    }


def fit_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    classes: int,
    weight_decay: float = 1e-3,
) -> float:
    """Top-1 (%) of a multinomial logistic regression on standardised features."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    linear = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train_x), train_y) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)  # type: ignore[arg-type]
    with torch.no_grad():
        return 100.0 * float((linear(test_x).argmax(1) == test_y).float().mean())


def few_shot(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    classes: int,
    shots: int,
    draws: int = 3,
) -> float:
    """Mean top-1 (%) of probes fit on `shots` training videos per class (`draws` fixed draws)."""
    scores = []
    for draw in range(draws):
        generator = torch.Generator().manual_seed(1000 * shots + draw)
        chosen = torch.cat(
            [
                torch.nonzero(train_y == c).squeeze(1)[
                    torch.randperm(int((train_y == c).sum()), generator=generator)[:shots]
                ]
                for c in range(classes)
            ]
        )
        scores.append(fit_probe(train_x[chosen], train_y[chosen], test_x, test_y, classes))
    return statistics.mean(scores)
