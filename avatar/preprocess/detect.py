"""Find the subject's head in a cheap, sparse pass and place the fixed crop around it.

The crop is fixed for the whole video (the anchors' portrait framing), so it is chosen from the
head's positions over time before any frame is written. Face *detection* on a few frames per
second at reduced resolution is enough for that and costs a fraction of full tracking.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from avatar import media
from avatar.errors import InputError
from avatar.progress import Progress, track

log = logging.getLogger(__name__)


@dataclass
class DetectConfig:
    """Sparse face detection for crop placement."""

    sample_fps: float = 5.0
    """Frames per second of video that get a detection pass."""
    max_side: int = 640
    """Frames are downscaled so that their longer side is at most this (speed; boxes are rescaled)."""
    min_confidence: float = 0.5
    """mediapipe detection score below which a box is ignored."""


@dataclass
class Detections:
    """Per sampled frame, the subject's face box (nan where no face) in source pixels."""

    times: np.ndarray
    """[S] seconds of each sampled frame."""
    boxes: np.ndarray
    """[S, 4] x0, y0, x1, y1 of the chosen face (nan where none)."""
    n_faces: np.ndarray
    """[S] number of faces detected."""
    source_size: tuple[int, int]
    """(width, height) of the decoded source frames."""
    warnings: list[str] = field(default_factory=list)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of an npz (no pickles: the warnings become a unicode array)."""
        return dict(times=self.times, boxes=self.boxes, n_faces=self.n_faces,
                    source_size=np.array(self.source_size), warnings=np.array(self.warnings, dtype=str))

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "Detections":
        """Inverse of :meth:`to_arrays`."""
        return cls(arrays["times"], arrays["boxes"], arrays["n_faces"],
                   tuple(int(v) for v in arrays["source_size"]), [str(w) for w in arrays["warnings"]])


def _detect_all(frames, n_total: Optional[int], scale: float, model: int, min_conf: float,
                progress: Optional[Progress]) -> list[list[tuple[np.ndarray, float]]]:
    import mediapipe as mp

    out = []
    with mp.solutions.face_detection.FaceDetection(model_selection=model,
                                                   min_detection_confidence=min_conf) as det:
        for frame in track(frames, "detect faces", n_total, progress):
            h, w = frame.shape[:2]
            res = det.process(frame)
            faces = []
            for d in res.detections or []:
                b = d.location_data.relative_bounding_box
                box = np.array([b.xmin * w, b.ymin * h, (b.xmin + b.width) * w, (b.ymin + b.height) * h])
                faces.append((box / scale, float(d.score[0])))
            out.append(faces)
    return out


def detect_faces(video: Path, fps: float, info: media.MediaInfo, config: DetectConfig = DetectConfig(),
                 progress: Optional[Progress] = None) -> Detections:
    """Detect faces on a sparse, downscaled pass over ``video`` and follow the largest one.

    Raises:
        InputError: no face in any sampled frame.
    """
    src_w, src_h = info.size
    scale = min(1.0, config.max_side / max(src_w, src_h))
    det_size = (max(2, int(round(src_w * scale / 2)) * 2), max(2, int(round(src_h * scale / 2)) * 2))
    scale_x = det_size[0] / src_w
    sample_fps = min(config.sample_fps, fps)
    n_est = int(info.duration_s * sample_fps) + 1 if info.duration_s else None

    per_frame = None
    for model in (1, 0):  # full-range first (any face size, several faces); short-range as fallback
        frames = media.iter_frames(video, fps=sample_fps, size=det_size)
        per_frame = _detect_all(frames, n_est, scale_x, model, config.min_confidence, progress)
        if any(per_frame):
            break
    assert per_frame is not None
    if not per_frame:
        raise InputError(f"{video} has no decodable video frames.")
    if not any(per_frame):
        raise InputError(
            f"No face was found in {video}; the toolkit needs a video of one person facing the camera."
        )
    return _follow_largest(per_frame, sample_fps, (src_w, src_h))


def _distance_to_reference(box, ref: np.ndarray, ref_size: float) -> float:
    """How far a face box is from the followed face: centre distance and log size ratio."""
    c = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    size = np.sqrt(max((box[2] - box[0]) * (box[3] - box[1]), 1e-6))
    return float(np.linalg.norm(c - ref) / ref_size + abs(np.log(size / ref_size)))


def _follow_largest(per_frame: list[list[tuple[np.ndarray, float]]], sample_fps: float,
                    source_size: tuple[int, int]) -> Detections:
    """Pick the largest face over the video and follow it through frames with several faces."""
    n = len(per_frame)
    n_faces = np.array([len(f) for f in per_frame])
    areas = [max((b[2] - b[0]) * (b[3] - b[1]) for b, _ in faces) for faces in per_frame if faces]
    ref_size = float(np.sqrt(np.median(areas)))
    # Reference centre: that of the largest face in frames with exactly one or the largest face.
    centres = []
    for faces in per_frame:
        if faces:
            b = max(faces, key=lambda f: (f[0][2] - f[0][0]) * (f[0][3] - f[0][1]))[0]
            centres.append([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    ref = np.median(np.array(centres), axis=0)
    boxes = np.full((n, 4), np.nan)
    for i, faces in enumerate(per_frame):
        if not faces:
            continue
        # Prefer the face nearest the running reference among those of comparable size.
        best = min(faces, key=lambda face, ref=ref: _distance_to_reference(face[0], ref, ref_size))[0]
        boxes[i] = best
        ref = 0.8 * ref + 0.2 * np.array([(best[0] + best[2]) / 2, (best[1] + best[3]) / 2])
    warnings = []
    multi = float(np.mean(n_faces >= 2))
    if multi > 0.1:
        warnings.append(
            f"Found two or more faces in {multi:.0%} of sampled frames; using the largest one."
        )
        log.warning(warnings[-1])
    return Detections(times=(np.arange(n) + 0.5) / sample_fps, boxes=boxes, n_faces=n_faces,
                      source_size=source_size, warnings=warnings)


@dataclass
class CropConfig:
    """Where the fixed square crop goes relative to the face box (the anchors' 512 framing)."""

    face_scale: float = 2.4
    """Crop side as a multiple of the face box size (face box: brows to chin)."""
    down_shift: float = 0.3
    """Shift of the crop centre below the face-box centre, in face-box sizes (shows neck, shoulders)."""


def place_crop(det: Detections, config: CropConfig = CropConfig()) -> media.Crop:
    """A square crop, fixed for the video, that keeps the head in frame through its motion.

    Where the ideal square does not fit in the source frame it shrinks to the largest square
    that does (never padding with invented pixels).
    """
    ok = ~np.isnan(det.boxes[:, 0])
    boxes = det.boxes[ok]
    size = np.median(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]))
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    # Head motion: widen by the spread of the centre so the head stays inside the crop.
    spread = max(np.percentile(cx, 95) - np.percentile(cx, 5), np.percentile(cy, 95) - np.percentile(cy, 5))
    side = config.face_scale * size + spread
    centre_x = float(np.median(cx))
    centre_y = float(np.median(cy)) + config.down_shift * size
    src_w, src_h = det.source_size
    side = int(min(side, src_w, src_h)) // 2 * 2
    x0 = int(round(np.clip(centre_x - side / 2, 0, src_w - side)))
    y0 = int(round(np.clip(centre_y - side / 2, 0, src_h - side)))
    return media.Crop(x=x0, y=y0, w=side, h=side)
