"""Lip sync judged against real mouths: the avatar says another person's speech, frame by frame.

The self-driven ``mouth_corr`` of the val split re-renders the subject's own speech, so an avatar
that learned the subject's habits (or memorised a sentence) can score well there and still move
its lips wrongly for anyone else's voice. Here the speech of a real video of *another* person
drives the avatar, and the avatar's inner-lip opening is compared with that person's real one,
both measured by the same mediapipe face mesh (:class:`avatar.eval.landmarks.MouthTracker`) and
normalised by the same face size (the outer-eye-corner distance of
:func:`avatar.eval.landmarks.inner_lip_opening`), at the subject's frame rate.

``cross_mouth_corr`` is the Pearson r of the two opening series at the best audio-visual offset
within +-80 ms: 1 means the avatar's lips follow the real person's exactly, 0 unrelated. The
offset is reported in ms; positive means the avatar's mouth moves *later* than the real one.

Nothing holds a whole video: the driving video is decoded frame by frame (resampled to the
subject's fps by :func:`avatar.media.iter_frames`), its speech goes to a wav in a scratch
directory (:func:`avatar.media.decode_audio_to_wav`, through the demuxer/protocol allow-lists),
and rendered frames are tracked as they come.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from avatar import media
from avatar.atomic import scratch_dir
from avatar.errors import InputError
from avatar.eval.landmarks import MouthTracker, inner_lip_opening, lip_sync_correlation
from avatar.models import AvatarModel
from avatar.progress import Progress, null_progress, track
from avatar.speak import DriveOptions, SpeechDriver, WavSpeech
from avatar.speak.render import check_speech, rendered_batches
from avatar.subject_data import SubjectData

log = logging.getLogger(__name__)

MAX_OFFSET_S = 0.08
"""Largest audio-visual offset searched: lips lead or trail the sound by a frame or two (and a
driving video's streams may be a little out of step), more would reward a wrong mouth by luck."""
MIN_SECONDS = 1.0
"""A driving video must give this much speech with a visible face: below it, r is noise."""
MIN_PAIRS = 3
"""Frames with a face in both series below which no correlation is defined."""
DRIVE_OPTIONS = DriveOptions(pose="loop", blink="auto", seed=0)
"""What the speech does not say: the subject's own head motion, its blink timing, a fixed seed."""


def max_offset_frames(fps: float) -> int:
    """The +-offset searched, in frames: round(0.08 * fps) (2 at 25 fps)."""
    return int(round(MAX_OFFSET_S * fps))


@dataclass
class DrivingVideo:
    """A checked driving video: its speech as a wav and the real person's mouth opening."""

    path: Path
    wav: Path
    """16 kHz mono speech, decoded into a scratch directory."""
    fps: float
    """The rate ``real_open`` was measured at (the subject's)."""
    real_open: np.ndarray
    """[T] inner-lip opening / inter-ocular distance per frame, NaN where no face was found."""


def check_drive_video(path: Path) -> media.MediaInfo:
    """Refuse, in one sentence, a driving video that cannot give both speech and a face to compare.

    Raises:
        InputError: missing or unreadable file, no video or audio stream, shorter than 1 s.
    """
    info = media.probe(path)
    if not info.has_video:
        raise InputError(f"{path} has no video stream; --drive needs a video of a person speaking.")
    if not info.has_audio:
        raise InputError(f"{path} has no audio track; --drive needs a video with the speaker's voice.")
    if info.duration_s is not None and info.duration_s < MIN_SECONDS:
        raise _too_short(path, info.duration_s)
    return info


def _too_short(path: Path, seconds: float) -> InputError:
    return InputError(f"{path} lasts only {seconds:.2f} s; --drive needs at least {MIN_SECONDS:g} s of speech.")


def real_mouth_opening(path: Path, fps: float, progress: Optional[Progress] = None) -> np.ndarray:
    """The real person's inner-lip opening per frame of ``path`` resampled to ``fps``.

    Returns:
        float64 [T]; NaN where no face was found.

    Raises:
        InputError: shorter than 1 s at ``fps``, or a face in less than 1 s worth of frames.
    """
    with MouthTracker().session() as session:
        for frame in track(media.iter_frames(path, fps=fps), "drive: real mouth", None, progress):
            session.add(frame)
        opening = inner_lip_opening(session.landmarks())
    n, found = len(opening), int(np.isfinite(opening).sum())
    if n < MIN_SECONDS * fps:
        raise _too_short(path, n / fps)
    if found == 0:
        raise InputError(f"no face was found in {path}; --drive needs a video with the speaker's face in view.")
    if found < MIN_SECONDS * fps:
        raise InputError(f"a face was found in only {found} of the {n} frames of {path}; --drive needs at least "
                         f"{MIN_SECONDS:g} s with the speaker's face in view.")
    log.info("%s: a face in %d of %d frames at %g fps", path, found, n, fps)
    return opening


def load_driving_video(path: Path | str, fps: float, wav: Path, progress: Optional[Progress] = None) -> DrivingVideo:
    """Check ``path``, decode its speech to ``wav`` and measure the real mouth, before any rendering
    (a video without a face should fail in seconds, not after the avatar has rendered it).

    Raises:
        InputError: see :func:`check_drive_video` and :func:`real_mouth_opening`; silent speech.
    """
    path = Path(path)
    check_drive_video(path)
    seconds = media.decode_audio_to_wav(path, wav)
    if seconds < MIN_SECONDS:
        raise _too_short(path, seconds)
    check_speech(wav, path)
    return DrivingVideo(path, wav, float(fps), real_mouth_opening(path, fps, progress))


def cross_correlation(avatar_open: np.ndarray, real_open: np.ndarray, fps: float) -> dict[str, Any]:
    """``cross_mouth_corr`` (best Pearson r within +-80 ms), its ``offset_ms`` and ``n_frames`` paired there.

    A positive offset means the avatar's mouth moves later than the real one
    (``avatar_open[t + lag]`` pairs with ``real_open[t]``). Frames without a face in either
    series are left out; with fewer than 3 left, the correlation is None.

    Args:
        avatar_open, real_open: openings per frame at ``fps``; the longer is cut to the shorter. [T]
    """
    n = min(len(avatar_open), len(real_open))
    a, b = np.asarray(avatar_open, np.float64)[:n], np.asarray(real_open, np.float64)[:n]
    r, lag = lip_sync_correlation(a, b, max_lag=min(max_offset_frames(fps), max(n - 1, 0)))
    used = _pairs(a, b, lag)
    if used < MIN_PAIRS or not np.isfinite(r):
        r = None
    return {"cross_mouth_corr": None if r is None else round(float(r), 4),
            "offset_ms": None if r is None else round(lag * 1000.0 / fps, 1), "n_frames": used}


def _pairs(a: np.ndarray, b: np.ndarray, lag: int) -> int:
    """Frames finite in both series when ``a`` is shifted by ``lag`` against ``b``."""
    n = len(a)
    x, y = (a[lag:], b[: n - lag]) if lag >= 0 else (a[: n + lag], b[-lag:])
    return int((np.isfinite(x) & np.isfinite(y)).sum())


@torch.no_grad()
def render_driven(model: AvatarModel, data: SubjectData, wav: Path, n_frames: int, batch: int = 8,
                  progress: Optional[Progress] = None) -> Iterator[np.ndarray]:
    """Yield the avatar's frames (uint8 [S, S, 3] at ``data.resolution``) saying the speech of ``wav``,
    through :class:`avatar.speak.SpeechDriver` exactly as ``avatar render`` does (pose loop, auto blinks)."""
    driver = SpeechDriver(model, data)
    plan = driver.plan(n_frames, DRIVE_OPTIONS)
    done = 0
    report = progress or null_progress
    report("drive: render", 0, n_frames)
    for images, _ in rendered_batches(driver, WavSpeech(wav), plan, batch, DRIVE_OPTIONS.block):
        yield from images
        done += len(images)
        report("drive: render", done, n_frames)


def drive_metrics(model: AvatarModel, data: SubjectData, video: DrivingVideo | Path | str,
                  side_by_side: Optional[Path] = None, progress: Optional[Progress] = None) -> dict[str, Any]:
    """Cross-speaker lip sync of ``model`` driven by the speech of ``video`` (see the module docstring).

    Args:
        data: the avatar's subject at the size to render (mediapipe finds no face in a 64 px render).
        video: a driving video already checked by :func:`load_driving_video`, or its path.
        side_by_side: also write real video | avatar as an mp4 with the driving speech.

    Returns:
        ``cross_mouth_corr``, ``offset_ms``, ``n_frames`` (used), ``n_frames_total`` (compared),
        ``avatar_face_frames``, ``size`` and ``seconds`` (rendering and tracking).

    Raises:
        InputError: a driving video without face, audio or length (when given as a path).
    """
    if not isinstance(video, DrivingVideo):
        with scratch_dir("drive") as tmp:
            checked = load_driving_video(video, data.subject.manifest.fps, tmp / "speech.wav", progress)
            return drive_metrics(model, data, checked, side_by_side, progress)
    fps = video.fps
    if not np.isclose(fps, data.subject.manifest.fps):
        raise ValueError(f"{video.path} was measured at {fps:g} fps, the subject runs at {data.subject.manifest.fps:g}")
    model.eval()
    start = time.perf_counter()
    n = min(len(video.real_open), SpeechDriver(model, data).n_frames(WavSpeech(video.wav)))
    with contextlib.ExitStack() as stack:
        tracker = stack.enter_context(MouthTracker().session())
        frames: Iterator[Any] = render_driven(model, data, video.wav, n, progress=progress)
        if side_by_side is not None:
            writer = stack.enter_context(media.VideoWriter(side_by_side, fps=fps, audio=video.wav, shortest=True))
            real = stack.enter_context(contextlib.closing(_real_frames(video.path, fps, data.resolution)))
            frames = _written_beside(frames, writer, real)
        for image in frames:
            tracker.add(image)
        avatar_open = inner_lip_opening(tracker.landmarks())
    found = int(np.isfinite(avatar_open).sum())
    metrics = {**cross_correlation(avatar_open, video.real_open[:n], fps), "n_frames_total": n,
               "avatar_face_frames": found, "size": int(data.resolution),
               "seconds": round(time.perf_counter() - start, 2)}
    if metrics["cross_mouth_corr"] is None:
        log.warning("%s: the avatar's face was found in %d of %d rendered frames at %d px, too few to correlate; "
                    "a larger --drive-size may help.", video.path, found, n, data.resolution)
    return metrics


def _real_frames(path: Path, fps: float, height: int) -> Iterator[np.ndarray]:
    """The driving video's frames at ``fps``, scaled to ``height`` (even width, aspect kept)."""
    w, h = media.probe(path).size
    width = max(2, int(round(w / max(h, 1) * height / 2)) * 2)
    return media.iter_frames(path, fps=fps, size=(width, height))


def _written_beside(frames: Iterator[np.ndarray], writer: media.VideoWriter,
                    real: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    """Pass ``frames`` on, writing each next to the real video's frame (the last one held if it runs out)."""
    last = None
    for image in frames:
        last = next(real, last)
        writer.write(image if last is None else np.concatenate([last, image], axis=1))
        yield image


__all__ = [
    "DrivingVideo",
    "MAX_OFFSET_S",
    "check_drive_video",
    "cross_correlation",
    "drive_metrics",
    "load_driving_video",
    "max_offset_frames",
    "real_mouth_opening",
    "render_driven",
]
