"""Spoken and handwritten digits: a real audio-visual task where what binds the two modalities is
content (which digit), not timing.

Each second of a video shows one handwritten digit (scikit-learn's bundled 8x8 digits, drawn by
default at half to three quarters of the frame's side, moving, at a random place and scale beside a
stroke-like distractor on a noisy background) while the same digit is spoken (espeak-ng, voice,
speed and pitch varied) at a random offset inside the second, over noise and the babble of other
voices saying other words. With `nuisance="second"` (the default) the background and the voice
change every second: nothing but the digits is shared by a video's seconds, so an objective that
predicts one second from the others, or tells a video's sound from another's, can only succeed by
reading and hearing digits. With `nuisance="video"` they stay fixed through a video, and
pretraining learns them instead of the digits (benchmarks/results/sharing_quality_digits_gate.md).

One digit (the `majority`) is shown and spoken in `repeats` of the seconds, the others once each;
in one other second the picture shows a digit that is never spoken while the voice says another:

- `majority`: the digit shown and spoken most often: either modality tells it, if the model can
  read digits among distractors or hear them in noise (the task's main label);
- `unspoken`: the digit shown but never spoken: only the two modalities together tell it.

Held-out videos use digit images and voices that no training video uses (`split`). Everything is
deterministic from the seed (and the installed espeak-ng's voices).
"""

from __future__ import annotations

import functools
import hashlib
import io
import shutil
import subprocess
import wave
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from pemt.data.synthetic import encode_mp4

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Babble: other voices saying words that are not digits, under the speaker.
BABBLE_WORDS = (
    "river", "yellow", "market", "window", "garden", "paper", "silver", "morning", "table", "basket",
    "orange", "pocket", "little", "winter", "candle", "hello", "bottle", "forest", "button", "middle",
)  # fmt: skip
# English accents espeak-ng ships; each combines with every voice variant.
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
SPLITS = ("train", "held_out")
# Changed whenever the same settings would make other videos: a set made by another version is
# never taken for this one's.
GENERATOR_VERSION = 2
NUISANCES = ("second", "video")  # how often the background and the voice change
HELD_OUT_SHARE = 0.2  # of the digit images and of the voice variants
ESPEAK = "espeak-ng"


class MissingSpeech(RuntimeError):
    """espeak-ng is not installed."""


@dataclass(frozen=True)
class DigitsSpec:
    """How the videos are made. `seconds` digits per video, one a second."""

    videos: int = 256
    split: str = "train"  # train | held_out: which digit images and voices the videos use
    seed: int = 0
    seconds: int = 6
    fps: int = 8
    size: int = 32  # frame side in pixels
    sample_rate: int = 16000
    # seconds in which the majority digit is shown and spoken; 4 of 6 lift a random
    # initialisation's probe from 41% to 64% (benchmarks/results/sharing_quality_digits_gate.md)
    repeats: int = 3
    # How hard reading and hearing are. At (12, 18) px, 2 distractors and 5-15 dB the CNNs' InfoNCE
    # left chance only after 200-330 of 600 steps when each video comes once per epoch; at these it
    # starts at ~100 and the CNN warm-up ends at 134-243 (benchmarks/results/sharing_quality_digits_gate.md)
    digit_px: tuple[int, int] = (16, 24)  # side of a drawn digit, drawn uniformly in this range
    clutter: int = 1  # stroke-like distractors on screen each second
    snr_db: tuple[float, float] = (10.0, 20.0)  # speech over noise and babble, uniformly in this range
    babble_voices: int = 1
    nuisance: str = "second"  # second | video: a new background and voice every second, or one per video

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r}: choose one of {', '.join(SPLITS)}")
        if self.nuisance not in NUISANCES:
            raise ValueError(f"nuisance={self.nuisance!r}: choose one of {', '.join(NUISANCES)}")
        if self.seconds < self.repeats + 2 or self.seconds - self.repeats + 1 > len(WORDS):
            raise ValueError(
                f"seconds={self.seconds}, repeats={self.repeats}: a video needs the majority's {self.repeats} "
                f"seconds, one second with an unspoken digit and the other digits once each (at most 10 digits)"
            )
        if not 2 <= self.digit_px[0] <= self.digit_px[1] <= self.size:
            raise ValueError(f"digit_px={self.digit_px}: give a range of sides within the frame ({self.size})")
        if self.clutter < 0:
            raise ValueError(f"clutter={self.clutter}: give a number of distractors, 0 or more")

    def digest(self) -> str:
        described = (GENERATOR_VERSION, sorted(asdict(self).items()))
        return hashlib.sha1(repr(described).encode()).hexdigest()[:12]


def check_espeak() -> str:
    """The espeak-ng executable, or MissingSpeech saying how to install it."""
    found = shutil.which(ESPEAK)
    if found is None:
        raise MissingSpeech(
            "espeak-ng is not installed; it speaks the digits. Install it with `make speech` "
            "(Debian/Ubuntu: apt-get install espeak-ng)"
        )
    return found


def _stable_share(name: str) -> float:
    """A number in [0, 1) fixed by `name`: which split a digit image or voice belongs to."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 2**32


@functools.cache
def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits: (1797, 8, 8) in [0, 1] and their digits."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def images_of(split: str) -> dict[int, np.ndarray]:
    """Per digit, the indices of the images of `split` (a fixed fifth of each digit's images is
    held out)."""
    _, targets = digit_images()
    held = np.array([_stable_share(f"image-{i}") < HELD_OUT_SHARE for i in range(len(targets))])
    chosen = held if split == "held_out" else ~held
    return {d: np.nonzero(chosen & (targets == d))[0] for d in range(len(WORDS))}


@functools.cache
def voice_variants() -> tuple[str, ...]:
    """espeak-ng's voice variants (`-v <accent>+<variant>`), as the installed version lists them."""
    listing = subprocess.run([check_espeak(), "--voices=variant"], capture_output=True, text=True, check=True).stdout
    names = [line.split()[4].removeprefix("!v/") for line in listing.splitlines()[1:] if len(line.split()) >= 5]
    if not names:
        raise MissingSpeech(f"`{ESPEAK} --voices=variant` listed no voice variants")
    return tuple(sorted(names))


def voices_of(split: str) -> list[str]:
    """Voice variants of `split`: a fixed fifth of them is heard only in held-out videos."""
    held = [v for v in voice_variants() if _stable_share(f"voice-{v}") < HELD_OUT_SHARE]
    return held if split == "held_out" else [v for v in voice_variants() if v not in held]


@functools.lru_cache(maxsize=4096)
def speak(text: str, voice: str, words_per_minute: int, pitch: int, sample_rate: int, trim: bool = True) -> np.ndarray:
    """espeak-ng saying `text`, at `sample_rate`, peak 1; `trim`: without the silence around it."""
    done = subprocess.run(
        [check_espeak(), "-v", voice, "-s", str(words_per_minute), "-p", str(pitch), "--stdout", text],
        capture_output=True,
        check=True,
    )
    with wave.open(io.BytesIO(done.stdout)) as wav:
        rate = wav.getframerate()
        samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype=np.int16).astype(np.float32)
    loud = np.nonzero(np.abs(samples) > 0.02 * max(1.0, float(np.abs(samples).max())))[0]
    if trim and len(loud):
        samples = samples[loud[0] : loud[-1] + 1]
    times = np.arange(int(len(samples) * sample_rate / rate)) * rate / sample_rate
    resampled: np.ndarray = np.interp(times, np.arange(len(samples)), samples)
    peak = max(1e-6, float(np.abs(resampled).max())) if len(resampled) else 1.0
    return (resampled / peak).astype(np.float32)


@dataclass(frozen=True)
class DigitsVideo:
    """What one video holds, second by second, and its labels."""

    shown: tuple[int, ...]
    spoken: tuple[int, ...]
    majority: int
    unspoken: int
    voices: tuple[str, ...]  # each second's

    def labels(self) -> dict[str, Any]:
        return {
            "label": self.majority,
            "majority": self.majority,
            "unspoken": self.unspoken,
            "shown": list(self.shown),
            "spoken": list(self.spoken),
            "voices": list(self.voices),
        }


def draw_video(spec: DigitsSpec, rng: np.random.Generator) -> DigitsVideo:
    """Which digit each second shows and says."""
    order = rng.permutation(len(WORDS))
    majority, unspoken, others = int(order[0]), int(order[1]), [int(d) for d in order[2:]]
    singles = spec.seconds - spec.repeats - 1
    shown = [majority] * spec.repeats + [unspoken] + others[:singles]
    spoken = [majority] * spec.repeats + [others[singles] if singles < len(others) else majority] + others[:singles]
    # The odd second says a digit the video does not show (if one is left), never the unspoken one.
    arrangement = rng.permutation(spec.seconds)
    variants = voices_of(spec.split)
    voices = [
        f"{ACCENTS[int(rng.integers(len(ACCENTS)))]}+{variants[int(rng.integers(len(variants)))]}"
        for _ in range(spec.seconds if spec.nuisance == "second" else 1)
    ]
    return DigitsVideo(
        tuple(shown[i] for i in arrangement),
        tuple(spoken[i] for i in arrangement),
        majority,
        unspoken,
        tuple(voices * (spec.seconds // len(voices))),
    )


def _stroke(mask: np.ndarray, start: np.ndarray, end: np.ndarray, width: float) -> None:
    """Adds an antialiased line segment to `mask` (in place, saturating at 1)."""
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]].astype(np.float32)
    direction = end - start
    along = np.clip(
        ((yy - start[0]) * direction[0] + (xx - start[1]) * direction[1]) / max(1e-6, direction @ direction), 0, 1
    )
    distance = np.hypot(yy - (start[0] + along * direction[0]), xx - (start[1] + along * direction[1]))
    np.maximum(mask, np.clip(width / 2 + 0.5 - distance, 0, 1), out=mask)


def _scaled(image: np.ndarray, side: int) -> np.ndarray:
    """An 8x8 image resized to side x side, bilinear (pixel centres aligned)."""
    at = (np.arange(side) + 0.5) * image.shape[0] / side - 0.5
    low = np.clip(np.floor(at).astype(int), 0, image.shape[0] - 1)
    high = np.clip(low + 1, 0, image.shape[0] - 1)
    weight = np.clip(at - low, 0, 1).astype(np.float32)
    rows = image[low] * (1 - weight[:, None]) + image[high] * weight[:, None]
    scaled: np.ndarray = rows[:, low] * (1 - weight[None, :]) + rows[:, high] * weight[None, :]
    return scaled


def _place(frame: np.ndarray, alpha: np.ndarray, top: float, left: float, colour: np.ndarray) -> None:
    """Composites `colour` through `alpha` at (top, left), clipped to the frame (in place)."""
    size, side = frame.shape[0], alpha.shape[0]
    y, x = int(round(top)), int(round(left))
    y0, x0, y1, x1 = max(0, y), max(0, x), min(size, y + side), min(size, x + side)
    if y0 >= y1 or x0 >= x1:
        return
    a = alpha[y0 - y : y1 - y, x0 - x : x1 - x, None]
    frame[y0:y1, x0:x1] = frame[y0:y1, x0:x1] * (1 - a) + colour * a


def render_frames(spec: DigitsSpec, video: DigitsVideo, rng: np.random.Generator) -> np.ndarray:
    """(seconds x fps, size, size, 3) uint8: each second's digit moving among clutter."""
    images, _ = digit_images()
    pool = images_of(spec.split)
    size, frames_per_second = spec.size, spec.fps

    def textured() -> np.ndarray:
        base = rng.uniform(10, 60, size=3).astype(np.float32)
        texture = rng.normal(0, 12, size=(size // 8, size // 8, 3)).astype(np.float32)
        return base + np.kron(texture, np.ones((8, 8, 1), dtype=np.float32))

    background = textured()
    frames = np.empty((spec.seconds * frames_per_second, size, size, 3), dtype=np.uint8)
    for second, digit in enumerate(video.shown):
        if spec.nuisance == "second" and second:
            background = textured()
        side = int(rng.integers(spec.digit_px[0], spec.digit_px[1] + 1))
        glyph = _scaled(images[int(rng.choice(pool[digit]))], side).clip(0, 1)
        start = rng.uniform(0, size - side, size=2)
        velocity = rng.uniform(-6, 6, size=2)  # pixels per second
        colour = rng.uniform(150, 255, size=3).astype(np.float32)
        # Clutter: strokes as wide as the digit's, in colours like its, drifting.
        width = side / 8 * 1.5
        strokes = []
        for _ in range(spec.clutter):
            mask = np.zeros((size, size), dtype=np.float32)
            centre = rng.uniform(0, size, size=2)
            for _ in range(int(rng.integers(1, 3))):
                end = centre + rng.normal(0, side / 2.5, size=2)
                _stroke(mask, centre.astype(np.float32), end.astype(np.float32), width)
                centre = end
            strokes.append((mask, rng.uniform(-6, 6, size=2), rng.uniform(150, 255, size=3).astype(np.float32)))
        for i in range(frames_per_second):
            t = i / frames_per_second
            frame = background + rng.normal(0, 8, size=(size, size, 3)).astype(np.float32)
            for mask, drift, tint in strokes:
                shifted = np.roll(mask, (int(round(drift[0] * t)), int(round(drift[1] * t))), axis=(0, 1))
                frame = frame * (1 - shifted[..., None]) + tint * shifted[..., None]
            top, left = np.clip(start + velocity * t, 0, size - side)
            _place(frame, glyph, top, left, colour)
            frames[second * frames_per_second + i] = frame.clip(0, 255).astype(np.uint8)
    return frames


BABBLE_BANK = 64  # babble recordings per split, each a voice saying 24 other words


@functools.cache
def babble_bank(split: str, sample_rate: int) -> tuple[np.ndarray, ...]:
    """Other voices (of `split`) saying other words, speed and pitch varied: what babble is cut
    from. Spoken once per process; fixed by the split."""
    rng = np.random.default_rng([SPLITS.index(split), 7])
    variants = voices_of(split)
    bank = []
    for _ in range(BABBLE_BANK):
        voice = f"{ACCENTS[int(rng.integers(len(ACCENTS)))]}+{variants[int(rng.integers(len(variants)))]}"
        words = " ".join(BABBLE_WORDS[int(i)] for i in rng.integers(len(BABBLE_WORDS), size=24))
        said = speak(words, voice, int(rng.integers(180, 300)), int(rng.integers(0, 100)), sample_rate, trim=False)
        bank.append(said if len(said) else np.zeros(sample_rate, dtype=np.float32))
    return tuple(bank)


def _background(spec: DigitsSpec, rng: np.random.Generator, length: int, spoken_rms: float) -> np.ndarray:
    """`length` samples of babble (other voices saying other words, each from a random start of
    its sentence) and low-passed noise, at a random SNR below speech of `spoken_rms`."""
    background = np.zeros(length, dtype=np.float32)
    bank = babble_bank(spec.split, spec.sample_rate)
    for _ in range(spec.babble_voices):
        said = bank[int(rng.integers(len(bank)))]
        said = np.tile(said, -(-length // len(said)) + 1)
        start = int(rng.integers(0, len(said) - length + 1))
        background += said[start : start + length]
    # Low-passed noise (a one-pole filter, its response cut where it is below 1e-5), so it covers
    # the speech band as babble and rooms do.
    response = 0.9 ** np.arange(110, dtype=np.float32)
    noise = np.convolve(rng.standard_normal(length).astype(np.float32), response)[:length]
    background += noise / max(1e-6, float(noise.std())) * 0.3
    snr = float(rng.uniform(*spec.snr_db))
    scaled: np.ndarray = background * (spoken_rms / max(1e-6, float(background.std())) / 10 ** (snr / 20))
    return scaled


def render_audio(spec: DigitsSpec, video: DigitsVideo, rng: np.random.Generator) -> np.ndarray:
    """(seconds x sample_rate,) float32: each second's digit spoken at a random offset in it, over
    noise and babble (drawn again each second with nuisance "second")."""
    rate, total = spec.sample_rate, spec.seconds * spec.sample_rate
    speech = np.zeros(total, dtype=np.float32)
    base_speed, base_pitch = int(rng.integers(200, 300)), int(rng.integers(25, 75))
    for second, digit in enumerate(video.spoken):
        if spec.nuisance == "second" and second:
            base_speed, base_pitch = int(rng.integers(200, 300)), int(rng.integers(25, 75))
        speed = int(np.clip(base_speed + rng.integers(-30, 31), 170, 340))
        pitch = int(np.clip(base_pitch + rng.integers(-10, 11), 0, 99))
        word = speak(WORDS[digit], video.voices[second], speed, pitch, rate)[: int(0.95 * rate)]
        offset = second * rate + int(rng.integers(0, rate - len(word) + 1))
        speech[offset : offset + len(word)] += word
    # The background: per video, or (nuisance "second") drawn again for every second, so that
    # no babble voice or noise level is shared by a video's seconds.
    pieces = spec.seconds if spec.nuisance == "second" else 1
    length = total // pieces
    spoken_rms = float(np.sqrt(np.mean(speech[speech != 0] ** 2))) if np.any(speech) else 1.0
    background = np.concatenate([_background(spec, rng, length, spoken_rms) for _ in range(pieces)])
    mixed: np.ndarray = speech + background
    return (0.5 * mixed / max(1e-6, float(np.abs(mixed).max()))).astype(np.float32)


def video_rng(spec: DigitsSpec, index: int) -> np.random.Generator:
    """The generator of video `index`: its draw first, then its pictures and sound."""
    return np.random.default_rng([spec.seed, SPLITS.index(spec.split), index])


def video_metadata(spec: DigitsSpec, index: int, video: DigitsVideo | None = None) -> dict[str, Any]:
    """Video `index`'s id and labels (without rendering it)."""
    video = video or draw_video(spec, video_rng(spec, index))
    return {"id": f"digits-{spec.split}-{index:06d}", **video.labels()}


def make_video(spec: DigitsSpec, index: int) -> tuple[bytes, dict[str, Any]]:
    """Video `index` of the set: mp4 (H.264 + AAC) bytes and its metadata (id, labels, contents)."""
    rng = video_rng(spec, index)
    video = draw_video(spec, rng)
    frames = render_frames(spec, video, rng)
    audio = render_audio(spec, video, rng)
    return encode_mp4(frames, audio, spec.fps, spec.sample_rate), video_metadata(spec, index, video)
