"""Synthetic sample subject: a talking-head video made from a public-domain portrait.

The demo and the tests need a video of one person talking, with audio, without downloading
anything. This module animates scikit-image's bundled astronaut portrait (Eileen Collins, NASA,
public domain) into such a video and writes the ground truth it was made from, so that later
stages (landmark tracking, blendshapes, lip-sync metrics) can be checked against known values.

How a sample is made:

1. **Speech.** A random utterance (phrases of CV/CVC syllables at ~4.5 Hz separated by silent
   pauses) is planned from the seed and synthesised with a small formant synthesiser: a
   Rosenberg glottal-pulse source with a declining, accented F0 contour, vowel and approximant
   formants applied as spectral envelopes in an overlap-add filterbank, and shaped noise for
   fricatives, plosive bursts and aspiration. The same plan yields the articulation tracks
   (jaw opening, lip spread), so the mouth follows the audio by construction.
2. **Face geometry.** MediaPipe face mesh locates lips, eyelids, brows and the face oval once
   on the still; MediaPipe selfie segmentation separates the person from the backdrop, whose
   hidden part behind the head is inpainted once (the background stays static).
3. **Frames.** Each frame is one backward warp (``cv2.remap``) of the portrait: the jaw and
   lower lip drop with the opening, the lips spread or pucker, the upper lids slide down over
   the eyes during blinks, and the head layer gets a small smooth rotation, translation and
   scale about the neck while the torso stays put. The inside of the mouth is drawn from the
   portrait's own upper teeth (which move with the upper lip) over a dark red-brown cavity.
   The moved person is composited over the static background and streamed to the encoder,
   so memory does not grow with the duration.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from avatar.atomic import atomic_output
from avatar.media import AUDIO_RATE, VideoWriter, write_wav
from avatar.progress import Progress, track

log = logging.getLogger(__name__)

# Square crop (x, y, side) of the 512x512 astronaut photo that frames head and shoulders the way
# talking-head datasets do (face about a third of the frame width, some room above the hair).
_CROP = (68, 0, 320)

# MediaPipe face-mesh landmark indices (canonical 468/478-point topology).
_INNER_UPPER_LIP = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
_INNER_LOWER_LIP = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
_UPPER_LIP_TOP = 0
_LOWER_LIP_BOTTOM = 17
_NOSE_BASE = 2
_CHIN = 152
_FOREHEAD = 10
_CHEEKS = (234, 454)
# Per eye: (upper lid, corner to corner; lower lid, same corners; lower brow point).
_EYES = (
    ((33, 246, 161, 160, 159, 158, 157, 173, 133), (33, 7, 163, 144, 145, 153, 154, 155, 133), 52),
    ((362, 398, 384, 385, 386, 387, 388, 466, 263), (362, 382, 381, 380, 374, 373, 390, 249, 263),
     282),
)
_EYE_CENTERS = ((33, 133), (362, 263))

_CTRL_RATE = 200  # Hz of the articulation control tracks
_FRAME_LEN = 512  # samples per overlap-add analysis window (32 ms)
_HOP = 128  # overlap-add hop (8 ms)
_NFFT = 1024  # zero-padded so formant ringing does not wrap around


@dataclass(frozen=True)
class SampleConfig:
    """What synthetic sample to make."""

    seed: int = 0
    """Seed of everything random: the utterance, blinks and head motion. Another seed gives
    another utterance (new audio with matching mouth motion) of the same person."""
    duration_s: float = 24.0
    """Length of the video and audio in seconds (at least 1)."""
    fps: int = 25
    """Frame rate of the video."""
    size: int = 512
    """Width and height of the square video in pixels (even, 64..2048)."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field, the expected range and the given value."""
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not math.isfinite(self.duration_s) or self.duration_s < 1.0:
            raise ValueError(f"duration_s must be at least 1 second, got {self.duration_s!r}")
        if self.duration_s > 3600.0:
            raise ValueError(f"duration_s must be at most 3600 seconds, got {self.duration_s!r}")
        if not isinstance(self.fps, (int, np.integer)) or not 1 <= self.fps <= 120:
            raise ValueError(f"fps must be an integer from 1 to 120, got {self.fps!r}")
        if not isinstance(self.size, (int, np.integer)) or not 64 <= self.size <= 2048:
            raise ValueError(f"size must be an integer from 64 to 2048, got {self.size!r}")
        if self.size % 2:
            raise ValueError(f"size must be even (H.264 yuv420p needs even sizes), got {self.size}")


@dataclass(frozen=True)
class SamplePaths:
    """Files written by :func:`make_sample`."""

    video: Path
    """``sample.mp4``: H.264 video with the audio muxed in as AAC."""
    audio: Path
    """``sample.wav``: the same audio, 16 kHz mono 16-bit PCM."""
    truth: Path
    """``sample_truth.npz``: per-frame ground truth (see :func:`make_sample`)."""


def make_sample(
    out_dir: Path | str,
    config: SampleConfig = SampleConfig(),
    progress: Optional[Progress] = None,
) -> SamplePaths:
    """Write a synthetic talking-head video, its audio and its ground truth into ``out_dir``.

    The output is deterministic for ``config.seed``. Frames are generated and encoded one at a
    time, so memory does not grow with ``config.duration_s``.

    Args:
        out_dir: directory to write into; created if missing. Existing sample files are replaced.
        config: seed, duration, frame rate and size.
        progress: called as ``progress("sample", done, total)`` while frames are rendered.

    Returns:
        Paths of ``sample.mp4``, ``sample.wav`` and ``sample_truth.npz``. The npz holds, for
        ``T = round(duration_s * fps)`` frames (frame ``k`` shows time ``k / fps``):
        ``mouth_open`` [T] true inner-lip opening in 0..1 (0 = lips together),
        ``mouth_width`` [T] lip spread in -1..1 (-1 pucker, +1 spread),
        ``blink`` [T] eyelid closure in 0..1 (1 = closed),
        ``rotation_deg`` [T] in-plane head rotation (positive = counter-clockwise on screen),
        ``translation_px`` [T, 2] head translation (x right, y down) in output pixels,
        ``scale`` [T] head scale factor, ``audio_envelope`` [T] RMS of the audio in a 40 ms
        window centred on the frame, divided by its maximum (0..1), and scalars ``fps``,
        ``seed``, ``size`` and ``audio_rate``.

    Raises:
        ValueError: ``config`` is out of range.
    """
    config.validate()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = SamplePaths(video=out_dir / "sample.mp4", audio=out_dir / "sample.wav",
                        truth=out_dir / "sample_truth.npz")
    started = time.monotonic()
    rng = np.random.default_rng(config.seed)
    n_frames = max(1, int(round(config.duration_s * config.fps)))

    plan = _plan_utterance(rng, config.duration_s)
    ctrl = _control_tracks(plan, rng, config.duration_s)
    audio = _synthesize(ctrl, rng, config.duration_s)
    write_wav(paths.audio, audio, AUDIO_RATE)

    frame_t = np.arange(n_frames) / config.fps
    ctrl_t = np.arange(len(ctrl["mouth"])) / _CTRL_RATE
    mouth_open = np.clip(np.interp(frame_t, ctrl_t, ctrl["mouth"]), 0.0, 1.0)
    mouth_width = np.clip(np.interp(frame_t, ctrl_t, ctrl["spread"]), -1.0, 1.0)
    stress = np.interp(frame_t, ctrl_t, ctrl["stress"])
    blink = _blinks(rng, n_frames, config.fps)
    rotation, translation, scale = _head_motion(rng, n_frames, config.fps, config.size, stress)
    envelope = _audio_envelope(audio, n_frames, config.fps)

    portrait = _Portrait.build(config.size)
    with VideoWriter(paths.video, fps=config.fps, audio=paths.audio, preset="veryfast") as writer:
        for k in track(range(n_frames), "sample", n_frames, progress):
            writer.write(portrait.render(
                mouth_open[k], mouth_width[k], blink[k], rotation[k], translation[k], scale[k]))

    with atomic_output(paths.truth) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                mouth_open=mouth_open.astype(np.float32),
                mouth_width=mouth_width.astype(np.float32),
                blink=blink.astype(np.float32),
                rotation_deg=rotation.astype(np.float32),
                translation_px=translation.astype(np.float32),
                scale=scale.astype(np.float32),
                audio_envelope=envelope.astype(np.float32),
                fps=np.int64(config.fps),
                seed=np.int64(config.seed),
                size=np.int64(config.size),
                audio_rate=np.int64(AUDIO_RATE),
            )
    log.info("sample: %d frames (%.1f s, seed %d) written to %s in %.1f s", n_frames,
             config.duration_s, config.seed, out_dir, time.monotonic() - started)
    return paths


# --------------------------------------------------------------------------------------------
# Speech: utterance plan -> articulation/control tracks -> waveform
# --------------------------------------------------------------------------------------------

# Vowel: formants F1-F3 (Hz, adult female), jaw/lip openness 0..1, lip spread -1..1.
_VOWELS: dict[str, tuple[float, float, float, float, float]] = {
    "a": (850.0, 1400.0, 2800.0, 1.00, 0.10),
    "ae": (800.0, 1950.0, 2900.0, 0.85, 0.35),
    "e": (560.0, 2150.0, 2950.0, 0.60, 0.55),
    "i": (340.0, 2650.0, 3250.0, 0.32, 0.90),
    "o": (580.0, 950.0, 2700.0, 0.72, -0.70),
    "u": (370.0, 900.0, 2600.0, 0.30, -1.00),
    "schwa": (620.0, 1650.0, 2850.0, 0.50, 0.00),
}
_VOWEL_WEIGHTS = {"a": 0.22, "ae": 0.12, "e": 0.18, "i": 0.16, "o": 0.14, "u": 0.08, "schwa": 0.10}


@dataclass(frozen=True)
class _Consonant:
    kind: str  # "stop", "fric", "nasal", "approx", "aspir"
    mouth: float  # openness while it is articulated (0 = lips closed)
    spread: float
    voiced: bool
    noise_hz: float = 0.0  # centre of the frication / burst noise
    noise_bw: float = 0.0
    noise_gain: float = 0.0
    formants: tuple[float, float, float] = (0.0, 0.0, 0.0)  # nasals and approximants


_CONSONANTS: dict[str, _Consonant] = {
    "p": _Consonant("stop", 0.0, 0.0, False, 900.0, 1800.0, 0.55),
    "b": _Consonant("stop", 0.0, 0.0, True, 900.0, 1800.0, 0.35),
    "t": _Consonant("stop", 0.18, 0.2, False, 4200.0, 2500.0, 0.6),
    "d": _Consonant("stop", 0.18, 0.2, True, 4000.0, 2500.0, 0.4),
    "k": _Consonant("stop", 0.25, 0.0, False, 2200.0, 1200.0, 0.6),
    "g": _Consonant("stop", 0.25, 0.0, True, 2200.0, 1200.0, 0.4),
    "s": _Consonant("fric", 0.12, 0.35, False, 5600.0, 2200.0, 0.42),
    "z": _Consonant("fric", 0.12, 0.35, True, 5400.0, 2200.0, 0.28),
    "sh": _Consonant("fric", 0.18, -0.55, False, 3000.0, 1600.0, 0.45),
    "f": _Consonant("fric", 0.07, 0.1, False, 4500.0, 6000.0, 0.22),
    "v": _Consonant("fric", 0.07, 0.1, True, 4500.0, 6000.0, 0.15),
    "h": _Consonant("aspir", -1.0, 0.0, False, 0.0, 0.0, 0.35),  # mouth of the next vowel
    "m": _Consonant("nasal", 0.0, 0.0, True, formants=(260.0, 1150.0, 2600.0)),
    "n": _Consonant("nasal", 0.2, 0.1, True, formants=(260.0, 1600.0, 2700.0)),
    "l": _Consonant("approx", 0.25, 0.1, True, formants=(360.0, 1100.0, 2750.0)),
    "r": _Consonant("approx", 0.22, -0.3, True, formants=(420.0, 1250.0, 1700.0)),
    "w": _Consonant("approx", 0.12, -1.0, True, formants=(300.0, 700.0, 2300.0)),
    "y": _Consonant("approx", 0.2, 0.6, True, formants=(300.0, 2400.0, 3000.0)),
}
_ONSET_WEIGHTS = {"p": 6, "b": 6, "t": 8, "d": 6, "k": 6, "g": 3, "s": 8, "z": 2, "sh": 3, "f": 4,
                  "v": 3, "h": 4, "m": 7, "n": 7, "l": 6, "r": 5, "w": 4, "y": 2, "": 10}
_CODA_WEIGHTS = {"n": 5, "m": 3, "s": 4, "t": 4, "k": 2, "l": 2, "": 40}


@dataclass(frozen=True)
class _Segment:
    """One stretch of the utterance with constant articulation targets."""

    start: float
    end: float
    phone: str  # vowel or consonant name, "" for silence, "burst" for a plosive release
    voice: float  # glottal source amplitude
    noise: float  # noise source amplitude
    formants: tuple[float, float, float]
    noise_hz: float
    noise_bw: float
    noise_formant_mix: float  # 1: noise shaped by the formants (aspiration), 0: by noise_hz/bw
    mouth: float
    spread: float
    stress: float
    f0_accent: float  # relative F0 bump centred on this segment


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.array([weights[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _plan_utterance(rng: np.random.Generator, duration_s: float) -> list[_Segment]:
    """Random phrases of syllables separated by pauses, filling ``duration_s``."""
    segs: list[_Segment] = []
    silence = dict(phone="", voice=0.0, noise=0.0, formants=_VOWELS["schwa"][:3], noise_hz=1000.0,
                   noise_bw=1000.0, noise_formant_mix=0.0, mouth=0.0, spread=0.0, stress=0.0,
                   f0_accent=0.0)
    t = float(rng.uniform(0.25, 0.5))
    segs.append(_Segment(0.0, t, **silence))
    end_speech = duration_s - 0.3
    while t < end_speech - 0.5:
        n_syl = int(rng.integers(4, 13))
        phrase_start = t
        for i in range(n_syl):
            if t > end_speech - 0.35:
                break
            final = i == n_syl - 1
            stressed = bool(rng.random() < 0.35) or (i == 0 and rng.random() < 0.5)
            stress = (1.0 if stressed else 0.72) * (1.0 - 0.2 * i / max(n_syl - 1, 1))
            dur = float(rng.uniform(0.17, 0.27)) * (1.35 if final else 1.0)
            dur *= 1.1 if stressed else 1.0
            t = _add_syllable(segs, rng, t, dur, stress, stressed, final)
        log.debug("phrase %.2f-%.2f s, %d syllables", phrase_start, t, n_syl)
        pause = float(rng.uniform(0.3, 0.8))
        pause_end = min(t + pause, duration_s)
        segs.append(_Segment(t, pause_end, **silence))
        t = pause_end
    if t < duration_s:
        segs.append(_Segment(t, duration_s, **silence))
    return segs


def _add_syllable(segs: list[_Segment], rng: np.random.Generator, t: float, dur: float,
                  stress: float, stressed: bool, final: bool) -> float:
    """Append onset consonant, vowel and optional coda starting at ``t``; return the end time."""
    vowel = _pick(rng, _VOWEL_WEIGHTS)
    f1, f2, f3, v_open, v_spread = _VOWELS[vowel]
    onset = _pick(rng, _ONSET_WEIGHTS)
    coda = _pick(rng, _CODA_WEIGHTS) if not final or rng.random() < 0.5 else ""
    jitter = rng.uniform(0.94, 1.06, size=3)
    vf = (f1 * jitter[0], f2 * jitter[1], f3 * jitter[2])
    v_level = stress * (0.35 + 0.65 * v_open)  # open vowels are intrinsically louder
    v_mouth = min(1.0, v_open * (0.5 + 0.55 * stress) * float(rng.uniform(0.92, 1.08)))
    accent = float(rng.uniform(0.08, 0.16)) if stressed else 0.0
    end = t + dur

    def seg(a: float, b: float, phone: str, **kw) -> None:
        base = dict(voice=0.0, noise=0.0, formants=vf, noise_hz=1000.0, noise_bw=1000.0,
                    noise_formant_mix=0.0, mouth=v_mouth, spread=v_spread, stress=stress,
                    f0_accent=0.0)
        base.update(kw)
        segs.append(_Segment(a, b, phone, **base))

    if onset:
        c = _CONSONANTS[onset]
        if c.kind == "stop":
            closure = float(rng.uniform(0.045, 0.07))
            burst = 0.014 if c.voiced else 0.03
            seg(t, t + closure, onset, voice=0.06 if c.voiced else 0.0, mouth=c.mouth,
                spread=c.spread)
            seg(t + closure, t + closure + burst, "burst", noise=c.noise_gain * stress,
                noise_hz=c.noise_hz, noise_bw=c.noise_bw,
                noise_formant_mix=0.0 if c.voiced else 0.5, mouth=0.5 * (c.mouth + v_mouth),
                spread=c.spread)
            t += closure + burst
        else:
            length = float(rng.uniform(0.05, 0.085))
            mouth = v_mouth if c.mouth < 0 else c.mouth
            if c.kind == "fric":
                seg(t, t + length, onset, voice=0.25 * stress if c.voiced else 0.0,
                    noise=c.noise_gain * stress, noise_hz=c.noise_hz, noise_bw=c.noise_bw,
                    mouth=mouth, spread=c.spread)
            elif c.kind == "aspir":
                seg(t, t + length, onset, noise=c.noise_gain * stress, noise_formant_mix=1.0,
                    mouth=0.7 * mouth, spread=v_spread)
            elif c.kind == "nasal":
                seg(t, t + length, onset, voice=0.32 * stress, formants=c.formants,
                    mouth=c.mouth, spread=c.spread)
            else:
                seg(t, t + length, onset, voice=0.55 * stress, formants=c.formants,
                    mouth=c.mouth, spread=c.spread)
            t += length
    coda_len = float(rng.uniform(0.05, 0.08)) if coda else 0.0
    v_end = max(t + 0.07, end - coda_len)
    seg(t, v_end, vowel, voice=v_level, f0_accent=accent)
    t = v_end
    if coda:
        c = _CONSONANTS[coda]
        if c.kind == "stop":
            seg(t, t + 0.05, coda, mouth=c.mouth, spread=c.spread)
            seg(t + 0.05, t + 0.07, "burst", noise=0.6 * c.noise_gain * stress,
                noise_hz=c.noise_hz, noise_bw=c.noise_bw, mouth=c.mouth, spread=c.spread)
            t += 0.07
        elif c.kind == "fric":
            seg(t, t + coda_len, coda, noise=c.noise_gain * stress, noise_hz=c.noise_hz,
                noise_bw=c.noise_bw, mouth=c.mouth, spread=c.spread)
            t += coda_len
        else:
            seg(t, t + coda_len, coda, voice=0.35 * stress, formants=c.formants, mouth=c.mouth,
                spread=c.spread)
            t += coda_len
    return t


def _smooth(x: np.ndarray, sigma_s: float, rate: float) -> np.ndarray:
    """Gaussian smoothing with edge padding (sigma in seconds)."""
    from scipy.ndimage import gaussian_filter1d

    return gaussian_filter1d(x, sigma_s * rate, mode="nearest")


def _control_tracks(plan: list[_Segment], rng: np.random.Generator,
                    duration_s: float) -> dict[str, np.ndarray]:
    """Sample the plan on the control grid and smooth it like real articulators move."""
    n = int(math.ceil(duration_s * _CTRL_RATE)) + 2
    t = np.arange(n) / _CTRL_RATE
    starts = np.array([s.start for s in plan])
    idx = np.clip(np.searchsorted(starts, t, side="right") - 1, 0, len(plan) - 1)

    def col(fn) -> np.ndarray:
        return np.array([fn(s) for s in plan], dtype=np.float64)[idx]

    # Vowel amplitude rises quickly and decays towards the syllable end (syllable envelope).
    seg_start, seg_end = col(lambda s: s.start), col(lambda s: s.end)
    is_vowel = col(lambda s: float(s.phone in _VOWELS))
    rel = np.clip((t - seg_start) / np.maximum(seg_end - seg_start, 1e-3), 0.0, 1.0)
    rise = np.clip((t - seg_start) / 0.03, 0.0, 1.0)
    shape = np.where(is_vowel > 0, rise * (1.0 - 0.35 * rel ** 2), 1.0)
    voice = _smooth(col(lambda s: s.voice) * shape, 0.006, _CTRL_RATE)
    noise = _smooth(col(lambda s: s.noise), 0.003, _CTRL_RATE)
    formants = np.stack([_smooth(col(lambda s, k=k: s.formants[k]), 0.018, _CTRL_RATE)
                         for k in range(3)], axis=1)
    noise_hz = _smooth(col(lambda s: s.noise_hz), 0.004, _CTRL_RATE)
    noise_bw = _smooth(col(lambda s: s.noise_bw), 0.004, _CTRL_RATE)
    mix = _smooth(col(lambda s: s.noise_formant_mix), 0.004, _CTRL_RATE)
    # Jaw and lips are slower than the source: ~35 ms smoothing gives 60-100 ms transitions.
    mouth = np.clip(_smooth(col(lambda s: s.mouth), 0.035, _CTRL_RATE), 0.0, 1.0)
    spread = np.clip(_smooth(col(lambda s: s.spread), 0.05, _CTRL_RATE), -1.0, 1.0)
    stress = _smooth(col(lambda s: s.stress), 0.08, _CTRL_RATE)

    # F0: per-phrase declination, accents on stressed vowels, slow wander; female register.
    base = float(rng.uniform(185.0, 215.0))
    speaking = col(lambda s: float(s.phone != ""))
    phrase_id = np.cumsum(np.diff(speaking, prepend=0.0) > 0)
    f0 = np.full(n, base)
    for pid in np.unique(phrase_id[speaking > 0]):
        sel = np.nonzero((phrase_id == pid) & (speaking > 0))[0]
        a, b = sel[0], sel[-1] + 1
        pos = np.linspace(0.0, 1.0, b - a)
        rise_end = rng.random() < 0.2  # the occasional question-like final rise
        final = np.where(pos > 0.8, (pos - 0.8) / 0.2, 0.0)
        f0[a:b] = base * (1.08 - 0.2 * pos + (0.18 if rise_end else -0.06) * final ** 2)
    accent = _smooth(col(lambda s: s.f0_accent), 0.05, _CTRL_RATE)
    wander = _smooth(rng.standard_normal(n), 0.25, _CTRL_RATE)
    wander *= 0.03 / max(float(np.std(wander)), 1e-9)
    f0 = _smooth(f0, 0.04, _CTRL_RATE) * (1.0 + 2.5 * accent + wander)
    return dict(voice=voice, noise=noise, formants=formants, noise_hz=noise_hz,
                noise_bw=noise_bw, mix=mix, mouth=mouth, spread=spread, stress=stress, f0=f0)


def _resonance(f: np.ndarray, fc: np.ndarray, bw: np.ndarray | float) -> np.ndarray:
    """Magnitude of a two-pole resonator at ``fc`` with bandwidth ``bw`` (1 at DC)."""
    hb = 0.5 * np.asarray(bw)
    return (fc ** 2 + hb ** 2) / np.sqrt(((f - fc) ** 2 + hb ** 2) * ((f + fc) ** 2 + hb ** 2))


def _synthesize(ctrl: dict[str, np.ndarray], rng: np.random.Generator,
                duration_s: float) -> np.ndarray:
    """Formant synthesis of the control tracks to mono float32 at :data:`AUDIO_RATE`."""
    sr = AUDIO_RATE
    n = int(round(duration_s * sr))
    ct = np.arange(len(ctrl["f0"])) / _CTRL_RATE
    ts = np.arange(n) / sr

    # Glottal source: Rosenberg pulses (open 40 %, closing 16 %) at the F0 contour, with a
    # little jitter and shimmer; its derivative includes the lip radiation (+6 dB/octave).
    f0 = np.interp(ts, ct, ctrl["f0"]) * (1.0 + 0.004 * rng.standard_normal(n))
    frac = np.cumsum(f0 / sr) % 1.0
    tp, tn = 0.4, 0.16
    flow = np.where(frac < tp, 0.5 * (1.0 - np.cos(np.pi * frac / tp)),
                    np.where(frac < tp + tn, np.cos(0.5 * np.pi * (frac - tp) / tn), 0.0))
    voiced = np.diff(flow, prepend=0.0) * (sr / 200.0)
    voiced += 0.015 * rng.standard_normal(n) * flow  # breathiness
    shimmer = _smooth(rng.standard_normal(len(ct)), 0.01, _CTRL_RATE)
    shimmer = 1.0 + 0.04 * shimmer / max(float(np.std(shimmer)), 1e-9)
    voiced *= np.interp(ts, ct, ctrl["voice"] * shimmer)
    noise = rng.standard_normal(n) * np.interp(ts, ct, ctrl["noise"])

    # Overlap-add filterbank: every 8 ms window gets the spectral envelope of its instant.
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(_FRAME_LEN) / _FRAME_LEN)
    n_frames = n // _HOP + 1
    pad = _FRAME_LEN // 2
    voiced_p = np.pad(voiced, (pad, _NFFT))
    noise_p = np.pad(noise, (pad, _NFFT))
    out = np.zeros(n_frames * _HOP + _NFFT)
    freqs = np.fft.rfftfreq(_NFFT, 1.0 / sr)
    # Fixed parts of the voiced envelope: fourth formant and a gentle high-frequency roll-off.
    fixed = _resonance(freqs, np.float64(3900.0), 300.0) / np.sqrt(1.0 + (freqs / 1500.0) ** 2)
    chunk = 1024
    for j0 in range(0, n_frames, chunk):
        j = np.arange(j0, min(n_frames, j0 + chunk))
        centre = j * _HOP / sr
        fm = np.stack([np.interp(centre, ct, ctrl["formants"][:, k]) for k in range(3)], axis=1)
        env_v = np.repeat(fixed[None, :], len(j), axis=0)
        for k, bw in enumerate((90.0, 110.0, 170.0)):
            env_v *= _resonance(freqs[None, :], fm[:, k : k + 1], bw)
        nhz = np.interp(centre, ct, ctrl["noise_hz"])[:, None]
        nbw = np.interp(centre, ct, ctrl["noise_bw"])[:, None]
        env_n = _resonance(freqs[None, :], nhz, nbw) * (freqs[None, :] / (freqs[None, :] + 400.0))
        env_n /= np.sqrt(np.mean(env_n ** 2, axis=1, keepdims=True))
        mix = np.interp(centre, ct, ctrl["mix"])[:, None]
        env_a = env_v / np.sqrt(np.mean(env_v ** 2, axis=1, keepdims=True))
        env_n = mix * env_a + (1.0 - mix) * env_n
        take = j[:, None] * _HOP + np.arange(_FRAME_LEN)[None, :]
        src_v = np.fft.rfft(voiced_p[take] * window, n=_NFFT)
        # Normalise each window's filter to unit power gain on its actual source spectrum, so
        # the loudness of a segment is set by its voicing amplitude alone.
        p_src = np.sum(np.abs(src_v) ** 2, axis=1, keepdims=True)
        p_out = np.sum(np.abs(src_v * env_v) ** 2, axis=1, keepdims=True)
        spec_v = src_v * env_v * np.sqrt((p_src + 1e-12) / (p_out + 1e-12))
        spec_n = np.fft.rfft(noise_p[take] * window, n=_NFFT) * env_n
        frames = np.fft.irfft(spec_v + 0.5 * spec_n, n=_NFFT)
        blocks = frames.reshape(len(j), _NFFT // _HOP, _HOP)
        for b in range(_NFFT // _HOP):
            lo = (j0 + b) * _HOP
            out[lo : lo + len(j) * _HOP] += blocks[:, b, :].reshape(-1)
    audio = out[pad : pad + n] / 2.0  # a Hann window at 75 % overlap sums to 2
    peak = float(np.max(np.abs(audio))) if n else 0.0
    if peak > 0:
        audio *= 0.85 / peak
    audio += 8e-4 * rng.standard_normal(n)  # faint room noise: silence is never digital zero
    return audio.astype(np.float32)


def _audio_envelope(audio: np.ndarray, n_frames: int, fps: float) -> np.ndarray:
    """RMS in a 40 ms window centred on each frame's time, scaled so the maximum is 1."""
    half = int(0.02 * AUDIO_RATE)
    cs = np.concatenate([[0.0], np.cumsum(audio.astype(np.float64) ** 2)])
    centre = np.round(np.arange(n_frames) / fps * AUDIO_RATE).astype(int)
    lo = np.clip(centre - half, 0, len(audio))
    hi = np.clip(centre + half, 0, len(audio))
    rms = np.sqrt((cs[hi] - cs[lo]) / np.maximum(hi - lo, 1))
    top = float(rms.max()) if rms.size else 0.0
    return rms / top if top > 0 else rms


# --------------------------------------------------------------------------------------------
# Blinks and head motion
# --------------------------------------------------------------------------------------------


def _blinks(rng: np.random.Generator, n_frames: int, fps: float) -> np.ndarray:
    """Eyelid closure per frame: blinks every 2-6 s lasting 150-250 ms, peaking on a frame."""
    t = np.arange(n_frames) / fps
    closure = np.zeros(n_frames)
    at = float(rng.uniform(0.8, 3.0))
    while at < t[-1] + 1.0:
        dur = float(rng.uniform(0.15, 0.25))
        peak = round((at + 0.35 * dur) * fps) / fps  # fully closed on a frame
        down, up = 0.35 * dur, 0.5 * dur  # fast close, short hold, slower open
        hold = dur - down - up
        x = t - peak
        prof = np.where(x < 0, 1.0 - np.clip(-x / down, 0, 1) ** 2,
                        np.where(x < hold, 1.0, 1.0 - _ease(np.clip((x - hold) / up, 0, 1))))
        prof[(x < -down) | (x > hold + up)] = 0.0
        closure = np.maximum(closure, prof)
        at += float(rng.uniform(2.0, 6.0))
    return np.clip(closure, 0.0, 1.0)


def _ease(x: np.ndarray) -> np.ndarray:
    return x * x * (3.0 - 2.0 * x)


def _head_motion(rng: np.random.Generator, n_frames: int, fps: float, size: int,
                 stress: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Smooth small head roll (deg), translation (px) and scale, with nods on stressed speech.

    Each channel is a sum of three slow sinusoids (periods of 3-30 s) scaled to a given standard
    deviation and clipped, so the head drifts a few degrees / pixels like a seated speaker.
    """
    t = np.arange(n_frames) / fps

    def wave(std: float, lo: float, hi: float, limit: float) -> np.ndarray:
        freqs = rng.uniform(lo, hi, size=3)
        phases = rng.uniform(0.0, 2.0 * np.pi, size=3)
        weights = rng.uniform(0.5, 1.0, size=3)
        x = weights @ np.sin(2 * np.pi * freqs[:, None] * t[None, :] + phases[:, None])
        x *= std / math.sqrt(0.5 * float(np.sum(weights ** 2)))
        return limit * np.tanh(x / limit)  # soft clip keeps the motion smooth

    px = size / 512.0
    nod = stress - float(np.mean(stress)) if stress.size else stress
    rotation = wave(1.4, 0.04, 0.3, 4.5)
    tx = wave(3.0 * px, 0.03, 0.25, 9.0 * px)
    ty = wave(1.8 * px, 0.05, 0.35, 6.0 * px) + 2.0 * px * nod
    scale = 1.0 + wave(0.007, 0.02, 0.15, 0.02)
    return rotation, np.stack([tx, ty], axis=1), scale


# --------------------------------------------------------------------------------------------
# Portrait: geometry from the still, per-frame warp
# --------------------------------------------------------------------------------------------


def _smoothstep(e0: float | np.ndarray, e1: float | np.ndarray, x: np.ndarray) -> np.ndarray:
    s = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return s * s * (3.0 - 2.0 * s)


def _cos_window(x: np.ndarray, half_width: float) -> np.ndarray:
    """1 at 0, 0 from ``half_width`` on, smooth (raised cosine)."""
    return 0.5 * (1.0 + np.cos(np.pi * np.clip(np.abs(x) / half_width, 0.0, 1.0)))


class _Curve:
    """A face-frame curve v(u) through landmarks, tabulated for fast lookup (clamped ends)."""

    def __init__(self, uv: np.ndarray, step: float = 0.25):
        from scipy.interpolate import PchipInterpolator

        order = np.argsort(uv[:, 0])
        u, v = uv[order, 0], uv[order, 1]
        keep = np.concatenate([[True], np.diff(u) > 1e-3])
        u, v = u[keep], v[keep]
        self.grid = np.arange(u[0], u[-1] + step, step)
        self.table = PchipInterpolator(u, v)(np.clip(self.grid, u[0], u[-1]))

    def __call__(self, u: np.ndarray) -> np.ndarray:
        return np.interp(u, self.grid, self.table)


def _detect_still(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Face-mesh landmarks [478, 2] (pixels) and person probability [H, W] of the still."""
    import mediapipe as mp

    from avatar.errors import InputError

    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1,
                                         refine_landmarks=True) as mesh:
        result = mesh.process(image)
    if not result.multi_face_landmarks:
        raise InputError("MediaPipe found no face in the sample portrait; "
                         "check the mediapipe installation.")
    h, w = image.shape[:2]
    pts = np.array([[p.x * w, p.y * h] for p in result.multi_face_landmarks[0].landmark])
    with mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0) as seg:
        mask = seg.process(image).segmentation_mask
    return pts, np.asarray(mask, dtype=np.float32)


@dataclass
class _MouthGeom:
    upper: _Curve  # inner upper lip, source v(u)
    lower: _Curve  # inner lower lip
    centre_u: float
    half_width: float
    max_gap: float  # inner-lip gap at mouth_open = 1
    upper_reach: float  # how far above the lip the upper-lip motion fades out
    lower_reach: float  # lower lip -> jaw transition length at the lip centre
    chin_v: float
    chin_fade: float
    jaw_half_width: float
    support: tuple[float, float, float, float]  # u0, u1, v0, v1 where the fields act


@dataclass
class _EyeGeom:
    upper: _Curve
    lower: _Curve
    lid_band: float  # skin band above the lid that stretches over the eye
    support: tuple[float, float, float, float]


class _Portrait:
    """The prepared still and everything needed to render one frame from articulation values."""

    def __init__(self, size: int, rgba: np.ndarray, background: np.ndarray, head_w: np.ndarray,
                 box: tuple[int, int, int, int], face_box: tuple[int, int, int, int],
                 origin: np.ndarray, axes: np.ndarray, pivot: np.ndarray, mouth: _MouthGeom,
                 eyes: tuple[_EyeGeom, _EyeGeom]):
        self.size = size
        self.rgba = rgba
        self.background = background
        self.origin, self.axes, self.pivot = origin, axes, pivot
        self.mouth, self.eyes = mouth, eyes
        y0, y1, x0, x1 = box
        self.box = box
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        self.xs, self.ys = xs, ys
        self.head_w = head_w[y0:y1, x0:x1]
        fy0, fy1, fx0, fx1 = face_box
        self.face_slice = (slice(fy0 - y0, fy1 - y0), slice(fx0 - x0, fx1 - x0))
        self.frame = rgba[:, :, :3].copy()

    @classmethod
    def build(cls, size: int) -> "_Portrait":
        """Locate the face on the astronaut still and precompute the warp geometry."""
        import cv2
        from skimage import data

        still = data.astronaut()
        pts512, seg512 = _detect_still(still)
        cx, cy, side = _CROP
        s = size / side
        interp = cv2.INTER_CUBIC if size > side else cv2.INTER_AREA
        image = cv2.resize(still[cy : cy + side, cx : cx + side], (size, size),
                           interpolation=interp)
        seg = cv2.resize(seg512[cy : cy + side, cx : cx + side], (size, size),
                         interpolation=cv2.INTER_LINEAR)
        pts = (pts512 - np.array([cx, cy], dtype=float)) * s

        # Face frame: origin between the inner lips, u along the eye line, v down the face.
        eye_l = pts[list(_EYE_CENTERS[0])].mean(0)
        eye_r = pts[list(_EYE_CENTERS[1])].mean(0)
        ang = math.atan2(eye_r[1] - eye_l[1], eye_r[0] - eye_l[0])
        axes = np.array([[math.cos(ang), math.sin(ang)], [-math.sin(ang), math.cos(ang)]])
        origin = 0.5 * (pts[13] + pts[14])
        uv = (pts - origin) @ axes.T

        face_w = float(uv[_CHEEKS[1], 0] - uv[_CHEEKS[0], 0])
        face_h = float(uv[_CHIN, 1] - uv[_FOREHEAD, 1])
        upper = _Curve(uv[list(_INNER_UPPER_LIP)])
        lower = _Curve(uv[list(_INNER_LOWER_LIP)])
        u_l, u_r = uv[_INNER_UPPER_LIP[0], 0], uv[_INNER_UPPER_LIP[-1], 0]
        mouth_w = float(u_r - u_l)
        lower_lip = float(uv[_LOWER_LIP_BOTTOM, 1] - uv[14, 1])
        upper_reach = max(float(uv[13, 1] - uv[_NOSE_BASE, 1]), 0.2 * mouth_w)
        chin_fade = 0.3 * face_h
        mouth = _MouthGeom(
            upper=upper, lower=lower, centre_u=0.5 * float(u_l + u_r), half_width=0.5 * mouth_w,
            max_gap=0.42 * mouth_w, upper_reach=upper_reach,
            lower_reach=max(2.5 * lower_lip, 0.3 * mouth_w), chin_v=float(uv[_CHIN, 1]),
            chin_fade=chin_fade, jaw_half_width=0.75 * face_w,
            support=(-0.8 * face_w, 0.8 * face_w, float(uv[_NOSE_BASE, 1]) - 2.0,
                     float(uv[_CHIN, 1]) + chin_fade + 2.0),
        )
        eyes = []
        for up_idx, lo_idx, brow in _EYES:
            e_up, e_lo = _Curve(uv[list(up_idx)]), _Curve(uv[list(lo_idx)])
            band = 0.9 * float(uv[list(up_idx), 1].min() - uv[brow, 1])
            u0, u1 = float(uv[list(up_idx), 0].min()), float(uv[list(up_idx), 0].max())
            eyes.append(_EyeGeom(e_up, e_lo, max(band, 2.0), (
                u0 - 2.0, u1 + 2.0, float(uv[list(up_idx), 1].min()) - band - 2.0,
                float(uv[list(lo_idx), 1].max()) + 2.0)))

        alpha, head_w, background = _matte(image, seg, pts, origin, axes)
        chin = uv[_CHIN] @ axes + origin
        pivot = chin + np.array([0.0, 0.15 * face_h])

        # Pixels whose output can change: the head region grown by the largest motion.
        margin = int(math.ceil(0.05 * size)) + 2
        moving = head_w > 1e-3
        grown = cv2.dilate(moving.astype(np.uint8), cv2.getStructuringElement(
            cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1)))
        ys, xs = np.nonzero(grown)
        box = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
        rgba = np.dstack([image, np.round(alpha * 255).astype(np.uint8)])

        corners = []
        for u0, u1, v0, v1 in [mouth.support] + [e.support for e in eyes]:
            for u in (u0, u1):
                for v in (v0, v1):
                    corners.append(np.array([u, v]) @ axes + origin)
        corners = np.array(corners)
        fx0 = int(max(box[2], math.floor(corners[:, 0].min()) - margin))
        fx1 = int(min(box[3], math.ceil(corners[:, 0].max()) + margin))
        fy0 = int(max(box[0], math.floor(corners[:, 1].min()) - margin))
        fy1 = int(min(box[1], math.ceil(corners[:, 1].max()) + margin))
        return cls(size, rgba, background, head_w, box, (fy0, fy1, fx0, fx1), origin, axes, pivot,
                   mouth, (eyes[0], eyes[1]))

    def render(self, mouth_open: float, mouth_width: float, blink: float, rotation_deg: float,
               translation: np.ndarray, scale: float) -> np.ndarray:
        """One RGB frame [size, size, 3] uint8 for the given articulation and head pose."""
        import cv2

        # Head motion: inverse similarity about the neck pivot, blended by the head weight.
        a = math.radians(rotation_deg)
        c, s = math.cos(a), math.sin(a)
        dx = self.xs - self.pivot[0] - float(translation[0])
        dy = self.ys - self.pivot[1] - float(translation[1])
        # Forward: x = P + t + scale * R(-a) (q - P) (counter-clockwise on screen, y down).
        qx = self.pivot[0] + (c * dx - s * dy) / scale
        qy = self.pivot[1] + (s * dx + c * dy) / scale
        w = self.head_w
        mx = self.xs + w * (qx - self.xs)
        my = self.ys + w * (qy - self.ys)

        fs = self.face_slice
        fx, fy = mx[fs], my[fs]
        o, ax = self.origin, self.axes
        u = (fx - o[0]) * ax[0, 0] + (fy - o[1]) * ax[0, 1]
        v = (fx - o[0]) * ax[1, 0] + (fy - o[1]) * ax[1, 1]
        su, sv, cavity = self._deform(u, v, mouth_open, mouth_width, blink)
        mx[fs] = o[0] + su * ax[0, 0] + sv * ax[1, 0]
        my[fs] = o[1] + su * ax[0, 1] + sv * ax[1, 1]

        layer = cv2.remap(self.rgba, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        rgb = layer[:, :, :3].astype(np.float32)
        alpha = layer[:, :, 3:4].astype(np.float32) * (1.0 / 255.0)
        if cavity is not None:
            face = rgb[fs]
            face += cavity[..., :1] * (cavity[..., 1:] - face)
            rgb[fs] = face
        y0, y1, x0, x1 = self.box
        bg = self.background[y0:y1, x0:x1].astype(np.float32)
        out = self.frame.copy()
        out[y0:y1, x0:x1] = np.clip(bg + alpha * (rgb - bg) + 0.5, 0, 255).astype(np.uint8)
        return out

    def _deform(self, u: np.ndarray, v: np.ndarray, mouth_open: float, mouth_width: float,
                blink: float):
        """Backward face warp in the face frame: source (u, v) for output (u, v), and the
        mouth-interior paint (alpha, rgb) [h, w, 4] or None when the lips are together."""
        m = self.mouth
        # Lip spread/pucker: horizontal scaling about the mouth centre, fading out around it.
        k = 0.09 * mouth_width if mouth_width > 0 else 0.13 * mouth_width
        du_c = u - m.centre_u
        g = _cos_window(du_c, 2.2 * m.half_width) * _cos_window(v, 1.6 * m.half_width)
        su = u - du_c * (1.0 - 1.0 / (1.0 + k)) * g

        # Jaw and lips: the inner lips part into a lens (upper lip 20 %, lower lip/jaw 80 %).
        yu, yl = m.upper(su), m.lower(su)
        r = (su - m.centre_u) / m.half_width
        prof = np.clip(1.0 - r * r, 0.0, 1.0) ** 0.6
        gap = m.max_gap * float(mouth_open)
        mid = 0.5 * (yu + yl)
        out_u = mid - 0.2 * gap * prof
        out_l = mid + 0.8 * gap * prof
        d_up = out_u - yu
        d_lo = out_l - yl
        jaw = 0.8 * gap - 0.5 * float(m.lower(m.centre_u) - m.upper(m.centre_u))
        sv = v.copy()
        above = v <= out_u
        fade_up = 1.0 - _smoothstep(0.0, m.upper_reach, out_u - v)
        sv = np.where(above, v - d_up * fade_up, sv)
        below = v >= out_l
        reach = m.lower_reach * (1.0 + 1.5 * (1.0 - prof))
        blend = _smoothstep(0.0, reach, v - out_l)
        h = _cos_window(su - m.centre_u, m.jaw_half_width)
        chin = 1.0 - _smoothstep(m.chin_v, m.chin_v + m.chin_fade, v)
        disp = (d_lo * (1.0 - blend) + jaw * h * blend) * chin
        sv = np.where(below, v - disp, sv)

        # Inside the mouth: the still's upper teeth move with the upper lip; below them a dark
        # cavity shading to tongue colour, darker towards the corners.
        inside = (~above) & (~below)
        cavity = None
        if gap > 0.0 and bool(inside.any()):
            depth = v - out_u
            teeth_h = 0.9 * (yl - yu)
            sv = np.where(inside, yu + np.minimum(depth, teeth_h), sv)
            opening = np.maximum(out_l - out_u, 1e-3)
            t_rel = np.clip((v - out_u - teeth_h) / np.maximum(opening - teeth_h, 1e-3), 0.0, 1.0)
            dark = np.array([38.0, 12.0, 12.0], dtype=np.float32)
            tongue = np.array([120.0, 48.0, 50.0], dtype=np.float32)
            colour = dark + (tongue - dark) * (t_rel[..., None] ** 1.5)
            colour *= (1.0 - 0.5 * np.clip(np.abs(r), 0.0, 1.0) ** 2)[..., None]
            a_teeth = np.clip(depth - teeth_h + 0.5, 0.0, 1.0)  # below the teeth band
            a_lips = np.clip(np.minimum(depth, out_l - v) + 0.5, 0.0, 1.0)
            a = np.where(inside, a_teeth * a_lips, 0.0).astype(np.float32)
            cavity = np.concatenate([a[..., None], colour.astype(np.float32)], axis=-1)

        # Blinks: the upper lid slides down to the lower lid; the skin band above it stretches.
        if blink > 1e-3:
            for eye in self.eyes:
                eu, el = eye.upper(su), eye.lower(su)
                lid = eu + float(blink) * (el - eu)
                top = eu - eye.lid_band
                u0, u1 = eye.support[:2]
                band = (v > top) & (v < lid) & (su > u0) & (su < u1)
                stretched = top + (v - top) * (eu - top) / np.maximum(lid - top, 1e-3)
                sv = np.where(band, stretched, sv)
        return su, sv, cavity


def _matte(image: np.ndarray, seg: np.ndarray, pts: np.ndarray, origin: np.ndarray,
           axes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Person alpha [H, W], head-layer weight [H, W] and static background plate [H, W, 3].

    The selfie segmentation is coarse (it drops the ears and cuts into the hair), so near the
    head it is completed by a difference matte against an inpainted estimate of the backdrop.
    The head weight is 1 on the face (hull of the mesh) and on the hair above the mouth and fades
    out over a few pixels into neck and backdrop, so that the head moves while the torso and
    suit collar stay still. The background plate is the inpainted backdrop where the head may
    uncover it, fading back to the real image where the head weight drops.
    """
    import cv2

    size = image.shape[0]
    alpha = _smoothstep(0.25, 0.75, seg)
    hull = np.zeros((size, size), np.uint8)
    cv2.fillConvexPoly(hull, np.round(cv2.convexHull(pts.astype(np.float32))).astype(np.int32)
                       .reshape(-1, 2), 1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    above_mouth = (xx - origin[0]) * axes[1, 0] + (yy - origin[1]) * axes[1, 1] < 0.0

    def disk(radius: float) -> np.ndarray:
        r = max(1, int(round(radius)))
        return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))

    near = cv2.dilate(hull | ((alpha > 0.5) & above_mouth).astype(np.uint8), disk(0.06 * size))
    hide = cv2.dilate((alpha > 0.02).astype(np.uint8), disk(0.05 * size)) & near
    backdrop = _inpaint_behind(image, hide > 0).astype(np.float32)
    diff = np.linalg.norm(image.astype(np.float32) - backdrop, axis=2)
    alpha = np.maximum(alpha, _smoothstep(18.0, 45.0, diff) * (hide > 0))
    alpha = cv2.GaussianBlur(alpha.astype(np.float32), (0, 0), 0.6 * size / 512.0 + 0.3)

    head = hull | ((alpha > 0.5) & above_mouth).astype(np.uint8)
    head = cv2.morphologyEx(head, cv2.MORPH_CLOSE, disk(0.01 * size))
    soft = cv2.GaussianBlur(head.astype(np.float32), (0, 0), 0.02 * size)
    head_w = _smoothstep(0.02, 0.5, soft).astype(np.float32)
    beta = _smoothstep(0.2, 0.6, head_w)[..., None] * (hide > 0)[..., None]
    background = np.round(image + beta * (backdrop - image)).astype(np.uint8)
    return alpha.astype(np.float32), head_w, background


def _inpaint_behind(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Background plate: ``image`` with the masked person region filled from its surroundings.

    Inpainting runs at a quarter of the size: the backdrop is smooth and only a thin band of it
    ever shows behind the moving head, so detail does not matter but speed does.
    """
    import cv2

    size = image.shape[0]
    small = max(32, size // 4)
    img_s = cv2.resize(image, (small, small), interpolation=cv2.INTER_AREA)
    mask_s = cv2.resize(mask.astype(np.uint8) * 255, (small, small), interpolation=cv2.INTER_AREA)
    mask_s = cv2.dilate((mask_s > 0).astype(np.uint8) * 255, np.ones((3, 3), np.uint8))
    filled = cv2.inpaint(img_s, mask_s, 5, cv2.INPAINT_TELEA)
    filled = cv2.GaussianBlur(filled, (0, 0), 1.0)
    up = cv2.resize(filled, (size, size), interpolation=cv2.INTER_CUBIC)
    out = image.copy()
    out[mask] = up[mask]
    return out
