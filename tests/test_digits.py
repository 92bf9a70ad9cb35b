"""Spoken and handwritten digits: what a video holds, held-out splits that share nothing with
training, and real mp4 shards the normal loader reads."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pemt.data.digits import (
    DigitsSpec,
    MissingSpeech,
    check_espeak,
    digit_images,
    draw_video,
    images_of,
    render_frames,
    video_rng,
    voice_variants,
    voices_of,
)

SMALL_SET = ["--videos", "6", "--held-out", "4", "--seconds", "6", "--size", "32", "--samples-per-shard", "2"]


def test_held_out_videos_use_images_and_voices_no_training_video_uses() -> None:
    train, held = images_of("train"), images_of("held_out")
    for digit in range(10):
        assert not set(train[digit]) & set(held[digit])
        assert len(held[digit]) > 10 and len(train[digit]) > 3 * len(held[digit])
    _, targets = digit_images()
    assert sum(len(v) for v in train.values()) + sum(len(v) for v in held.values()) == len(targets)
    assert all((targets[train[d]] == d).all() for d in range(10))
    assert not set(voices_of("train")) & set(voices_of("held_out"))
    assert sorted(voices_of("train") + voices_of("held_out")) == sorted(voice_variants())


@pytest.mark.parametrize("seconds", [6, 8])
def test_a_video_shows_and_says_its_majority_most_often_and_shows_one_digit_it_never_says(seconds: int) -> None:
    spec = DigitsSpec(seconds=seconds)
    for index in range(20):
        video = draw_video(spec, np.random.default_rng([0, 0, index]))
        shown, spoken = Counter(video.shown), Counter(video.spoken)
        assert len(video.shown) == len(video.spoken) == seconds
        assert shown.most_common(1)[0] == (video.majority, spec.repeats) == spoken.most_common(1)[0]
        assert shown.most_common(2)[1][1] == 1 and spoken.most_common(2)[1][1] == 1, "one majority"
        assert video.unspoken in shown and video.unspoken not in spoken
        # every other second shows what it says, so matched audio and video agree but for one second
        assert sum(a != b for a, b in zip(video.shown, video.spoken)) == 1
        assert all(voice.split("+")[1] in voices_of("train") for voice in video.voices)


def test_the_background_and_voice_change_every_second_unless_asked_to_stay_through_the_video() -> None:
    """With a new background and voice each second, only the digits tie a video's seconds together
    (with one per video, pretraining learned those instead of the digits)."""
    for nuisance, changes in (("second", True), ("video", False)):
        spec = DigitsSpec(seconds=6, nuisance=nuisance)
        rng = video_rng(spec, 0)
        video = draw_video(spec, rng)
        frames = render_frames(spec, video, rng).astype(np.float32)
        # the background's colour: a low percentile of each second's pixels (digits and distractors
        # are drawn brighter than any background, and a digit may cover half the frame)
        colours = np.stack(
            [np.percentile(frames[s * spec.fps : (s + 1) * spec.fps].reshape(-1, 3), 20, 0) for s in range(6)]
        )
        step = np.abs(np.diff(colours, axis=0)).mean(1)
        assert (step.mean() > 8) if changes else (step.max() < 5), (nuisance, step)
        assert (len(set(video.voices)) > 2) == changes, video.voices
    with pytest.raises(ValueError, match="nuisance='hour'"):
        DigitsSpec(nuisance="hour")


def test_the_digits_side_and_the_clutter_are_settings_and_bad_ones_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pemt.apps.make_av_digits import main

    def bright_pixels(spec: DigitsSpec) -> float:
        """Pixels per frame far above the background: the digit's and the distractors' strokes."""
        rng = video_rng(spec, 0)
        frames = render_frames(spec, draw_video(spec, rng), rng).astype(np.float32).mean(-1)
        background = np.percentile(frames.reshape(len(frames), -1), 20, 1)[:, None, None]
        return float((frames > background + 50).sum((1, 2)).mean())

    small, large = DigitsSpec(digit_px=(8, 8), clutter=0), DigitsSpec(digit_px=(24, 24), clutter=0)
    assert bright_pixels(large) > 4 * bright_pixels(small) > 0
    assert bright_pixels(DigitsSpec(digit_px=(8, 8), clutter=4)) > 2 * bright_pixels(small)
    for bad, named in ((["--clutter", "-1"], "clutter=-1"), (["--digit-px", "20", "40"], "digit_px=(20, 40)")):
        with pytest.raises(SystemExit) as refused:
            main([str(tmp_path / "set"), *SMALL_SET, *bad])
        assert refused.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "set").exists(), "nothing is made for refused settings"


def test_a_missing_espeak_is_named_with_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(MissingSpeech, match="make speech"):
        check_espeak()


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pemt.apps.make_av_digits import main

    out = tmp_path_factory.mktemp("digits") / "set"
    main([str(out), *SMALL_SET])
    return out


def test_make_av_digits_packs_real_videos_the_loader_reads(digits: Path) -> None:
    import torch

    from pemt.config import compose_config
    from pemt.data.loader import clip_spec, decode_sample
    from pemt.data.members import member_bytes
    from pemt.data.shards import read_manifest
    from pemt.data.stream import shard_samples

    cfg = compose_config("pretrain", ["data.clips=6", "data.frames_per_clip=2", "data.fps=2", "data.crop=32"])
    voices = {}
    for split, count in (("train", 6), ("held_out", 4)):
        manifest = json.loads((digits / split / "manifest.json").read_text())
        assert manifest["samples"] == count and manifest["classes"][7] == "seven"
        shards = [str(digits / split / e["name"]) for e in read_manifest(digits / split)]
        samples = [sample for shard in shards for sample, _ in shard_samples(shard, 2)]
        assert len(samples) == count
        for sample in samples:
            meta = json.loads(member_bytes(sample["json"]))
            clips = decode_sample(sample, clip_spec(cfg.data), window_seed=None)
            assert clips["video"].shape == (6, 3, 2, 32, 32) and clips["video"].dtype == torch.uint8
            assert clips["audio"].shape[:2] == (6, 1) and torch.isfinite(clips["audio"]).all()
            assert clips["label"] == meta["majority"] and meta["unspoken"] in meta["shown"]
            assert clips["video"].float().std() > 10, "frames with content"
            voices.setdefault(split, set()).update(voice.split("+")[1] for voice in meta["voices"])
    assert not voices["train"] & voices["held_out"]
    assert not (digits / "videos").exists(), "the mp4 files are removed once packed"


def test_make_av_digits_keeps_a_finished_set_and_refuses_other_settings(digits: Path) -> None:
    from pemt.apps.make_av_digits import main

    before = {p: p.stat().st_mtime for p in (digits / "train").glob("*.tar")}
    main([str(digits), *SMALL_SET])
    assert {p: p.stat().st_mtime for p in (digits / "train").glob("*.tar")} == before
    with pytest.raises(SystemExit) as refused:
        main([str(digits), "--videos", "8", "--held-out", "4", "--seconds", "6", "--size", "32"])
    assert refused.value.code == 2
    # the same settings, made by an older generator (other videos): refused too, not reused
    done = digits / "digits.json"
    recorded = done.read_text()
    try:
        done.write_text(
            json.dumps({**json.loads(recorded), "specs": {**json.loads(recorded)["specs"], "generator": 1}})
        )
        with pytest.raises(SystemExit) as refused:
            main([str(digits), *SMALL_SET])
        assert refused.value.code == 2
    finally:
        done.write_text(recorded)


def test_an_interrupted_make_av_digits_keeps_the_videos_it_wrote(tmp_path: Path) -> None:
    from pemt.apps.make_av_digits import write_split

    spec = DigitsSpec(videos=3, seconds=6, size=32)
    folder = tmp_path / "videos" / "train"
    folder.mkdir(parents=True)
    listing = write_split(spec, folder, processes=1, progress=False)
    entries = [json.loads(line) for line in listing.read_text().splitlines()]
    assert [e["id"] for e in entries] == [f"digits-train-{i:06d}" for i in range(3)]
    assert all((listing.parent / e["path"]).stat().st_size > 1000 for e in entries)
    # interrupted before its list was written: the videos on disk are kept, the rest written
    listing.unlink()
    os.utime(folder / "digits-train-000000.mp4", (1, 1))
    (folder / "digits-train-000002.mp4").unlink()
    assert write_split(spec, folder, processes=1, progress=False) == listing
    assert (folder / "digits-train-000000.mp4").stat().st_mtime == 1, "not written again"
    assert (folder / "digits-train-000002.mp4").exists()
    assert [json.loads(line) for line in listing.read_text().splitlines()] == entries
