"""Make a trained avatar say new speech: any audio file in, an mp4 of the person saying it out.

The speech is decoded to a temporary 16 kHz wav and processed in blocks of frames: audio
features (with a margin of context on both sides), audio codes, deformation, rasterization, and
straight into the video encoder, so memory stays flat however long the speech is. What the
speech cannot provide comes from the subject:

* head pose, torso and background: ``loop`` walks the training frames forwards then backwards
  (no jump at the turn), ``static`` holds one frame, or a pose file;
* blinks: ``auto`` places blinks at intervals drawn from the subject's own blink timing, using
  the shapes of its own blinks; ``none`` keeps the eyes open; or a per-frame file.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from avatar import media
from avatar.audio import AudioFeatureConfig, compute_audio_features
from avatar.errors import InputError
from avatar.progress import Progress, null_progress, report_status

log = logging.getLogger(__name__)

BLINK_NAMES = ("eye_blink_left", "eye_blink_right")


@dataclass
class RenderOptions:
    """How ``avatar render`` fills in what the speech does not say."""

    pose: str = "loop"
    """``loop``, ``static``, ``static:N`` (hold subject frame N) or a ``.npz`` pose track."""
    blink: str = "auto"
    """``auto``, ``none`` or a ``.npy``/``.npz``/``.txt`` file of per-frame blink values in 0..1."""
    size: Optional[int] = None
    """Output resolution in pixels (default: the training resolution)."""
    batch: int = 8
    """Frames whose conditions and deformations are computed together."""
    block: int = 256
    """Frames per audio-feature block (bounds memory for long speech)."""
    seed: int = 0
    """Seed of the automatic blink timing."""
    device: str = "auto"
    crf: int = 18


@dataclass
class RenderSummary:
    output: Path
    n_frames: int
    duration_s: float
    seconds: float
    render_fps: float
    resolution: int
    device: str


# -- pose and blink tracks ------------------------------------------------------------------


def loop_indices(train: np.ndarray, n: int, start: int = 0) -> np.ndarray:
    """``n`` subject frames walking ``train`` forwards then backwards (ping-pong), from ``start``."""
    if len(train) == 1:
        return np.repeat(train, n)
    cycle = np.concatenate([train, train[-2:0:-1]])
    return cycle[(start + np.arange(n)) % len(cycle)]


def pose_track(spec: str, n: int, train: np.ndarray, n_subject: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Subject frame per output frame (torso, background, brows), and optional camera overrides.

    Returns:
        frame indices [n], and cam_to_world [n, 4, 4] when the pose comes from a file (else None).

    Raises:
        InputError: unknown spec, unreadable or malformed pose file.
    """
    if spec == "loop":
        return loop_indices(train, n), None
    if spec == "static" or spec.startswith("static:"):
        frame = int(train[0]) if spec == "static" else int(spec.split(":", 1)[1])
        if not 0 <= frame < n_subject:
            raise InputError(f"--pose {spec}: the subject has frames 0..{n_subject - 1}.")
        return np.full(n, frame), None
    path = Path(spec)
    if path.suffix != ".npz" or not path.is_file():
        raise InputError(f"--pose must be loop, static, static:N or an existing .npz file, got {spec!r}.")
    try:
        with np.load(path, allow_pickle=False) as data:
            c2w = np.asarray(data["cam_to_world"], np.float64)
            frames = np.asarray(data["frame_index"]) if "frame_index" in data.files else None
    except (OSError, KeyError, ValueError) as err:
        raise InputError(f"{path} is not a pose track with a 'cam_to_world' [F,4,4] array ({err}).") from None
    if c2w.ndim != 3 or c2w.shape[1:] != (4, 4) or len(c2w) == 0:
        raise InputError(f"{path}: cam_to_world must have shape [F, 4, 4], got {c2w.shape}.")
    take = np.minimum(np.arange(n), len(c2w) - 1)  # hold the last pose past the file's end
    if frames is None:
        frames = loop_indices(train, n)
    else:
        frames = np.clip(frames[np.minimum(np.arange(n), len(frames) - 1)], 0, n_subject - 1)
    return frames.astype(int), c2w[take]


def blink_events(track: np.ndarray, threshold: float = 0.5) -> list[tuple[int, int]]:
    """(start, stop) frame ranges where a 0..1 blink track is above ``threshold``."""
    above = np.concatenate([[False], track > threshold, [False]])
    edges = np.flatnonzero(np.diff(above.astype(int)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def auto_blinks(subject_blink: np.ndarray, n: int, fps: float, seed: int = 0) -> np.ndarray:
    """A natural blink track [n, 2] for new speech, learned from the subject's own [T, 2].

    Intervals between blinks are drawn from the subject's (or, with fewer than two blinks, from
    a typical 2-6 s range); each blink reuses the profile of one of the subject's blinks.
    """
    rng = np.random.default_rng(seed)
    mean_track = subject_blink.mean(axis=1)
    events = blink_events(mean_track)
    base = np.percentile(subject_blink, 10, axis=0)
    out = np.tile(base, (n, 1)).astype(np.float32)
    starts = [a for a, _ in events]
    gaps = np.diff(starts) / fps if len(starts) >= 2 else np.array([])
    gaps = gaps[gaps > 0.5]
    profiles = []
    for a, b in events:
        lo, hi = max(0, a - 2), min(len(subject_blink), b + 2)
        profiles.append(subject_blink[lo:hi])
    if not profiles:  # a subject that never blinked: a 5-frame closure
        profiles = [np.array([[0.3, 0.3], [0.8, 0.8], [1.0, 1.0], [0.8, 0.8], [0.3, 0.3]], np.float32)]
    t = rng.uniform(0.5, 3.0)
    while True:
        frame = int(t * fps)
        if frame >= n:
            break
        prof = profiles[rng.integers(len(profiles))]
        stop = min(n, frame + len(prof))
        out[frame:stop] = np.maximum(out[frame:stop], prof[: stop - frame])
        t += float(rng.choice(gaps)) if len(gaps) else rng.uniform(2.0, 6.0)
    return out


def blink_track(spec: str, n: int, fps: float, subject_blink: np.ndarray, seed: int) -> np.ndarray:
    """Per-frame blink values [n, 2] (left, right) for ``--blink``.

    Raises:
        InputError: unknown spec or unreadable file.
    """
    if spec == "auto":
        return auto_blinks(subject_blink, n, fps, seed)
    if spec == "none":
        return np.tile(np.percentile(subject_blink, 10, axis=0), (n, 1)).astype(np.float32)
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"--blink must be auto, none or an existing file, got {spec!r}.")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                values = np.asarray(data[data.files[0]], np.float32)
        elif path.suffix == ".npy":
            values = np.load(path, allow_pickle=False).astype(np.float32)
        else:
            values = np.loadtxt(path, dtype=np.float32)
    except (OSError, ValueError, IndexError) as err:
        raise InputError(f"{path} is not a readable blink track ({err}).") from None
    values = values.reshape(len(values), -1)
    if values.shape[1] == 1:
        values = np.repeat(values, 2, axis=1)
    if values.shape[1] != 2 or len(values) == 0:
        raise InputError(f"{path}: expected [T] or [T, 2] blink values, got {values.shape}.")
    return np.clip(values[np.minimum(np.arange(n), len(values) - 1)], 0, 1)


# -- audio codes in blocks ------------------------------------------------------------------


def audio_code_blocks(model, wav: Path, n_frames: int, fps: float, config: AudioFeatureConfig,
                      device: torch.device, block: int, margin: int = 8) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (first frame, codes [B, C]) for consecutive blocks of frames of the speech in ``wav``.

    Each block's features are computed with ``margin`` frames of real audio context on both
    sides, so block edges see the same audio as an unbroken pass would.
    """
    per_frame = media.AUDIO_RATE / fps
    for a in range(0, n_frames, block):
        b = min(n_frames, a + block)
        lo = a - margin
        count = (b - a) + 2 * margin
        start = int(round(lo * per_frame))
        samples = media.read_wav_segment(wav, start, int(math.ceil(count * per_frame)) + 1)
        feats = compute_audio_features(samples, count, fps, config)
        feats_t = torch.from_numpy(feats).to(device)
        idx = torch.arange(margin, margin + (b - a), device=device)
        codes, _ = model.audio(feats_t, idx, smooth=True)
        yield a, codes


def check_speech(wav: Path, source: Path) -> None:
    """Refuse silent speech: the avatar would stand with its mouth shut."""
    with wave.open(str(wav), "rb") as wf:
        n = wf.getnframes()
    peak = 0.0
    step = media.AUDIO_RATE * 30
    for start in range(0, n, step):
        seg = media.read_wav_segment(wav, start, min(step, n - start))
        peak = max(peak, float(np.abs(seg).max(initial=0.0)))
    if peak < 1e-3:
        raise InputError(f"{source} is silent; give a recording of speech.")


# -- the whole render -----------------------------------------------------------------------


@torch.no_grad()
def render_speech(run_dir: Path | str, speech: Path | str, output: Path | str,
                  options: RenderOptions = RenderOptions(), progress: Optional[Progress] = None) -> RenderSummary:
    """Render the run's avatar saying ``speech`` into ``output`` (H.264 + AAC mp4).

    Raises:
        AvatarError: bad run, unreadable/silent/empty speech, bad pose or blink spec, output
            directory missing. Nothing is left at ``output`` on failure.
    """
    from avatar.models.talking_head import FrameCondition
    from avatar.train.data import SubjectData
    from avatar.train.trainer import load_model, resolve_device

    speech, output = Path(speech), Path(output)
    if not output.parent.is_dir():
        raise InputError(f"The directory {output.parent} does not exist; create it first.")
    if output.suffix.lower() != ".mp4":
        raise InputError(f"{output} should end in .mp4.")
    device = resolve_device(options.device)
    config, model, _ = load_model(run_dir, str(device))
    report = progress or null_progress
    start_time = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="avatar-render-") as tmp:
        wav = Path(tmp) / "speech.wav"
        duration = media.decode_audio_to_wav(speech, wav)
        check_speech(wav, speech)
        size = options.size or config.resolution
        data = SubjectData(config.subject, size, config.model.eye_features, device, progress)
        fps = data.subject.manifest.fps
        n = max(1, int(round(duration * fps)))
        feat_cfg = _feature_config(data.subject.manifest.audio_features)
        frames_idx, c2w = pose_track(options.pose, n, data.split("train"), data.n_frames)
        names = list(config.model.eye_features)
        eye_all = data.eye.cpu().numpy()
        blink_cols = [names.index(b) for b in BLINK_NAMES if b in names]
        blinks = blink_track(options.blink, n, fps, eye_all[:, blink_cols], options.seed) if len(blink_cols) == 2 else None
        viewmats = None
        if c2w is not None:
            viewmats = torch.linalg.inv(torch.from_numpy(c2w)).float().to(device)
        report("render", 0, n)
        rendered = 0
        render_seconds = 0.0
        with media.VideoWriter(output, fps=fps, audio=speech, crf=options.crf) as writer:
            for a, codes in audio_code_blocks(model, wav, n, fps, feat_cfg, device, options.block):
                for b0 in range(0, codes.shape[0], max(1, options.batch)):
                    t0 = time.perf_counter()
                    ts = range(a + b0, a + min(codes.shape[0], b0 + max(1, options.batch)))
                    frames = [data.frame(int(frames_idx[t])) for t in ts]
                    eyes = torch.stack([f.eye for f in frames])
                    if blinks is not None:
                        eyes[:, blink_cols] = torch.from_numpy(blinks[list(ts)]).to(device)
                    if c2w is not None:  # the head turns as the pose file says, and the hair with it
                        eyes = data.with_pose(eyes, c2w[list(ts)])
                    views = torch.stack([f.viewmat if viewmats is None else viewmats[t] for f, t in zip(frames, ts)])
                    conds = FrameCondition(codes[b0:b0 + len(ts)], eyes)
                    outs = model.render_many(conds, views, data.K, size, size,
                                             torch.stack([f.background for f in frames]))
                    images = (outs.clamp(0, 1) * 255).round().byte().cpu().numpy()
                    render_seconds += time.perf_counter() - t0
                    for image in images:
                        writer.write(image)
                    rendered += len(images)
                    report_status(progress, "render", f"{rendered / max(render_seconds, 1e-9):.1f} frames/s")
                    report("render", rendered, n)
    seconds = time.perf_counter() - start_time
    return RenderSummary(output=output, n_frames=rendered, duration_s=duration, seconds=seconds,
                         render_fps=rendered / max(render_seconds, 1e-9), resolution=size, device=str(device))


def _feature_config(stored: dict) -> AudioFeatureConfig:
    """The subject's audio-feature config from its manifest entry (window/dim are derived)."""
    fields = {f for f in AudioFeatureConfig.__dataclass_fields__}
    return AudioFeatureConfig(**{k: v for k, v in stored.items() if k in fields})
