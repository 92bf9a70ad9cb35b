"""Downstream dataset layouts -> shards: small fabricated folders in each dataset's real layout."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from conftest import make_charades, write_video, write_wav
from pemt.data.adapters import LayoutError, charades, esc50, kinetics_sounds, ucf101, write_dataset
from pemt.data.decode import ClipSpec
from pemt.data.loader import decode_sample

SPEC = ClipSpec(
    clips=2, frames_per_clip=2, fps=4, crop=16, sample_rate=16000, mel_bins=16, mel_window_ms=25, mel_hop_ms=10
)


def shard_samples(folder: Path) -> dict[str, dict]:
    """key -> {member: bytes} of every sample in a shard folder."""
    samples: dict[str, dict] = {}
    for tar in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(tar) as handle:
            for member in handle.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = handle.extractfile(member).read()
    return samples


def labels_of(folder: Path) -> dict[str, dict]:
    return {key: json.loads(s["json"]) for key, s in shard_samples(folder).items()}


def test_ucf101_layout_to_labelled_splits(tmp_path: Path) -> None:
    root = tmp_path / "UCF101"
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 HandstandPushups\n")
    # The real lists spell one class folder differently from the class index: case is ignored.
    (lists / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n"
        "HandStandPushups/v_HandStandPushups_g08_c01.avi 2\n"
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g09_c01.avi 1\n"
    )
    (lists / "testlist01.txt").write_text("HandstandPushups/v_HandstandPushups_g01_c01.avi\n")
    write_video(root / "UCF-101" / "ApplyEyeMakeup" / "v_ApplyEyeMakeup_g08_c01.avi", 0)
    write_video(root / "UCF-101" / "HandstandPushups" / "v_HandStandPushups_g08_c01.avi", 1)
    write_video(root / "UCF-101" / "HandstandPushups" / "v_HandstandPushups_g01_c01.avi", 2)
    # v_ApplyEyeMakeup_g09_c01 is listed but absent.

    dataset = ucf101(root, split=1)
    manifests = write_dataset(dataset, tmp_path / "out", samples_per_shard=1, progress=False)

    assert manifests["train"]["classes"] == ["ApplyEyeMakeup", "HandstandPushups"]
    assert manifests["train"]["samples"] == 2 and manifests["test"]["samples"] == 1
    train = labels_of(tmp_path / "out" / "train")
    assert sorted(m["label"] for m in train.values()) == [0, 1]
    assert [m["label"] for m in labels_of(tmp_path / "out" / "test").values()] == [1]
    missing = (tmp_path / "out" / "missing.jsonl").read_text()
    assert "v_ApplyEyeMakeup_g09_c01" in missing and "trainlist01.txt" in missing


def test_ucf101_errors_name_the_file_and_line(tmp_path: Path) -> None:
    lists = tmp_path / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\n")
    (lists / "trainlist01.txt").write_text("Archery/v_Archery_g01_c01.avi 2\n")
    (lists / "testlist01.txt").write_text("")
    with pytest.raises(LayoutError, match=r"trainlist01.txt:1: class folder 'Archery' is not in"):
        ucf101(tmp_path)
    with pytest.raises(LayoutError, match="no classInd.txt found"):
        ucf101(tmp_path / "nowhere")


def test_esc50_folds_and_audio_only_samples(tmp_path: Path) -> None:
    root = tmp_path / "ESC-50-master"
    (root / "meta").mkdir(parents=True)
    rows = [("1-100-A-0.wav", 1, 0, "dog"), ("2-100-A-1.wav", 2, 1, "rooster"), ("3-101-A-0.wav", 1, 0, "dog")]
    (root / "meta" / "esc50.csv").write_text(
        "filename,fold,target,category,esc10,src_file,take\n"
        + "".join(f"{f},{fold},{t},{c},True,100,A\n" for f, fold, t, c in rows)
    )
    for filename, *_ in rows:
        write_wav(root / "audio" / filename)

    manifests = write_dataset(esc50(root, split=1), tmp_path / "out", samples_per_shard=2, progress=False)

    assert manifests["test"]["samples"] == 2 and manifests["train"]["samples"] == 1
    assert manifests["test"]["classes"] == ["dog", "rooster"]
    sample = next(iter(shard_samples(tmp_path / "out" / "train").values()))
    assert "wav" in sample and "mp4" not in sample
    decoded = decode_sample(sample, SPEC, window_seed=None)
    assert decoded["label"] == 1 and decoded["labels"] == [1]
    assert decoded["audio"].shape[:3] == (2, 1, 16) and decoded["audio"].std() > 0
    assert decoded["video"].abs().sum() == 0, "a sound alone gets black frames"


def test_kinetics_sounds_subset_and_clip_names(tmp_path: Path) -> None:
    root = tmp_path / "kinetics"
    (root / "annotations").mkdir(parents=True)
    header = "label,youtube_id,time_start,time_end,split\n"
    (root / "annotations" / "train.csv").write_text(
        header + "playing drums,abc123,10,20,train\nbowling,def456,0,10,train\nsinging,zzz999,5,15,train\n"
    )
    (root / "annotations" / "validate.csv").write_text(header + "bowling,ghi789,30,40,val\n")
    write_video(root / "train" / "playing drums" / "abc123_000010_000020.mp4", 0)
    write_video(root / "train" / "bowling" / "def456_000000_000010.mp4", 1)
    write_video(root / "train" / "singing" / "zzz999_000005_000015.mp4", 2)
    write_video(root / "val" / "bowling" / "ghi789.mp4", 3)  # named by id alone
    classes = tmp_path / "kinetics_sounds.txt"
    classes.write_text("bowling\nplaying drums\n")  # singing is outside the subset

    manifests = write_dataset(kinetics_sounds(root, classes), tmp_path / "out", samples_per_shard=4, progress=False)

    assert manifests["train"]["classes"] == ["bowling", "playing drums"]
    train = labels_of(tmp_path / "out" / "train")
    assert sorted((m["source"].split("/")[-1], m["label"]) for m in train.values()) == [
        ("abc123_000010_000020.mp4", 1),
        ("def456_000000_000010.mp4", 0),
    ]
    assert [m["label"] for m in labels_of(tmp_path / "out" / "val").values()] == [0]


def test_charades_is_multi_label(tmp_path: Path) -> None:
    make_charades(tmp_path / "charades")
    dataset = charades(tmp_path / "charades")
    manifests = write_dataset(dataset, tmp_path / "out", samples_per_shard=2, progress=False)

    assert manifests["train"]["multi_label"] is True and len(manifests["train"]["classes"]) == 3
    test = {m["source"].split("/")[-1]: m for m in labels_of(tmp_path / "out" / "test").values()}
    assert test["YSKX3.mp4"]["labels"] == [0, 1]
    assert test["ZZZZ1.mp4"]["labels"] == [2]
    assert "labels" not in test["QQQQ2.mp4"], "a video without actions has no labels"


def test_charades_unknown_action_names_file_and_line(tmp_path: Path) -> None:
    make_charades(tmp_path / "charades")
    table = tmp_path / "charades" / "Charades" / "Charades_v1_train.csv"
    table.write_text(table.read_text().replace("c001 2.0 4.0", "c157 2.0 4.0"))
    with pytest.raises(LayoutError, match=r"Charades_v1_train.csv:3: action 'c157' is not in"):
        charades(tmp_path / "charades")


def test_make_downstream_tool_reports_a_wrong_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_downstream import main

    assert main(["esc50", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "no esc50.csv found" in capsys.readouterr().err
