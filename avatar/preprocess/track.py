"""The main pass over the cropped video: frames, landmarks, person masks, background samples.

One streaming decode of the crop (ffmpeg resamples the frame rate, crops and resizes) feeds
mediapipe's face mesh in tracking mode and its selfie segmentation; each frame is written as
soon as it is processed, so memory stays bounded whatever the video length. Image encoding
runs in a small thread pool (OpenCV releases the GIL) while the next frame is tracked.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from avatar import media
from avatar.preprocess.background import BackgroundAccumulator
from avatar.preprocess.masks import label_map
from avatar.progress import Progress, track
from avatar.subject import LABEL, SubjectPaths

log = logging.getLogger(__name__)

JPEG_PARAMS = [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
               cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1]


@dataclass
class TrackConfig:
    """Face mesh and segmentation settings of the main pass."""

    min_detection_confidence: float = 0.5
    min_tracking_confidence: float = 0.5
    person_threshold: float = 0.5
    """Selfie-segmentation probability above which a pixel belongs to the person."""
    background_samples: int = 48
    """Frames kept (evenly spaced) for the background median."""


@dataclass
class TrackResult:
    landmarks: np.ndarray
    """[T, 478, 3] float32: x, y in crop pixels, z mediapipe's relative depth scaled like x."""
    valid: np.ndarray
    """[T] bool: the face mesh tracked this frame."""
    background: np.ndarray
    """[size, size, 3] uint8 background plate."""
    neck_plate: np.ndarray
    """[size, size, 3] uint8 what lies behind the head (torso + neck median, filled upwards)."""


def _write(path: Path, image: np.ndarray, params: list[int]) -> None:
    if not cv2.imwrite(str(path), image, params):
        raise OSError(f"could not write {path}")


def track_video(
    video: Path,
    paths: SubjectPaths,
    fps: float,
    crop: media.Crop,
    size: int,
    n_expected: Optional[int],
    config: TrackConfig = TrackConfig(),
    progress: Optional[Progress] = None,
) -> TrackResult:
    """Decode the crop of ``video`` at ``fps`` and ``size``; write frames and provisional masks.

    Masks of frames where the face was not tracked hold only person/background labels; they are
    redrawn after landmark interpolation (:func:`avatar.preprocess.masks.label_map`).
    """
    import mediapipe as mp

    paths.frames_dir.mkdir(parents=True, exist_ok=True)
    paths.masks_dir.mkdir(parents=True, exist_ok=True)
    for stale in list(paths.frames_dir.glob("*.jpg")) + list(paths.masks_dir.glob("*.png")):
        stale.unlink()
    background = BackgroundAccumulator(n_expected or 1, config.background_samples)
    landmarks: list[np.ndarray] = []
    valid: list[bool] = []
    nan_face = np.full((478, 3), np.nan, np.float32)
    pending = []
    frames = media.iter_frames(video, fps=fps, crop=crop, size=(size, size))
    with mp.solutions.face_mesh.FaceMesh(
        static_image_mode=False,
        max_num_faces=1,
        refine_landmarks=True,
        min_detection_confidence=config.min_detection_confidence,
        min_tracking_confidence=config.min_tracking_confidence,
    ) as mesh, mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0) as seg, \
            ThreadPoolExecutor(max_workers=2) as pool:
        for i, frame in enumerate(track(frames, "track faces", n_expected, progress)):
            result = mesh.process(frame)
            if result.multi_face_landmarks:
                lm = result.multi_face_landmarks[0].landmark
                pts = np.array([(p.x, p.y, p.z) for p in lm], np.float32) * size
                landmarks.append(pts)
                valid.append(True)
            else:
                landmarks.append(nan_face)
                valid.append(False)
            person = seg.process(frame).segmentation_mask > config.person_threshold
            labels = label_map(person, landmarks[-1] if valid[-1] else None)
            if background.wants(i):
                background.add(frame, person, labels == LABEL["torso_neck"])
            pending.append(pool.submit(_write, paths.frame(i), frame[:, :, ::-1], JPEG_PARAMS))
            pending.append(pool.submit(_write, paths.mask(i), labels, PNG_PARAMS))
            if len(pending) > 16:
                for fut in pending[:-8]:
                    fut.result()
                pending = pending[-8:]
        for fut in pending:
            fut.result()
    if not landmarks:
        empty = np.zeros((size, size, 3), np.uint8)
        return TrackResult(np.zeros((0, 478, 3), np.float32), np.zeros(0, bool), empty, empty)
    return TrackResult(
        landmarks=np.stack(landmarks).astype(np.float32),
        valid=np.array(valid, bool),
        background=background.plate(),
        neck_plate=background.neck_plate(),
    )


def fill_gaps(landmarks: np.ndarray, valid: np.ndarray, max_gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate landmarks over runs of untracked frames no longer than ``max_gap``.

    Runs at the start or end are held at the nearest tracked frame when short. Frames stay
    marked invalid either way (they were not observed); longer gaps keep NaN landmarks.

    Args:
        landmarks: [T, 478, 3] with NaN where not tracked.
        valid: [T] bool.

    Returns:
        (filled landmarks [T, 478, 3], filled mask [T] bool: has usable landmarks).
    """
    t = len(valid)
    out = landmarks.copy()
    usable = valid.copy()
    idx = np.flatnonzero(valid)
    if idx.size == 0:
        return out, usable
    i = 0
    while i < t:
        if valid[i]:
            i += 1
            continue
        j = i
        while j < t and not valid[j]:
            j += 1
        gap = j - i
        if gap <= max_gap:
            if i == 0:
                out[i:j] = landmarks[j]
            elif j == t:
                out[i:j] = landmarks[i - 1]
            else:
                w = (np.arange(1, gap + 1) / (gap + 1))[:, None, None].astype(np.float32)
                out[i:j] = (1 - w) * landmarks[i - 1] + w * landmarks[j]
            usable[i:j] = True
        i = j
    return out, usable
